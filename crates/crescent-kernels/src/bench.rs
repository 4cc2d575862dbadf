//! Machine roofline probes: streaming read bandwidth and f32 GEMM peak.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

/// Sums a slice of u64 as 4 interleaved sequential streams with 8
/// independent lanes each (vectorises; several streams per core keep more
/// DRAM requests in flight — measured ≈ +20 % over one stream on one core).
fn sum_u64(s: &[u64]) -> u64 {
    let q = s.len() / 4;
    let (a, rest) = s.split_at(q);
    let (b, rest) = rest.split_at(q);
    let (c, d) = rest.split_at(q);
    let mut acc = [0u64; 8];
    for (((x, y), z), w) in a
        .chunks_exact(8)
        .zip(b.chunks_exact(8))
        .zip(c.chunks_exact(8))
        .zip(d.chunks_exact(8))
    {
        for l in 0..8 {
            acc[l] = acc[l]
                .wrapping_add(x[l])
                .wrapping_add(y[l])
                .wrapping_add(z[l])
                .wrapping_add(w[l]);
        }
    }
    // Leftovers (not covered by the 4 × 8-aligned part above).
    let done = (q / 8) * 8;
    let tail = [&a[done..], &b[done..], &c[done..], &d[done..]];
    tail.iter()
        .flat_map(|t| t.iter())
        .chain(acc.iter())
        .fold(0u64, |acc, &v| acc.wrapping_add(v))
}

/// Streaming read bandwidth in GB/s (10⁹ B/s): the best of 20 parallel sums
/// over a 256 MiB buffer (one contiguous slice per rayon thread). The buffer
/// is far larger than any cache, so this is DRAM bandwidth — the roofline
/// for decode-time GEMV. Takes ~0.3 s.
pub fn bandwidth_gb_s() -> f64 {
    const BYTES: usize = 256 << 20;
    let n = BYTES / 8;
    // Written in parallel so pages are faulted in (and first-touched) by the
    // threads that later read them.
    let mut buf = vec![0u64; n];
    let threads = rayon::current_num_threads().max(1);
    let per = n.div_ceil(threads);
    buf.par_chunks_mut(per).enumerate().for_each(|(t, c)| {
        for (i, v) in c.iter_mut().enumerate() {
            *v = (t * per + i) as u64;
        }
    });
    let mut best = f64::INFINITY;
    for _ in 0..20 {
        let t0 = Instant::now();
        let s = buf
            .par_chunks(per)
            .map(sum_u64)
            .reduce(|| 0, u64::wrapping_add);
        black_box(s);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    BYTES as f64 / best / 1e9
}

/// Best f32 GEMM throughput of this crate's kernels in GFLOP/s (2·m·n·k per
/// call), measured on a 2048×2048×2048 `matmul_f32`. Takes ~1 s.
pub fn gemm_peak_gflops() -> f64 {
    let (m, n, k) = (2048, 2048, 2048);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
        .collect();
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i % 89) as f32 - 44.0) / 64.0)
        .collect();
    let mut y = vec![0.0f32; m * n];
    crate::matmul_f32(&x, m, &w, n, k, None, &mut y); // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        crate::matmul_f32(black_box(&x), m, black_box(&w), n, k, None, &mut y);
        black_box(&y);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}
