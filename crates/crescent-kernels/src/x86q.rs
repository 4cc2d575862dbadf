//! AVX2 + FMA GEMV kernels for int8 / int4 weights (layouts in `crate::quant`).
//!
//! Safety contract shared by every function here (besides the extents documented per
//! function): **the caller has verified at runtime that the CPU supports AVX2, FMA and F16C**
//! (`Isa::Avx2Fma`), as for `crate::x86`.

use core::arch::x86_64::*;

use half::f16;

use crate::util::{ensure_len, with_scratch, SyncPtr};

/// From this many rows of x, the int4 GEMV dequantizes blocks of 4 weight rows to f32 once
/// and runs the f32 kernel (2048→8192, 2 threads: 16 rows 118 → 170 GFLOP/s, 64 rows 117 →
/// 198); below it the fused 2×4 kernel is faster (2 rows: 109 vs 78 GFLOP/s; 4 rows: equal).
const Q4_DEQUANT_MIN_ROWS: usize = 4;

/// Software-prefetch distance in bytes of the single-row kernels (as the bf16 one).
const SEQ_PF_BYTES: usize = 8192;

/// The f16 at `p` as f32 (F16C `vcvtph2ps`; exact).
///
/// # Safety
/// `p` readable; CPU features per the module doc.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn h2f(p: *const f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from((*p).to_bits()))))
}

/// Horizontal sum of the 8 lanes.
///
/// # Safety
/// CPU features per the module doc.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 8 int8 weights at `p` as f32 (exact).
///
/// # Safety
/// `p .. p + 8` readable; CPU features per the module doc.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8_q8(p: *const i8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast::<__m128i>())))
}

/// 16 int4 weights (8 bytes at `p`) dequantized with scale `s` and `m = −8·s`:
/// `(even columns 0,2,..,14; odd columns 1,3,..,15)` of the 16.
///
/// # Safety
/// `p .. p + 8` readable; CPU features per the module doc.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load16_q4(p: *const u8, s: __m256, m: __m256) -> (__m256, __m256) {
    let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast::<__m128i>()));
    let lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
    (_mm256_fmadd_ps(lo, s, m), _mm256_fmadd_ps(hi, s, m))
}

/// Dot products of ONE row of x (natural order, `k` floats) with `nrows` consecutive int8
/// weight rows, streamed sequentially with a software prefetch; `y[o] = scales[o] · dot (+
/// bias[o])`.
///
/// # Safety
/// `x` has `k` floats; `w` points to `nrows * k` readable bytes; `scales`, `y` (and `bias` if
/// not null) have `nrows` floats; nothing else writes `y` concurrently; CPU features.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_q8_seq1(
    x: *const f32,
    k: usize,
    w: *const i8,
    scales: *const f32,
    nrows: usize,
    bias: *const f32,
    y: *mut f32,
) {
    let k64 = k & !63;
    let k16 = k & !15;
    for o in 0..nrows {
        let wr = w.add(o * k);
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut kk = 0;
        while kk < k64 {
            // 64 weights = one cache line.
            _mm_prefetch::<_MM_HINT_T0>(wr.wrapping_add(kk + SEQ_PF_BYTES));
            for u in 0..4 {
                let p = wr.add(kk + 16 * u);
                let xr = x.add(kk + 16 * u);
                acc[2 * u] = _mm256_fmadd_ps(load8_q8(p), _mm256_loadu_ps(xr), acc[2 * u]);
                acc[2 * u + 1] = _mm256_fmadd_ps(
                    load8_q8(p.add(8)),
                    _mm256_loadu_ps(xr.add(8)),
                    acc[2 * u + 1],
                );
            }
            kk += 64;
        }
        while kk < k16 {
            let p = wr.add(kk);
            let xr = x.add(kk);
            acc[0] = _mm256_fmadd_ps(load8_q8(p), _mm256_loadu_ps(xr), acc[0]);
            acc[1] = _mm256_fmadd_ps(load8_q8(p.add(8)), _mm256_loadu_ps(xr.add(8)), acc[1]);
            kk += 16;
        }
        let a = _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
            _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7])),
        );
        let mut s = hsum(a);
        for t in k16..k {
            s += *x.add(t) * f32::from(*wr.add(t));
        }
        s *= *scales.add(o);
        if !bias.is_null() {
            s += *bias.add(o);
        }
        *y.add(o) = s;
    }
}

