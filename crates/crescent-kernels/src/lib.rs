//! # crescent-kernels
//!
//! CPU matmul kernels for crescent: `y = x · Wᵀ (+ bias)` (the `nn.Linear`
//! layout, `w` is `[out_features, in_features]`) with the weights kept in
//! their storage dtype (bf16, f16 or f32) and all arithmetic in f32. Pure
//! Rust (`half`, `rayon`); no per-call upcast copy of the weights.
//!
//! ## API
//! * [`matmul_bf16`], [`matmul_f16`], [`matmul_f32`] — or generic
//!   [`matmul`]`::<W>` over [`WeightElem`]. `y` is overwritten. Inconsistent
//!   lengths panic (programmer error). Threads: rayon's current pool.
//! * [`matmul_forced`] — same with an explicit [`Isa`] and [`Path`]
//!   (tests / benchmarks); [`uses_gemv`] tells which path `matmul` takes.
//! * Quantized weights: [`quantize_q8`] / [`matmul_q8`] (symmetric int8, one
//!   f32 scale per output channel) and [`quantize_q4`] / [`matmul_q4`]
//!   (symmetric int4 in groups of [`Q4_GROUP`] = 32 input columns, two
//!   nibbles per byte, one f16 scale per group); `*_forced` variants, row dequantizers. Layouts,
//!   rounding and error bounds: [`quantize_q8`], [`quantize_q4`].
//! * [`matmul_f32_strided`] with [`Rhs`] — f32 GEMM on strided views
//!   (attention: `q·kᵀ` and `p·v` read heads in place from the qkv buffer).
//! * Row / element-wise kernels (module `ops`): [`gelu_tanh`], [`gelu_erf`],
//!   [`geglu`], [`softmax_scaled`], [`layer_norm`], [`add_assign`],
//!   [`exp_inplace`], [`dot`], [`dot_rows`] / [`axpy_rows`] (decode attention).
//!   Polynomial exp / erf, no libm; one source compiled per ISA, same
//!   results on every ISA.
//! * [`bandwidth_gb_s`], [`gemm_peak_gflops`] — roofline probes for
//!   `crescent bench` (≈ 0.3 s and ≈ 1 s).
//!
//! ## Kernels
//! * **GEMV path** (`rows <= 16`, or x ≤ 1 MiB — e.g. ≤ 64 rows at
//!   in = 2048; decode): weights are streamed from memory exactly once per
//!   call, converted to f32 in registers (bf16: one AND + one shift per 16
//!   weights, with x re-laid-out once per call to match the lane order), and
//!   parallelised over chunks of output features. One row of x: each thread
//!   reads its weight rows strictly sequentially with an 8 KiB software
//!   prefetch. Several rows: blocks of 4 weight rows × 2 rows of x
//!   (8 accumulators, no register spills), the next block prefetched.
//! * **GEMM path** (prefill / vision): BLIS-style. Output features in
//!   panels of ~256 (count rounded to a multiple of the thread count), rows
//!   in tasks of ≤ 768; per K block (≤ 384) the task converts its weight
//!   panel to f32 into a per-thread buffer (8×8 in-register transposes),
//!   reads x packed once per call (shared by all panels; it used to be
//!   re-packed per panel), and runs a 6×16 AVX2 FMA micro-kernel (12 ymm
//!   accumulators) — or, with AVX-512F, a 12×32 zmm kernel (24 accumulators,
//!   two 16-wide W slivers × two 6-row x slivers; K blocks ≤ 256 so both W
//!   slivers stay in L1), with 6×32 / 6×16 tiles for the edges. Per-thread
//!   scratch is reused across calls (no allocation in the hot path;
//!   re-entrant calls from rayon tasks are safe).
//! * **Quantized**: the GEMV streams the int8 / int4 bytes once and converts
//!   them in registers (`vpmovsxbd` / `vpmovzxbd` + nibble mask and shift,
//!   `vcvtdq2ps`; int8 scales each dot product once, int4 dequantizes with
//!   its group scale in the FMA `u·s − 8s`; from 4 rows of x, int4 converts
//!   each block of 4 weight rows to f32 once and runs the f32 kernel); the
//!   GEMM dequantizes each 16-row sliver of its panel to f32 and reuses the
//!   f32 micro-kernel. The AVX2 int4 GEMV needs groups that are multiples of
//!   32 (else portable).
//! * **ISA**: AVX-512F (GEMM micro-kernel; multi-row bf16 GEMV; int8 GEMV;
//!   single-row int4 GEMV — with AVX-512 VNNI + BW, an integer kernel on x
//!   quantized to int8 per group of 32 — and int4's dequantized multi-row blocks; the
//!   single-row bf16 GEMV and `dot_rows` / `axpy_rows` stay AVX2), AVX2 +
//!   FMA + F16C detected at runtime; otherwise the same blocking in plain
//!   Rust that LLVM auto-vectorises. `CRESCENT_KERNELS_ISA=avx2` / `portable`
//!   caps the level. Numerics: f32 accumulation; tests check every
//!   path/ISA/dtype against an f64 reference (error ≤ 1e-5 · Σ|x·w|).
//!
//! ## Measured (`cargo run --release -p crescent-kernels --example kbench`)
//! Dev VM: 2 cores of an AMD EPYC family 26 (Zen 5), 2 rayon threads, bf16
//! weights, median ms per call, weights rotated over ≥ 256 MiB so decode
//! reads come from DRAM. The machine is shared and its DRAM bandwidth drifts (the probe read
//! 50–74 GB/s within minutes), so ratios are approximate.
//! Tables below: AVX2 GEMM kernel. The AVX-512 GEMM kernel (same VM, paired
//! runs against the AVX2 build): 1152→4304 rows 729 / 9477 ≈ 370 / 350
//! GFLOP/s (AVX2 ≈ 215 / 210), 2048→8192 rows 729 / 2048 ≈ 335–375 / 340
//! (AVX2 ≈ 170–215 / 180–200); one thread 2048→8192 × 729: 160 vs 95
//! (≈ 1.6–1.8× throughout; the VM is noisy, single runs vary ± 20 %).
//!
//! | probe | value |
//! |---|---|
//! | streaming read bandwidth ([`bandwidth_gb_s`]) | 72 GB/s best (45–55 typical) |
//! | f32 GEMM 2048³ ([`gemm_peak_gflops`]) | 212 GFLOP/s (1 thread: 114) |
//!
//! | weight (in→out) | rows=1 ms · GB/s | rows=4 GB/s | rows=16 GFLOP/s | rows=729 GFLOP/s | rows=2048 GFLOP/s |
//! |---|---|---|---|---|---|
//! | 2048→8192 (33.6 MB) | 0.55 · 60.5 | 37.8 | 200 | 235 | 230 |
//! | 8192→2048 (33.6 MB) | 0.76 · 43.9 | 39.1 | 189 | 223 | 211 |
//! | 2048→6144 (25.2 MB) | 0.54 · 46.7 | 39.3 | 211 | 230 | 222 |
//! | 1152→4304 (9.9 MB)  | 0.23 · 43.0 | — | 178 | 234 | 214 (9477 rows) |
//!
//! Quantized (`--dtype q8|q4 --quick`, same machine, another day: probe
//! 49 GB/s; bf16 rows=1 then ≈ 50 GB/s = 25 G weights/s). GB/s counts the
//! quantized bytes read, scales included (int8 ≈ 1, int4 0.625 bytes per
//! weight with the f32 group scales of that day; 0.5625 with today's f16 ones):
//!
//! | weight (in→out) | q8 rows=1 GB/s · GFLOP/s | q8 rows=16 / 729 GFLOP/s | q4 rows=1 GB/s · GFLOP/s | q4 rows=16 / 729 GFLOP/s |
//! |---|---|---|---|---|
//! | 2048→8192 | 40.4 · 80.6 | 202 / 214 | 22.5 · 72.1 | 179 / 211 |
//! | 8192→2048 | 36.5 · 73.0 | 200 / 208 | 20.4 · 65.3 | 154 / 209 |
//! | 2048→6144 | 39.2 · 78.2 | 202 / 212 | 21.6 · 69.1 | 181 / 210 |
//! | 1152→4304 | 43.5 · 86.7 | 197 / 216 | 19.9 · 63.7 | 178 / 217 |
//!
//! int8 decode streams at 75–89 % of the probe: 1.6–1.8× the weights/s of
//! bf16. int4 is compute-bound with AVX2 (≈ 18 vector ops per 32 weights,
//! ~4 per cycle per core): ≈ 1.4× bf16's weights/s, a little below int8 —
//! its gain here is memory. With AVX-512F the single-row int4 GEMV unpacks 16
//! bytes per instruction and scales once per group (≈ 12 ops per 32
//! weights): 26.5 GB/s at 2048→8192 (+18 %), still compute-bound. At 729 rows both run at
//! the f32 GEMM peak (dequantization ≈ free).
//!
//! Decode (rows=1) runs at 60–84 % of the best bandwidth probe of the same
//! run (≈ 100 % of the probe on one thread: 36.6 vs 35–38 GB/s), i.e.
//! 70–100× the 0.6 GB/s of candle's bf16 GEMV; GEMM reaches ~100 % of the
//! 2048³ probe (≈ the AVX2 FMA peak, 2 × ~115 GFLOP/s). The portable
//! fallback: rows=1 ≈ 33 GB/s, rows=729 ≈ 60 GFLOP/s.

