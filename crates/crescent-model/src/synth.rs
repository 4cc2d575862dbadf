//! Synthetic checkpoints: random weights under exactly the real tensor names, shapes and dtype
//! (bf16), written as sharded safetensors with an index and an HF `config.json` — so the
//! real-size model can be loaded and benchmarked without downloading it.

use std::io::Write;
use std::path::Path;

use crate::config::Config;
use crate::error::{ModelError, Result};

/// How a tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Uniform with this standard deviation, mean 0.
    Random(f32),
    /// Every element this value.
    Const(f32),
}

/// One tensor of the checkpoint.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// HF key name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Initialisation.
    pub init: Init,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn spec(out: &mut Vec<TensorSpec>, name: String, shape: Vec<usize>, init: Init) {
    out.push(TensorSpec { name, shape, init });
}

fn linear(out: &mut Vec<TensorSpec>, prefix: &str, inp: usize, o: usize) {
    let std = 1.0 / (inp as f32).sqrt();
    spec(
        out,
        format!("{prefix}.weight"),
        vec![o, inp],
        Init::Random(std),
    );
    spec(out, format!("{prefix}.bias"), vec![o], Init::Random(0.01));
}

fn norm(out: &mut Vec<TensorSpec>, prefix: &str, dim: usize) {
    spec(out, format!("{prefix}.weight"), vec![dim], Init::Const(1.0));
    spec(out, format!("{prefix}.bias"), vec![dim], Init::Const(0.0));
}

/// Every tensor of the HF layout (spec §3.1) for `cfg`, in checkpoint order.
pub fn tensor_specs(cfg: &Config) -> Vec<TensorSpec> {
    let mut s = Vec::new();
    let v = &cfg.vision;
    let t = &cfg.text;
    let r = &cfg.region;
    let c = v.enc_dim;
    let g = v.grid();
    linear(&mut s, "model.vision.patch_emb", v.patch_dim(), c);
    spec(
        &mut s,
        "model.vision.pos_emb".into(),
        vec![1, g * g, c],
        Init::Random(0.02),
    );
    for i in 0..v.enc_n_layers {
        let p = format!("model.vision.blocks.{i}");
        norm(&mut s, &format!("{p}.ln1"), c);
        linear(&mut s, &format!("{p}.attn.qkv"), c, 3 * c);
        linear(&mut s, &format!("{p}.attn.proj"), c, c);
        norm(&mut s, &format!("{p}.ln2"), c);
        linear(&mut s, &format!("{p}.mlp.fc1"), c, v.enc_ff_dim);
        linear(&mut s, &format!("{p}.mlp.fc2"), v.enc_ff_dim, c);
    }
    norm(&mut s, "model.vision.post_ln", c);
    linear(&mut s, "model.vision.proj_mlp.fc1", 2 * c, v.proj_inner_dim);
    linear(
        &mut s,
        "model.vision.proj_mlp.fc2",
        v.proj_inner_dim,
        v.proj_out_dim,
    );
    let d = t.dim;
    let qkv = t.qkv_dim();
    spec(
        &mut s,
        "model.text.wte".into(),
        vec![t.vocab_size, d],
        Init::Random(0.02),
    );
    for i in 0..t.n_layers {
        let p = format!("model.text.blocks.{i}");
        norm(&mut s, &format!("{p}.ln"), d);
        linear(&mut s, &format!("{p}.attn.qkv"), d, qkv);
        linear(&mut s, &format!("{p}.attn.proj"), d, d);
        if t.tau_attn {
            let std = 1.0 / (qkv as f32).sqrt();
            spec(
                &mut s,
                format!("{p}.attn.tau.wq"),
                vec![t.n_heads, qkv],
                Init::Random(std),
            );
            spec(
                &mut s,
                format!("{p}.attn.tau.wv"),
                vec![t.n_heads, qkv],
                Init::Random(std),
            );
            spec(
                &mut s,
                format!("{p}.attn.tau.alpha"),
                vec![t.n_heads],
                Init::Random(0.1),
            );
        }
        match &t.moe {
            Some(m) if i >= m.start_layer => {
                linear(&mut s, &format!("{p}.mlp.router"), d, m.num_experts);
                let e = m.num_experts;
                let inner = m.expert_inner_dim;
                spec(
                    &mut s,
                    format!("{p}.mlp.fc1.weight"),
                    vec![e, 2 * inner, d],
                    Init::Random(1.0 / (d as f32).sqrt()),
                );
                spec(
                    &mut s,
                    format!("{p}.mlp.fc2.weight"),
                    vec![e, d, inner],
                    Init::Random(1.0 / (inner as f32).sqrt()),
                );
            }
            _ => {
                linear(&mut s, &format!("{p}.mlp.fc1"), d, t.ff_dim);
                linear(&mut s, &format!("{p}.mlp.fc2"), t.ff_dim, d);
            }
        }
    }
    norm(&mut s, "model.text.post_ln", d);
    linear(&mut s, "model.text.lm_head", d, t.vocab_size);
    spec(
        &mut s,
        "model.region.coord_features".into(),
        vec![1, r.coord_feat_dim / 2],
        Init::Random(1.0),
    );
    spec(
        &mut s,
        "model.region.size_features".into(),
        vec![2, r.size_feat_dim / 2],
        Init::Random(1.0),
    );
    linear(
        &mut s,
        "model.region.coord_encoder",
        r.coord_feat_dim,
        r.dim,
    );
    linear(&mut s, "model.region.coord_decoder", r.dim, r.coord_out_dim);
    linear(&mut s, "model.region.size_encoder", r.size_feat_dim, r.dim);
    linear(&mut s, "model.region.size_decoder", r.dim, r.size_out_dim);
    norm(&mut s, "model.region.ln", r.dim);
    s
}

