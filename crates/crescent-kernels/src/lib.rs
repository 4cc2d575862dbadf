//! # crescent-kernels
//!
//! CPU matmul kernels for crescent: `y = x · Wᵀ (+ bias)` with the weights in
//! their storage dtype (bf16, f16 or f32) and all arithmetic in f32.
//!
//! (README section; numbers filled in below.)

mod bench;
mod gemm;
mod gemv;
mod portable;
mod util;
mod weights;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

pub use bench::{bandwidth_gb_s, gemm_peak_gflops};
pub use half::{bf16, f16};
pub use weights::WeightElem;

/// Calls with at most this many rows of `x` always use the GEMV path
/// (weights streamed once per call).
pub const GEMV_MAX_ROWS: usize = 16;

/// Calls with more rows still use the GEMV path while `x` is at most this
/// many f32 (1 MiB, about one core's L2): the GEMV kernel re-reads `x` from
/// L2 for every block of 4 weight rows and measured faster than the packed
/// GEMM there (e.g. 64 × 2048 and 32 × 8192); beyond it the GEMM wins.
pub const GEMV_MAX_X_ELEMS: usize = 256 * 1024;

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
}

impl Isa {
    /// The best level this CPU supports (detected once, then cached). The
    /// environment variable `CRESCENT_KERNELS_ISA=portable` forces the
    /// portable kernels (for testing / comparison).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var("CRESCENT_KERNELS_ISA")
                .is_ok_and(|v| v.eq_ignore_ascii_case("portable"))
            {
                return Isa::Portable;
            }
            if Isa::Avx2Fma.is_supported() {
                Isa::Avx2Fma
            } else {
                Isa::Portable
            }
        })
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
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2Fma => false,
        }
    }

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2Fma => "avx2+fma",
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

fn check_len(what: &str, got: usize, a: (&str, usize), b: (&str, usize)) {
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
    check_len("x", x.len(), ("rows", rows), ("in_features", k));
    check_len("w", w.len(), ("out_features", n), ("in_features", k));
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
        return;
    }
    if k == 0 {
        for row in y.chunks_exact_mut(n) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
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
        gemm::gemm(isa, x, rows, w, n, k, bias, y);
    }
}

#[cfg(test)]
mod tests;
