//! Element-wise and row kernels for everything around the matmuls: GELU (tanh and erf forms),
//! GeGLU, softmax, LayerNorm, dot products and weighted row sums (decode attention).
//!
//! Each kernel is plain Rust written in 16-lane blocks without libm calls (exp and erf are
//! polynomial), compiled three times — AVX-512F, AVX2 + FMA, and the portable baseline — and
//! dispatched on [`Isa::detect`]. All three run the same operations in the same order (no
//! fused multiply-adds), so results are identical across ISAs. Accuracy (tested against f64):
//! exp ≤ 2 ulp over the clamped range, erf ≤ 5e-7 absolute, GELU within f32 rounding of the
//! exact formulas. Large buffers are split over rayon's pool.

use rayon::prelude::*;

use half::f16;

use crate::Isa;

/// Lanes per block: one zmm or two ymm registers.
const L: usize = 16;
/// Element-wise maps over at least this many elements run in parallel.
const PAR_MIN: usize = 1 << 16;

/// Compiles `$body` (a generic `#[inline(always)]` function call) for each ISA and dispatches.
macro_rules! dispatch {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? => $impl:ident) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v512($($a: $t),*) $(-> $r)? { $impl($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($a: $t),*) $(-> $r)? { $impl($($a),*) }
                match Isa::detect() {
                    // SAFETY: `Isa::detect` only reports levels whose features this CPU has.
                    Isa::Avx512 => return unsafe { v512($($a),*) },
                    // SAFETY: as above.
                    Isa::Avx2Fma => return unsafe { v256($($a),*) },
                    Isa::Portable => {}
                }
            }
            $impl($($a),*)
        }
    };
}

/// `eˣ` (Cephes-style: 2ⁿ · polynomial of the reduced argument; inputs clamped to
/// [-87.3, 88.3], NaN stays NaN).
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding and subtracting rounds to the nearest integer (no SSE4.1 needed).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    e * scale
}

/// `erf(x)` (rational minimax approximation on [-4, 4], ±1 outside; as in Eigen / XLA).
#[inline(always)]
fn erf_lane(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    p *= x;
    let mut q = -1.456_607_2e-5;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_3e-3;
    q = q * x2 + -1.426_473_9e-2;
    p / q
}

/// PyTorch `gelu(x, approximate="tanh")` = `0.5·x·(1 + tanh(u))` = `x / (1 + e^(−2u))`,
/// `u = √(2/π)·(x + 0.044715·x³)`.
#[inline(always)]
fn gelu_tanh_lane(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    let u = C * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_lane(-2.0 * u))
}