/// Named synthetic model sizes.
pub fn preset(name: &str) -> Result<Config> {
    let mut cfg = Config::default();
    match name {
        "moondream3-preview" => {}
        "md3-medium" => {
            // Real widths, fewer layers: small enough for the f32 PyTorch reference.
            cfg.vision.enc_n_layers = 6;
            cfg.text.n_layers = 6;
            if let Some(m) = cfg.text.moe.as_mut() {
                m.start_layer = 2;
            }
        }
        other => {
            return Err(ModelError::Config(format!(
                "unknown preset {other:?} (known: moondream3-preview, md3-medium)"
            )))
        }
    }
    cfg.text.max_context = 4096;
    Ok(cfg)
}

/// HF `config.json` text for `cfg` (the Moondream config nested under `"config"`).
pub fn hf_config_json(cfg: &Config) -> String {
    let t = &cfg.text;
    let v = &cfg.vision;
    let r = &cfg.region;
    let tk = &cfg.tokenizer;
    let tp = &tk.templates;
    let moe = t.moe.as_ref().map(|m| {
        serde_json::json!({"num_experts": m.num_experts, "start_layer": m.start_layer,
            "experts_per_token": m.experts_per_token, "expert_inner_dim": m.expert_inner_dim})
    });
    let j = serde_json::json!({
        "architectures": ["HfMoondream"],
        "model_type": "moondream3",
        "torch_dtype": "bfloat16",
        "config": {
            "text": {"dim": t.dim, "ff_dim": t.ff_dim, "n_layers": t.n_layers, "vocab_size": t.vocab_size,
                "max_context": t.max_context, "n_heads": t.n_heads, "n_kv_heads": t.n_kv_heads,
                "prefix_attn": t.prefix_attn, "tau_attn": t.tau_attn, "rope_theta": t.rope_theta, "moe": moe},
            "vision": {"enc_dim": v.enc_dim, "enc_patch_size": v.enc_patch_size, "enc_n_layers": v.enc_n_layers,
                "enc_ff_dim": v.enc_ff_dim, "enc_n_heads": v.enc_n_heads, "proj_out_dim": v.proj_out_dim,
                "crop_size": v.crop_size, "in_channels": v.in_channels, "max_crops": v.max_crops,
                "overlap_margin": v.overlap_margin, "proj_inner_dim": v.proj_inner_dim},
            "region": {"dim": r.dim, "coord_feat_dim": r.coord_feat_dim, "coord_out_dim": r.coord_out_dim,
                "size_feat_dim": r.size_feat_dim, "size_out_dim": r.size_out_dim},
            "tokenizer": {"bos_id": tk.bos_id, "eos_id": tk.eos_id, "answer_id": tk.answer_id,
                "thinking_id": tk.thinking_id, "coord_id": tk.coord_id, "size_id": tk.size_id,
                "start_ground_points_id": tk.start_ground_points_id, "end_ground_id": tk.end_ground_id,
                "templates": {
                    "caption": {"short": tp.caption.short, "normal": tp.caption.normal, "long": tp.caption.long},
                    "query": {"prefix": tp.query.prefix, "answer_prefix": tp.query.answer_prefix,
                        "reasoning_prefix": tp.query.reasoning_prefix,
                        "post_reasoning_prefix": tp.query.post_reasoning_prefix},
                    "detect": {"prefix": tp.detect.prefix, "suffix": tp.detect.suffix},
                    "point": {"prefix": tp.point.prefix, "suffix": tp.point.suffix},
                    "segment": {"prefix": tp.segment.prefix, "suffix": tp.segment.suffix}}}
        }
    });
    serde_json::to_string_pretty(&j).unwrap_or_default()
}