mod bench;
mod gemm;
mod gemv;
mod ops;
mod portable;
mod quant;
mod util;
mod weights;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86q;

use std::sync::OnceLock;

pub use bench::{bandwidth_gb_s, gemm_peak_gflops};
pub use half::{bf16, f16};
pub use ops::{
    add_assign, axpy_rows, axpy_rows_f16, dot, dot_rows, dot_rows_f16, exp_inplace, geglu,
    gelu_erf, gelu_tanh, layer_norm, softmax_partial, softmax_scaled,
};
pub use quant::{
    dequantize_q4_row, dequantize_q8_row, matmul_q4, matmul_q4_forced, matmul_q8, matmul_q8_forced,
    quantize_q4, quantize_q8, Q4_GROUP,
};
pub use util::{
    advise_huge_pages, huge_vec, on_pool, prefetch_slice, tune_allocator, ALLOCATOR_RETAIN_BYTES,
};
pub use weights::WeightElem;

/// Calls with at most this many rows of `x` always use the GEMV path
/// (weights streamed once per call).
pub const GEMV_MAX_ROWS: usize = 16;

/// Calls with more rows still use the GEMV path while `x` is at most this
/// many f32 (32 Ki: e.g. ≤ 16 rows at in = 2048). Since the GEMM packs x once
/// per call, it beats the GEMV from ~32 rows on (`kbench --paths`, 64 × 2048
/// → 8192: GEMM 303 vs GEMV 204 GFLOP/s; 16 rows: GEMV 190 vs GEMM 137).
pub const GEMV_MAX_X_ELEMS: usize = 32 * 1024;

