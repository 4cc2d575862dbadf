//! Building blocks shared by the vision encoder, text decoder and region module.
//!
//! Activations are f32 throughout (the reference computes in f32 from the bf16 weights
//! upcast exactly); weight matrices stay in the checkpoint dtype ([`Weight`]) and are converted
//! in registers by the `crescent-kernels` matmuls, so model memory ≈ checkpoint size — or, for
//! the text decoder's large matrices with [`Quantize`], are quantized to int8 / int4 at load.

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

/// Weight quantization applied at load time to the text decoder's large matrices (attention
/// qkv / proj, dense MLP, MoE experts, LM head), independently of [`WeightStorage`] (which
/// still governs every other matrix). Quantized from the checkpoint's weights tensor by
/// tensor, rows in parallel; nothing is saved to disk. Layouts, rounding and error bounds:
/// `crescent_kernels::quantize_q8` / `quantize_q4`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quantize {
    /// No quantization: the matrices follow [`WeightStorage`].
    #[default]
    None,
    /// Symmetric int8, one f32 scale per output channel (≈ 1 byte per weight).
    Int8,
    /// Symmetric int4 in groups of `group` input columns with one f16 scale each (0.5 +
    /// 2/group bytes per weight). A matrix whose width is not a multiple of `group` (never the
    /// case for Moondream 3 with groups of 32) falls back to int8.
    Int4 {
        /// Columns per scale (even; [`crescent_kernels::Q4_GROUP`] = 32 by default).
        group: usize,
    },
}

impl Quantize {
    /// int4 with the default group size ([`crescent_kernels::Q4_GROUP`]).
    pub const INT4: Quantize = Quantize::Int4 {
        group: crescent_kernels::Q4_GROUP,
    };

    /// Short name for reports: `none`, `int8`, `int4` (`int4-g64` for a non-default group).
    pub fn name(self) -> String {
        match self {
            Quantize::None => "none".into(),
            Quantize::Int8 => "int8".into(),
            Quantize::Int4 { group } if group == crescent_kernels::Q4_GROUP => "int4".into(),
            Quantize::Int4 { group } => format!("int4-g{group}"),
        }
    }

    /// The precision used for the attention projections (qkv, proj): one step finer than the
    /// rest (int8 mode keeps them in the checkpoint dtype, int4 mode uses int8). Attention logits
    /// are the most precision-sensitive part of the decoder (measured on the fixtures: int8 qkv
    /// alone flips 12 % of greedy steps, int8 experts none), while the projections are only ≈ 4 %
    /// of the real model's weight bytes (0.8 of 18.5 GB).
    pub fn for_attention(self) -> Quantize {
        match self {
            Quantize::None | Quantize::Int8 => Quantize::None,
            Quantize::Int4 { .. } => Quantize::Int8,
        }
    }
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
    /// int8 per output channel: `q` `[rows, cols]`, `scales` `[rows]` (see [`Quantize::Int8`]).
    Q8 {
        /// Quantized values, row-major.
        q: Vec<i8>,
        /// One scale per row.
        scales: Vec<f32>,
    },
    /// int4 groups: `q` `[rows, cols / 2]` bytes (low nibble = even column, value + 8),
    /// `scales` `[rows, cols / group]` (see [`Quantize::Int4`]).
    Q4 {
        /// Packed nibbles, row-major.
        q: Vec<u8>,
        /// One f16 scale per group of `group` columns, row-major.
        scales: Vec<f16>,
        /// Columns per scale.
        group: usize,
    },
}