/// PyTorch `gelu(x)` = `0.5·x·(1 + erf(x/√2))`.
#[inline(always)]
fn gelu_erf_lane(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_lane(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn map_impl(x: &mut [f32], f: fn(f32) -> f32) {
    for v in x.iter_mut() {
        *v = f(*v);
    }
}

#[inline(always)]
fn gelu_tanh_impl(x: &mut [f32]) {
    map_impl(x, gelu_tanh_lane)
}

#[inline(always)]
fn gelu_erf_impl(x: &mut [f32]) {
    map_impl(x, gelu_erf_lane)
}

#[inline(always)]
fn exp_impl(x: &mut [f32]) {
    map_impl(x, exp_lane)
}

dispatch!(fn gelu_tanh_serial(x: &mut [f32]) => gelu_tanh_impl);
dispatch!(fn gelu_erf_serial(x: &mut [f32]) => gelu_erf_impl);
dispatch!(
    /// `x ← eˣ` element-wise (see the module doc for accuracy).
    fn exp_inplace(x: &mut [f32]) => exp_impl
);

fn par_map(x: &mut [f32], f: fn(&mut [f32])) {
    if x.len() >= PAR_MIN && rayon::current_num_threads() > 1 {
        x.par_chunks_mut(PAR_MIN / 4).for_each(f);
    } else {
        f(x)
    }
}

/// `x ← gelu_tanh(x)` element-wise (PyTorch `approximate="tanh"`).
pub fn gelu_tanh(x: &mut [f32]) {
    par_map(x, gelu_tanh_serial)
}

/// `x ← gelu(x)` element-wise (exact erf form, PyTorch's default).
pub fn gelu_erf(x: &mut [f32]) {
    par_map(x, gelu_erf_serial)
}

#[inline(always)]
fn geglu_impl(u: &[f32], inner: usize, out: &mut [f32]) {
    for (row, o) in u.chunks_exact(2 * inner).zip(out.chunks_exact_mut(inner)) {
        let (a, g) = row.split_at(inner);
        for ((ov, &av), &gv) in o.iter_mut().zip(a).zip(g) {
            *ov = gelu_erf_lane(av) * (gv + 1.0);
        }
    }
}

dispatch!(fn geglu_serial(u: &[f32], inner: usize, out: &mut [f32]) => geglu_impl);

/// Moondream's GeGLU: for each row of `u` `[rows, 2·inner]` (`a` then `g`),
/// `out[rows, inner] = gelu_erf(a) · (g + 1)`.
///
/// # Panics
/// If `u` is not `2·inner` wide or `out` does not have `inner` columns for each row.
pub fn geglu(u: &[f32], inner: usize, out: &mut [f32]) {
    assert!(inner > 0 && u.len().is_multiple_of(2 * inner) && out.len() * 2 == u.len());
    let rows = out.len() / inner;
    if u.len() >= PAR_MIN && rows > 1 && rayon::current_num_threads() > 1 {
        let per = (PAR_MIN / 4 / inner).max(1);
        u.par_chunks(2 * inner * per)
            .zip(out.par_chunks_mut(inner * per))
            .for_each(|(u, o)| geglu_serial(u, inner, o));
    } else {
        geglu_serial(u, inner, out)
    }
}

/// Sum in 16 interleaved partial sums (vectorisable; fixed order).
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let mut ch = x.chunks_exact(L);
    for c in &mut ch {
        for i in 0..L {
            acc[i] += c[i];
        }
    }
    for (i, v) in ch.remainder().iter().enumerate() {
        acc[i] += v;
    }
    fold(acc)
}

#[inline(always)]
fn fold(acc: [f32; L]) -> f32 {
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = acc[i] + acc[i + 8];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// Element types the row kernels read (cached keys / values: f32, or f16 widened exactly).
pub(crate) trait Row: Copy {
    /// The value as f32 (exact).
    fn get(self) -> f32;
    /// 8 consecutive values as f32.
    ///
    /// # Safety
    /// `p .. p + 8` readable; AVX2 + F16C available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> core::arch::x86_64::__m256;
    /// 16 consecutive values as f32.
    ///
    /// # Safety
    /// `p .. p + 16` readable; AVX-512F available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> core::arch::x86_64::__m512;
}

impl Row for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> core::arch::x86_64::__m256 {
        core::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> core::arch::x86_64::__m512 {
        core::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl Row for f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> core::arch::x86_64::__m256 {
        use core::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> core::arch::x86_64::__m512 {
        use core::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast::<__m256i>()))
    }
}

#[inline(always)]
fn dot_impl<R: Row>(a: &[f32], b: &[R]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; L];
    let mut ca = a.chunks_exact(L);
    let mut cb = b.chunks_exact(L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..L {
            acc[i] += x[i] * y[i].get();
        }
    }
    for (i, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[i] += x * y.get();
    }
    fold(acc)
}

dispatch!(
    /// `Σ a[i]·b[i]` over the shorter length, in 16 partial sums.
    fn dot(a: &[f32], b: &[f32]) -> f32 => dot_impl
);

#[inline(always)]
fn dot_rows_impl<R: Row>(q: &[f32], rows: &[R], scale: f32, out: &mut [f32]) {
    let d = q.len();
    for (o, r) in out.iter_mut().zip(rows.chunks_exact(d)) {
        *o = dot_impl(q, r) * scale;
    }
}

#[inline(always)]
fn axpy_rows_impl<R: Row>(w: &[f32], rows: &[R], out: &mut [f32]) {
    let d = out.len();
    for (&ws, r) in w.iter().zip(rows.chunks_exact(d)) {
        for (o, v) in out.iter_mut().zip(r) {
            *o += ws * v.get();
        }
    }
}

/// `out[s] = scale · (q · rows[s])` for each `q.len()`-wide row of `rows` (attention scores
/// of one query against a run of cached keys). Same summation order as [`dot`] on every ISA.
pub fn dot_rows(q: &[f32], rows: &[f32], scale: f32, out: &mut [f32]) {
    dot_rows_generic(q, rows, scale, out)
}

/// [`dot_rows`] over f16 rows (an f16 KV cache): each key is widened to f32 exactly, then the
/// same arithmetic in the same order as [`dot_rows`], so results equal `dot_rows` on the
/// widened keys, on every ISA.
pub fn dot_rows_f16(q: &[f32], rows: &[f16], scale: f32, out: &mut [f32]) {
    dot_rows_generic(q, rows, scale, out)
}

/// `out += Σ_s w[s] · rows[s]` for each `out.len()`-wide row of `rows` (attention's weighted
/// sum of a run of cached values). Same results on every ISA.
pub fn axpy_rows(w: &[f32], rows: &[f32], out: &mut [f32]) {
    axpy_rows_generic(w, rows, out)
}

/// [`axpy_rows`] over f16 rows (an f16 KV cache's values), widened exactly; same results as
/// `axpy_rows` on the widened values, on every ISA.
pub fn axpy_rows_f16(w: &[f32], rows: &[f16], out: &mut [f32]) {
    axpy_rows_generic(w, rows, out)
}

fn dot_rows_generic<R: Row>(q: &[f32], rows: &[R], scale: f32, out: &mut [f32]) {
    let d = q.len();
    assert!(d > 0 && rows.len() >= out.len() * d);
    #[cfg(target_arch = "x86_64")]
    if Isa::detect().has_avx2() {
        // SAFETY: AVX2 + F16C were detected (`Isa::Avx2Fma` and up), AVX-512F too for the zmm
        // kernel; `rows` holds `out.len()` rows of `d` elements (asserted).
        unsafe {
            if Isa::detect() == Isa::Avx512 {
                x86::dot_rows_512(q, rows, scale, out)
            } else {
                x86::dot_rows(q, rows, scale, out)
            }
        };
        return;
    }
    dot_rows_impl(q, rows, scale, out)
}

fn axpy_rows_generic<R: Row>(w: &[f32], rows: &[R], out: &mut [f32]) {
    let d = out.len();
    assert!(d > 0 && rows.len() >= w.len() * d);
    #[cfg(target_arch = "x86_64")]
    if Isa::detect().has_avx2() {
        // SAFETY: AVX2 + F16C were detected; `rows` holds `w.len()` rows of `d` elements
        // (asserted).
        unsafe { x86::axpy_rows(w, rows, out) };
        return;
    }
    axpy_rows_impl(w, rows, out)
}

/// AVX2 versions of the row kernels (LLVM's auto-vectoriser produced 2-lane code for the
/// generic `dot_rows`: 10 GB/s of keys). Unfused multiply + add in the generic code's lane
/// order, so results are bit-identical to it.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Row;

    /// # Safety
    /// AVX2 + F16C available; `rows.len() >= out.len() * q.len()`.
    #[inline(always)]
    unsafe fn dot_rows_any<R: Row>(q: &[f32], rows: &[R], scale: f32, out: &mut [f32]) {
        let d = q.len();
        let d16 = d & !15;
        let qp = q.as_ptr();
        for (s, o) in out.iter_mut().enumerate() {
            let rp = rows.as_ptr().add(s * d);
            let mut a0 = _mm256_setzero_ps();
            let mut a1 = _mm256_setzero_ps();
            let mut i = 0;
            while i < d16 {
                a0 = _mm256_add_ps(
                    a0,
                    _mm256_mul_ps(_mm256_loadu_ps(qp.add(i)), R::load8(rp.add(i))),
                );
                a1 = _mm256_add_ps(
                    a1,
                    _mm256_mul_ps(_mm256_loadu_ps(qp.add(i + 8)), R::load8(rp.add(i + 8))),
                );
                i += 16;
            }
            let sum = if d16 == d {
                // fold(): lanes i + (i+8), then j + (j+4), then (0+2) + (1+3).
                let h = _mm256_add_ps(a0, a1);
                let qv = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
                let t = _mm_add_ps(qv, _mm_movehl_ps(qv, qv));
                _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)))
            } else {
                let mut acc = [0f32; 16];
                _mm256_storeu_ps(acc.as_mut_ptr(), a0);
                _mm256_storeu_ps(acc.as_mut_ptr().add(8), a1);
                for (j, a) in acc[..d - d16].iter_mut().enumerate() {
                    *a += *qp.add(d16 + j) * (*rp.add(d16 + j)).get();
                }
                super::fold(acc)
            };
            *o = sum * scale;
        }
    }

    /// `out` is kept in registers 32 columns at a time while every row is added (one load and
    /// one store of `out` per call instead of per row). Each element still takes its rows in
    /// order with an unfused multiply and add, so results equal the generic code's.
    ///
    /// # Safety
    /// AVX2 + F16C available; `rows.len() >= w.len() * out.len()`.
    #[inline(always)]
    unsafe fn axpy_rows_any<R: Row>(w: &[f32], rows: &[R], out: &mut [f32]) {
        let d = out.len();
        let op = out.as_mut_ptr();
        let rp = rows.as_ptr();
        let mut c = 0;
        while c + 32 <= d {
            let mut a0 = _mm256_loadu_ps(op.add(c));
            let mut a1 = _mm256_loadu_ps(op.add(c + 8));
            let mut a2 = _mm256_loadu_ps(op.add(c + 16));
            let mut a3 = _mm256_loadu_ps(op.add(c + 24));
            for (s, &ws) in w.iter().enumerate() {
                let wv = _mm256_set1_ps(ws);
                let r = rp.add(s * d + c);
                a0 = _mm256_add_ps(a0, _mm256_mul_ps(wv, R::load8(r)));
                a1 = _mm256_add_ps(a1, _mm256_mul_ps(wv, R::load8(r.add(8))));
                a2 = _mm256_add_ps(a2, _mm256_mul_ps(wv, R::load8(r.add(16))));
                a3 = _mm256_add_ps(a3, _mm256_mul_ps(wv, R::load8(r.add(24))));
            }
            _mm256_storeu_ps(op.add(c), a0);
            _mm256_storeu_ps(op.add(c + 8), a1);
            _mm256_storeu_ps(op.add(c + 16), a2);
            _mm256_storeu_ps(op.add(c + 24), a3);
            c += 32;
        }
        while c + 8 <= d {
            let mut a0 = _mm256_loadu_ps(op.add(c));
            for (s, &ws) in w.iter().enumerate() {
                a0 = _mm256_add_ps(
                    a0,
                    _mm256_mul_ps(_mm256_set1_ps(ws), R::load8(rp.add(s * d + c))),
                );
            }
            _mm256_storeu_ps(op.add(c), a0);
            c += 8;
        }
        for j in c..d {
            let mut a = *op.add(j);
            for (s, &ws) in w.iter().enumerate() {
                a += ws * (*rp.add(s * d + j)).get();
            }
            *op.add(j) = a;
        }
    }

    /// [`dot_rows_any`] for AVX-512 (`R` = f32 or f16), 16 rows at a time when `d % 16 == 0`:
    /// each row's 16 lane sums are accumulated in one zmm exactly as the generic code's 16
    /// partial sums, then the 16 rows are folded together by a transpose network that adds
    /// the same pairs in the same order as `fold` (lanes i + (i+8), then j + (j+4), then
    /// (0+2) + (1+3)) — a horizontal sum per 16 rows instead of one per row. Bit-identical
    /// to the generic code; other head sizes and the last `n % 16` rows take the AVX2 loop.
    ///
    /// # Safety
    /// AVX-512F + AVX2 + F16C available; `rows.len() >= out.len() * q.len()`.
    #[target_feature(enable = "avx512f,avx2,f16c")]
    pub(super) unsafe fn dot_rows_512<R: Row>(q: &[f32], rows: &[R], scale: f32, out: &mut [f32]) {
        let d = q.len();
        // Head sizes as compile-time block counts, so the 16 accumulators stay in registers.
        let n16 = match d {
            64 => dot16::<R, 4>(q, rows, scale, out),
            128 => dot16::<R, 8>(q, rows, scale, out),
            32 => dot16::<R, 2>(q, rows, scale, out),
            16 => dot16::<R, 1>(q, rows, scale, out),
            80 => dot16::<R, 5>(q, rows, scale, out),
            _ => 0,
        };
        dot_rows_any(q, &rows[n16 * d..], scale, &mut out[n16..]);
    }

    /// The 16-row blocks of [`dot_rows_512`] for `d = 16·B`; returns the rows done.
    ///
    /// # Safety
    /// As [`dot_rows_512`], and `q.len() == 16 * B`.
    #[inline(always)]
    unsafe fn dot16<R: Row, const B: usize>(
        q: &[f32],
        rows: &[R],
        scale: f32,
        out: &mut [f32],
    ) -> usize {
        let d = 16 * B;
        let n16 = out.len() / 16 * 16;
        let mut qv = [_mm512_setzero_ps(); B];
        for (j, v) in qv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(q.as_ptr().add(16 * j));
        }
        // Output lane e of the network holds row ORDER[e] (an involution).
        let order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
        let sv = _mm512_set1_ps(scale);
        let mut r0 = 0;
        while r0 < n16 {
            let mut acc = [_mm512_setzero_ps(); 16];
            for (r, a) in acc.iter_mut().enumerate() {
                let rp = rows.as_ptr().add((r0 + r) * d);
                for (j, qj) in qv.iter().enumerate() {
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(*qj, R::load16(rp.add(16 * j))));
                }
            }
            // h[i] = acc[i] + acc[i+8]: rows r and r+8 → [h_r | h_{r+8}].
            let mut s1 = [_mm512_setzero_ps(); 8];
            for (r, v) in s1.iter_mut().enumerate() {
                let a = _mm512_shuffle_f32x4::<0b01_00_01_00>(acc[r], acc[r + 8]);
                let b = _mm512_shuffle_f32x4::<0b11_10_11_10>(acc[r], acc[r + 8]);
                *v = _mm512_add_ps(a, b);
            }
            // q[i] = h[i] + h[i+4]: → [q_r | q_{r+8} | q_{r+4} | q_{r+12}].
            let mut s2 = [_mm512_setzero_ps(); 4];
            for (r, v) in s2.iter_mut().enumerate() {
                let c = _mm512_shuffle_f32x4::<0b10_00_10_00>(s1[r], s1[r + 4]);
                let e = _mm512_shuffle_f32x4::<0b11_01_11_01>(s1[r], s1[r + 4]);
                *v = _mm512_add_ps(c, e);
            }
            // t = (q0 + q2, q1 + q3) of two rows per 128-bit lane.
            let t = |a: __m512, b: __m512| {
                let p = _mm512_shuffle_ps::<0b01_00_01_00>(a, b);
                let q = _mm512_shuffle_ps::<0b11_10_11_10>(a, b);
                _mm512_add_ps(p, q)
            };
            let s3a = t(s2[0], s2[2]);
            let s3b = t(s2[1], s2[3]);
            // t0 + t1 of four rows per 128-bit lane.
            let p = _mm512_shuffle_ps::<0b10_00_10_00>(s3a, s3b);
            let e = _mm512_shuffle_ps::<0b11_01_11_01>(s3a, s3b);
            let f = _mm512_permutexvar_ps(order, _mm512_add_ps(p, e));
            _mm512_storeu_ps(out.as_mut_ptr().add(r0), _mm512_mul_ps(f, sv));
            r0 += 16;
        }
        n16
    }

    /// # Safety
    /// AVX2 + F16C available; `rows.len() >= out.len() * q.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dot_rows<R: Row>(q: &[f32], rows: &[R], scale: f32, out: &mut [f32]) {
        dot_rows_any(q, rows, scale, out)
    }

    /// # Safety
    /// AVX2 + F16C available; `rows.len() >= w.len() * out.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn axpy_rows<R: Row>(w: &[f32], rows: &[R], out: &mut [f32]) {
        axpy_rows_any(w, rows, out)
    }
}