/// Raw dot products (no scale) of `R` rows of x with `NW` consecutive int8 weight rows:
/// `out[r][j] = Σ_t x[r*k + t] · q[j*k + t]`, prefetching the `NW` rows at `pf` (if not null).
///
/// # Safety
/// `x` has `R * k` floats, `w` `NW * k` readable bytes; `pf` may be anything (prefetches
/// never fault); CPU features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // const-size loops, fully unrolled
unsafe fn gemv_q8_block<const R: usize, const NW: usize>(
    x: *const f32,
    k: usize,
    w: *const i8,
    pf: *const i8,
    out: &mut [[f32; NW]; R],
) {
    let k16 = k & !15;
    let mut acc = [[_mm256_setzero_ps(); NW]; R];
    let mut kk = 0;
    while kk < k16 {
        if !pf.is_null() && kk % 64 == 0 {
            for j in 0..NW {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(j * k + kk));
            }
        }
        for j in 0..NW {
            let p = w.add(j * k + kk);
            let (lo, hi) = (load8_q8(p), load8_q8(p.add(8)));
            for r in 0..R {
                let xr = x.add(r * k + kk);
                acc[r][j] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr), acc[r][j]);
                acc[r][j] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr.add(8)), acc[r][j]);
            }
        }
        kk += 16;
    }
    for r in 0..R {
        for j in 0..NW {
            let mut s = hsum(acc[r][j]);
            for t in k16..k {
                s += *x.add(r * k + t) * f32::from(*w.add(j * k + t));
            }
            out[r][j] = s;
        }
    }
}

/// int8 GEMV over output features `o0..o1`: `y[r*n + o] = scales[o] · x[r]·q[o] (+ bias[o])`.
/// One row of x streams the weights sequentially (`gemv_q8_seq1`); several rows reuse each
/// block of 4 weight rows for pairs of rows of x.
///
/// # Safety
/// CPU features; `x.len() == rows * k` (natural order); `q.len() >= o1 * k`,
/// `scales.len() >= o1`, `o0 <= o1 <= n`, `bias` (if any) has `n` elements; `y.0` points to a
/// live `rows * n` buffer whose columns `o0..o1` no other thread accesses during the call.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_q8_range(
    x: &[f32],
    rows: usize,
    q: &[i8],
    scales: &[f32],
    k: usize,
    n: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    y: SyncPtr,
) {
    debug_assert!(x.len() == rows * k && q.len() >= o1 * k && scales.len() >= o1 && o1 <= n);
    if rows == 1 {
        gemv_q8_seq1(
            x.as_ptr(),
            k,
            q.as_ptr().add(o0 * k),
            scales.as_ptr().add(o0),
            o1 - o0,
            bias.map_or(core::ptr::null(), |b| b.as_ptr().add(o0)),
            y.0.add(o0),
        );
        return;
    }
    macro_rules! block {
        ($r:expr, $o:expr, $R:literal, $NW:literal) => {{
            let mut res = [[0.0f32; $NW]; $R];
            let pf = if $o + 2 * $NW <= o1 {
                q.as_ptr().wrapping_add(($o + $NW) * k)
            } else {
                core::ptr::null()
            };
            gemv_q8_block::<$R, $NW>(
                x.as_ptr().add($r * k),
                k,
                q.as_ptr().add($o * k),
                pf,
                &mut res,
            );
            for (i, row) in res.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    let b = bias.map_or(0.0, |b| b[$o + j]);
                    *y.0.add(($r + i) * n + $o + j) = v * scales[$o + j] + b;
                }
            }
        }};
    }
    let mut o = o0;
    while o < o1 {
        let quad = o1 - o >= 4;
        let mut r = 0;
        while r < rows {
            let rc = if rows - r == 1 { 1 } else { 2 };
            match (rc, quad) {
                (1, true) => block!(r, o, 1, 4),
                (_, true) => block!(r, o, 2, 4),
                (1, false) => block!(r, o, 1, 1),
                _ => block!(r, o, 2, 1),
            }
            r += rc;
        }
        o += if quad { 4 } else { 1 };
    }
}

