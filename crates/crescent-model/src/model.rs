//! The whole model: configuration, tokenizer, vision encoder, text decoder and region module,
//! loaded from one model folder.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::config::{Config, Conventions};
use crate::error::{ModelError, Result};
use crate::kv::KvDtype;
use crate::layers::{Quantize, WeightStorage};
use crate::region::Region;
use crate::text::{KvCache, TextDecoder, TextTrace};
use crate::tokenizer::TextTokenizer;
use crate::tokens::Token;
use crate::vision::{VisionEncoder, VisionTrace};
use crate::weights::Checkpoint;

/// Choices made when loading.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// How weight matrices are held in memory.
    pub weights: WeightStorage,
    /// Load-time quantization of the text decoder's large matrices (default: none). The
    /// vision encoder and projector stay in `weights` (their matmuls are compute-bound GEMMs,
    /// where fewer weight bytes buy no speed), as do the region module and the text
    /// decoder's embeddings, tau gates and routers (small; see [`TextDecoder::load`]).
    pub quantize: Quantize,
    /// Where public implementations disagree (defaults: Kestrel).
    pub conventions: Conventions,
    /// Crops per vision-encoder batch (memory knob only).
    pub vision_batch: usize,
    /// Element type of KV caches made for this model; `None` (auto): f32 with full-precision
    /// weights (the reference's numerics), f16 with quantized ones (whose own rounding is far
    /// larger; halves the KV bytes each decode step reads and doubles the cache's capacity).
    pub kv_dtype: Option<KvDtype>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            weights: WeightStorage::Checkpoint,
            quantize: Quantize::None,
            conventions: Conventions::default(),
            vision_batch: 16,
            kv_dtype: None,
        }
    }
}

/// Moondream 3 loaded in memory.
#[derive(Debug)]
pub struct Moondream {
    /// The parsed configuration.
    pub config: Config,
    /// Conventions in force.
    pub conventions: Conventions,
    /// Vision tower + projector.
    pub vision: VisionEncoder,
    /// Text decoder.
    pub text: TextDecoder,
    /// Region module.
    pub region: Region,
    vision_batch: usize,
    kv_dtype: KvDtype,
}

/// A model folder's files.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// The folder.
    pub dir: PathBuf,
    /// `config.json` (may be absent: defaults).
    pub config: PathBuf,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
}

impl ModelFiles {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            config: dir.join("config.json"),
            tokenizer: dir.join("tokenizer.json"),
        }
    }
}

