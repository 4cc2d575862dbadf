//! Quantized weights: int8 per output channel and int4 group-wise, both
//! symmetric (no zero point); quantizers, dequantizers, and the matmuls.
//!
//! ## Layouts
//! * **int8** ([`quantize_q8`], [`matmul_q8`]): `q` is `[out, in]` `i8`
//!   row-major, `scales` is `[out]` f32; `w[o, i] ≈ scales[o] · q[o, i]`.
//!   `scale = max_i |w[o, i]| / 127`, `q = round(w / scale)` ∈ −127..=127.
//! * **int4** ([`quantize_q4`], [`matmul_q4`]): every row is split into
//!   groups of `group` consecutive columns (`group` even, `in % group == 0`,
//!   default [`Q4_GROUP`] = 32). `scales` is `[out, in / group]` f16
//!   row-major; a value `v` ∈ −8..=7 is stored as the nibble `v + 8`, two per
//!   byte, the **low nibble holding the even column**: `q` is
//!   `[out, in / 2]` bytes and `w[o, i] ≈ scales[o, i / group] · v[o, i]`
//!   with `v[o, 2j] = (q[o, j] & 15) − 8`, `v[o, 2j+1] = (q[o, j] >> 4) − 8`.
//!   The quantizer uses all 16 levels (as llama.cpp's Q4_0): with `m` the
//!   group's element of largest magnitude (sign kept), `scale = m / −8`, so
//!   `m` maps to −8, and `q = clamp(round(w / scale), −8, 7)` with `scale` the
//!   f16-rounded value that is stored (relative rounding ≤ 2⁻¹¹; f16 scales are
//!   half the bytes of f32 ones: 0.5625 instead of 0.625 bytes per weight).
//!   Scales may therefore be negative.
//!
//! ## Rounding and error bounds
//! `round` is round-half-to-even (the IEEE default, computed with the
//! `1.5·2²³` magic constant — exact for |v| < 2²²) of the correctly rounded
//! f32 quotient `w / scale`. Hence, per element (up to that quotient's
//! rounding, ≤ 1 ulp):
//! int8 `|w − scale·q| ≤ scale / 2`; int4 `|w − scale·v| ≤ |scale| / 2`,
//! except for elements clamped at +7 (those within `|scale|/2` of `−m`), where
//! the error is at most `|scale|` = max|w| of the group / 8. An all-zero row
//! (group) gets scale 0 and q = 0. A row (group) holding a NaN or ±∞ gets a
//! NaN scale (callers should reject such weights).
//!
//! ## Kernels
//! Same structure as the dense ones: the GEMV path streams the quantized
//! bytes once per call and converts them in registers (AVX2: sign/zero
//! extension `vpmovsxbd` / `vpmovzxbd` + nibble masks, `vcvtdq2ps`, FMA;
//! int8 applies the row scale once per dot product, int4 dequantizes with the
//! group scale in the same FMA, `fma(u, s, −8s)`); the GEMM path dequantizes
//! each 16-row sliver of the weight panel to f32 (per-thread buffer) and runs
//! the f32 micro-kernel. The AVX2 int4 GEMV needs `group % 32 == 0`; other
//! groups use the portable kernels.

use half::f16;
use rayon::prelude::*;

use crate::gemm::{self, PackB, NR};
use crate::gemv::{deinterleave_x, par_outputs};
use crate::util::{div_ceil, ensure_len, huge_vec, with_call_scratch, SyncPtr};
use crate::weights::WeightElem;
use crate::{check_len, uses_gemv, Isa, Path};

/// Default int4 group size (columns sharing one scale).
pub const Q4_GROUP: usize = 32;

/// Rows per rayon task when quantizing (a row is ≥ a few KiB for real layers).
const QUANT_MIN_ROWS: usize = 16;

/// `1.5 · 2²³`: for |v| < 2²², `v + MAGIC` is rounded (ties to even, the IEEE default) to an
/// integer `n + MAGIC` whose bit pattern is `MAGIC_BITS + n` — so rounding and conversion to
/// an integer are one add and one integer subtraction, which vectorise.
const MAGIC: f32 = 12_582_912.0;
const MAGIC_BITS: i32 = 0x4B40_0000;