/// Dot products of ONE row of x (de-interleaved per 16, see `gemv::deinterleave_x`) with
/// `nrows` consecutive int4 weight rows (`k / 2` bytes and `k / group` scales each),
/// streamed sequentially with a software prefetch; `y[o] = dot (+ bias[o])`.
///
/// # Safety
/// `group % 32 == 0`, `k % group == 0`; `x` has `k` floats; `w` points to `nrows * k / 2`
/// readable bytes and `scales` to `nrows * k / group` halves; `y` (and `bias` if not null)
/// have `nrows` floats, `y` written by nobody else; CPU features.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments, unused_assignments)]
unsafe fn gemv_q4_seq1(
    x: *const f32,
    k: usize,
    w: *const u8,
    scales: *const f16,
    group: usize,
    nrows: usize,
    bias: *const f32,
    y: *mut f32,
) {
    let units = k / 32; // 32 weights = 16 bytes per unit
    let upg = group / 32;
    let neg8 = _mm256_set1_ps(-8.0);
    let row_bytes = k / 2;
    let gpr = k / group;
    for o in 0..nrows {
        let wr = w.add(o * row_bytes);
        let mut sp = scales.add(o * gpr);
        let mut left = upg;
        let mut s = _mm256_set1_ps(h2f(sp));
        let mut m = _mm256_mul_ps(s, neg8);
        let mut acc = [_mm256_setzero_ps(); 8];
        // One unit into accumulators `a..a+4`, then step the group.
        macro_rules! unit {
            ($u:expr, $a:expr) => {{
                let p = wr.add(16 * $u);
                let xr = x.add(32 * $u);
                let (l0, h0) = load16_q4(p, s, m);
                let (l1, h1) = load16_q4(p.add(8), s, m);
                acc[$a] = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xr), acc[$a]);
                acc[$a + 1] = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xr.add(8)), acc[$a + 1]);
                acc[$a + 2] = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xr.add(16)), acc[$a + 2]);
                acc[$a + 3] = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xr.add(24)), acc[$a + 3]);
                left -= 1;
                if left == 0 {
                    left = upg;
                    sp = sp.add(1);
                    if $u + 1 < units {
                        s = _mm256_set1_ps(h2f(sp));
                        m = _mm256_mul_ps(s, neg8);
                    }
                }
            }};
        }
        let mut u = 0;
        while u + 2 <= units {
            if u % 4 == 0 {
                // 4 units = 64 bytes = one cache line.
                _mm_prefetch::<_MM_HINT_T0>(wr.wrapping_add(16 * u + SEQ_PF_BYTES).cast::<i8>());
            }
            unit!(u, 0);
            unit!(u + 1, 4);
            u += 2;
        }
        if u < units {
            unit!(u, 0);
        }
        let a = _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
            _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7])),
        );
        let mut v = hsum(a);
        if !bias.is_null() {
            v += *bias.add(o);
        }
        *y.add(o) = v;
    }
}

/// Dot products of `R` rows of x (de-interleaved per 16) with `NW` consecutive int4 weight
/// rows: `out[r][j] = Σ_t x[r, t] · ŵ[j, t]` (dequantized weights), prefetching the `NW` rows
/// at `pf` (if not null).
///
/// # Safety
/// `group % 32 == 0`, `k % group == 0`; `x` has `R * k` floats, `w` `NW * k / 2` readable
/// bytes, `scales` `NW * k / group` halves; `sbuf` at least as many floats (scratch); `pf`
/// may be anything; CPU features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // const-size loops, fully unrolled
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_q4_block<const R: usize, const NW: usize>(
    x: *const f32,
    k: usize,
    w: *const u8,
    scales: *const f16,
    group: usize,
    pf: *const u8,
    sbuf: &mut [f32],
    out: &mut [[f32; NW]; R],
) {
    let row_bytes = k / 2;
    let gpr = k / group;
    let neg8 = _mm256_set1_ps(-8.0);
    // The NW rows' scales as f32, converted once per call (this kernel is compute-bound: an
    // f16 conversion per group inside the loop cost 8 % at batch 2).
    for (i, v) in sbuf[..NW * gpr].iter_mut().enumerate() {
        *v = h2f(scales.add(i));
    }
    let sf = sbuf.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); NW]; R];
    let mut kk = 0;
    let mut g = 0;
    while g < gpr {
        let end = kk + group;
        while kk < end {
            if !pf.is_null() && kk % 128 == 0 {
                // 128 weights = 64 bytes per row.
                for j in 0..NW {
                    _mm_prefetch::<_MM_HINT_T0>(
                        pf.wrapping_add(j * row_bytes + kk / 2).cast::<i8>(),
                    );
                }
            }
            for j in 0..NW {
                let s = _mm256_broadcast_ss(&*sf.add(j * gpr + g));
                let m = _mm256_mul_ps(s, neg8);
                let (lo, hi) = load16_q4(w.add(j * row_bytes + kk / 2), s, m);
                for r in 0..R {
                    let xr = x.add(r * k + kk);
                    acc[r][j] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr), acc[r][j]);
                    acc[r][j] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr.add(8)), acc[r][j]);
                }
            }
            kk += 16;
        }
        g += 1;
    }
    for r in 0..R {
        for j in 0..NW {
            out[r][j] = hsum(acc[r][j]);
        }
    }
}

