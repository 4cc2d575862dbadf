//! Vision encoder (SigLIP-style ViT over the crops), feature-map reconstruction, adaptive
//! pooling and the projector (spec §5). Produces the image-token embeddings.

use candle_core::{Device, Tensor};

use crate::config::VisionConfig;
use crate::error::{ModelError, Result};
use crate::layers::{attention, gelu_tanh, HeadRows, LayerNorm, Linear, WeightStorage};
use crate::weights::Checkpoint;

/// One pre-norm transformer block of the encoder.
#[derive(Clone, Debug)]
struct VisionBlock {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The vision tower and projector.
#[derive(Clone, Debug)]
pub struct VisionEncoder {
    cfg: VisionConfig,
    patch_emb: Linear,
    /// `[g², C]` flattened.
    pos_emb: Vec<f32>,
    blocks: Vec<VisionBlock>,
    post_ln: LayerNorm,
    proj_fc1: Linear,
    proj_fc2: Linear,
}

/// Optional per-stage outputs, for layer-by-layer comparison with the reference.
#[derive(Default, Debug)]
pub struct VisionTrace {
    /// Patch embeddings + positions `[n, g², C]`.
    pub embed: Option<Tensor>,
    /// Output of every block `[n, g², C]`.
    pub blocks: Vec<Tensor>,
    /// After `post_ln` `[n, g², C]`.
    pub features: Option<Tensor>,
    /// Stitched local feature map `[Hr, Wr, C]`.
    pub reconstructed: Option<Tensor>,
    /// Pooled local features `[g², C]`.
    pub pooled: Option<Tensor>,
    /// Projector input `[g², 2C]`.
    pub proj_in: Option<Tensor>,
}

impl VisionEncoder {
    /// Load from the checkpoint (HF key names, spec §3.1).
    pub fn load(
        ck: &Checkpoint,
        cfg: &VisionConfig,
        text_dim: usize,
        ws: WeightStorage,
    ) -> Result<Self> {
        let c = cfg.enc_dim;
        let g = cfg.grid();
        let patch_emb = Linear::load(ck, "model.vision.patch_emb", cfg.patch_dim(), c, true, ws)?;
        let pos_emb = ck
            .get_f32("model.vision.pos_emb", &[1, g * g, c])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut blocks = Vec::with_capacity(cfg.enc_n_layers);
        for i in 0..cfg.enc_n_layers {
            let p = format!("model.vision.blocks.{i}");
            blocks.push(VisionBlock {
                ln1: LayerNorm::load(ck, &format!("{p}.ln1"), c)?,
                qkv: Linear::load(ck, &format!("{p}.attn.qkv"), c, 3 * c, true, ws)?,
                proj: Linear::load(ck, &format!("{p}.attn.proj"), c, c, true, ws)?,
                ln2: LayerNorm::load(ck, &format!("{p}.ln2"), c)?,
                fc1: Linear::load(ck, &format!("{p}.mlp.fc1"), c, cfg.enc_ff_dim, true, ws)?,
                fc2: Linear::load(ck, &format!("{p}.mlp.fc2"), cfg.enc_ff_dim, c, true, ws)?,
            });
        }
        let post_ln = LayerNorm::load(ck, "model.vision.post_ln", c)?;
        let proj_fc1 = Linear::load(
            ck,
            "model.vision.proj_mlp.fc1",
            2 * c,
            cfg.proj_inner_dim,
            true,
            ws,
        )?;
        let proj_fc2 = Linear::load(
            ck,
            "model.vision.proj_mlp.fc2",
            cfg.proj_inner_dim,
            text_dim,
            true,
            ws,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_emb,
            pos_emb,
            blocks,
            post_ln,
            proj_fc1,
            proj_fc2,
        })
    }

