//! AVX2 + FMA (+ F16C) kernels.
//!
//! Every function here is an `unsafe fn` compiled with
//! `#[target_feature(enable = "avx2,fma,f16c")]`. The shared safety contract
//! (in addition to the pointer extents documented per function) is: **the
//! caller has verified at runtime that the CPU supports AVX2, FMA and F16C**
//! — `Isa::Avx2Fma` is only ever constructed after
//! `is_x86_feature_detected!` confirmed all three (see `Isa::detect` and
//! `matmul_forced`).

use core::arch::x86_64::*;

use crate::util::SyncPtr;
use crate::weights::{WeightElem, WeightKind};

/// Loads 16 consecutive weights starting at `p` as two f32 vectors.
///
/// f32 / f16: natural order (elements 0..8, 8..16). bf16: *de-interleaved*
/// (elements 0,2,..,14 and 1,3,..,15) — this costs one shift and one AND for
/// 16 weights instead of two zero-extends + two shifts; the `x` operand must
/// be re-laid-out the same way (see `crate::gemv::deinterleave_x`).
///
/// # Safety
/// `p .. p + 16` must be readable; CPU features per the module doc.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load16<W: WeightElem>(p: *const W) -> (__m256, __m256) {
    match W::KIND {
        WeightKind::F32 => {
            let p = p.cast::<f32>();
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
        WeightKind::Bf16 => {
            // Each 32-bit lane holds (elem 2i) in its low half and (elem 2i+1)
            // in its high half; bf16 → f32 is "place in the high half".
            let v = _mm256_loadu_si256(p.cast::<__m256i>());
            let even = _mm256_slli_epi32(v, 16);
            let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000_u32 as i32));
            (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
        }
        WeightKind::F16 => {
            let p = p.cast::<__m128i>();
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
            )
        }
    }
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

/// Dot products of `R` rows of x with `NW` consecutive weight rows:
/// `out[r][j] = Σ_t xp[r*k + t] · w[j*k + t]`.
///
/// While it computes, it software-prefetches the `NW` weight rows starting
/// at `pf` (the next block, if not null) so that, when several row groups of
/// x reuse one weight block, the DRAM stream of the next block overlaps the
/// compute on this one (the hardware prefetcher alone does not run that far
/// ahead).
///
/// # Safety
/// `xp` must point to `R * k` readable floats (laid out as `load16::<W>`
/// expects for the first `k & !15` elements of each row, natural order for
/// the tail); `w` to `NW * k` readable weights; CPU features per module doc.
/// `pf` may be anything (prefetches never fault; only wrapping arithmetic is
/// done on it).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // const-size loops, fully unrolled
pub(crate) unsafe fn gemv_block<W: WeightElem, const R: usize, const NW: usize>(
    xp: *const f32,
    k: usize,
    w: *const W,
    pf: *const W,
    out: &mut [[f32; NW]; R],
) {
    let k16 = k & !15;
    let mut acc = [[_mm256_setzero_ps(); NW]; R];
    let mut kk = 0;
    while kk < k16 {
        // One prefetch per 64-byte line (every iteration for f32, every
        // other one for 16-bit weights).
        if !pf.is_null() && kk % (64 / core::mem::size_of::<W>()) == 0 {
            for j in 0..NW {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(j * k + kk).cast::<i8>());
            }
        }
        for j in 0..NW {
            let (lo, hi) = load16(w.add(j * k + kk));
            for r in 0..R {
                let xr = xp.add(r * k + kk);
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
                s += *xp.add(r * k + t) * (*w.add(j * k + t)).to_f32();
            }
            out[r][j] = s;
        }
    }
}

/// Software-prefetch distance (bytes ahead in the weight stream) of the
/// single-row kernel. Measured on the 2-core Zen 5 dev VM, bf16, 2 threads:
/// 8 KiB > 4 KiB > 1–2 KiB > none.
const SEQ_PF_BYTES: usize = 8192;