/// `round(v)` (ties to even) as an integer, for |v| < 2²².
#[inline(always)]
fn rne_i32(v: f32) -> i32 {
    (v + MAGIC).to_bits() as i32 - MAGIC_BITS
}

/// Largest |v| of `x` as f32 bits (`>= 0x7f80_0000`: a NaN or ±∞ is present). An integer max
/// over the magnitude bits (monotonic in |v| for non-NaN floats), so it vectorises.
#[inline]
fn amax_bits(x: &[f32]) -> u32 {
    x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff))
}

/// Quantizes one row (already converted to f32) to int8; returns the scale.
fn quantize_row_q8(w: &[f32], q: &mut [i8]) -> f32 {
    let bits = amax_bits(w);
    if bits >= 0x7f80_0000 {
        q.fill(0);
        return f32::NAN;
    }
    let scale = f32::from_bits(bits) / 127.0;
    if scale == 0.0 {
        q.fill(0);
        return 0.0;
    }
    for (d, v) in q.iter_mut().zip(w) {
        *d = rne_i32(v / scale).clamp(-127, 127) as i8;
    }
    scale
}

/// `s` as the f16 nearest to it that is not smaller in magnitude, so that every |w| ≤ 8·|s|
/// still satisfies |w / scale| ≤ 8 (relative rounding ≤ 2⁻¹⁰ in f16's normal range); ±∞ when
/// |s| > 65504 (callers reject non-finite scales).
fn f16_scale(s: f32) -> f16 {
    let h = f16::from_f32(s);
    if !h.is_finite() || h.to_f32().abs() >= s.abs() {
        h
    } else {
        // Sign-magnitude: the next representable value away from zero.
        f16::from_bits(h.to_bits() + 1)
    }
}

/// Quantizes one row (already converted to f32) to int4 groups (`w.len() == 2 * q.len()`,
/// `scales` one per group).
fn quantize_row_q4(w: &[f32], group: usize, q: &mut [u8], scales: &mut [f16]) {
    for ((wg, qg), s) in w
        .chunks_exact(group)
        .zip(q.chunks_exact_mut(group / 2))
        .zip(scales.iter_mut())
    {
        let bits = amax_bits(wg);
        if bits >= 0x7f80_0000 || bits == 0 {
            qg.fill(0x88);
            *s = if bits == 0 { f16::ZERO } else { f16::NAN };
            continue;
        }
        // The (first) element of largest magnitude, sign kept, maps to -8.
        let m = wg
            .iter()
            .copied()
            .find(|v| v.to_bits() & 0x7fff_ffff == bits)
            .unwrap_or(f32::from_bits(bits));
        let h = f16_scale(m / -8.0);
        *s = h;
        let scale = h.to_f32();
        for (b, pair) in qg.iter_mut().zip(wg.chunks_exact(2)) {
            let lo = rne_i32(pair[0] / scale).clamp(-8, 7) + 8;
            let hi = rne_i32(pair[1] / scale).clamp(-8, 7) + 8;
            *b = (lo | (hi << 4)) as u8;
        }
    }
}

/// Quantizes `w` (`[out_features, in_features]` row-major, any [`WeightElem`]) to symmetric
/// int8 per output channel: returns `(q, scales)`, `q` `[out, in]` `i8` row-major and `scales`
/// `[out]` f32 with `w[o, i] ≈ scales[o] · q[o, i]`, `scales[o] = max_i |w[o, i]| / 127`,
/// `q = round(w / scale)` ∈ −127..=127 (round half to even of the f32 quotient), so
/// `|w − scale·q| ≤ scale / 2`. An all-zero row gets scale 0; a row holding NaN or ±∞ gets a
/// NaN scale (reject such weights). Rows are quantized in parallel (rayon's current pool).
///
/// # Panics
/// If `w.len() != out_features · in_features`.
pub fn quantize_q8<W: WeightElem>(
    w: &[W],
    out_features: usize,
    in_features: usize,
) -> (Vec<i8>, Vec<f32>) {
    check_len(
        "w",
        w.len(),
        ("out_features", out_features),
        ("in_features", in_features),
    );
    let mut q = huge_vec(w.len(), 0i8);
    let mut scales = vec![0f32; out_features];
    if in_features == 0 {
        return (q, scales);
    }
    q.par_chunks_mut(in_features)
        .zip(w.par_chunks(in_features))
        .zip(scales.par_iter_mut())
        .with_min_len(QUANT_MIN_ROWS)
        .for_each_init(
            || vec![0f32; in_features],
            |buf, ((qr, wr), s)| {
                W::convert_slice(wr, buf);
                *s = quantize_row_q8(buf, qr);
            },
        );
    (q, scales)
}