/// int4 GEMV over output features `o0..o1`: `y[r*n + o] = x[r]·ŵ[o] (+ bias[o])`. With
/// `avx512`, the dequantized blocks (≥ `Q4_DEQUANT_MIN_ROWS` rows of x) go through the zmm f32
/// kernel.
///
/// # Safety
/// CPU features (AVX-512F too when `avx512`); `group % 32 == 0`, `k % group == 0`; `x.len() == rows * k`, de-interleaved
/// per 16 (`gemv::deinterleave_x`); `q.len() >= o1 * k / 2`, `scales.len() >= o1 * k / group`,
/// `o0 <= o1 <= n`, `bias` (if any) has `n` elements; `y.0` points to a live `rows * n`
/// buffer whose columns `o0..o1` no other thread accesses during the call.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_q4_range(
    avx512: bool,
    x: &[f32],
    rows: usize,
    q: &[u8],
    scales: &[f16],
    group: usize,
    k: usize,
    n: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    y: SyncPtr,
) {
    debug_assert!(group.is_multiple_of(32) && k.is_multiple_of(group));
    debug_assert!(x.len() == rows * k && q.len() >= o1 * k / 2 && o1 <= n);
    debug_assert!(scales.len() >= o1 * (k / group));
    let row_bytes = k / 2;
    let gpr = k / group;
    if rows == 1 {
        gemv_q4_seq1(
            x.as_ptr(),
            k,
            q.as_ptr().add(o0 * row_bytes),
            scales.as_ptr().add(o0 * gpr),
            group,
            o1 - o0,
            bias.map_or(core::ptr::null(), |b| b.as_ptr().add(o0)),
            y.0.add(o0),
        );
        return;
    }
    if rows < Q4_DEQUANT_MIN_ROWS {
        let mut sbuf = vec![0f32; 4 * gpr];
        macro_rules! block {
            ($r:expr, $o:expr, $R:literal, $NW:literal) => {{
                let mut res = [[0.0f32; $NW]; $R];
                let pf = if $o + 2 * $NW <= o1 {
                    q.as_ptr().wrapping_add(($o + $NW) * row_bytes)
                } else {
                    core::ptr::null()
                };
                gemv_q4_block::<$R, $NW>(
                    x.as_ptr().add($r * k),
                    k,
                    q.as_ptr().add($o * row_bytes),
                    scales.as_ptr().add($o * gpr),
                    group,
                    pf,
                    &mut sbuf,
                    &mut res,
                );
                for (i, row) in res.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        let b = bias.map_or(0.0, |b| b[$o + j]);
                        *y.0.add(($r + i) * n + $o + j) = v + b;
                    }
                }
            }};
        }
        let mut o = o0;
        while o < o1 {
            let quad = o1 - o >= 4;
            let mut r = 0;
            while r < rows {
                let rc = if rows - r == 1 { 1 } else { 2 };
                match (rc, quad) {
                    (1, true) => block!(r, o, 1, 4),
                    (_, true) => block!(r, o, 2, 4),
                    (1, false) => block!(r, o, 1, 1),
                    _ => block!(r, o, 2, 1),
                }
                r += rc;
            }
            o += if quad { 4 } else { 1 };
        }
        return;
    }
    // Several rows of x: dequantize each block of (up to) 4 weight rows once into an f32
    // buffer — in the same per-16 de-interleaved order as `x` — and run the f32 kernel over
    // pairs of rows of x (the conversion, ~9 ops per 16 weights, is then paid once per weight
    // instead of once per pair of rows).
    with_scratch(|sc| {
        let buf = ensure_len(&mut sc.t, 4 * k);
        let mut sbuf = vec![0f32; 4 * gpr];
        let mut o = o0;
        while o < o1 {
            let nw = (o1 - o).min(4);
            // Prefetch the block after this one while dequantizing.
            let pf = q.as_ptr().wrapping_add((o + nw) * row_bytes);
            dequant_q4_rows(
                q.as_ptr().add(o * row_bytes),
                scales.as_ptr().add(o * gpr),
                group,
                k,
                nw,
                pf,
                &mut sbuf,
                buf.as_mut_ptr(),
            );
            if avx512 {
                // Every row of x against the dequantized rows (in cache), zmm registers.
                crate::x86::zmm_rows(
                    x.as_ptr(),
                    rows,
                    k,
                    buf.as_ptr(),
                    0,
                    nw,
                    false,
                    |r, j, v| {
                        *y.0.add(r * n + o + j) = v + bias.map_or(0.0, |b| b[o + j]);
                    },
                );
                o += nw;
                continue;
            }
            let mut r = 0;
            while r < rows {
                let rc = if rows - r == 1 { 1 } else { 2 };
                let xr = x.as_ptr().add(r * k);
                let put = |i: usize, j: usize, v: f32| {
                    let b = bias.map_or(0.0, |b| b[o + j]);
                    *y.0.add((r + i) * n + o + j) = v + b;
                };
                let null = core::ptr::null();
                if nw == 4 {
                    if rc == 2 {
                        let mut res = [[0.0f32; 4]; 2];
                        crate::x86::gemv_block::<f32, 2, 4>(xr, k, buf.as_ptr(), null, &mut res);
                        for (i, row) in res.iter().enumerate() {
                            for (j, v) in row.iter().enumerate() {
                                put(i, j, *v);
                            }
                        }
                    } else {
                        let mut res = [[0.0f32; 4]; 1];
                        crate::x86::gemv_block::<f32, 1, 4>(xr, k, buf.as_ptr(), null, &mut res);
                        for (j, v) in res[0].iter().enumerate() {
                            put(0, j, *v);
                        }
                    }
                } else {
                    for j in 0..nw {
                        let wj = buf.as_ptr().add(j * k);
                        if rc == 2 {
                            let mut res = [[0.0f32; 1]; 2];
                            crate::x86::gemv_block::<f32, 2, 1>(xr, k, wj, null, &mut res);
                            put(0, j, res[0][0]);
                            put(1, j, res[1][0]);
                        } else {
                            let mut res = [[0.0f32; 1]; 1];
                            crate::x86::gemv_block::<f32, 1, 1>(xr, k, wj, null, &mut res);
                            put(0, j, res[0][0]);
                        }
                    }
                }
                r += rc;
            }
            o += nw;
        }
    });
}

