//! Building blocks shared by the vision encoder, text decoder and region module.
//!
//! Activations are f32 throughout (the reference computes in f32 from the bf16 weights
//! upcast exactly); weight matrices stay in the checkpoint dtype ([`Weight`]) and are converted
//! in registers by the `crescent-kernels` matmuls, so model memory ≈ checkpoint size.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::error::{ModelError, Result};
use crate::weights::Checkpoint;

/// LayerNorm epsilon used everywhere in Moondream.
pub const LN_EPS: f32 = 1e-5;

/// How weight matrices are held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightStorage {
    /// Keep the checkpoint dtype (bf16 for the real model); kernels convert in registers:
    /// memory ≈ checkpoint size.
    #[default]
    Checkpoint,
    /// Upcast to f32 at load: twice the memory of a bf16 checkpoint.
    F32,
}

/// Elements of a weight matrix in their storage dtype.
#[derive(Clone, Debug)]
pub enum WeightData {
    /// bfloat16 (the real checkpoint).
    Bf16(Vec<bf16>),
    /// float16.
    F16(Vec<f16>),
    /// float32.
    F32(Vec<f32>),
    /// Used in place from the memory-mapped checkpoint (bf16, f16 or f32 elements).
    Mapped(crate::weights::MappedBytes, DType),
}

/// A row-major weight matrix `[rows, cols]` (a 3-D expert tensor `[E, r, c]` is held as
/// `[E·r, c]` and addressed by row ranges).
#[derive(Clone, Debug)]
pub struct Weight {
    data: WeightData,
    rows: usize,
    cols: usize,
}

impl Weight {
    /// From a loaded tensor of any rank ≥ 1 (leading dims fold into rows).
    pub fn from_tensor(t: &Tensor, ws: WeightStorage) -> Result<Self> {
        let dims = t.dims();
        let cols = *dims.last().unwrap_or(&1);
        let rows = t.elem_count().checked_div(cols).unwrap_or(0);
        let flat = t.flatten_all()?;
        let data = match (ws, t.dtype()) {
            (WeightStorage::F32, _) | (_, DType::F32) => {
                WeightData::F32(flat.to_dtype(DType::F32)?.to_vec1()?)
            }
            (_, DType::BF16) => WeightData::Bf16(flat.to_vec1()?),
            (_, DType::F16) => WeightData::F16(flat.to_vec1()?),
            (_, other) => {
                return Err(ModelError::Checkpoint(format!(
                    "unsupported weight dtype {other:?}"
                )))
            }
        };
        Ok(Self { data, rows, cols })
    }

    /// Load `name` with `shape` from the checkpoint: in place from the mapping when the storage
    /// policy keeps the checkpoint dtype (and the data is aligned), else a converted copy.
    pub fn load(ck: &Checkpoint, name: &str, shape: &[usize], ws: WeightStorage) -> Result<Self> {
        if ws == WeightStorage::Checkpoint {
            let (m, dtype) = ck.mapped(name, shape)?;
            let align = if dtype == DType::F32 { 4 } else { 2 };
            if (m.bytes().as_ptr() as usize).is_multiple_of(align) {
                let cols = *shape.last().unwrap_or(&1);
                let rows = shape
                    .iter()
                    .product::<usize>()
                    .checked_div(cols)
                    .unwrap_or(0);
                return Ok(Self {
                    data: WeightData::Mapped(m, dtype),
                    rows,
                    cols,
                });
            }
        }
        Self::from_tensor(&ck.get(name, shape)?, ws)
    }