/// Dot products of ONE row of x with `nrows` consecutive weight rows, read
/// strictly sequentially (row after row): one DRAM stream per thread plus a
/// software prefetch `SEQ_PF_BYTES` ahead. For decode this streamed faster
/// (paired runs: +10–30 %) than the 4-row blocked kernel, whose 4–8
/// interleaved row streams per core are harder on DRAM.
///
/// # Safety
/// `xp` has `k` floats laid out as `load16::<W>` expects; `w` points to
/// `(o1 - o0) * k` readable weights (rows `o0..o1`); `y` has room for
/// `o1 - o0` floats and nothing else writes it concurrently; `bias` (if not
/// null) has `o1 - o0` floats. CPU features per the module doc.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_seq1<W: WeightElem>(
    xp: *const f32,
    k: usize,
    w: *const W,
    nrows: usize,
    bias: *const f32,
    y: *mut f32,
) {
    let k64 = k & !63;
    let k16 = k & !15;
    let esz = core::mem::size_of::<W>();
    for o in 0..nrows {
        let wr = w.add(o * k);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut kk = 0;
        while kk < k64 {
            // 64 weights = 2 (bf16/f16) or 4 (f32) cache lines.
            let mut line = 0;
            while line < 64 * esz {
                _mm_prefetch::<_MM_HINT_T0>(
                    wr.cast::<i8>()
                        .wrapping_add((kk * esz) + line + SEQ_PF_BYTES),
                );
                line += 64;
            }
            for (u, a) in acc.iter_mut().enumerate() {
                let (lo, hi) = load16(wr.add(kk + 16 * u));
                let xr = xp.add(kk + 16 * u);
                *a = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr), *a);
                *a = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr.add(8)), *a);
            }
            kk += 64;
        }
        while kk < k16 {
            let (lo, hi) = load16(wr.add(kk));
            let xr = xp.add(kk);
            acc[0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr), acc[0]);
            acc[1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr.add(8)), acc[1]);
            kk += 16;
        }
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        for t in k16..k {
            s += *xp.add(t) * (*wr.add(t)).to_f32();
        }
        if !bias.is_null() {
            s += *bias.add(o);
        }
        *y.add(o) = s;
    }
}