#[inline(always)]
fn softmax_impl(x: &mut [f32], scale: f32) {
    let mut mx = [f32::NEG_INFINITY; L];
    let mut ch = x.chunks_exact_mut(L);
    for c in &mut ch {
        for i in 0..L {
            c[i] *= scale;
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
        }
    }
    for (i, v) in ch.into_remainder().iter_mut().enumerate() {
        *v *= scale;
        mx[i] = if *v > mx[i] { *v } else { mx[i] };
    }
    let m = mx
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for v in x.iter_mut() {
        *v = exp_lane(*v - m);
    }
    let inv = 1.0 / sum_lanes(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

dispatch!(
    /// `x ← softmax(scale · x)` over the whole slice (max-subtracted, f32).
    fn softmax_scaled(x: &mut [f32], scale: f32) => softmax_impl
);

#[inline(always)]
fn softmax_partial_impl(x: &mut [f32]) -> (f32, f32) {
    let mut mx = [f32::NEG_INFINITY; L];
    let mut ch = x.chunks_exact(L);
    for c in &mut ch {
        for i in 0..L {
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
        }
    }
    for (i, v) in ch.remainder().iter().enumerate() {
        mx[i] = if *v > mx[i] { *v } else { mx[i] };
    }
    let m = mx
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for v in x.iter_mut() {
        *v = exp_lane(*v - m);
    }
    (m, sum_lanes(x))
}

dispatch!(
    /// Unnormalised softmax of a partial row: `x ← e^(x − max)`, returning `(max, Σ)` (for
    /// merging softmax states of key ranges, as in flash attention).
    fn softmax_partial(x: &mut [f32]) -> (f32, f32) => softmax_partial_impl
);

#[inline(always)]
fn layer_norm_impl(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let n = d as f32;
        let mean = sum_lanes(row) / n;
        let mut acc = [0f32; L];
        let mut ch = row.chunks_exact(L);
        for c in &mut ch {
            for i in 0..L {
                let t = c[i] - mean;
                acc[i] += t * t;
            }
        }
        for (i, v) in ch.remainder().iter().enumerate() {
            acc[i] += (v - mean) * (v - mean);
        }
        let var = fold(acc) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (((ov, &xv), &wv), &bv) in o.iter_mut().zip(row).zip(w).zip(b) {
            *ov = (xv - mean) * inv * wv + bv;
        }
    }
}

dispatch!(fn layer_norm_serial(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) => layer_norm_impl);

/// LayerNorm of each `w.len()`-wide row of `x` into `out` (mean, biased variance, two passes;
/// `(x − mean) / √(var + eps) · w + b`). Rows run in parallel when there are many.
///
/// # Panics
/// If `b`, `x` or `out` do not match the width `w.len()`.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert!(d > 0 && b.len() == d && x.len() == out.len() && x.len().is_multiple_of(d));
    if x.len() >= PAR_MIN && rayon::current_num_threads() > 1 {
        let per = (PAR_MIN / 4 / d).max(1) * d;
        x.par_chunks(per)
            .zip(out.par_chunks_mut(per))
            .for_each(|(x, o)| layer_norm_serial(x, w, b, eps, o));
    } else {
        layer_norm_serial(x, w, b, eps, out)
    }
}

