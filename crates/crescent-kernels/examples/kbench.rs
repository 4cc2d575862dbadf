//! Kernel benchmark: `cargo run --release -p crescent-kernels --example kbench
//! [-- [--dtype bf16|f16|f32|q8|q4] [--paths] [--quick]]`.
//!
//! `q8` / `q4` time the quantized kernels (int8 per channel / int4 groups of
//! 32, weights quantized from random f32); their GB/s counts the quantized
//! bytes read (weights + scales).
//!
//! For each weight shape and row count prints the median (and best) ms per
//! call, GB/s of weight bytes read (weights are read once per call in both
//! paths) and GFLOP/s; then the machine's streaming bandwidth and f32 GEMM
//! peak (each probed before and after the runs, best kept — the machine is
//! shared) and the roofline ratios.
//! Several copies of each weight (≥ 256 MiB in total) are used round-robin
//! so decode timings come from DRAM, not the 32 MiB L3.
//! `--paths` also times the GEMV and GEMM paths separately (threshold tuning).

use std::hint::black_box;
use std::time::Instant;

use crescent_kernels::{
    bandwidth_gb_s, bf16, f16, gemm_peak_gflops, matmul_forced, matmul_q4_forced, matmul_q8_forced,
    quantize_q4, quantize_q8, uses_gemv, Isa, Path, Q4_GROUP,
};

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

struct Res {
    best_ms: f64,
    ms: f64,
    gbs: f64,
    gflops: f64,
}

/// `f(copy, path, x, rows, y)`: one matmul with weight copy `copy`.
type Call<'a> = Box<dyn Fn(usize, Path, &[f32], usize, &mut [f32]) + 'a>;

/// One weight format under test: `copies` matrices `[n, k]`, `bytes` each, and its call.
struct Subject<'a> {
    copies: usize,
    bytes: usize,
    call: Call<'a>,
}

fn time_one(
    s: &Subject<'_>,
    path: Path,
    x: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    y: &mut [f32],
) -> Res {
    let flops = 2.0 * (rows * n * k) as f64;
    let bytes = s.bytes as f64;
    let (x, y) = (&x[..rows * k], &mut y[..rows * n]);
    // Warm-up (also faults in y).
    (s.call)(0, path, x, rows, y);
    // Enough iterations for ~0.25 s, at least 4.
    let t0 = Instant::now();
    (s.call)(1 % s.copies, path, x, rows, y);
    let est = t0.elapsed().as_secs_f64();
    let iters = ((0.25 / est) as usize).clamp(4, 2000);
    // Median time per call (this machine is shared: the median is robust to
    // other processes; the best is printed too).
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters {
        let t0 = Instant::now();
        (s.call)((i + 2) % s.copies, path, black_box(x), rows, y);
        black_box(&y[0]);
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let dt = times[times.len() / 2];
    let best = times[0];
    Res {
        best_ms: best * 1e3,
        ms: dt * 1e3,
        gbs: bytes / dt / 1e9,
        gflops: flops / dt / 1e9,
    }
}

/// Builds the weight copies of one shape for a format.
fn subject<'a>(
    isa: Isa,
    dtype: &str,
    n: usize,
    k: usize,
    seed: &mut u64,
    store: &'a mut Store,
) -> Subject<'a> {
    let elem_bytes = match dtype {
        "f32" => 4.0,
        "q8" => 1.0 + 4.0 / k as f64,
        "q4" => 0.5 + 2.0 / 32.0,
        _ => 2.0,
    };
    let bytes = (n as f64 * k as f64 * elem_bytes) as usize;
    let copies = (256usize << 20).div_ceil(bytes.max(1)).clamp(2, 32);
    let mut gen = |_: usize| -> Vec<f32> { (0..n * k).map(|_| lcg(seed)).collect() };
    match dtype {
        "f32" => {
            store.f32 = (0..copies).map(&mut gen).collect();
            let w = &store.f32;
            Subject {
                copies,
                bytes,
                call: Box::new(move |c, p, x, r, y| {
                    matmul_forced(isa, p, x, r, &w[c], n, k, None, y)
                }),
            }
        }
        "f16" => {
            store.f16 = (0..copies)
                .map(|i| gen(i).into_iter().map(f16::from_f32).collect())
                .collect();
            let w = &store.f16;
            Subject {
                copies,
                bytes,
                call: Box::new(move |c, p, x, r, y| {
                    matmul_forced(isa, p, x, r, &w[c], n, k, None, y)
                }),
            }
        }
        "q8" => {
            store.q8 = (0..copies).map(|i| quantize_q8(&gen(i), n, k)).collect();
            let w = &store.q8;
            Subject {
                copies,
                bytes,
                call: Box::new(move |c, p, x, r, y| {
                    matmul_q8_forced(isa, p, x, r, &w[c].0, &w[c].1, n, k, None, y)
                }),
            }
        }
        "q4" => {
            store.q4 = (0..copies)
                .map(|i| quantize_q4(&gen(i), n, k, Q4_GROUP))
                .collect();
            let w = &store.q4;
            Subject {
                copies,
                bytes,
                call: Box::new(move |c, p, x, r, y| {
                    matmul_q4_forced(isa, p, x, r, &w[c].0, &w[c].1, Q4_GROUP, n, k, None, y)
                }),
            }
        }
        _ => {
            store.bf16 = (0..copies)
                .map(|i| gen(i).into_iter().map(bf16::from_f32).collect())
                .collect();
            let w = &store.bf16;
            Subject {
                copies,
                bytes,
                call: Box::new(move |c, p, x, r, y| {
                    matmul_forced(isa, p, x, r, &w[c], n, k, None, y)
                }),
            }
        }
    }
}

