//! Portable kernels (any CPU): plain Rust written so that LLVM can
//! auto-vectorise it for the baseline target (independent lane
//! accumulators, no reassociation needed).

use crate::util::{ensure_len, with_scratch, SyncPtr};
use crate::weights::WeightElem;

const LANES: usize = 16;

/// Dot product with 16 independent partial sums (vectorisable).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += xa[l] * xb[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (p, q) in ta.iter().zip(tb) {
        s += p * q;
    }
    s
}

/// Portable counterpart of `x86::gemv_range`: each weight row is converted
/// to f32 once (into a per-thread buffer) and dotted with every row of x.
///
/// Requirements as for `x86::gemv_range` (minus the CPU features; `x` in
/// natural layout).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_range<W: WeightElem>(
    x: &[f32],
    rows: usize,
    w: &[W],
    k: usize,
    n: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    y: SyncPtr,
) {
    with_scratch(|s| {
        let t = ensure_len(&mut s.t, k);
        for o in o0..o1 {
            W::convert_slice(&w[o * k..(o + 1) * k], t);
            let b = bias.map_or(0.0, |b| b[o]);
            for r in 0..rows {
                let v = dot(&x[r * k..(r + 1) * k], t) + b;
                // SAFETY: `r < rows`, `o < o1 <= n`, so the index is inside
                // the caller's live `rows * n` output buffer; this task is the
                // only writer of column `o` (disjoint column ranges per task).
                unsafe { *y.0.add(r * n + o) = v };
            }
        }
    });
}

/// Portable 6×16 micro-kernel, same contract as `x86::kernel_6x16` but on
/// slices: `a.len() >= kc*6`, `b.len() >= kc*16`; `c` as there.
///
/// # Safety
/// `c` must be valid for reads and writes of 6 rows × 16 floats with stride
/// `ldc` and not accessed concurrently by another thread.
#[allow(clippy::needless_range_loop)]
pub(crate) unsafe fn kernel_6x16(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    init: bool,
    bias: Option<&[f32]>,
) {
    let mut acc = [[0.0f32; 16]; 6];
    if init {
        if let Some(bias) = bias {
            for row in acc.iter_mut() {
                row.copy_from_slice(&bias[..16]);
            }
        }
    } else {
        for i in 0..6 {
            for j in 0..16 {
                acc[i][j] = *c.add(i * ldc + j);
            }
        }
    }
    for (ak, bk) in a[..kc * 6]
        .chunks_exact(6)
        .zip(b[..kc * 16].chunks_exact(16))
    {
        for i in 0..6 {
            let ai = ak[i];
            for j in 0..16 {
                acc[i][j] += ai * bk[j];
            }
        }
    }
    for i in 0..6 {
        for j in 0..16 {
            *c.add(i * ldc + j) = acc[i][j];
        }
    }
}