/// Dequantizes `nw` consecutive int4 weight rows into `dst` (`nw * k` floats), each row in the
/// per-16 de-interleaved order of `gemv::deinterleave_x`; prefetches `nw` rows at `pf`.
///
/// # Safety
/// `group % 32 == 0`, `k % group == 0`; `w` points to `nw * k / 2` readable bytes, `scales`
/// to `nw * k / group` halves, `dst` to `nw * k` writable floats; `pf` may be anything; CPU
/// features per the module doc.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn dequant_q4_rows(
    w: *const u8,
    scales: *const f16,
    group: usize,
    k: usize,
    nw: usize,
    pf: *const u8,
    sbuf: &mut [f32],
    dst: *mut f32,
) {
    let row_bytes = k / 2;
    let gpr = k / group;
    let neg8 = _mm256_set1_ps(-8.0);
    // f16 → f32 for all the rows' scales first, 8 at a time (per group in the loop it cost
    // ~10 % of batch-4 decode: this loop is compute-bound).
    let ns = nw * gpr;
    let mut i = 0;
    while i + 8 <= ns {
        let h = _mm_loadu_si128(scales.add(i).cast::<__m128i>());
        _mm256_storeu_ps(sbuf.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for (t, v) in sbuf.iter_mut().enumerate().take(ns).skip(i) {
        *v = h2f(scales.add(t));
    }
    for j in 0..nw {
        let wr = w.add(j * row_bytes);
        let pr = pf.wrapping_add(j * row_bytes);
        let d = dst.add(j * k);
        let mut kk = 0;
        for g in 0..gpr {
            let s = _mm256_broadcast_ss(&sbuf[j * gpr + g]);
            let m = _mm256_mul_ps(s, neg8);
            let end = kk + group;
            while kk < end {
                if kk % 128 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(pr.wrapping_add(kk / 2).cast::<i8>());
                }
                let (lo, hi) = load16_q4(wr.add(kk / 2), s, m);
                _mm256_storeu_ps(d.add(kk), lo);
                _mm256_storeu_ps(d.add(kk + 8), hi);
                kk += 16;
            }
        }
    }
}

/// Re-lays out `x` (one row, `k % 32 == 0`) for [`gemv_q4_seq1_avx512`]: each block of 32 becomes
/// `[x0, x2, .., x30, x1, x3, .., x31]` (the lane order of 16 unpacked bytes: low nibbles, then
/// high nibbles), and returns in `xs` the per-group offset terms `−8 · Σ x` (the weights are
/// stored as `q + 8`, so `Σ s·(q − 8)·x = s·Σ q·x + s·(−8·Σ x)`).
pub(crate) fn prepare_q4_x512(x: &[f32], group: usize, d: &mut [f32], xs: &mut [f32]) {
    for (src, dst) in x.chunks_exact(32).zip(d.chunks_exact_mut(32)) {
        for i in 0..16 {
            dst[i] = src[2 * i];
            dst[16 + i] = src[2 * i + 1];
        }
    }
    for (g, o) in x.chunks_exact(group).zip(xs.iter_mut()) {
        *o = -8.0 * g.iter().sum::<f32>();
    }
}

/// Single-row int4 GEMV with AVX-512F: dot products of one row of x (laid out by
/// [`prepare_q4_x512`]) with `nrows` consecutive int4 weight rows, streamed sequentially with a
/// software prefetch. 16 bytes (32 weights, one group of 32) per step: one `vpmovzxbd` to 16
/// lanes, nibble mask / shift, two FMAs against x; the group scale is applied once per group
/// (≈ 12 instructions per 32 weights against ≈ 20 in the AVX2 kernel, which is compute-bound).
///
/// # Safety
/// CPU supports AVX-512F (and the module's features); `group % 32 == 0`, `k % group == 0`;
/// `x` has `k` floats, `xs` `k / group`; `w` points to `nrows * k / 2` readable bytes and
/// `scales` to `nrows * k / group` halves; `y` (and `bias` if not null) have `nrows` floats,
/// `y` written by nobody else.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_q4_seq1_avx512(
    x: *const f32,
    xs: *const f32,
    k: usize,
    w: *const u8,
    scales: *const f16,
    group: usize,
    nrows: usize,
    bias: *const f32,
    y: *mut f32,
) {
    let upg = group / 32;
    let gpr = k / group;
    let row_bytes = k / 2;
    let mask = _mm512_set1_epi32(15);
    // Σ over one group's units → (lo-nibble acc, hi-nibble acc).
    macro_rules! group_dot {
        ($wr:expr, $g:expr) => {{
            let mut a0 = _mm512_setzero_ps();
            let mut a1 = _mm512_setzero_ps();
            for uu in 0..upg {
                let u = $g * upg + uu;
                let p = $wr.add(16 * u);
                if u % 4 == 0 {
                    // 4 units = 64 bytes = one cache line.
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(SEQ_PF_BYTES).cast::<i8>());
                }
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast::<__m128i>()));
                let lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, mask));
                let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(b));
                let xr = x.add(32 * u);
                a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), a0);
                a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr.add(16)), a1);
            }
            _mm512_add_ps(a0, a1)
        }};
    }
    for o in 0..nrows {
        let wr = w.add(o * row_bytes);
        let sr = scales.add(o * gpr);
        // Four independent running totals (the FMA latency would otherwise bound the stream).
        let mut tot = [_mm512_setzero_ps(); 4];
        let mut corr = 0f32;
        let mut g = 0;
        while g + 4 <= gpr {
            for (j, t) in tot.iter_mut().enumerate() {
                let s = h2f(sr.add(g + j));
                *t = _mm512_fmadd_ps(group_dot!(wr, g + j), _mm512_set1_ps(s), *t);
                corr += s * *xs.add(g + j);
            }
            g += 4;
        }
        while g < gpr {
            let s = h2f(sr.add(g));
            tot[0] = _mm512_fmadd_ps(group_dot!(wr, g), _mm512_set1_ps(s), tot[0]);
            corr += s * *xs.add(g);
            g += 1;
        }
        let t = _mm512_add_ps(_mm512_add_ps(tot[0], tot[1]), _mm512_add_ps(tot[2], tot[3]));
        let mut v = _mm512_reduce_add_ps(t) + corr;
        if !bias.is_null() {
            v += *bias.add(o);
        }
        *y.add(o) = v;
    }
}