#[inline(always)]
fn add_impl(y: &mut [f32], x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

dispatch!(
    /// `y += x` element-wise (over the shorter length).
    fn add_assign(y: &mut [f32], x: &[f32]) => add_impl
);

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in f64 by its Maclaurin series (|x| ≤ 4: terms shrink fast enough in f64).
    fn erf64(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        loop {
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() < 1e-17 * sum.abs().max(1e-300) {
                break;
            }
            n += 1.0;
            term *= -x * x / n;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn grid() -> Vec<f32> {
        (-12000..=12000).map(|i| i as f32 * 1e-3).collect()
    }

    #[test]
    fn exp_matches_f64() {
        let mut worst = 0f64;
        for i in -8700..=8830 {
            let x = i as f32 * 0.01;
            let mut v = [x];
            exp_inplace(&mut v);
            let want = (x as f64).exp();
            worst = worst.max((v[0] as f64 - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "exp relative error {worst}");
        let mut v = [f32::NAN, f32::NEG_INFINITY, -1000.0];
        exp_inplace(&mut v);
        assert!(v[0].is_nan() && v[1] < 1e-37 && v[2] < 1e-37);
    }

    #[test]
    fn erf_and_gelu_match_f64() {
        let xs = grid();
        let mut worst_erf = 0f64;
        for &x in xs.iter().filter(|x| x.abs() <= 4.0) {
            worst_erf = worst_erf.max((erf_lane(x) as f64 - erf64(x as f64)).abs());
        }
        assert!(worst_erf < 5e-7, "erf abs error {worst_erf}");
        let mut ge = xs.clone();
        gelu_erf(&mut ge);
        let mut gt = xs.clone();
        gelu_tanh(&mut gt);
        for ((&x, &e), &t) in xs.iter().zip(&ge).zip(&gt) {
            let x64 = x as f64;
            let z = x64 / 2f64.sqrt();
            // erf(±4) = ±(1 − 1.5e-8): beyond it ±1 is exact enough.
            let erf_z = if z.abs() <= 4.0 { erf64(z) } else { z.signum() };
            let want_e = 0.5 * x64 * (1.0 + erf_z);
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3));
            let want_t = 0.5 * x64 * (1.0 + u.tanh());
            let tol = 4e-7 * x64.abs().max(1.0);
            assert!(
                (e as f64 - want_e).abs() < tol,
                "gelu_erf({x}) = {e}, want {want_e}"
            );
            assert!(
                (t as f64 - want_t).abs() < tol,
                "gelu_tanh({x}) = {t}, want {want_t}"
            );
        }
        let mut v = [f32::NAN];
        gelu_tanh(&mut v);
        assert!(v[0].is_nan());
    }

    #[test]
    fn isas_agree_bitwise() {
        // Same operation order everywhere: the portable build equals the dispatched one.
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 2001) as f32 * 3e-3 - 3.0)
            .collect();
        let mut a = xs.clone();
        gelu_erf(&mut a);
        let mut b = xs.clone();
        gelu_erf_impl(&mut b);
        assert_eq!(a, b);
        for d in [64, 72, 5] {
            let q = &xs[..d];
            let rows = &xs[100..100 + 9 * d];
            let (mut a, mut b) = (vec![0f32; 9], vec![0f32; 9]);
            dot_rows(q, rows, 0.3, &mut a);
            dot_rows_impl(q, rows, 0.3, &mut b);
            assert_eq!(a, b, "dot_rows d={d}");
            let (mut a, mut b) = (q.to_vec(), q.to_vec());
            axpy_rows(&xs[500..509], rows, &mut a);
            axpy_rows_impl(&xs[500..509], rows, &mut b);
            assert_eq!(a, b, "axpy_rows d={d}");
            // f16 rows: dispatched = generic = the f32 kernels on the widened rows.
            let rh: Vec<f16> = rows.iter().map(|&v| f16::from_f32(v)).collect();
            let rw: Vec<f32> = rh.iter().map(|v| v.to_f32()).collect();
            let (mut a, mut b, mut c) = (vec![0f32; 9], vec![0f32; 9], vec![0f32; 9]);
            dot_rows_f16(q, &rh, 0.3, &mut a);
            dot_rows_impl(q, &rh, 0.3, &mut b);
            dot_rows(q, &rw, 0.3, &mut c);
            assert_eq!(a, b, "dot_rows_f16 d={d}");
            assert_eq!(a, c, "dot_rows_f16 vs f32 d={d}");
            let (mut a, mut b, mut c) = (q.to_vec(), q.to_vec(), q.to_vec());
            axpy_rows_f16(&xs[500..509], &rh, &mut a);
            axpy_rows_impl(&xs[500..509], &rh, &mut b);
            axpy_rows(&xs[500..509], &rw, &mut c);
            assert_eq!(a, b, "axpy_rows_f16 d={d}");
            assert_eq!(a, c, "axpy_rows_f16 vs f32 d={d}");
        }
        let mut a = xs.clone();
        softmax_scaled(&mut a, 0.7);
        let mut b = xs.clone();
        softmax_impl(&mut b, 0.7);
        assert_eq!(a, b);
        // Enough rows for the 16-row AVX-512 dot kernel and its remainder.
        for d in [64, 80, 16, 24] {
            let n = 37;
            let q = &xs[..d];
            let rows: Vec<f32> = (0..n * d)
                .map(|i| ((i * 104_729) % 2003) as f32 * 1e-3 - 1.0)
                .collect();
            let rh: Vec<f16> = rows.iter().map(|&v| f16::from_f32(v)).collect();
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            dot_rows(q, &rows, 0.3, &mut a);
            dot_rows_impl(q, &rows, 0.3, &mut b);
            assert_eq!(a, b, "dot_rows n={n} d={d}");
            dot_rows_f16(q, &rh, 0.3, &mut a);
            dot_rows_impl(q, &rh, 0.3, &mut b);
            assert_eq!(a, b, "dot_rows_f16 n={n} d={d}");
        }
    }

    #[test]
    fn rows_kernels_match_scalar() {
        let d = 72;
        let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let rows: Vec<f32> = (0..d * 37).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut s = vec![0f32; 37];
        dot_rows(&q, &rows, 0.5, &mut s);
        for (j, v) in s.iter().enumerate() {
            let want: f64 = (0..d)
                .map(|i| q[i] as f64 * rows[j * d + i] as f64)
                .sum::<f64>()
                * 0.5;
            assert!((*v as f64 - want).abs() < 1e-5, "{v} vs {want}");
        }
        // Partial softmax state, normalised, equals the softmax.
        let mut p = s.clone();
        let (m, l) = softmax_partial(&mut p);
        assert_eq!(m, s.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let mut full = s.clone();
        softmax_scaled(&mut full, 1.0);
        for (a, b) in p.iter().zip(&full) {
            assert!((a / l - b).abs() < 1e-6);
        }
        softmax_scaled(&mut s, 2.0);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut o = vec![1f32; d];
        axpy_rows(&s, &rows, &mut o);
        for (i, v) in o.iter().enumerate() {
            let want: f64 = 1.0
                + (0..37)
                    .map(|j| s[j] as f64 * rows[j * d + i] as f64)
                    .sum::<f64>();
            assert!((*v as f64 - want).abs() < 1e-5);
        }
        // LayerNorm against the textbook two-pass formula in f64.
        let w: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..d).map(|i| i as f32 * -0.02).collect();
        let mut out = vec![0f32; rows.len()];
        layer_norm(&rows, &w, &b, 1e-5, &mut out);
        for (r, o) in rows.chunks(d).zip(out.chunks(d)) {
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            for i in 0..d {
                let want = (r[i] as f64 - mean) / (var + 1e-5).sqrt() * w[i] as f64 + b[i] as f64;
                assert!((o[i] as f64 - want).abs() < 2e-5, "{} vs {want}", o[i]);
            }
        }
        // GeGLU.
        let u: Vec<f32> = (0..2 * 3 * 5).map(|i| i as f32 * 0.1 - 1.0).collect();
        let mut z = vec![0f32; 15];
        geglu(&u, 5, &mut z);
        for r in 0..3 {
            for i in 0..5 {
                let mut a = [u[r * 10 + i]];
                gelu_erf(&mut a);
                assert_eq!(z[r * 5 + i], a[0] * (u[r * 10 + 5 + i] + 1.0));
            }
        }
    }
}