/// Checks the int4 group parameters (programmer errors panic).
fn check_q4_group(group: usize, in_features: usize) {
    assert!(
        group >= 2 && group.is_multiple_of(2),
        "crescent-kernels q4: group {group} must be even and >= 2"
    );
    assert!(
        in_features.is_multiple_of(group),
        "crescent-kernels q4: in_features {in_features} is not a multiple of group {group}"
    );
}

/// Quantizes `w` (`[out_features, in_features]` row-major) to symmetric int4 in groups of
/// `group` consecutive columns (`group` even, `in % group == 0`; default [`Q4_GROUP`]):
/// returns `(q, scales)`.
///
/// Layout: `scales` is `[out, in / group]` f16 row-major; a value `v` ∈ −8..=7 is stored as
/// the nibble `v + 8`, two per byte, the **low nibble holding the even column**, so `q` is
/// `[out, in / 2]` bytes and `w[o, i] ≈ scales[o, i / group] · v[o, i]` with
/// `v[o, 2j] = (q[o, j] & 15) − 8`, `v[o, 2j + 1] = (q[o, j] >> 4) − 8`.
///
/// All 16 levels are used (as llama.cpp's Q4_0): with `m` the group's first element of
/// largest magnitude (sign kept), `scale` is `m / −8` rounded to f16 away from zero (so
/// `|scale| ≥ max|w| / 8`, within 2⁻¹⁰ relative in f16's normal range; scales may be
/// negative) and `v = clamp(round(w / scale), −8, 7)` (round half to even). Hence
/// `|w − scale·v| ≤ |scale| / 2`, except for elements clamped at +7 (within `|scale| / 2` of
/// `−m`), where it is at most `|scale|`. An all-zero group gets scale 0; a group holding NaN
/// or ±∞ gets a NaN scale, one whose scale exceeds f16's range (max |w| > 524 032) an infinite
/// one. Rows are quantized in parallel.
///
/// # Panics
/// If `w.len() != out_features · in_features`, `group` is odd or 0, or `in_features` is not a
/// multiple of `group`.
pub fn quantize_q4<W: WeightElem>(
    w: &[W],
    out_features: usize,
    in_features: usize,
    group: usize,
) -> (Vec<u8>, Vec<f16>) {
    check_len(
        "w",
        w.len(),
        ("out_features", out_features),
        ("in_features", in_features),
    );
    check_q4_group(group, in_features);
    let mut q = huge_vec(w.len() / 2, 0x88u8);
    let gpr = in_features / group;
    let mut scales = huge_vec(out_features * gpr, f16::ZERO);
    if in_features == 0 {
        return (q, scales);
    }
    q.par_chunks_mut(in_features / 2)
        .zip(w.par_chunks(in_features))
        .zip(scales.par_chunks_mut(gpr))
        .with_min_len(QUANT_MIN_ROWS)
        .for_each_init(
            || vec![0f32; in_features],
            |buf, ((qr, wr), sr)| {
                W::convert_slice(wr, buf);
                quantize_row_q4(buf, group, qr, sr);
            },
        );
    (q, scales)
}

/// Dequantizes one int8 row: `out[i] = scale · q[i]`.
///
/// # Panics
/// If `q` and `out` differ in length.
pub fn dequantize_q8_row(q: &[i8], scale: f32, out: &mut [f32]) {
    assert_eq!(q.len(), out.len(), "dequantize_q8_row: length mismatch");
    for (o, v) in out.iter_mut().zip(q) {
        *o = f32::from(*v) * scale;
    }
}

