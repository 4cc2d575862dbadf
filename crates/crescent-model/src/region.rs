//! Region module (spec §7): Fourier-feature encoders that turn coordinates and sizes into input
//! embeddings, and decoders that turn a hidden state into coordinate / size bins.

use candle_core::{Device, Tensor};

use crate::config::RegionConfig;
use crate::error::Result;
use crate::layers::{LayerNorm, Linear, WeightStorage};
use crate::weights::Checkpoint;

/// Round an f32 to bfloat16 precision (round to nearest even).
pub fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// `torch.linspace(start, end, n, dtype=float32)` as PyTorch's CPU kernel computes it.
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// Kestrel's coordinate table: `bf16(linspace(0, 1, bins))`.
pub fn coord_table(bins: usize) -> Vec<f32> {
    linspace_f32(0.0, 1.0, bins)
        .into_iter()
        .map(bf16_round)
        .collect()
}

/// Kestrel's size table: `bf16(exp2(linspace(-10, 0, bins)))`.
pub fn size_table(bins: usize) -> Vec<f32> {
    linspace_f32(-10.0, 0.0, bins)
        .into_iter()
        .map(|v| bf16_round(v.exp2()))
        .collect()
}

/// The region module.
#[derive(Clone, Debug)]
pub struct Region {
    coord_features: Vec<f32>,
    size_features: Vec<f32>,
    coord_encoder: Linear,
    coord_decoder: Linear,
    size_encoder: Linear,
    size_decoder: Linear,
    ln: LayerNorm,
    coord_values: Vec<f32>,
    size_values: Vec<f32>,
    coord_linspace: bool,
}

impl Region {
    /// Load from the checkpoint (HF key names, spec §3.1). `coord_linspace` selects Kestrel's
    /// coordinate table (true) or the HF `bin / bins` rule.
    pub fn load(
        ck: &Checkpoint,
        cfg: &RegionConfig,
        coord_linspace: bool,
        ws: WeightStorage,
    ) -> Result<Self> {
        let d = cfg.dim;
        let cf = cfg.coord_feat_dim / 2;
        let sf = cfg.size_feat_dim / 2;
        let coord_features = ck
            .get_maybe_transposed("model.region.coord_features", [1, cf])?
            .to_dtype(candle_core::DType::F32)?;
        let size_features = ck
            .get_maybe_transposed("model.region.size_features", [2, sf])?
            .to_dtype(candle_core::DType::F32)?;
        Ok(Self {
            coord_features: coord_features.flatten_all()?.to_vec1()?,
            size_features: size_features.flatten_all()?.to_vec1()?,
            coord_encoder: Linear::load(
                ck,
                "model.region.coord_encoder",
                cfg.coord_feat_dim,
                d,
                true,
                ws,
            )?,
            coord_decoder: Linear::load(
                ck,
                "model.region.coord_decoder",
                d,
                cfg.coord_out_dim,
                true,
                ws,
            )?,
            size_encoder: Linear::load(
                ck,
                "model.region.size_encoder",
                cfg.size_feat_dim,
                d,
                true,
                ws,
            )?,
            size_decoder: Linear::load(
                ck,
                "model.region.size_decoder",
                d,
                cfg.size_out_dim,
                true,
                ws,
            )?,
            ln: LayerNorm::load(ck, "model.region.ln", d)?,
            coord_values: coord_table(cfg.coord_out_dim),
            size_values: size_table(cfg.size_out_dim / 2),
            coord_linspace,
        })
    }

    /// Input embedding `[D]` of a coordinate value.
    pub fn encode_coord(&self, value: f32) -> Result<Tensor> {
        let s = std::f32::consts::TAU * value;
        let f: Vec<f32> = self.coord_features.iter().map(|w| s * w).collect();
        self.encode(&self.coord_encoder, &f)
    }

    /// Input embedding `[D]` of a size (width, height).
    pub fn encode_size(&self, w: f32, h: f32) -> Result<Tensor> {
        let n = self.size_features.len() / 2;
        let sw = std::f32::consts::TAU * w;
        let sh = std::f32::consts::TAU * h;
        let f: Vec<f32> = (0..n)
            .map(|k| sw * self.size_features[k] + sh * self.size_features[n + k])
            .collect();
        self.encode(&self.size_encoder, &f)
    }

    fn encode(&self, enc: &Linear, f: &[f32]) -> Result<Tensor> {
        let mut feat: Vec<f32> = f.iter().map(|v| v.cos()).collect();
        feat.extend(f.iter().map(|v| v.sin()));
        let n = feat.len();
        let x = Tensor::from_vec(feat, (1, n), &Device::Cpu)?;
        Ok(enc.forward(&x)?.squeeze(0)?)
    }

    /// Coordinate-bin logits of a pre-`post_ln` hidden state `[D]`.
    pub fn coord_logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let z = self.ln.forward(&hidden.unsqueeze(0)?)?;
        Ok(self.coord_decoder.forward(&z)?.squeeze(0)?.to_vec1()?)
    }

    /// Width-bin and height-bin logits of a pre-`post_ln` hidden state `[D]`.
    pub fn size_logits(&self, hidden: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let z = self.ln.forward(&hidden.unsqueeze(0)?)?;
        let mut all: Vec<f32> = self.size_decoder.forward(&z)?.squeeze(0)?.to_vec1()?;
        let hgt = all.split_off(all.len() / 2);
        Ok((all, hgt))
    }

    /// Coordinate value of a bin.
    pub fn coord_value(&self, bin: usize) -> f32 {
        if self.coord_linspace {
            self.coord_values[bin.min(self.coord_values.len() - 1)]
        } else {
            bin as f32 / self.coord_values.len() as f32
        }
    }

    /// Size value of a bin: `2^(bin/(bins-1)·10 − 10)` rounded to bf16.
    pub fn size_value(&self, bin: usize) -> f32 {
        self.size_values[bin.min(self.size_values.len() - 1)]
    }
}