impl Moondream {
    /// Load config and weights from a model folder.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_files(&ModelFiles::in_dir(dir), opts)
    }

    /// Load config and weights from resolved model files.
    pub fn load_files(files: &ModelFiles, opts: &LoadOptions) -> Result<Self> {
        if !files.dir.is_dir() {
            return Err(ModelError::Checkpoint(format!(
                "model folder {} does not exist",
                files.dir.display()
            )));
        }
        let config = Config::from_file(&files.config)?;
        let ck = Checkpoint::open(&files.dir)?;
        Self::from_checkpoint(config, &ck, opts)
    }

    /// Build from an opened checkpoint.
    pub fn from_checkpoint(config: Config, ck: &Checkpoint, opts: &LoadOptions) -> Result<Self> {
        config.validate()?;
        let ws = opts.weights;
        let conv = opts.conventions.clone();
        let vision = VisionEncoder::load(ck, &config.vision, config.text.dim, ws)?;
        let text = TextDecoder::load(ck, &config.text, conv.tau_gelu_tanh, ws, opts.quantize)?;
        let region = Region::load(ck, &config.region, conv.coord_linspace, ws)?;
        let unused = ck.unused();
        if !unused.is_empty() {
            tracing::warn!(count = unused.len(), first = %unused[0], "checkpoint tensors not used by the model");
        }
        Ok(Self {
            config,
            conventions: conv,
            vision,
            text,
            region,
            vision_batch: opts.vision_batch,
            kv_dtype: opts.kv_dtype.unwrap_or(match opts.quantize {
                Quantize::None => KvDtype::F32,
                _ => KvDtype::F16,
            }),
        })
    }

    /// Image-token embeddings `[g², D]` of normalised crops (`[n, 3, S, S]` flattened, crop 0 =
    /// global) for the given tiling.
    pub fn encode_image(
        &self,
        pixels_chw: &[f32],
        tiling: (usize, usize),
        trace: Option<&mut VisionTrace>,
    ) -> Result<Tensor> {
        let v = &self.config.vision;
        let per = v.in_channels * v.crop_size * v.crop_size;
        let n = tiling.0 * tiling.1 + 1;
        if pixels_chw.len() != n * per {
            return Err(ModelError::Input(format!(
                "expected {n} crops of {}x{} for tiling {}x{}, got {} values",
                v.crop_size,
                v.crop_size,
                tiling.0,
                tiling.1,
                pixels_chw.len()
            )));
        }
        let t = Tensor::from_slice(
            pixels_chw,
            (n, v.in_channels, v.crop_size, v.crop_size),
            &Device::Cpu,
        )?;
        self.vision
            .embed_image(&t, tiling, self.vision_batch, trace)
    }

    /// Image-token embeddings of several images at once: the crops of all images go through
    /// the vision encoder together (in batches of the configured size), then each image's
    /// features are stitched, pooled and projected on their own. Fails as a whole if any image's
    /// pixel count does not match its tiling.
    pub fn encode_images(&self, images: &[(&[f32], (usize, usize))]) -> Result<Vec<Tensor>> {
        let v = &self.config.vision;
        let per = v.in_channels * v.crop_size * v.crop_size;
        let mut counts = Vec::with_capacity(images.len());
        let mut all: Vec<f32> = Vec::new();
        for (px, tiling) in images {
            let n = tiling.0 * tiling.1 + 1;
            if px.len() != n * per {
                return Err(ModelError::Input(format!(
                    "expected {n} crops for tiling {}x{}, got {} values",
                    tiling.0,
                    tiling.1,
                    px.len()
                )));
            }
            counts.push(n);
            all.extend_from_slice(px);
        }
        let total: usize = counts.iter().sum();
        if total == 0 {
            return Ok(Vec::new());
        }
        let t = Tensor::from_vec(
            all,
            (total, v.in_channels, v.crop_size, v.crop_size),
            &Device::Cpu,
        )?;
        let batch = self.vision_batch.max(1);
        let mut feats = Vec::new();
        let mut s = 0;
        while s < total {
            let len = batch.min(total - s);
            feats.push(self.vision.encode_crops(&t.narrow(0, s, len)?, None)?);
            s += len;
        }
        let feats = Tensor::cat(&feats, 0)?;
        let mut out = Vec::with_capacity(images.len());
        let mut off = 0;
        for ((_, tiling), n) in images.iter().zip(&counts) {
            out.push(
                self.vision
                    .project(&feats.narrow(0, off, *n)?, *tiling, None)?,
            );
            off += n;
        }
        Ok(out)
    }

    /// Input embedding `[D]` of one typed token.
    pub fn embed_token(&self, tok: &Token) -> Result<Tensor> {
        match *tok {
            Token::Text(id) => Ok(self.text.embed_ids(&[id])?.squeeze(0)?),
            Token::Coord(c) => self.region.encode_coord(c),
            Token::Size(w, h) => self.region.encode_size(w, h),
        }
    }

    /// Input embeddings `[n, D]` of typed tokens (runs of text ids are looked up together).
    pub fn embed_tokens(&self, toks: &[Token]) -> Result<Tensor> {
        let mut parts: Vec<Tensor> = Vec::new();
        let mut run: Vec<u32> = Vec::new();
        for t in toks {
            match t {
                Token::Text(id) => run.push(*id),
                other => {
                    if !run.is_empty() {
                        parts.push(self.text.embed_ids(&run)?);
                        run.clear();
                    }
                    parts.push(self.embed_token(other)?.unsqueeze(0)?);
                }
            }
        }
        if !run.is_empty() {
            parts.push(self.text.embed_ids(&run)?);
        }
        if parts.is_empty() {
            return Err(ModelError::Input("empty token sequence".into()));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Prefill `[BOS] + image embeddings` (bidirectional block) into a fresh cache with room for
    /// `extra` more positions; returns the cache and the hidden states `[1 + g², D]`.
    pub fn prefill_image(
        &self,
        image_embeds: &Tensor,
        extra: usize,
        trace: Option<&mut TextTrace>,
    ) -> Result<(KvCache, Tensor)> {
        let bos = self.text.embed_ids(&[self.config.tokenizer.bos_id])?;
        let x = Tensor::cat(&[&bos, image_embeds], 0)?;
        let n = x.dims()[0];
        let mut cache = KvCache::with_dtype(&self.config.text, n + extra, self.kv_dtype)?;
        let h = self.text.forward(&x, &mut cache, n, trace)?;
        Ok((cache, h))
    }

    /// Run `tokens` after what `cache` holds (causal); returns hidden states `[n, D]`.
    pub fn forward_tokens(
        &self,
        tokens: &[Token],
        cache: &mut KvCache,
        trace: Option<&mut TextTrace>,
    ) -> Result<Tensor> {
        let x = self.embed_tokens(tokens)?;
        self.text.forward(&x, cache, 0, trace)
    }

    /// Element type of the KV caches made for this model (see [`LoadOptions::kv_dtype`]).
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Average bytes per weight element of the text decoder (2 for bf16, 4 for f32, ...).
    pub fn text_weight_bytes_per_param(&self) -> f64 {
        let (bytes, params) = self.text.weight_footprint();
        if params == 0 {
            0.0
        } else {
            bytes as f64 / params as f64
        }
    }

    /// Weight bytes the text decoder reads per decode token (as stored: quantized bytes and
    /// scales when quantized); see [`TextDecoder::decode_weight_bytes_per_token`].
    pub fn text_decode_bytes_per_token(&self) -> usize {
        self.text.decode_weight_bytes_per_token()
    }

    /// Logits `[V]` of one pre-`post_ln` hidden state `[D]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        Ok(self
            .text
            .logits(&hidden.unsqueeze(0)?)?
            .squeeze(0)?
            .to_vec1()?)
    }
}

/// Load a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<TextTokenizer> {
    if !path.exists() {
        return Err(ModelError::Tokenizer(format!(
            "{} not found (the real tokenizer is in the Hub repository moondream/starmie-v1)",
            path.display()
        )));
    }
    TextTokenizer::from_file(path)
}