/// int8 GEMV over output features `o0..o1` with AVX-512F: one row of x streams the weights
/// ([`gemv_q8_seq1_avx512`]); several rows (batched decode) go through the shared zmm blocks
/// (`x86::gemv_range_avx512`); `y[r*n + o] = scales[o] · x[r]·q[o] (+ bias[o])`.
///
/// # Safety
/// AVX-512F and the module's features; otherwise as `gemv_q8_range`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_q8_range_avx512(
    x: &[f32],
    rows: usize,
    q: &[i8],
    scales: &[f32],
    k: usize,
    n: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    y: SyncPtr,
) {
    debug_assert!(x.len() == rows * k && q.len() >= o1 * k && scales.len() >= o1 && o1 <= n);
    if rows == 1 {
        gemv_q8_seq1_avx512(
            x.as_ptr(),
            k,
            q.as_ptr().add(o0 * k),
            scales.as_ptr().add(o0),
            o1 - o0,
            bias.map_or(core::ptr::null(), |b| b.as_ptr().add(o0)),
            y.0.add(o0),
        );
        return;
    }
    crate::x86::gemv_range_avx512(x, rows, q, Some(scales), k, n, o0, o1, bias, y);
}

/// [`gemv_q8_seq1`] with zmm registers: 16 int8 weights widened per instruction (≈ 5 ops per 16
/// weights against ≈ 10), four accumulators.
///
/// # Safety
/// AVX-512F and the module's features; otherwise as [`gemv_q8_seq1`].
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn gemv_q8_seq1_avx512(
    x: *const f32,
    k: usize,
    w: *const i8,
    scales: *const f32,
    nrows: usize,
    bias: *const f32,
    y: *mut f32,
) {
    let k64 = k & !63;
    for o in 0..nrows {
        let wr = w.add(o * k);
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut kk = 0;
        while kk < k64 {
            // 64 weights = one cache line.
            _mm_prefetch::<_MM_HINT_T0>(wr.wrapping_add(kk + SEQ_PF_BYTES));
            for (u, a) in acc.iter_mut().enumerate() {
                let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(wr.add(kk + 16 * u).cast()));
                *a = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(q),
                    _mm512_loadu_ps(x.add(kk + 16 * u)),
                    *a,
                );
            }
            kk += 64;
        }
        let a = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut s = _mm512_reduce_add_ps(a);
        for t in k64..k {
            s += *x.add(t) * f32::from(*wr.add(t));
        }
        s *= *scales.add(o);
        if !bias.is_null() {
            s += *bias.add(o);
        }
        *y.add(o) = s;
    }
}