    fn mapped_slice<T>(m: &crate::weights::MappedBytes) -> &[T] {
        let b = m.bytes();
        // SAFETY: `load` checked the alignment for T (2 or 4 bytes) and the checkpoint header
        // check guarantees the range lies inside the mapping; every bit pattern is a valid
        // bf16 / f16 / f32; the mapping lives as long as the Arc held here.
        unsafe {
            std::slice::from_raw_parts(b.as_ptr() as *const T, b.len() / std::mem::size_of::<T>())
        }
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::Bf16(v) => v.len() * 2,
            WeightData::F16(v) => v.len() * 2,
            WeightData::F32(v) => v.len() * 4,
            WeightData::Mapped(m, _) => m.bytes().len(),
        }
    }

    /// `y[r, o] = Σ_i x[r, i] · W[row0 + o, i] (+ bias[o])` for `o < n_out`: `x` is
    /// `[n_rows, cols]`, `y` `[n_rows, n_out]`.
    pub fn matmul_rows(
        &self,
        row0: usize,
        n_out: usize,
        x: &[f32],
        n_rows: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        let c = self.cols;
        let r = row0 * c..(row0 + n_out) * c;
        match &self.data {
            WeightData::Bf16(w) => crescent_kernels::matmul(x, n_rows, &w[r], n_out, c, bias, y),
            WeightData::F16(w) => crescent_kernels::matmul(x, n_rows, &w[r], n_out, c, bias, y),
            WeightData::F32(w) => crescent_kernels::matmul(x, n_rows, &w[r], n_out, c, bias, y),
            WeightData::Mapped(m, DType::BF16) => crescent_kernels::matmul(
                x,
                n_rows,
                &Self::mapped_slice::<bf16>(m)[r],
                n_out,
                c,
                bias,
                y,
            ),
            WeightData::Mapped(m, DType::F16) => crescent_kernels::matmul(
                x,
                n_rows,
                &Self::mapped_slice::<f16>(m)[r],
                n_out,
                c,
                bias,
                y,
            ),
            WeightData::Mapped(m, _) => crescent_kernels::matmul(
                x,
                n_rows,
                &Self::mapped_slice::<f32>(m)[r],
                n_out,
                c,
                bias,
                y,
            ),
        }
    }

    /// Row `i` as f32 (embedding lookup).
    pub fn row_f32(&self, i: usize, out: &mut [f32]) {
        let r = i * self.cols..(i + 1) * self.cols;
        match &self.data {
            WeightData::Bf16(w) => out.iter_mut().zip(&w[r]).for_each(|(o, v)| *o = v.to_f32()),
            WeightData::F16(w) => out.iter_mut().zip(&w[r]).for_each(|(o, v)| *o = v.to_f32()),
            WeightData::F32(w) => out.copy_from_slice(&w[r]),
            WeightData::Mapped(m, DType::BF16) => out
                .iter_mut()
                .zip(&Self::mapped_slice::<bf16>(m)[r])
                .for_each(|(o, v)| *o = v.to_f32()),
            WeightData::Mapped(m, DType::F16) => out
                .iter_mut()
                .zip(&Self::mapped_slice::<f16>(m)[r])
                .for_each(|(o, v)| *o = v.to_f32()),
            WeightData::Mapped(m, _) => out.copy_from_slice(&Self::mapped_slice::<f32>(m)[r]),
        }
    }
}

/// `y = x · Wᵀ (+ b)` with `W` `[out, in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
}

impl Linear {
    /// Load `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias` `[out]`.
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        inp: usize,
        out: usize,
        bias: bool,
        ws: WeightStorage,
    ) -> Result<Self> {
        let weight = Weight::load(ck, &format!("{prefix}.weight"), &[out, inp], ws)?;
        let bias = if bias {
            Some(
                ck.get_f32(&format!("{prefix}.bias"), &[out])?
                    .to_vec1::<f32>()?,
            )
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Wrap an already loaded weight `[out, in]` (and optional bias).
    pub fn from_parts(weight: Weight, bias: Option<Vec<f32>>) -> Self {
        Self { weight, bias }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.rows()
    }

    /// (bytes, elements) of the weight matrix.
    pub fn footprint(&self) -> (usize, usize) {
        (self.weight.bytes(), self.weight.rows() * self.weight.cols())
    }

    /// Apply to a row-major `x` `[rows, in]`, giving `[rows, out]`.
    pub fn forward_slice(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * self.out_dim()];
        self.weight
            .matmul_rows(0, self.out_dim(), x, rows, self.bias.as_deref(), &mut y);
        y
    }

    /// Apply to `x` `[..., in]` (f32) → `[..., out]` (f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        if inp != self.weight.cols() {
            return Err(ModelError::Input(format!(
                "linear: input width {inp}, expected {}",
                self.weight.cols()
            )));
        }
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let y = self.forward_slice(&xs, rows);
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_dim();
        Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?)
    }
}