/// Dequantizes one int4 row of `out.len()` columns (`q` holds `out.len() / 2` bytes, `scales`
/// one per group of `group` columns): `out[i] = scales[i / group] · v[i]`.
///
/// # Panics
/// On inconsistent lengths or an invalid group (see [`quantize_q4`]).
pub fn dequantize_q4_row(q: &[u8], scales: &[f16], group: usize, out: &mut [f32]) {
    check_q4_group(group, out.len());
    assert!(
        q.len() * 2 == out.len() && scales.len() * group == out.len(),
        "dequantize_q4_row: q has {} bytes and scales {} entries for {} columns (group {group})",
        q.len(),
        scales.len(),
        out.len()
    );
    dequant_q4_cols(q, scales, group, 0, out.len(), out);
}

/// Columns `c0..c1` of one int4 row into `out[..c1 - c0]` (`group` even).
fn dequant_q4_cols(q: &[u8], sc: &[f16], group: usize, c0: usize, c1: usize, out: &mut [f32]) {
    let nib = |c: usize| -> f32 {
        let b = q[c / 2];
        let u = if c.is_multiple_of(2) { b & 15 } else { b >> 4 };
        f32::from(u as i8 - 8)
    };
    let mut c = c0;
    while c < c1 {
        let g = c / group;
        let end = ((g + 1) * group).min(c1);
        let s = sc[g].to_f32();
        if c % 2 == 1 {
            out[c - c0] = nib(c) * s;
            c += 1;
        }
        let pairs = (end - c) / 2;
        let qb = &q[c / 2..c / 2 + pairs];
        let o = &mut out[c - c0..c - c0 + 2 * pairs];
        for (b, o2) in qb.iter().zip(o.chunks_exact_mut(2)) {
            o2[0] = f32::from((b & 15) as i8 - 8) * s;
            o2[1] = f32::from((b >> 4) as i8 - 8) * s;
        }
        c += 2 * pairs;
        if c < end {
            out[c - c0] = nib(c) * s;
            c += 1;
        }
    }
}

/// int8 weights as the kernels see them (lengths validated).
#[derive(Clone, Copy)]
pub(crate) struct Q8Ref<'a> {
    pub(crate) q: &'a [i8],
    pub(crate) scales: &'a [f32],
}

/// int4 weights as the kernels see them (lengths and group validated).
#[derive(Clone, Copy)]
pub(crate) struct Q4Ref<'a> {
    pub(crate) q: &'a [u8],
    pub(crate) scales: &'a [f16],
    pub(crate) group: usize,
}

/// Dequantizes 16 rows (`n0..n1`, zeros past `n1`) of columns `pc..pc+kcc` into `tmp` as
/// row-major `[16, kcc]`, then transposes them into slivers.
#[allow(clippy::too_many_arguments)]
fn pack_slivers(
    isa: Isa,
    n0: usize,
    n1: usize,
    kcc: usize,
    bp: &mut [f32],
    tmp: &mut Vec<f32>,
    row: impl Fn(usize, &mut [f32]),
) {
    let nsl = div_ceil(n1 - n0, NR);
    let t = ensure_len(tmp, NR * kcc);
    for (s, dst) in bp[..nsl * NR * kcc].chunks_exact_mut(NR * kcc).enumerate() {
        for (j, tr) in t.chunks_exact_mut(kcc).enumerate() {
            let o = n0 + s * NR + j;
            if o < n1 {
                row(o, tr);
            } else {
                tr.fill(0.0);
            }
        }
        gemm::transpose_sliver(isa, t, kcc, dst);
    }
}

impl PackB for Q8Ref<'_> {
    fn pack_b(
        &self,
        isa: Isa,
        k: usize,
        n0: usize,
        n1: usize,
        pc: usize,
        kcc: usize,
        bp: &mut [f32],
        tmp: &mut Vec<f32>,
    ) {
        pack_slivers(isa, n0, n1, kcc, bp, tmp, |o, out| {
            dequantize_q8_row(&self.q[o * k + pc..o * k + pc + kcc], self.scales[o], out)
        });
    }
}