/// Whether this CPU has what [`gemv_q4_vnni`] needs (AVX-512 BW + VNNI; checked once).
pub(crate) fn has_vnni() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
    })
}

/// Bytes of x [`prepare_q4_x_vnni`] writes for `k` columns (whole blocks of 128, zero-padded).
pub(crate) fn q4_vnni_xq_len(k: usize) -> usize {
    k.div_ceil(128) * 128
}

/// Quantizes one row of x for [`gemv_q4_vnni`] (`group == 32`, `k % 64 == 0`): per group
/// of 32, `sx = max|x| / 127` and `xq = round(x / sx)` (int8), laid out per block of 128
/// columns as `[64 even columns | 64 odd columns]` (the byte order of a cache line of weights
/// split into low and high nibbles; a last half block is zero-padded to 128), plus
/// `c = −8 · sx · Σ xq` per group (the weights' +8 storage offset). `xq` has
/// [`q4_vnni_xq_len`]`(k)` bytes. A group holding a NaN gets `sx = NaN`, so the NaN reaches the
/// output as it would in f32.
pub(crate) fn prepare_q4_x_vnni(x: &[f32], xq: &mut [i8], sx: &mut [f32], c: &mut [f32]) {
    // SAFETY: the caller (`q4_uses_vnni`) checked AVX-512F and BW.
    unsafe { prepare_q4_x_vnni_512(x, xq, sx, c) }
}

/// [`prepare_q4_x_vnni`] compiled for AVX-512 (the rounding loop vectorises; the scalar build
/// called `roundf` per element: 1.7 % of an int4 decode profile).
///
/// # Safety
/// AVX-512F and BW available.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn prepare_q4_x_vnni_512(x: &[f32], xq: &mut [i8], sx: &mut [f32], c: &mut [f32]) {
    let mut q = [0i8; 32];
    xq.fill(0);
    for (g, xs) in x.chunks_exact(32).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        // A NaN in x must reach the output as with the f32 kernels (int8 would drop it).
        let s = if xs.iter().any(|v| v.is_nan()) {
            f32::NAN
        } else {
            amax / 127.0
        };
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (o, v) in q.iter_mut().zip(xs) {
            *o = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        let sum: i32 = q.iter().map(|&v| v as i32).sum();
        sx[g] = s;
        c[g] = -8.0 * s * sum as f32;
        let block = &mut xq[(g / 4) * 128..(g / 4) * 128 + 128];
        let at = (g % 4) * 16;
        for i in 0..16 {
            block[at + i] = q[2 * i];
            block[64 + at + i] = q[2 * i + 1];
        }
    }
}

/// Rows of x per pass of [`gemv_q4_vnni`] (registers: 2 accumulators + 1 offset + 1 scale
/// vector per row).
pub(crate) const VNNI_ROWS: usize = 4;

/// int4 GEMV with integer dot products (AVX-512 VNNI) for up to a few dozen rows of x: each
/// row of x is quantized to int8 per group of 32 ([`prepare_q4_x_vnni`]). A cache line of
/// weights (128 columns, four groups) is split into its low and high nibbles once and, for each
/// row of x, takes two `vpdpbusd` (nibbles × int8, exact in i32) into one i32 vector whose lane
/// quads are the four groups, one conversion, one permute that spreads the four groups'
/// `scale_w · scale_x` over their lanes (products computed 16 groups at a time) and one FMA —
/// 5 instructions per 128 weights and row, plus 4 per 128 weights shared by the rows (the f32
/// path dequantizes, then spends 16 per 128 weights and row). The offset terms are one FMA per
/// 16 groups. Rows of x go in passes of [`VNNI_ROWS`]; a weight row (≤ a few KiB) stays in
/// L1 between passes. Output `y[r·ld + o]`.
/// Error: that of int8 activations, `|Δ| ≤ Σ |ŵ| · max|x_group| / 254` per row (exact
/// otherwise).
///
/// # Safety
/// AVX-512F/BW/VNNI and the module's features; `group == 32`, `k % 64 == 0`; `xq` has
/// `rows · `[`q4_vnni_xq_len`]`(k)` bytes and `sx`, `c` `rows · k / 32` floats from
/// [`prepare_q4_x_vnni`] (row after row); `w` points to `nrows * k / 2` readable bytes,
/// `scales` to `nrows * k / 32` halves; `y` to `(rows − 1)·ld + nrows` floats written by
/// nobody else, `bias` (if not null) to `nrows` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_q4_vnni(
    xq: *const i8,
    sx: *const f32,
    c: *const f32,
    rows: usize,
    k: usize,
    w: *const u8,
    scales: *const f16,
    nrows: usize,
    bias: *const f32,
    y: *mut f32,
    ld: usize,
) {
    let mut r0 = 0;
    while r0 < rows {
        let rc = (rows - r0).min(VNNI_ROWS);
        let xl = q4_vnni_xq_len(k);
        let (xq, sx, c, y) = (
            xq.add(r0 * xl),
            sx.add(r0 * (k / 32)),
            c.add(r0 * (k / 32)),
            y.add(r0 * ld),
        );
        match rc {
            1 => q4_vnni_pass::<1>(xq, sx, c, k, w, scales, nrows, bias, y, ld),
            2 => q4_vnni_pass::<2>(xq, sx, c, k, w, scales, nrows, bias, y, ld),
            3 => q4_vnni_pass::<3>(xq, sx, c, k, w, scales, nrows, bias, y, ld),
            _ => q4_vnni_pass::<4>(xq, sx, c, k, w, scales, nrows, bias, y, ld),
        }
        r0 += rc;
    }
}