/// GEMV-style kernel for a range of output features: for every `o` in
/// `o0..o1` and every row `r < rows`, `y[r*n + o] = x[r]·w[o] (+ bias[o])`.
/// With several rows of x, each block of 4 weight rows is streamed from
/// memory once and reused (from L1/L2) for every pair of rows of x while the
/// next block is software-prefetched; a single row of x uses `gemv_seq1`.
///
/// # Safety
/// * CPU features per the module doc;
/// * `xp.len() == rows * k`, laid out as `load16::<W>` expects;
/// * `w.len() >= o1 * k`, `o0 <= o1 <= n`, `bias` (if any) has `n` elements;
/// * `y.0` points to a live `rows * n` buffer and no other thread accesses
///   columns `o0..o1` of it during this call.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_range<W: WeightElem>(
    xp: &[f32],
    rows: usize,
    w: &[W],
    k: usize,
    n: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    y: SyncPtr,
) {
    debug_assert!(xp.len() == rows * k && w.len() >= o1 * k && o1 <= n);
    macro_rules! block {
        ($r:expr, $o:expr, $R:literal, $NW:literal) => {{
            let mut res = [[0.0f32; $NW]; $R];
            let pf = if $o + 2 * $NW <= o1 {
                w.as_ptr().wrapping_add(($o + $NW) * k)
            } else {
                core::ptr::null()
            };
            gemv_block::<W, $R, $NW>(
                xp.as_ptr().add($r * k),
                k,
                w.as_ptr().add($o * k),
                pf,
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
    if rows == 1 {
        // SAFETY: per this function's contract: `xp` has `k` floats, rows
        // `o0..o1` of `w` exist, `bias` has `n >= o1` entries, and columns
        // `o0..o1` of the single output row belong to this call.
        gemv_seq1(
            xp.as_ptr(),
            k,
            w.as_ptr().add(o0 * k),
            o1 - o0,
            bias.map_or(core::ptr::null(), |b| b.as_ptr().add(o0)),
            y.0.add(o0),
        );
        return;
    }
    while o < o1 {
        let quad = o1 - o >= 4;
        let mut r = 0;
        while r < rows {
            // Groups of 2 rows × 4 weight rows = 8 accumulators: with x (4)
            // and the converted weights (2) + mask that fills the 16 ymm
            // registers without spills (3 × 4 spills: measured 2× slower).
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

/// GEMM micro-kernel: a 6×16 tile of C (row stride `ldc`)
/// `C = (init ? bias-or-0 : C) + Σ_kk a[kk*6 + i] · b[kk*16 + j]`.
///
/// # Safety
/// * CPU features per the module doc;
/// * `a` has `kc * 6` and `b` has `kc * 16` readable floats;
/// * `c` is valid for reads and writes of 6 rows × 16 floats with stride
///   `ldc`, not accessed concurrently by another thread;
/// * `bias` is null or points to 16 readable floats.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // const-size loops, fully unrolled
pub(crate) unsafe fn kernel_6x16(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: bool,
    bias: *const f32,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    if init {
        if !bias.is_null() {
            let b0 = _mm256_loadu_ps(bias);
            let b1 = _mm256_loadu_ps(bias.add(8));
            acc = [[b0, b1]; 6];
        }
    } else {
        for i in 0..6 {
            acc[i][0] = _mm256_loadu_ps(c.add(i * ldc));
            acc[i][1] = _mm256_loadu_ps(c.add(i * ldc + 8));
        }
    }
    for kk in 0..kc {
        let bp = b.add(kk * 16);
        let b0 = _mm256_loadu_ps(bp);
        let b1 = _mm256_loadu_ps(bp.add(8));
        let ap = a.add(kk * 6);
        for i in 0..6 {
            let ai = _mm256_broadcast_ss(&*ap.add(i));
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    for i in 0..6 {
        _mm256_storeu_ps(c.add(i * ldc), acc[i][0]);
        _mm256_storeu_ps(c.add(i * ldc + 8), acc[i][1]);
    }
}

/// Loads 8 consecutive weights at `p` as f32 (natural order).
///
/// # Safety
/// `p .. p + 8` readable; CPU features per the module doc.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<W: WeightElem>(p: *const W) -> __m256 {
    match W::KIND {
        WeightKind::F32 => _mm256_loadu_ps(p.cast::<f32>()),
        WeightKind::Bf16 => {
            let v = _mm_loadu_si128(p.cast::<__m128i>());
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
        }
        WeightKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())),
    }
}

/// Packs one full 16-wide GEMM sliver: `dst[kk*16 + j] = f32(w[j*ldw + kk])`
/// for `j < 16`, `kk < kcc` — converting and transposing 8×8 blocks in
/// registers.
///
/// # Safety
/// * CPU features per the module doc;
/// * rows `w + j*ldw .. + kcc` readable for `j < 16`;
/// * `dst` valid for `kcc * 16` writes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_b_sliver<W: WeightElem>(
    w: *const W,
    ldw: usize,
    kcc: usize,
    dst: *mut f32,
) {
    let k8 = kcc & !7;
    for h in 0..2 {
        let base = w.add(h * 8 * ldw);
        let mut kk = 0;
        while kk < k8 {
            let r0 = load8(base.add(kk));
            let r1 = load8(base.add(ldw + kk));
            let r2 = load8(base.add(2 * ldw + kk));
            let r3 = load8(base.add(3 * ldw + kk));
            let r4 = load8(base.add(4 * ldw + kk));
            let r5 = load8(base.add(5 * ldw + kk));
            let r6 = load8(base.add(6 * ldw + kk));
            let r7 = load8(base.add(7 * ldw + kk));
            let t0 = _mm256_unpacklo_ps(r0, r1);
            let t1 = _mm256_unpackhi_ps(r0, r1);
            let t2 = _mm256_unpacklo_ps(r2, r3);
            let t3 = _mm256_unpackhi_ps(r2, r3);
            let t4 = _mm256_unpacklo_ps(r4, r5);
            let t5 = _mm256_unpackhi_ps(r4, r5);
            let t6 = _mm256_unpacklo_ps(r6, r7);
            let t7 = _mm256_unpackhi_ps(r6, r7);
            let u0 = _mm256_shuffle_ps(t0, t2, 0x44);
            let u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            let u2 = _mm256_shuffle_ps(t1, t3, 0x44);
            let u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            let u4 = _mm256_shuffle_ps(t4, t6, 0x44);
            let u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            let u6 = _mm256_shuffle_ps(t5, t7, 0x44);
            let u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            let d = dst.add(kk * 16 + h * 8);
            _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(d.add(16), _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(d.add(32), _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(d.add(48), _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(d.add(64), _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(d.add(80), _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(d.add(96), _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(d.add(112), _mm256_permute2f128_ps(u3, u7, 0x31));
            kk += 8;
        }
        for kk in k8..kcc {
            for j in 0..8 {
                *dst.add(kk * 16 + h * 8 + j) = (*base.add(j * ldw + kk)).to_f32();
            }
        }
    }
}

/// AVX-512F GEMM micro-kernel: a `(6·MA)`×32 tile of C (row stride `ldc`)
/// from `MA` consecutive packed 6-wide slivers of x (`a + s*6*kc`) and two
/// consecutive packed 16-wide slivers of W (`b`, `b + 16*kc`, i.e. the
/// usual 16-wide packing): `C = (init ? bias-or-0 : C) + Σ_kk A·B`.
/// `MA = 2` uses 24 zmm accumulators (12×32).
///
/// # Safety
/// * the CPU supports AVX-512F (`Isa::Avx512` is only constructed after
///   `is_x86_feature_detected!("avx512f")`);
/// * `a` has `MA * kc * 6` and `b` has `2 * kc * 16` readable floats;
/// * `c` is valid for reads and writes of `6 * MA` rows × 32 floats with
///   stride `ldc`, not accessed concurrently by another thread;
/// * `bias` is null or points to 32 readable floats.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // const-size loops, fully unrolled
pub(crate) unsafe fn kernel_avx512<const MA: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: bool,
    bias: *const f32,
) {
    let mut acc = [[[_mm512_setzero_ps(); 2]; 6]; MA];
    if init {
        if !bias.is_null() {
            let b0 = _mm512_loadu_ps(bias);
            let b1 = _mm512_loadu_ps(bias.add(16));
            acc = [[[b0, b1]; 6]; MA];
        }
    } else {
        for s in 0..MA {
            for i in 0..6 {
                let r = c.add((s * 6 + i) * ldc);
                acc[s][i][0] = _mm512_loadu_ps(r);
                acc[s][i][1] = _mm512_loadu_ps(r.add(16));
            }
        }
    }
    let bh = b.add(16 * kc);
    for kk in 0..kc {
        let b0 = _mm512_loadu_ps(b.add(kk * 16));
        let b1 = _mm512_loadu_ps(bh.add(kk * 16));
        for s in 0..MA {
            let ap = a.add(s * 6 * kc + kk * 6);
            for i in 0..6 {
                let ai = _mm512_set1_ps(*ap.add(i));
                acc[s][i][0] = _mm512_fmadd_ps(ai, b0, acc[s][i][0]);
                acc[s][i][1] = _mm512_fmadd_ps(ai, b1, acc[s][i][1]);
            }
        }
    }
    for s in 0..MA {
        for i in 0..6 {
            let r = c.add((s * 6 + i) * ldc);
            _mm512_storeu_ps(r, acc[s][i][0]);
            _mm512_storeu_ps(r.add(16), acc[s][i][1]);
        }
    }
}

/// Re-lays out each row of `x` (row length `k`) for the bf16 [`gemv_range_avx512`]: every full
/// block of 32 becomes `[x0, x2, .., x30, x1, x3, .., x31]` (the lane order of 32 bf16 weights
/// unpacked from one zmm load); the `k % 32` tail stays in natural order.
pub(crate) fn deinterleave_x32(x: &[f32], k: usize, dst: &mut [f32]) {
    debug_assert_eq!(x.len(), dst.len());
    if k == 0 {
        return;
    }
    let k32 = k & !31;
    for (src, d) in x.chunks_exact(k).zip(dst.chunks_exact_mut(k)) {
        for (sb, db) in src[..k32]
            .chunks_exact(32)
            .zip(d[..k32].chunks_exact_mut(32))
        {
            for i in 0..16 {
                db[i] = sb[2 * i];
                db[16 + i] = sb[2 * i + 1];
            }
        }
        d[k32..].copy_from_slice(&src[k32..]);
    }
}

/// Weights the zmm multi-row GEMV blocks read 32 at a time (bf16, int8, f32).
pub(crate) trait Zmm32: Copy {
    /// 32 weights at `p` as two f32 vectors, in the lane order `x` must be laid out in
    /// (bf16: even then odd elements, see [`deinterleave_x32`]; int8 and f32: natural).
    ///
    /// # Safety
    /// AVX-512F available; `p .. p + 32` readable.
    unsafe fn load32(p: *const Self) -> (__m512, __m512);
    /// One weight as f32 (the `k % 32` tail).
    fn widen(self) -> f32;
}

impl Zmm32 for half::bf16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load32(p: *const Self) -> (__m512, __m512) {
        let v = _mm512_loadu_si512(p.cast::<__m512i>());
        let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
        let odd = _mm512_castsi512_ps(_mm512_and_si512(
            v,
            _mm512_set1_epi32(0xFFFF_0000_u32 as i32),
        ));
        (even, odd)
    }
    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Zmm32 for i8 {
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load32(p: *const Self) -> (__m512, __m512) {
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16).cast())));
        (lo, hi)
    }
    #[inline]
    fn widen(self) -> f32 {
        f32::from(self)
    }
}

impl Zmm32 for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load32(p: *const Self) -> (__m512, __m512) {
        (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
    }
    #[inline]
    fn widen(self) -> f32 {
        self
    }
}

/// `R` rows of x × `NW` weight rows with zmm registers (16 accumulators at most):
/// `out[r][j] = x[r] · w[j]`, prefetching the `NW` rows at `pf` (if not null).
///
/// # Safety
/// AVX-512F and the module's features; `x` has `R * k` floats laid out as `W::load32`
/// expects; `w` points to `NW * k` readable weights; `pf` may be anything.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // const-size loops, fully unrolled
unsafe fn zmm_block<W: Zmm32, const R: usize, const NW: usize>(
    x: *const f32,
    k: usize,
    w: *const W,
    pf: *const W,
    out: &mut [[f32; 4]; 4],
) {
    let sz = core::mem::size_of::<W>();
    let k32 = k & !31;
    let mut acc = [[_mm512_setzero_ps(); NW]; R];
    let mut kk = 0;
    while kk < k32 {
        // One prefetch per 64-byte line of each of the next rows.
        if !pf.is_null() && (kk * sz).is_multiple_of(64) {
            for j in 0..NW {
                let line = pf.wrapping_add(j * k + kk).cast::<i8>();
                let mut b = 0;
                while b < 32 * sz {
                    _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(b));
                    b += 64;
                }
            }
        }
        for j in 0..NW {
            let (lo, hi) = W::load32(w.add(j * k + kk));
            for r in 0..R {
                let xr = x.add(r * k + kk);
                acc[r][j] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[r][j]);
                acc[r][j] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr.add(16)), acc[r][j]);
            }
        }
        kk += 32;
    }
    for r in 0..R {
        for j in 0..NW {
            let mut s = _mm512_reduce_add_ps(acc[r][j]);
            for t in k32..k {
                s += *x.add(r * k + t) * (*w.add(j * k + t)).widen();
            }
            out[r][j] = s;
        }
    }
}

/// Rows `0..rows` of x × weight rows `o0..o1` (row length `k`) in blocks of 4 weight rows
/// (each streamed once, the next block prefetched when `prefetch`) against groups of up to 4
/// rows of x; calls `put(r, o, x[r] · w[o])` for every pair.
///
/// # Safety
/// AVX-512F and the module's features; `x` has `rows * k` floats laid out as `W::load32`
/// expects; `w` points to at least `o1 * k` readable weights.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn zmm_rows<W: Zmm32>(
    x: *const f32,
    rows: usize,
    k: usize,
    w: *const W,
    o0: usize,
    o1: usize,
    prefetch: bool,
    mut put: impl FnMut(usize, usize, f32),
) {
    let mut o = o0;
    while o < o1 {
        let nw = if o1 - o >= 4 { 4 } else { 1 };
        let pf = if prefetch && o + 2 * nw <= o1 {
            w.wrapping_add((o + nw) * k)
        } else {
            core::ptr::null()
        };
        let wo = w.add(o * k);
        let mut r = 0;
        while r < rows {
            let rc = match rows - r {
                n if n >= 4 => 4,
                n if n >= 2 => 2,
                _ => 1,
            };
            let xr = x.add(r * k);
            let mut res = [[0f32; 4]; 4];
            match (rc, nw) {
                (4, 4) => zmm_block::<W, 4, 4>(xr, k, wo, pf, &mut res),
                (2, 4) => zmm_block::<W, 2, 4>(xr, k, wo, pf, &mut res),
                (_, 4) => zmm_block::<W, 1, 4>(xr, k, wo, pf, &mut res),
                (4, _) => zmm_block::<W, 4, 1>(xr, k, wo, pf, &mut res),
                (2, _) => zmm_block::<W, 2, 1>(xr, k, wo, pf, &mut res),
                _ => zmm_block::<W, 1, 1>(xr, k, wo, pf, &mut res),
            }
            for (i, row) in res[..rc].iter().enumerate() {
                for (j, v) in row[..nw].iter().enumerate() {
                    put(r + i, o + j, *v);
                }
            }
            r += rc;
        }
        o += nw;
    }
}

/// Several rows of x × weight rows `o0..o1` with AVX-512F (batched decode):
/// `y[r*n + o] = x[r]·w[o] · scale[o] (+ bias[o])` (`scales` for int8 rows). Twice the work
/// per instruction of the AVX2 kernels, which are compute-bound from ~8 rows.
///
/// # Safety
/// AVX-512F and the module's features; `xp.len() == rows * k` laid out as `W::load32` expects;
/// `w.len() >= o1 * k`, `o0 <= o1 <= n`, `scales` (if any) has `o1` and `bias` (if any) `n`
/// elements; `y.0` points to a live `rows * n` buffer whose columns `o0..o1` nobody else
/// accesses during this call.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_range_avx512<W: Zmm32>(
    xp: &[f32],
    rows: usize,
    w: &[W],
    scales: Option<&[f32]>,
    k: usize,
    n: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    y: SyncPtr,
) {
    debug_assert!(xp.len() == rows * k && w.len() >= o1 * k && o1 <= n);
    zmm_rows(xp.as_ptr(), rows, k, w.as_ptr(), o0, o1, true, |r, o, v| {
        let v = scales.map_or(v, |s| v * s[o]);
        *y.0.add(r * n + o) = v + bias.map_or(0.0, |b| b[o]);
    });
}