impl PackB for Q4Ref<'_> {
    fn pack_b(
        &self,
        isa: Isa,
        k: usize,
        n0: usize,
        n1: usize,
        pc: usize,
        kcc: usize,
        bp: &mut [f32],
        tmp: &mut Vec<f32>,
    ) {
        let gpr = k / self.group;
        pack_slivers(isa, n0, n1, kcc, bp, tmp, |o, out| {
            dequant_q4_cols(
                &self.q[o * k / 2..(o + 1) * k / 2],
                &self.scales[o * gpr..(o + 1) * gpr],
                self.group,
                pc,
                pc + kcc,
                out,
            )
        });
    }
}

/// Portable int8 GEMV over output features `o0..o1` (contract as `x86::gemv_range`).
#[allow(clippy::too_many_arguments)]
fn portable_gemv_q8(
    x: &[f32],
    rows: usize,
    w: Q8Ref<'_>,
    k: usize,
    n: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    y: SyncPtr,
) {
    crate::util::with_scratch(|s| {
        let t = ensure_len(&mut s.t, k);
        for o in o0..o1 {
            dequantize_q8_row(&w.q[o * k..(o + 1) * k], 1.0, t);
            let b = bias.map_or(0.0, |b| b[o]);
            for r in 0..rows {
                let v = crate::portable::dot(&x[r * k..(r + 1) * k], t) * w.scales[o] + b;
                // SAFETY: `r < rows`, `o < o1 <= n`: inside the caller's live `rows * n`
                // output; this task is the only writer of column `o`.
                unsafe { *y.0.add(r * n + o) = v };
            }
        }
    });
}

/// Portable int4 GEMV over output features `o0..o1`.
#[allow(clippy::too_many_arguments)]
fn portable_gemv_q4(
    x: &[f32],
    rows: usize,
    w: Q4Ref<'_>,
    k: usize,
    n: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    y: SyncPtr,
) {
    let gpr = k / w.group;
    crate::util::with_scratch(|s| {
        let t = ensure_len(&mut s.t, k);
        for o in o0..o1 {
            dequant_q4_cols(
                &w.q[o * k / 2..(o + 1) * k / 2],
                &w.scales[o * gpr..(o + 1) * gpr],
                w.group,
                0,
                k,
                t,
            );
            let b = bias.map_or(0.0, |b| b[o]);
            for r in 0..rows {
                let v = crate::portable::dot(&x[r * k..(r + 1) * k], t) + b;
                // SAFETY: as in `portable_gemv_q8`.
                unsafe { *y.0.add(r * n + o) = v };
            }
        }
    });
}

/// `y[r, o] = scales[o] · Σ_i x[r, i] · q[o, i] (+ bias[o])` with int8 weights `q`
/// (`[out_features, in_features]`, see [`quantize_q8`]) and f32 accumulation. Layouts and
/// threading as [`crate::matmul`].
///
/// # Panics
/// If a length is inconsistent with the dimensions.
#[allow(clippy::too_many_arguments)]
pub fn matmul_q8(
    x: &[f32],
    rows: usize,
    q: &[i8],
    scales: &[f32],
    out_features: usize,
    in_features: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    matmul_q8_forced(
        Isa::detect(),
        Path::Auto,
        x,
        rows,
        q,
        scales,
        out_features,
        in_features,
        bias,
        y,
    );
}