/// Quantizes `w` (`[rows, cols]`) per `quant` (int8 fallback for int4 when `cols % group !=
/// 0`); `None` for [`Quantize::None`]. Errors on non-finite weights or an invalid group.
fn quantize_data<W: crescent_kernels::WeightElem>(
    w: &[W],
    rows: usize,
    cols: usize,
    quant: Quantize,
    name: &str,
) -> Result<Option<WeightData>> {
    let data = match quant {
        Quantize::None => return Ok(None),
        Quantize::Int4 { group } if group < 2 || !group.is_multiple_of(2) => {
            return Err(ModelError::Config(format!(
                "int4 group size must be even and at least 2, got {group}"
            )))
        }
        Quantize::Int4 { group } if cols.is_multiple_of(group) => {
            let (q, scales) = crescent_kernels::quantize_q4(w, rows, cols, group);
            WeightData::Q4 { q, scales, group }
        }
        Quantize::Int4 { group } => {
            tracing::debug!(
                name,
                cols,
                group,
                "width not a multiple of the int4 group: int8"
            );
            let (q, scales) = crescent_kernels::quantize_q8(w, rows, cols);
            WeightData::Q8 { q, scales }
        }
        Quantize::Int8 => {
            let (q, scales) = crescent_kernels::quantize_q8(w, rows, cols);
            WeightData::Q8 { q, scales }
        }
    };
    let finite = match &data {
        WeightData::Q8 { scales, .. } => scales.iter().all(|s| s.is_finite()),
        WeightData::Q4 { scales, .. } => scales.iter().all(|s| s.is_finite()),
        _ => true,
    };
    if !finite {
        return Err(ModelError::Checkpoint(format!(
            "`{name}` holds NaN or infinite weights: cannot quantize it"
        )));
    }
    Ok(Some(data))
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

    /// Load `name` with `shape` and quantize it per `quant` (quantized straight from the mapped
    /// checkpoint bytes, whose pages are then released from this process; a misaligned
    /// tensor is copied first). [`Quantize::None`] is [`Weight::load`] with `ws`.
    pub fn load_quantized(
        ck: &Checkpoint,
        name: &str,
        shape: &[usize],
        quant: Quantize,
        ws: WeightStorage,
    ) -> Result<Self> {
        if quant == Quantize::None {
            return Self::load(ck, name, shape, ws);
        }
        let (m, _) = ck.mapped(name, shape)?;
        let w = Self::load(ck, name, shape, WeightStorage::Checkpoint)?;
        let q = w.quantized(quant, name)?;
        drop(w);
        m.release();
        Ok(q)
    }

    /// This matrix quantized per `quant` (a copy; `self` unchanged, returned as is for
    /// [`Quantize::None`] or when already quantized). `name` is used in errors.
    pub fn quantized(&self, quant: Quantize, name: &str) -> Result<Self> {
        let (r, c) = (self.rows, self.cols);
        let data = match &self.data {
            WeightData::Bf16(w) => quantize_data(w, r, c, quant, name)?,
            WeightData::F16(w) => quantize_data(w, r, c, quant, name)?,
            WeightData::F32(w) => quantize_data(w, r, c, quant, name)?,
            WeightData::Mapped(m, DType::BF16) => {
                quantize_data(Self::mapped_slice::<bf16>(m), r, c, quant, name)?
            }
            WeightData::Mapped(m, DType::F16) => {
                quantize_data(Self::mapped_slice::<f16>(m), r, c, quant, name)?
            }
            WeightData::Mapped(m, _) => {
                quantize_data(Self::mapped_slice::<f32>(m), r, c, quant, name)?
            }
            WeightData::Q8 { .. } | WeightData::Q4 { .. } => None,
        };
        Ok(match data {
            Some(data) => Self {
                data,
                rows: r,
                cols: c,
            },
            None => self.clone(),
        })
    }

    /// Storage kind for reports: `bf16`, `f16`, `f32`, `int8` or `int4`.
    pub fn kind(&self) -> &'static str {
        match &self.data {
            WeightData::Bf16(_) | WeightData::Mapped(_, DType::BF16) => "bf16",
            WeightData::F16(_) | WeightData::Mapped(_, DType::F16) => "f16",
            WeightData::F32(_) | WeightData::Mapped(..) => "f32",
            WeightData::Q8 { .. } => "int8",
            WeightData::Q4 { .. } => "int4",
        }
    }

    /// Bytes held by rows `row0 .. row0 + n` (an expert's slice of a stacked tensor):
    /// elements, plus scales for quantized weights.
    pub fn bytes_of_rows(&self, n: usize) -> usize {
        if self.rows == 0 {
            return 0;
        }
        // Every row holds the same number of bytes.
        self.bytes() / self.rows * n
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
            WeightData::Q8 { q, scales } => q.len() + scales.len() * 4,
            WeightData::Q4 { q, scales, .. } => q.len() + scales.len() * 2,
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
            WeightData::Q8 { q, scales } => crescent_kernels::matmul_q8(
                x,
                n_rows,
                &q[r],
                &scales[row0..row0 + n_out],
                n_out,
                c,
                bias,
                y,
            ),
            WeightData::Q4 { q, scales, group } => {
                let g = c / group;
                crescent_kernels::matmul_q4(
                    x,
                    n_rows,
                    &q[row0 * c / 2..(row0 + n_out) * c / 2],
                    &scales[row0 * g..(row0 + n_out) * g],
                    *group,
                    n_out,
                    c,
                    bias,
                    y,
                )
            }
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
            WeightData::Q8 { q, scales } => {
                crescent_kernels::dequantize_q8_row(&q[r], scales[i], out)
            }
            WeightData::Q4 { q, scales, group } => {
                let c = self.cols;
                let g = c / group;
                crescent_kernels::dequantize_q4_row(
                    &q[i * c / 2..(i + 1) * c / 2],
                    &scales[i * g..(i + 1) * g],
                    *group,
                    out,
                )
            }
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
        Self::load_quantized(ck, prefix, inp, out, bias, Quantize::None, ws)
    }

    /// [`Linear::load`] with the weight quantized per `quant` (bias stays f32).
    pub fn load_quantized(
        ck: &Checkpoint,
        prefix: &str,
        inp: usize,
        out: usize,
        bias: bool,
        quant: Quantize,
        ws: WeightStorage,
    ) -> Result<Self> {
        let weight =
            Weight::load_quantized(ck, &format!("{prefix}.weight"), &[out, inp], quant, ws)?;
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

    /// The weight matrix.
    pub fn weight(&self) -> &Weight {
        &self.weight
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
        self.forward_into(x, rows, &mut y);
        y
    }

    /// Apply to a row-major `x` `[rows, in]`, overwriting `y` `[rows, out]` (no allocation).
    pub fn forward_into(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.weight
            .matmul_rows(0, self.out_dim(), x, rows, self.bias.as_deref(), y);
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
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; data.len()];
        self.forward_into(&data, &mut out);
        Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
    }

    /// Normalise each `dim`-wide row of `x` into `out` (same length).
    pub fn forward_into(&self, x: &[f32], out: &mut [f32]) {
        crescent_kernels::layer_norm(x, &self.weight, &self.bias, LN_EPS, out);
    }
}