/// Owner of the weight copies of the shape being timed.
#[derive(Default)]
struct Store {
    f32: Vec<Vec<f32>>,
    f16: Vec<Vec<f16>>,
    bf16: Vec<Vec<bf16>>,
    q8: Vec<(Vec<i8>, Vec<f32>)>,
    q4: Vec<(Vec<u8>, Vec<f16>)>,
}

struct Opts {
    paths: bool,
    quick: bool,
    /// Custom (in, out) shape and row list.
    custom: Option<(usize, usize, Vec<usize>)>,
}

fn run(isa: Isa, dtype: &str, o: &Opts) -> Vec<(String, usize, Res)> {
    let (paths, quick) = (o.paths, o.quick);
    let all = vec![1, 4, 16, 64, 729, 2048];
    let default: Vec<(String, usize, usize, Vec<usize>)> = vec![
        ("2048->8192".into(), 2048, 8192, all.clone()),
        ("8192->2048".into(), 8192, 2048, all.clone()),
        ("2048->6144".into(), 2048, 6144, all),
        (
            "1152->4304 (vision)".into(),
            1152,
            4304,
            vec![1, 16, 729, 729 * 13],
        ),
    ];
    let shapes = match &o.custom {
        Some((k, n, rows)) => vec![(format!("{k}->{n}"), *k, *n, rows.clone())],
        None => default,
    };
    let mut seed = 42u64;
    let maxrows = |r: &[usize]| r.iter().copied().max().unwrap_or(0);
    let xlen = shapes
        .iter()
        .map(|s| maxrows(&s.3) * s.1)
        .max()
        .unwrap_or(0);
    let ylen = shapes
        .iter()
        .map(|s| maxrows(&s.3) * s.2)
        .max()
        .unwrap_or(0);
    let x: Vec<f32> = (0..xlen).map(|_| lcg(&mut seed)).collect();
    let mut y = vec![0.0f32; ylen];
    let mut results = Vec::new();
    for (name, k, n, rows_list) in &shapes {
        let (k, n) = (*k, *n);
        let mut store = Store::default();
        let subj = subject(isa, dtype, n, k, &mut seed, &mut store);
        println!(
            "\n{name}: W [{n} x {k}] {dtype} = {:.1} MB ({} copies rotated)",
            subj.bytes as f64 / 1e6,
            subj.copies
        );
        println!(
            "  {:>6} {:>6} {:>10} {:>10} {:>9} {:>9}",
            "rows", "path", "ms/call", "(best)", "GB/s(W)", "GFLOP/s"
        );
        for &rows in rows_list {
            if quick && rows > 729 {
                continue;
            }
            let r = time_one(&subj, Path::Auto, &x, rows, n, k, &mut y);
            let path = if uses_gemv(rows, k) { "gemv" } else { "gemm" };
            println!(
                "  {rows:>6} {path:>6} {:>10.3} {:>10.3} {:>9.2} {:>9.1}",
                r.ms, r.best_ms, r.gbs, r.gflops
            );
            if paths && rows <= 729 {
                for (label, p) in [("gemv", Path::Gemv), ("gemm", Path::Gemm)] {
                    let r = time_one(&subj, p, &x, rows, n, k, &mut y);
                    println!(
                        "    forced {label}: {:>10.3} ms {:>9.2} GB/s {:>9.1} GFLOP/s",
                        r.ms, r.gbs, r.gflops
                    );
                }
            }
            results.push((name.clone(), rows, r));
        }
    }
    results
}

fn probes() -> (f64, f64) {
    let bw = bandwidth_gb_s();
    let peak = gemm_peak_gflops();
    println!("probe: streaming read {bw:.2} GB/s, f32 GEMM 2048^3 {peak:.1} GFLOP/s");
    (bw, peak)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let dtype = arg("--dtype").unwrap_or_else(|| "bf16".into());
    // `--shape IN,OUT --rows R1,R2,..` benchmarks one custom shape.
    let custom = arg("--shape").map(|s| {
        let d: Vec<usize> = s
            .split(',')
            .map(|v| v.parse().expect("--shape IN,OUT"))
            .collect();
        let rows = arg("--rows")
            .unwrap_or_else(|| "1,4,16,64".into())
            .split(',')
            .map(|v| v.parse().expect("--rows R1,R2,.."))
            .collect();
        (d[0], d[1], rows)
    });
    let opts = Opts {
        paths: args.iter().any(|a| a == "--paths"),
        quick: args.iter().any(|a| a == "--quick"),
        custom,
    };
    let skip_probes = args.iter().any(|a| a == "--no-probes");
    let isa = Isa::detect();
    println!(
        "crescent-kernels kbench: isa={} threads={} weights={dtype}",
        isa.name(),
        rayon::current_num_threads()
    );
    let first = if skip_probes {
        (f64::NAN, f64::NAN)
    } else {
        probes()
    };
    let results = run(isa, &dtype, &opts);
    if skip_probes {
        return;
    }
    let last = probes();
    let (bw, peak) = (first.0.max(last.0), first.1.max(last.1));
    println!("\nroofline (best probes): bandwidth {bw:.2} GB/s, f32 GEMM peak {peak:.1} GFLOP/s");
    println!(
        "  {:<22} {:>6} {:>9} {:>9} {:>7} {:>7}",
        "shape", "rows", "GB/s(W)", "GFLOP/s", "%bw", "%peak"
    );
    for (name, rows, r) in &results {
        println!(
            "  {name:<22} {rows:>6} {:>9.2} {:>9.1} {:>6.0}% {:>6.0}%",
            r.gbs,
            r.gflops,
            100.0 * r.gbs / bw,
            100.0 * r.gflops / peak
        );
    }
}