/// [`matmul_q8`] with an explicit kernel level and algorithm.
///
/// # Panics
/// On inconsistent lengths, or if `isa` is not supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub fn matmul_q8_forced(
    isa: Isa,
    path: Path,
    x: &[f32],
    rows: usize,
    q: &[i8],
    scales: &[f32],
    out_features: usize,
    in_features: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (n, k) = (out_features, in_features);
    check_len("q", q.len(), ("out_features", n), ("in_features", k));
    assert!(
        scales.len() == n,
        "crescent-kernels matmul_q8: scales has {} elements, expected out_features = {n}",
        scales.len()
    );
    if !crate::prologue(isa, x, rows, n, k, bias, y) {
        return;
    }
    let w = Q8Ref { q, scales };
    let use_gemv = match path {
        Path::Auto => uses_gemv(rows, k),
        Path::Gemv => true,
        Path::Gemm => false,
    };
    if !use_gemv {
        gemm::gemm(isa, x, rows, &w, n, k, bias, y);
        return;
    }
    let yp = SyncPtr(y.as_mut_ptr());
    let run = |o0: usize, o1: usize| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` implies AVX-512F and the AVX2 set were detected; lengths
        // validated above (x: rows*k, q: n*k, scales: n, y: rows*n, bias: n); tasks get disjoint
        // `o0..o1` ranges and `y` outlives the parallel section.
        Isa::Avx512 => unsafe {
            crate::x86q::gemv_q8_range_avx512(x, rows, q, scales, k, n, o0, o1, bias, yp)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` implies the CPU features were detected; lengths validated
        // above (x: rows*k, q: n*k, scales: n, y: rows*n, bias: n); tasks get disjoint
        // `o0..o1` ranges and `y` outlives the parallel section.
        Isa::Avx2Fma => unsafe {
            crate::x86q::gemv_q8_range(x, rows, q, scales, k, n, o0, o1, bias, yp)
        },
        _ => portable_gemv_q8(x, rows, w, k, n, o0, o1, bias, yp),
    };
    par_outputs(rows, n, k, run);
}

/// `y[r, o] = Σ_i x[r, i] · scales[o, i / group] · v[o, i] (+ bias[o])` with int4 weights
/// (`q` `[out_features, in_features / 2]` bytes, `scales` `[out_features, in_features /
/// group]`, see [`quantize_q4`]) and f32 accumulation. Layouts and threading as
/// [`crate::matmul`].
///
/// # Panics
/// If a length is inconsistent with the dimensions, `group` is odd or 0, or `in_features` is
/// not a multiple of `group`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_q4(
    x: &[f32],
    rows: usize,
    q: &[u8],
    scales: &[f16],
    group: usize,
    out_features: usize,
    in_features: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    matmul_q4_forced(
        Isa::detect(),
        Path::Auto,
        x,
        rows,
        q,
        scales,
        group,
        out_features,
        in_features,
        bias,
        y,
    );
}

/// Whether the GEMV path of [`matmul_q4_forced`] takes the int8-activation VNNI kernel:
/// AVX-512 level with BW and VNNI on this CPU, groups of 32 and `in_features % 64 == 0` (any
/// number of rows: the GEMV path serves decode batches). Its error is that of int8
/// activations (see `x86q::gemv_q4_vnni`), not f32 rounding.
pub(crate) fn q4_uses_vnni(isa: Isa, rows: usize, group: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512
            && rows >= 1
            && group == 32
            && k.is_multiple_of(64)
            && crate::x86q::has_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, rows, group, k);
        false
    }
}