/// SplitMix64 stream for deterministic weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn fill_bf16(
    spec: &TensorSpec,
    seed: u64,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let n = spec.numel();
    let mut rng = Rng(seed);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    // Uniform(-a, a) has std a/sqrt(3).
    let (scale, constant) = match spec.init {
        Init::Random(std) => (std * 3f32.sqrt(), None),
        Init::Const(c) => (0.0, Some(c)),
    };
    let mut i = 0;
    while i < n {
        let r = rng.next();
        for k in 0..4 {
            if i >= n {
                break;
            }
            let v = match constant {
                Some(c) => c,
                None => {
                    let u = ((r >> (16 * k)) & 0xFFFF) as f32 / 65535.0;
                    (2.0 * u - 1.0) * scale
                }
            };
            buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            i += 1;
        }
        if buf.len() >= (1 << 20) {
            sink(&buf)?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        sink(&buf)?;
    }
    Ok(())
}

/// Write a random-weight checkpoint for `cfg` into `dir`: `config.json`, shards of at most
/// `shard_bytes` (`model-0000i-of-0000n.safetensors`) and `model.safetensors.index.json`.
/// `progress(done_bytes, total_bytes)` is called as data is written.
pub fn write_checkpoint(
    cfg: &Config,
    dir: &Path,
    shard_bytes: u64,
    seed: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<()> {
    let io = |e: std::io::Error| ModelError::Checkpoint(format!("writing the checkpoint: {e}"));
    std::fs::create_dir_all(dir).map_err(io)?;
    let specs = tensor_specs(cfg);
    let total: u64 = specs.iter().map(|s| 2 * s.numel() as u64).sum();
    // Group tensors into shards.
    let mut shards: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut cur = 0u64;
    for s in &specs {
        let b = 2 * s.numel() as u64;
        if cur > 0 && cur + b > shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        if let Some(v) = shards.last_mut() {
            v.push(s)
        }
        cur += b;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut done = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        let fname = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        let mut header = serde_json::Map::new();
        let mut off = 0u64;
        for s in shard {
            let b = 2 * s.numel() as u64;
            header.insert(
                s.name.clone(),
                serde_json::json!({"dtype": "BF16", "shape": s.shape, "data_offsets": [off, off + b]}),
            );
            off += b;
            weight_map.insert(s.name.clone(), serde_json::Value::String(fname.clone()));
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header))
            .map_err(|e| ModelError::Checkpoint(e.to_string()))?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let f = std::fs::File::create(dir.join(&fname)).map_err(io)?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&h).map_err(io)?;
        for s in shard {
            let seed_t = seed ^ fxhash(&s.name);
            fill_bf16(s, seed_t, |b| {
                done += b.len() as u64;
                progress(done, total);
                w.write_all(b)
            })
            .map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join(crate::weights::INDEX_FILE),
        serde_json::to_string_pretty(&index).unwrap_or_default(),
    )
    .map_err(io)?;
    std::fs::write(dir.join("config.json"), hf_config_json(cfg)).map_err(io)?;
    Ok(())
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadOptions, Moondream};

    #[test]
    fn preview_has_the_real_tensor_count_and_size() {
        let cfg = preset("moondream3-preview").unwrap();
        let specs = tensor_specs(&cfg);
        assert_eq!(specs.len(), 662);
        let params: usize = specs.iter().map(|s| s.numel()).sum();
        // ≈ 9.27 B parameters (spec §1).
        assert!((9.2e9..9.35e9).contains(&(params as f64)), "{params}");
    }

    #[test]
    fn synthetic_fixture_sized_checkpoint_loads_with_every_tensor_used() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/md3-tiny/config.json");
        let cfg = Config::from_file(&p).unwrap();
        let dir = std::env::temp_dir().join(format!("crescent-synth-{}", std::process::id()));
        write_checkpoint(&cfg, &dir, 1 << 20, 7, |_, _| {}).unwrap();
        let ck = crate::weights::Checkpoint::open(&dir).unwrap();
        let m = Moondream::from_checkpoint(
            Config::from_file(&dir.join("config.json")).unwrap(),
            &ck,
            &LoadOptions::default(),
        );
        assert!(m.is_ok(), "{:?}", m.err());
        assert!(ck.unused().is_empty(), "{:?}", ck.unused());
        assert_eq!(Config::from_file(&dir.join("config.json")).unwrap(), cfg);
        std::fs::remove_dir_all(&dir).ok();
    }
}
