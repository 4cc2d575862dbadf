//! Small-`rows` (decode) path: weight rows are streamed once per call and
//! reused for every row of x; parallel over chunks of output features.

use rayon::prelude::*;

use crate::util::{div_ceil, ensure_len, round_up, with_call_scratch, SyncPtr};
use crate::weights::{WeightElem, WeightKind};
use crate::Isa;

/// Below this many multiply-adds a call runs on the calling thread only.
const PAR_MIN_MACS: usize = 1 << 17;

/// Re-lays out each row of `x` (row length `k`) so that every full block of
/// 16 becomes `[x0, x2, .., x14, x1, x3, .., x15]` — the lane order in which
/// the AVX2 kernel unpacks 16 bf16 weights. The `k % 16` tail stays in
/// natural order.
pub(crate) fn deinterleave_x(x: &[f32], k: usize, dst: &mut [f32]) {
    debug_assert_eq!(x.len(), dst.len());
    if k == 0 {
        return;
    }
    let k16 = k & !15;
    for (src, d) in x.chunks_exact(k).zip(dst.chunks_exact_mut(k)) {
        for (sb, db) in src[..k16]
            .chunks_exact(16)
            .zip(d[..k16].chunks_exact_mut(16))
        {
            for i in 0..8 {
                db[i] = sb[2 * i];
                db[8 + i] = sb[2 * i + 1];
            }
        }
        d[k16..].copy_from_slice(&src[k16..]);
    }
}

/// `y[rows, n] = x[rows, k] · w[n, k]ᵀ (+ bias)`; arguments already validated.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv<W: WeightElem>(
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: &[W],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let yp = SyncPtr(y.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && rows > 1 && W::KIND == WeightKind::Bf16 {
        // Several rows (batched decode): the zmm kernel (the AVX2 one is compute-bound there).
        // SAFETY: `WeightElem` is sealed and only `half::bf16` has `KIND == Bf16`: same type.
        let wb = unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<half::bf16>(), w.len()) };
        with_call_scratch(|buf| {
            let d = ensure_len(buf, x.len());
            crate::x86::deinterleave_x32(x, k, d);
            let d = &*d;
            par_outputs(rows, n, k, |o0, o1| {
                // SAFETY: `Isa::Avx512` implies AVX-512F and the AVX2 set were detected; lengths
                // validated by `matmul_forced`; `d` is `x` laid out for this kernel; tasks get
                // disjoint `o0..o1`, and `y` outlives the parallel section.
                unsafe { crate::x86::gemv_range_avx512(d, rows, wb, None, k, n, o0, o1, bias, yp) }
            });
        });
        return;
    }
    let deint = isa.has_avx2() && W::KIND == WeightKind::Bf16;
    with_call_scratch(|buf| {
        let xp: &[f32] = if deint {
            let d = ensure_len(buf, x.len());
            deinterleave_x(x, k, d);
            d
        } else {
            x
        };
        let run = |o0: usize, o1: usize| match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2Fma` / `Avx512` imply the CPU features were detected;
            // lengths were validated by `matmul_forced` (x: rows*k, w: n*k,
            // y: rows*n, bias: n) and `xp` has the layout `load16::<W>`
            // expects (de-interleaved exactly when W is bf16); tasks get
            // disjoint `o0..o1` ranges, and `y` outlives the parallel section.
            Isa::Avx2Fma | Isa::Avx512 => unsafe {
                crate::x86::gemv_range::<W>(xp, rows, w, k, n, o0, o1, bias, yp)
            },
            _ => crate::portable::gemv_range::<W>(xp, rows, w, k, n, o0, o1, bias, yp),
        };
        par_outputs(rows, n, k, run);
    });
}

/// Runs `run(o0, o1)` over disjoint ranges of the `n` output features covering `0..n`: on the
/// calling thread for small calls, else as rayon tasks of multiples of 8 features.
pub(crate) fn par_outputs(rows: usize, n: usize, k: usize, run: impl Fn(usize, usize) + Sync) {
    let threads = rayon::current_num_threads();
    if threads <= 1 || rows.saturating_mul(n).saturating_mul(k) < PAR_MIN_MACS || n < 8 {
        run(0, n);
        return;
    }
    // ~8 tasks per thread (load balance under work stealing; 1..64 per
    // thread measured the same on an idle machine), multiples of 8 output
    // rows (whole 4-row kernel blocks), 8..512 rows each.
    let chunk = round_up(div_ceil(n, threads * 8), 8).clamp(8, 512);
    let tasks = div_ceil(n, chunk);
    (0..tasks)
        .into_par_iter()
        .for_each(|t| run(t * chunk, ((t + 1) * chunk).min(n)));
}