/// One pass of [`gemv_q4_vnni`] over `R` rows of x.
///
/// # Safety
/// As [`gemv_q4_vnni`] with `rows = R`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // const-size loops
unsafe fn q4_vnni_pass<const R: usize>(
    xq: *const i8,
    sx: *const f32,
    c: *const f32,
    k: usize,
    w: *const u8,
    scales: *const f16,
    nrows: usize,
    bias: *const f32,
    y: *mut f32,
    ld: usize,
) {
    let gpr = k / 32;
    let xl = q4_vnni_xq_len(k);
    let row_bytes = k / 2;
    let full_blocks = k / 128;
    let full_chunks = gpr / 16;
    let nib = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    // Lane l of block j (of a chunk of 16 groups) takes the scale of group 4j + l / 4.
    let idx = [0, 1, 2, 3].map(|j: i32| {
        let (a, b, c, d) = (4 * j, 4 * j + 1, 4 * j + 2, 4 * j + 3);
        _mm512_setr_epi32(a, a, a, a, b, b, b, b, c, c, c, c, d, d, d, d)
    });
    for o in 0..nrows {
        let wr = w.add(o * row_bytes);
        let sr = scales.add(o * gpr);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let mut cv = [_mm512_setzero_ps(); R];
        let mut g0 = 0;
        while g0 < gpr {
            // A chunk of up to 16 groups (the last may be partial: 2..14 groups).
            let ng = (gpr - g0).min(16);
            let m: __mmask16 = if ng == 16 { 0xFFFF } else { (1u16 << ng) - 1 };
            // The scales are a second stream (1 byte per 8 of weights): prefetched as far
            // ahead as the weights, so their first use does not wait on DRAM.
            _mm_prefetch::<_MM_HINT_T0>(sr.add(g0).cast::<i8>().wrapping_add(SEQ_PF_BYTES / 8));
            let ws = if ng == 16 {
                _mm512_cvtph_ps(_mm256_loadu_si256(sr.add(g0).cast::<__m256i>()))
            } else {
                _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(
                    u32::from(m),
                    sr.add(g0).cast::<i16>(),
                )))
            };
            let mut sv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let off = r * gpr + g0;
                sv[r] = _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(m, sx.add(off)));
                cv[r] = _mm512_fmadd_ps(ws, _mm512_maskz_loadu_ps(m, c.add(off)), cv[r]);
            }
            let nb = ng.div_ceil(4);
            let full = g0 / 16 < full_chunks;
            for j in 0..4 {
                if !full && j >= nb {
                    break;
                }
                let b = g0 / 4 + j;
                let wp = wr.add(64 * b);
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(SEQ_PF_BYTES).cast::<i8>());
                let wv = if b < full_blocks {
                    _mm512_loadu_si512(wp.cast::<__m512i>())
                } else {
                    // The last half block: 32 bytes (its x half is zero-padded).
                    _mm512_maskz_loadu_epi8(0xFFFF_FFFF, wp.cast::<i8>())
                };
                let lo = _mm512_and_si512(wv, nib);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), nib);
                for r in 0..R {
                    let xp = xq.add(r * xl + 128 * b);
                    let d = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(xp.cast()));
                    let d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xp.add(64).cast()));
                    let a = &mut acc[r][j % 2];
                    *a = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(d),
                        _mm512_permutexvar_ps(idx[j], sv[r]),
                        *a,
                    );
                }
            }
            g0 += 16;
        }
        let b = if bias.is_null() { 0.0 } else { *bias.add(o) };
        for r in 0..R {
            let t = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), cv[r]);
            *y.add(r * ld + o) = _mm512_reduce_add_ps(t) + b;
        }
    }
}