/// Whether [`matmul`] uses the GEMV path (else the blocked GEMM) for this
/// many rows of `x` with this `in_features`.
pub fn uses_gemv(rows: usize, in_features: usize) -> bool {
    rows <= GEMV_MAX_ROWS || rows.saturating_mul(in_features) <= GEMV_MAX_X_ELEMS
}

/// Instruction-set level of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, auto-vectorised for the compile target (any CPU).
    Portable,
    /// x86-64 with AVX2, FMA and F16C (runtime-detected).
    Avx2Fma,
    /// [`Isa::Avx2Fma`] plus AVX-512F (runtime-detected): the GEMM uses a
    /// 12×32 zmm micro-kernel; every other kernel is the AVX2 one.
    Avx512,
}

impl Isa {
    /// The best level this CPU supports (detected once, then cached). The
    /// environment variable `CRESCENT_KERNELS_ISA=portable` (or `avx2`)
    /// caps the level (for testing / comparison).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let cap = std::env::var("CRESCENT_KERNELS_ISA").unwrap_or_default();
            let levels: &[Isa] = if cap.eq_ignore_ascii_case("portable") {
                &[]
            } else if cap.eq_ignore_ascii_case("avx2") || cap.eq_ignore_ascii_case("avx2+fma") {
                &[Isa::Avx2Fma]
            } else {
                &[Isa::Avx512, Isa::Avx2Fma]
            };
            levels
                .iter()
                .copied()
                .find(|i| i.is_supported())
                .unwrap_or(Isa::Portable)
        })
    }

    /// Whether the AVX2 + FMA + F16C kernels may be used (true for every
    /// x86 level; `Avx512` is a superset of `Avx2Fma`).
    pub(crate) fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2Fma | Isa::Avx512)
    }

    /// Whether this CPU can run kernels of this level.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Isa::Avx2Fma.is_supported() && is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2Fma | Isa::Avx512 => false,
        }
    }

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Avx512 => "avx512f",
        }
    }
}