/// [`matmul_q4`] with an explicit kernel level and algorithm.
///
/// # Panics
/// As [`matmul_q4`], or if `isa` is not supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub fn matmul_q4_forced(
    isa: Isa,
    path: Path,
    x: &[f32],
    rows: usize,
    q: &[u8],
    scales: &[f16],
    group: usize,
    out_features: usize,
    in_features: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (n, k) = (out_features, in_features);
    check_q4_group(group, k);
    check_len("q", q.len() * 2, ("out_features", n), ("in_features", k));
    check_len(
        "scales",
        scales.len(),
        ("out_features", n),
        ("in_features / group", k / group),
    );
    if !crate::prologue(isa, x, rows, n, k, bias, y) {
        return;
    }
    let w = Q4Ref { q, scales, group };
    let use_gemv = match path {
        Path::Auto => uses_gemv(rows, k),
        Path::Gemv => true,
        Path::Gemm => false,
    };
    if !use_gemv {
        gemm::gemm(isa, x, rows, &w, n, k, bias, y);
        return;
    }
    let yp = SyncPtr(y.as_mut_ptr());
    let simd = isa.has_avx2() && group.is_multiple_of(32);
    #[cfg(target_arch = "x86_64")]
    if q4_uses_vnni(isa, rows, group, k) {
        // Decode: integer dot products against x quantized to int8 per group (see the kernel).
        let gpr = k / 32;
        let xl = crate::x86q::q4_vnni_xq_len(k);
        let mut xq = vec![0i8; rows * xl];
        let mut sx = vec![0f32; rows * gpr];
        let mut c = vec![0f32; rows * gpr];
        for r in 0..rows {
            crate::x86q::prepare_q4_x_vnni(
                &x[r * k..(r + 1) * k],
                &mut xq[r * xl..(r + 1) * xl],
                &mut sx[r * gpr..(r + 1) * gpr],
                &mut c[r * gpr..(r + 1) * gpr],
            );
        }
        let run = |o0: usize, o1: usize| {
            // SAFETY: `q4_uses_vnni` checked AVX-512F (via `Isa::Avx512`), BW and VNNI,
            // `group == 32` and `k % 64 == 0`; lengths validated above (x: rows·k, q: n·k/2,
            // scales: n·k/32, y: rows·n); `xq`, `sx`, `c` were prepared row by row for this
            // kernel; tasks get disjoint `o0..o1` (columns of every row of y).
            unsafe {
                crate::x86q::gemv_q4_vnni(
                    xq.as_ptr(),
                    sx.as_ptr(),
                    c.as_ptr(),
                    rows,
                    k,
                    q.as_ptr().add(o0 * k / 2),
                    scales.as_ptr().add(o0 * gpr),
                    o1 - o0,
                    bias.map_or(core::ptr::null(), |b| b.as_ptr().add(o0)),
                    yp.get().add(o0),
                    n,
                )
            };
        };
        par_outputs(rows, n, k, run);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && rows == 1 && simd {
        // Decode: the AVX-512 single-row kernel (the AVX2 one is compute-bound at ≈ half the
        // memory bandwidth).
        let gpr = k / group;
        let mut xs = vec![0f32; gpr];
        with_call_scratch(|buf| {
            let d = ensure_len(buf, k);
            crate::x86q::prepare_q4_x512(x, group, d, &mut xs);
            let d = &*d;
            let run = |o0: usize, o1: usize| {
                // SAFETY: `Isa::Avx512` implies AVX-512F and the AVX2 set were detected; lengths
                // and group validated above (q: n·k/2, scales: n·k/group, group % 32 == 0); `d`
                // and `xs` were prepared for this kernel; tasks get disjoint `o0..o1`.
                unsafe {
                    crate::x86q::gemv_q4_seq1_avx512(
                        d.as_ptr(),
                        xs.as_ptr(),
                        k,
                        q.as_ptr().add(o0 * k / 2),
                        scales.as_ptr().add(o0 * gpr),
                        group,
                        o1 - o0,
                        bias.map_or(core::ptr::null(), |b| b.as_ptr().add(o0)),
                        yp.get().add(o0),
                    )
                };
            };
            par_outputs(rows, n, k, run);
        });
        return;
    }
    with_call_scratch(|buf| {
        let xp: &[f32] = if simd {
            let d = ensure_len(buf, x.len());
            deinterleave_x(x, k, d);
            d
        } else {
            x
        };
        let run = |o0: usize, o1: usize| {
            if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Avx2Fma` / `Avx512` imply the CPU features; lengths and group were
                // validated above (q: n*k/2, scales: n*k/group, group % 32 == 0), `xp` is `x`
                // de-interleaved per 16 as the kernel expects; disjoint `o0..o1` per task.
                unsafe {
                    crate::x86q::gemv_q4_range(
                        isa == Isa::Avx512,
                        xp,
                        rows,
                        q,
                        scales,
                        group,
                        k,
                        n,
                        o0,
                        o1,
                        bias,
                        yp,
                    )
                };
            } else {
                portable_gemv_q4(xp, rows, w, k, n, o0, o1, bias, yp);
            }
        };
        par_outputs(rows, n, k, run);
    });
}
