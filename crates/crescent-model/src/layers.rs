//! Building blocks shared by the vision encoder, text decoder and region module.
//!
//! Activations are f32 throughout (the reference computes in f32 from the bf16 weights
//! upcast exactly); weight matrices stay in the checkpoint dtype and are upcast per matmul.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::weights::Checkpoint;

/// LayerNorm epsilon used everywhere in Moondream.
pub const LN_EPS: f32 = 1e-5;

/// How weight matrices are held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightStorage {
    /// Keep the checkpoint dtype (bf16 for the real model) and upcast per matmul: memory ≈
    /// checkpoint size.
    #[default]
    Checkpoint,
    /// Upcast to f32 at load: twice the memory of a bf16 checkpoint, no per-call conversion.
    F32,
}

/// `y = x · Wᵀ (+ b)` with `W` `[out, in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
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
        let weight = store(ck.get(&format!("{prefix}.weight"), &[out, inp])?, ws)?;
        let bias = if bias {
            Some(ck.get_f32(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Wrap an already loaded weight `[out, in]` (and optional f32 bias).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Apply to `x` `[..., in]` (f32) → `[..., out]` (f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, inp))?;
        let w = upcast(&self.weight)?;
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_dim();
        Ok(y.reshape(out_dims)?)
    }
}

/// Convert a loaded weight per the storage policy.
pub fn store(t: Tensor, ws: WeightStorage) -> Result<Tensor> {
    Ok(match ws {
        WeightStorage::Checkpoint => t,
        WeightStorage::F32 => t.to_dtype(DType::F32)?,
    })
}

/// The f32 view of a weight (a no-op for f32 weights).
pub fn upcast(w: &Tensor) -> Result<Tensor> {
    if w.dtype() == DType::F32 {
        Ok(w.clone())
    } else {
        Ok(w.to_dtype(DType::F32)?)
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