/// Tanh-approximated GELU (PyTorch `gelu(approximate="tanh")`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    map_tensor(x, crescent_kernels::gelu_tanh)
}

/// Exact erf GELU (PyTorch `gelu`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    map_tensor(x, crescent_kernels::gelu_erf)
}

/// An element-wise f32 slice kernel applied to a tensor (f32 result, same shape).
fn map_tensor(x: &Tensor, f: fn(&mut [f32])) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let mut v = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    f(&mut v);
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// Softmax over the last axis in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax_last_dim(x)?)
}

/// A row-major matrix of attention vectors read in place: row `r`, head `h` is
/// `data[r·ld + h·hd ..][..hd]` (e.g. the q, k or v third of a fused qkv buffer).
#[derive(Clone, Copy, Debug)]
pub struct HeadRows<'a> {
    /// Elements, starting at head 0 of row 0.
    pub data: &'a [f32],
    /// Row stride in floats.
    pub ld: usize,
}

/// Multi-head attention of `t` queries against `s` keys/values, all read in place
/// ([`HeadRows`]); query head `h` uses key/value head `h / (heads / kv_heads)` (grouped-query
/// attention), scale `1/√hd`, and query row `i` sees keys `0..kmax(i)`. Writes
/// `out[i·heads·hd + h·hd ..][..hd]`. Heads run in parallel; scores and outputs are strided f32
/// GEMMs (no gathers or transposes), the softmax a SIMD row kernel.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: HeadRows<'_>,
    k: HeadRows<'_>,
    v: HeadRows<'_>,
    t: usize,
    s: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    kmax: impl Fn(usize) -> usize + Sync,
    out: &mut [f32],
) {
    use crescent_kernels::{matmul_f32_strided, softmax_scaled, Rhs};
    use rayon::prelude::*;
    let w = heads * hd;
    assert!(out.len() >= t * w && kv_heads > 0 && heads.is_multiple_of(kv_heads));
    if t == 0 {
        return;
    }
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let kh = h / group;
            let mut scores = vec![0f32; t * s];
            matmul_f32_strided(
                &q.data[h * hd..],
                q.ld,
                t,
                Rhs::Rows {
                    w: &k.data[kh * hd..],
                    ld: k.ld,
                },
                s,
                hd,
                &mut scores,
                s,
            );
            for (i, row) in scores.chunks_exact_mut(s).enumerate() {
                let km = kmax(i).min(s);
                softmax_scaled(&mut row[..km], scale);
                row[km..].fill(0.0);
            }
            let mut oh = vec![0f32; t * hd];
            matmul_f32_strided(
                &scores,
                s,
                t,
                Rhs::Cols {
                    w: &v.data[kh * hd..],
                    ld: v.ld,
                },
                hd,
                s,
                &mut oh,
                hd,
            );
            oh
        })
        .collect();
    for (h, oh) in per_head.iter().enumerate() {
        for (r, src) in oh.chunks_exact(hd).enumerate() {
            out[r * w + h * hd..r * w + (h + 1) * hd].copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive f64 multi-head attention with grouped-query heads and per-row key limits.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        s: usize,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        kmax: &dyn Fn(usize) -> usize,
    ) -> Vec<f64> {
        let group = heads / kv_heads;
        let mut out = vec![0f64; t * heads * hd];
        for i in 0..t {
            for h in 0..heads {
                let kh = h / group;
                let km = kmax(i).min(s);
                let sc: Vec<f64> = (0..km)
                    .map(|j| {
                        (0..hd)
                            .map(|d| {
                                q[i * heads * hd + h * hd + d] as f64
                                    * k[j * kv_heads * hd + kh * hd + d] as f64
                            })
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    out[i * heads * hd + h * hd + d] = (0..km)
                        .map(|j| e[j] / z * v[j * kv_heads * hd + kh * hd + d] as f64)
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_naive_with_gqa_and_limits() {
        let (t, s, heads, kv_heads, hd) = (23, 29, 6, 2, 12);
        let f = |i: usize, a: f32| (i as f32 * a).sin() * 1.7;
        let q: Vec<f32> = (0..t * heads * hd).map(|i| f(i, 0.37)).collect();
        let k: Vec<f32> = (0..s * kv_heads * hd).map(|i| f(i, 0.91)).collect();
        let v: Vec<f32> = (0..s * kv_heads * hd).map(|i| f(i, 1.31)).collect();
        // Causal with a 6-position bidirectional prefix, offset so the last rows see all keys.
        let kmax = |i: usize| (i + 7).max(6);
        let mut out = vec![f32::NAN; t * heads * hd];
        attention(
            HeadRows {
                data: &q,
                ld: heads * hd,
            },
            HeadRows {
                data: &k,
                ld: kv_heads * hd,
            },
            HeadRows {
                data: &v,
                ld: kv_heads * hd,
            },
            t,
            s,
            heads,
            kv_heads,
            hd,
            kmax,
            &mut out,
        );
        let want = naive(&q, &k, &v, t, s, heads, kv_heads, hd, &kmax);
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-5, "out[{i}] = {a}, want {b}");
        }
    }
}