/// LayerNorm with learned gain and bias (f32 statistics, biased variance, two passes).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl LayerNorm {
    /// Load `{prefix}.weight` and `{prefix}.bias`, both `[dim]`.
    pub fn load(ck: &Checkpoint, prefix: &str, dim: usize) -> Result<Self> {
        let weight = ck
            .get_f32(&format!("{prefix}.weight"), &[dim])?
            .to_vec1::<f32>()?;
        let bias = ck
            .get_f32(&format!("{prefix}.bias"), &[dim])?
            .to_vec1::<f32>()?;
        Ok(Self { weight, bias })
    }

    /// Normalise `x` `[..., dim]` over its last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n = self.weight.len();
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; data.len()];
        for (row, o) in data.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            layer_norm_row(row, &self.weight, &self.bias, o);
        }
        Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
    }
}

/// LayerNorm of one row into `out`.
pub fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + LN_EPS).sqrt();
    for i in 0..x.len() {
        out[i] = (x[i] - mean) * inv * w[i] + b[i];
    }
}

/// Tanh-approximated GELU (PyTorch `gelu(approximate="tanh")`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu()?)
}

/// Exact erf GELU (PyTorch `gelu`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// Softmax over the last axis in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax_last_dim(x)?)
}

/// Multi-head attention of `q` `[t, heads·hd]` against `k`, `v` `[s, heads·hd]` (all row-major),
/// scale `1/√hd`, every query seeing keys `0..kmax(row)`; returns `[t, heads·hd]`. Scores and
/// outputs go through the f32 kernels; heads run in parallel.
#[allow(clippy::too_many_arguments)]
pub fn attention_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    s: usize,
    heads: usize,
    hd: usize,
    kmax: impl Fn(usize) -> usize + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let w = heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let gather = |m: &[f32], n: usize| -> Vec<f32> {
                let mut o = Vec::with_capacity(n * hd);
                for r in 0..n {
                    o.extend_from_slice(&m[r * w + h * hd..r * w + (h + 1) * hd]);
                }
                o
            };
            let qh = gather(q, t);
            let kh = gather(k, s);
            // vᵀ: [hd, s]
            let mut vt = vec![0f32; hd * s];
            for r in 0..s {
                for d in 0..hd {
                    vt[d * s + r] = v[r * w + h * hd + d];
                }
            }
            let mut scores = vec![0f32; t * s];
            crescent_kernels::matmul(&qh, t, &kh, s, hd, None, &mut scores);
            for (i, row) in scores.chunks_exact_mut(s).enumerate() {
                let km = kmax(i).min(s);
                let mut mx = f32::NEG_INFINITY;
                for x in row[..km].iter_mut() {
                    *x *= scale;
                    mx = mx.max(*x);
                }
                let mut sum = 0f32;
                for x in row[..km].iter_mut() {
                    *x = (*x - mx).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                for x in row[..km].iter_mut() {
                    *x *= inv;
                }
                row[km..].fill(0.0);
            }
            let mut oh = vec![0f32; t * hd];
            crescent_kernels::matmul(&scores, t, &vt, hd, s, None, &mut oh);
            oh
        })
        .collect();
    let mut out = vec![0f32; t * w];
    for (h, oh) in per_head.iter().enumerate() {
        for r in 0..t {
            out[r * w + h * hd..r * w + (h + 1) * hd].copy_from_slice(&oh[r * hd..(r + 1) * hd]);
        }
    }
    out
}