/// Which algorithm [`matmul_forced`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// GEMV or GEMM as decided by [`uses_gemv`].
    Auto,
    /// Weight-streaming GEMV kernel (any `rows`; intended for few rows).
    Gemv,
    /// Blocked, packed GEMM (any `rows`; intended for many rows).
    Gemm,
}

/// `y[r, o] = Σ_i x[r, i] · f32(w[o, i]) (+ bias[o])` for `r < rows`,
/// `o < out_features`, with f32 accumulation.
///
/// Layouts are row-major: `x` is `[rows, in_features]`, `w` is
/// `[out_features, in_features]` (the PyTorch `nn.Linear` layout), `y` is
/// `[rows, out_features]` and is fully overwritten. Uses rayon's current
/// thread pool.
///
/// # Panics
/// If a length is inconsistent with the dimensions (programmer error).
pub fn matmul<W: WeightElem>(
    x: &[f32],
    rows: usize,
    w: &[W],
    out_features: usize,
    in_features: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    matmul_forced(
        Isa::detect(),
        Path::Auto,
        x,
        rows,
        w,
        out_features,
        in_features,
        bias,
        y,
    );
}

/// [`matmul`] with bf16 weights (the checkpoint dtype).
pub fn matmul_bf16(
    x: &[f32],
    rows: usize,
    w: &[bf16],
    out_features: usize,
    in_features: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    matmul(x, rows, w, out_features, in_features, bias, y);
}

/// [`matmul`] with f16 weights.
pub fn matmul_f16(
    x: &[f32],
    rows: usize,
    w: &[f16],
    out_features: usize,
    in_features: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    matmul(x, rows, w, out_features, in_features, bias, y);
}

/// [`matmul`] with f32 weights.
pub fn matmul_f32(
    x: &[f32],
    rows: usize,
    w: &[f32],
    out_features: usize,
    in_features: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    matmul(x, rows, w, out_features, in_features, bias, y);
}

pub(crate) fn check_len(what: &str, got: usize, a: (&str, usize), b: (&str, usize)) {
    let want = a.1.checked_mul(b.1).unwrap_or_else(|| {
        panic!(
            "crescent-kernels matmul: {} ({}) × {} ({}) overflows usize",
            a.0, a.1, b.0, b.1
        )
    });
    assert!(
        got == want,
        "crescent-kernels matmul: {what} has {got} elements, expected {} ({}) × {} ({}) = {want}",
        a.0,
        a.1,
        b.0,
        b.1
    );
}