    /// Encoder features `[n, g², C]` (after `post_ln`) of normalised crops `[n, 3, S, S]`.
    pub fn encode_crops(
        &self,
        pixels: &Tensor,
        mut trace: Option<&mut VisionTrace>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (n, ch, s, s2) = pixels.dims4()?;
        if ch != cfg.in_channels || s != cfg.crop_size || s2 != cfg.crop_size {
            return Err(ModelError::Input(format!(
                "crops must be [n, {}, {}, {}], got {:?}",
                cfg.in_channels,
                cfg.crop_size,
                cfg.crop_size,
                pixels.dims()
            )));
        }
        let p = cfg.enc_patch_size;
        let g = cfg.grid();
        let c = cfg.enc_dim;
        let nh = cfg.enc_n_heads;
        let hd = c / nh;
        // Patch (r, c) → vector ordered (channel, dy, dx) (spec §5.1).
        let patches = pixels
            .reshape(vec![n, ch, g, p, g, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let nt = g * g;
        let rows = n * nt;
        // The residual stream and every activation live in flat f32 buffers reused across
        // blocks; the matmuls, LayerNorm, GELU and attention are slice kernels.
        let mut x = self.patch_emb.forward_slice(&patches, rows);
        for xc in x.chunks_exact_mut(nt * c) {
            crescent_kernels::add_assign(xc, &self.pos_emb);
        }
        let snapshot = |x: &[f32]| Tensor::from_vec(x.to_vec(), (n, nt, c), &Device::Cpu);
        if let Some(t) = trace.as_deref_mut() {
            t.embed = Some(snapshot(&x)?);
        }
        let mut h = vec![0f32; rows * c];
        let mut qkv = vec![0f32; rows * 3 * c];
        let mut att = vec![0f32; rows * c];
        let mut y = vec![0f32; rows * c];
        let mut u = vec![0f32; rows * cfg.enc_ff_dim];
        for blk in &self.blocks {
            blk.ln1.forward_into(&x, &mut h);
            blk.qkv.forward_into(&h, rows, &mut qkv);
            for (qc, ac) in qkv
                .chunks_exact(nt * 3 * c)
                .zip(att.chunks_exact_mut(nt * c))
            {
                let view = |off: usize| HeadRows {
                    data: &qc[off..],
                    ld: 3 * c,
                };
                attention(
                    view(0),
                    view(c),
                    view(2 * c),
                    nt,
                    nt,
                    nh,
                    nh,
                    hd,
                    |_| nt,
                    ac,
                );
            }
            blk.proj.forward_into(&att, rows, &mut y);
            crescent_kernels::add_assign(&mut x, &y);
            blk.ln2.forward_into(&x, &mut h);
            blk.fc1.forward_into(&h, rows, &mut u);
            crescent_kernels::gelu_tanh(&mut u);
            blk.fc2.forward_into(&u, rows, &mut y);
            crescent_kernels::add_assign(&mut x, &y);
            if let Some(t) = trace.as_deref_mut() {
                t.blocks.push(snapshot(&x)?);
            }
        }
        self.post_ln.forward_into(&x, &mut h);
        let f = Tensor::from_vec(h, (n, nt, c), &Device::Cpu)?;
        if let Some(t) = trace {
            t.features = Some(f.clone());
        }
        Ok(f)
    }

    /// Image-token embeddings `[g², D]` from the features of the global crop and the local crops
    /// (`features` = `[1 + th·tw, g², C]`, crop 0 global, then row-major local crops).
    pub fn project(
        &self,
        features: &Tensor,
        tiling: (usize, usize),
        mut trace: Option<&mut VisionTrace>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let g = cfg.grid();
        let c = cfg.enc_dim;
        let (th, tw) = tiling;
        let (n, tokens, cc) = features.dims3()?;
        if n != th * tw + 1 || tokens != g * g || cc != c {
            return Err(ModelError::Input(format!(
                "features {:?} do not match tiling {th}x{tw} (expected [{}, {}, {c}])",
                features.dims(),
                th * tw + 1,
                g * g
            )));
        }
        let global = features.get(0)?;
        let local: Vec<f32> = features
            .narrow(0, 1, n - 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (recon, hr, wr) = reconstruct(&local, tiling, g, c, cfg.overlap_margin);
        let pooled = adaptive_avg_pool(&recon, hr, wr, c, g);
        let pooled = Tensor::from_vec(pooled, (g * g, c), &Device::Cpu)?;
        if let Some(t) = trace.as_deref_mut() {
            t.reconstructed = Some(Tensor::from_vec(recon, (hr, wr, c), &Device::Cpu)?);
            t.pooled = Some(pooled.clone());
        }
        let z = Tensor::cat(&[&global, &pooled], 1)?;
        if let Some(t) = trace {
            t.proj_in = Some(z.clone());
        }
        self.proj_fc2
            .forward(&gelu_tanh(&self.proj_fc1.forward(&z)?)?)
    }

    /// Crops → image-token embeddings `[g², D]`, running the encoder in batches of at most
    /// `batch` crops (a memory knob; results do not depend on it).
    pub fn embed_image(
        &self,
        pixels: &Tensor,
        tiling: (usize, usize),
        batch: usize,
        mut trace: Option<&mut VisionTrace>,
    ) -> Result<Tensor> {
        let n = pixels.dims()[0];
        let batch = batch.max(1);
        let mut feats = Vec::new();
        let mut s = 0;
        while s < n {
            let len = batch.min(n - s);
            let t = if batch >= n {
                trace.as_deref_mut()
            } else {
                None
            };
            feats.push(self.encode_crops(&pixels.narrow(0, s, len)?, t)?);
            s += len;
        }
        let feats = Tensor::cat(&feats, 0)?;
        self.project(&feats, tiling, trace)
    }
}

/// Stitch the local feature grids `[n, g, g, C]` (flattened) into the `(Hr, Wr)` map: each tile
/// keeps its outer `margin` cells only on the image border (spec §5.4).
pub fn reconstruct(
    local: &[f32],
    tiling: (usize, usize),
    g: usize,
    c: usize,
    margin: usize,
) -> (Vec<f32>, usize, usize) {
    let (th, tw) = tiling;
    let step = g - 2 * margin;
    let hr = step * th + 2 * margin;
    let wr = step * tw + 2 * margin;
    let mut out = vec![0f32; hr * wr * c];
    for i in 0..th {
        for j in 0..tw {
            let k = i * tw + j;
            let y0 = if i == 0 { 0 } else { margin };
            let y1 = if i == th - 1 { g } else { g - margin };
            let x0 = if j == 0 { 0 } else { margin };
            let x1 = if j == tw - 1 { g } else { g - margin };
            for y in y0..y1 {
                let src = ((k * g + y) * g + x0) * c;
                let dst = ((i * step + y) * wr + j * step + x0) * c;
                let len = (x1 - x0) * c;
                out[dst..dst + len].copy_from_slice(&local[src..src + len]);
            }
        }
    }
    (out, hr, wr)
}

/// PyTorch `adaptive_avg_pool2d` of an `[h, w, C]` map to `[out, out, C]`: window rows
/// `floor(a·h/out) .. ceil((a+1)·h/out)`, likewise for columns (spec §5.5).
pub fn adaptive_avg_pool(map: &[f32], h: usize, w: usize, c: usize, out: usize) -> Vec<f32> {
    let mut res = vec![0f32; out * out * c];
    for a in 0..out {
        let r0 = a * h / out;
        let r1 = ((a + 1) * h).div_ceil(out);
        for b in 0..out {
            let c0 = b * w / out;
            let c1 = ((b + 1) * w).div_ceil(out);
            let cnt = ((r1 - r0) * (c1 - c0)) as f32;
            let dst = &mut res[(a * out + b) * c..(a * out + b + 1) * c];
            for r in r0..r1 {
                for col in c0..c1 {
                    let src = &map[(r * w + col) * c..(r * w + col + 1) * c];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += s;
                    }
                }
            }
            for d in dst.iter_mut() {
                *d /= cnt;
            }
        }
    }
    res
}