/// Validation shared by every matmul entry point; returns whether there is work to do (and
/// writes the bias / zeros for `in_features == 0`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn prologue(
    isa: Isa,
    x: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> bool {
    check_len("x", x.len(), ("rows", rows), ("in_features", k));
    check_len("y", y.len(), ("rows", rows), ("out_features", n));
    if let Some(b) = bias {
        assert!(
            b.len() == n,
            "crescent-kernels matmul: bias has {} elements, expected out_features = {n}",
            b.len()
        );
    }
    assert!(
        isa.is_supported(),
        "crescent-kernels matmul: {} kernels are not supported by this CPU",
        isa.name()
    );
    if rows == 0 || n == 0 {
        return false;
    }
    if k == 0 {
        for row in y.chunks_exact_mut(n) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        return false;
    }
    true
}

/// [`matmul`] with an explicit kernel level and algorithm (benchmarks,
/// tests, comparisons).
///
/// # Panics
/// On inconsistent lengths, or if `isa` is not supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub fn matmul_forced<W: WeightElem>(
    isa: Isa,
    path: Path,
    x: &[f32],
    rows: usize,
    w: &[W],
    out_features: usize,
    in_features: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (n, k) = (out_features, in_features);
    check_len("w", w.len(), ("out_features", n), ("in_features", k));
    if !prologue(isa, x, rows, n, k, bias, y) {
        return;
    }
    let use_gemv = match path {
        Path::Auto => uses_gemv(rows, k),
        Path::Gemv => true,
        Path::Gemm => false,
    };
    if use_gemv {
        gemv::gemv(isa, x, rows, w, n, k, bias, y);
    } else {
        gemm::gemm(isa, x, rows, &gemm::Dense(w), n, k, bias, y);
    }
}

/// The f32 right-hand matrix of [`matmul_f32_strided`], read in place (no copy).
#[derive(Clone, Copy, Debug)]
pub enum Rhs<'a> {
    /// `y = x · wᵀ`: output feature `j` is the row `w[j·ld .. j·ld + k]` (e.g. attention keys
    /// `[s, heads·hd]`, one head's columns).
    Rows {
        /// Elements.
        w: &'a [f32],
        /// Row stride.
        ld: usize,
    },
    /// `y = x · w`: `w` is `[k, n]` row-major with row stride `ld` (e.g. attention values).
    Cols {
        /// Elements.
        w: &'a [f32],
        /// Row stride.
        ld: usize,
    },
}

/// Strided f32 GEMM for attention: `y[r·ldy + j] = Σ_i x[r·lda + i] · rhs(j, i)` for
/// `r < rows`, `j < n`, `i < k` (only those elements of `y` are written). Always the blocked
/// GEMM (intended for many rows), f32 accumulation, rayon's pool.
///
/// # Panics
/// If a stride is smaller than its row width or a slice is too short (programmer error).
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32_strided(
    x: &[f32],
    lda: usize,
    rows: usize,
    rhs: Rhs<'_>,
    n: usize,
    k: usize,
    y: &mut [f32],
    ldy: usize,
) {
    assert!(
        lda >= k && ldy >= n,
        "crescent-kernels: stride below row width"
    );
    if rows == 0 || n == 0 {
        return;
    }
    assert!(
        (rows - 1) * lda + k <= x.len() && (rows - 1) * ldy + n <= y.len(),
        "crescent-kernels: x or y too short for {rows} strided rows"
    );
    if k == 0 {
        for r in 0..rows {
            y[r * ldy..r * ldy + n].fill(0.0);
        }
        return;
    }
    let isa = Isa::detect();
    match rhs {
        Rhs::Rows { w, ld } => {
            assert!(
                ld >= k && (n - 1) * ld + k <= w.len(),
                "crescent-kernels: rhs too short"
            );
            gemm::gemm_ld(
                isa,
                x,
                lda,
                rows,
                &gemm::RowsLd { w, ld },
                n,
                k,
                None,
                y,
                ldy,
            );
        }
        Rhs::Cols { w, ld } => {
            assert!(
                ld >= n && (k - 1) * ld + n <= w.len(),
                "crescent-kernels: rhs too short"
            );
            gemm::gemm_ld(
                isa,
                x,
                lda,
                rows,
                &gemm::KMajor { w, ld },
                n,
                k,
                None,
                y,
                ldy,
            );
        }
    }
}

#[cfg(test)]
mod tests;
