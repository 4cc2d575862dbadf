//! Model configuration: the Hugging Face `config.json` wrapper and the Moondream config dict.
//!
//! The HF checkpoint nests the Moondream config under `"config"` (spec §2.1). Every missing
//! section or key falls back to the moondream3-preview defaults (spec §2.2); unknown keys are
//! ignored. [`Config::validate`] rejects dimensions that cannot form a model.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// Mixture-of-experts settings of the text decoder.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct MoeConfig {
    /// Experts per MoE layer (`E`).
    #[serde(alias = "n_experts")]
    pub num_experts: usize,
    /// First layer index that is a MoE layer; earlier layers are dense.
    pub start_layer: usize,
    /// Experts selected per token (`K`).
    #[serde(alias = "n_experts_per_tok")]
    pub experts_per_token: usize,
    /// Inner width of one expert (fc1 produces twice this).
    pub expert_inner_dim: usize,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            num_experts: 64,
            start_layer: 4,
            experts_per_token: 8,
            expert_inner_dim: 1024,
        }
    }
}

/// Text decoder settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct TextConfig {
    /// Model width.
    pub dim: usize,
    /// Dense MLP inner width.
    pub ff_dim: usize,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Vocabulary size (embedding and LM-head rows).
    pub vocab_size: usize,
    /// Maximum sequence length (positions).
    pub max_context: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// BOS + image tokens (informational).
    pub prefix_attn: usize,
    /// MoE settings; `None` = every layer dense.
    pub moe: Option<MoeConfig>,
    /// Whether attention uses tau scaling.
    pub tau_attn: bool,
    /// RoPE base.
    pub rope_theta: f64,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            dim: 2048,
            ff_dim: 8192,
            n_layers: 24,
            vocab_size: 51200,
            max_context: 32768,
            n_heads: 32,
            n_kv_heads: 32,
            prefix_attn: 730,
            moe: Some(MoeConfig::default()),
            tau_attn: true,
            rope_theta: 1_500_000.0,
        }
    }
}

impl TextConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    /// Rotary dimensions per head (the first half of each head).
    pub fn rot_dim(&self) -> usize {
        self.head_dim() / 2
    }
    /// Width of the fused qkv projection output.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim()
    }
    /// Whether block `layer` is a MoE block.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| layer >= m.start_layer)
    }
}

/// Vision encoder and projector settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct VisionConfig {
    /// Encoder width.
    pub enc_dim: usize,
    /// Patch side in pixels.
    pub enc_patch_size: usize,
    /// Encoder blocks.
    pub enc_n_layers: usize,
    /// Encoder MLP inner width.
    pub enc_ff_dim: usize,
    /// Encoder attention heads.
    pub enc_n_heads: usize,
    /// Projector output width (= text dim).
    pub proj_out_dim: usize,
    /// Crop side in pixels.
    pub crop_size: usize,
    /// Image channels.
    pub in_channels: usize,
    /// Maximum number of local crops.
    pub max_crops: usize,
    /// Overlap margin in patches.
    pub overlap_margin: usize,
    /// Projector inner width.
    pub proj_inner_dim: usize,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            enc_dim: 1152,
            enc_patch_size: 14,
            enc_n_layers: 27,
            enc_ff_dim: 4304,
            enc_n_heads: 16,
            proj_out_dim: 2048,
            crop_size: 378,
            in_channels: 3,
            max_crops: 12,
            overlap_margin: 4,
            proj_inner_dim: 8192,
        }
    }
}

impl VisionConfig {
    /// Patches per crop side (`crop_size / patch_size`; 27 for the real model).
    pub fn grid(&self) -> usize {
        self.crop_size / self.enc_patch_size
    }
    /// Image tokens per image (`grid²`; 729 for the real model).
    pub fn n_image_tokens(&self) -> usize {
        self.grid() * self.grid()
    }
    /// Length of one flattened patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.enc_patch_size * self.enc_patch_size
    }
}

/// Region (coordinate / size) module settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct RegionConfig {
    /// Width of the hidden state the region module reads and writes.
    pub dim: usize,
    /// Fourier feature width for a coordinate (cos + sin).
    pub coord_feat_dim: usize,
    /// Coordinate bins.
    pub coord_out_dim: usize,
    /// Fourier feature width for a size (cos + sin).
    pub size_feat_dim: usize,
    /// Size bins (width bins then height bins).
    pub size_out_dim: usize,
}

impl Default for RegionConfig {
    fn default() -> Self {
        Self {
            dim: 2048,
            coord_feat_dim: 256,
            coord_out_dim: 1024,
            size_feat_dim: 512,
            size_out_dim: 2048,
        }
    }
}

/// A prefix/suffix pair of template token ids.
#[derive(Clone, Debug, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct PrefixSuffix {
    /// Ids before the user text.
    pub prefix: Vec<u32>,
    /// Ids after the user text.
    pub suffix: Vec<u32>,
}

/// The query template (Kestrel MD3 field names).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct QueryTemplate {
    /// Ids before the question.
    pub prefix: Vec<u32>,
    /// Opener after the question when reasoning is off.
    pub answer_prefix: Vec<u32>,
    /// Opener after the question when reasoning is on.
    pub reasoning_prefix: Vec<u32>,
    /// Ids injected after the model ends its reasoning (empty for MD3).
    pub post_reasoning_prefix: Vec<u32>,
    /// Older HF/MD2 shape: `suffix` = answer opener.
    pub suffix: Option<Vec<u32>>,
}

impl Default for QueryTemplate {
    fn default() -> Self {
        Self {
            prefix: vec![1, 15381, 2],
            answer_prefix: vec![3],
            reasoning_prefix: vec![4],
            post_reasoning_prefix: vec![],
            suffix: None,
        }
    }
}

/// Caption templates per length.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct CaptionTemplates {
    /// `short` caption prompt ids.
    pub short: Vec<u32>,
    /// `normal` caption prompt ids.
    pub normal: Vec<u32>,
    /// `long` caption prompt ids.
    pub long: Vec<u32>,
}

impl Default for CaptionTemplates {
    fn default() -> Self {
        Self {
            short: vec![1, 32708, 2, 12492, 3],
            normal: vec![1, 32708, 2, 6382, 3],
            long: vec![1, 32708, 2, 4059, 3],
        }
    }
}

/// All prompt templates.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct Templates {
    /// Caption prompts.
    pub caption: CaptionTemplates,
    /// Query prompt parts.
    pub query: QueryTemplate,
    /// Detect prompt parts.
    pub detect: PrefixSuffix,
    /// Point prompt parts.
    pub point: PrefixSuffix,
    /// Segment prompt parts (not a skill of the preview; kept for completeness).
    pub segment: PrefixSuffix,
}

impl Default for Templates {
    fn default() -> Self {
        Self {
            caption: CaptionTemplates::default(),
            query: QueryTemplate::default(),
            detect: PrefixSuffix {
                prefix: vec![1, 7235, 476, 2],
                suffix: vec![3],
            },
            point: PrefixSuffix {
                prefix: vec![1, 2581, 2],
                suffix: vec![3],
            },
            segment: PrefixSuffix {
                prefix: vec![1, 17374, 2],
                suffix: vec![3],
            },
        }
    }
}

/// Special token ids and prompt templates.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct TokenizerConfig {
    /// Beginning of sequence.
    pub bos_id: u32,
    /// End of sequence.
    pub eos_id: u32,
    /// Starts the answer (and ends reasoning).
    pub answer_id: u32,
    /// Starts reasoning.
    pub thinking_id: u32,
    /// A coordinate token.
    pub coord_id: u32,
    /// A size token.
    pub size_id: u32,
    /// Starts a grounded span in reasoning.
    pub start_ground_points_id: u32,
    /// Ends a grounded span in reasoning.
    pub end_ground_id: u32,
    /// Prompt templates.
    pub templates: Templates,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            bos_id: 0,
            eos_id: 0,
            answer_id: 3,
            thinking_id: 4,
            coord_id: 5,
            size_id: 6,
            start_ground_points_id: 7,
            end_ground_id: 9,
            templates: Templates::default(),
        }
    }
}

/// Conventions where public implementations disagree (spec §11). Defaults follow Kestrel.
#[derive(Clone, Debug, PartialEq)]
pub struct Conventions {
    /// Tau token activation: tanh-GELU (Kestrel) or exact erf GELU (HF release, vLLM).
    pub tau_gelu_tanh: bool,
    /// Coordinate value from a bin: Kestrel's bf16 linspace table (true) or `bin / bins` (HF).
    pub coord_linspace: bool,
    /// Clamp detect boxes to [0, 1] (Kestrel).
    pub clamp_boxes: bool,
}

impl Default for Conventions {
    fn default() -> Self {
        Self {
            tau_gelu_tanh: true,
            coord_linspace: true,
            clamp_boxes: true,
        }
    }
}

impl Conventions {
    /// The HF release / vLLM behaviour.
    pub fn hf() -> Self {
        Self {
            tau_gelu_tanh: false,
            coord_linspace: false,
            clamp_boxes: false,
        }
    }
}

/// The complete Moondream 3 configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct Config {
    /// Text decoder.
    pub text: TextConfig,
    /// Vision encoder.
    pub vision: VisionConfig,
    /// Region module.
    pub region: RegionConfig,
    /// Token ids and templates.
    pub tokenizer: TokenizerConfig,
}

#[derive(Deserialize)]
struct HfWrapper {
    #[serde(default)]
    config: Option<serde_json::Value>,
    #[serde(flatten)]
    _rest: BTreeMap<String, serde_json::Value>,
}

impl Config {
    /// Parse a `config.json` text: the HF wrapper (`{"config": {...}}`) or the Moondream dict
    /// itself. An absent or empty `config` gives the moondream3-preview defaults.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json is not valid JSON: {e}")))?;
        let inner = match &value {
            serde_json::Value::Object(map) if map.contains_key("config") => {
                let w: HfWrapper = serde_json::from_value(value.clone())
                    .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
                match w.config {
                    Some(serde_json::Value::Null) | None => {
                        serde_json::Value::Object(Default::default())
                    }
                    Some(v) => v,
                }
            }
            serde_json::Value::Object(map)
                if map.contains_key("text")
                    || map.contains_key("vision")
                    || map.contains_key("region") =>
            {
                value.clone()
            }
            serde_json::Value::Object(_) => serde_json::Value::Object(Default::default()),
            _ => {
                return Err(ModelError::Config(
                    "config.json must hold a JSON object".into(),
                ))
            }
        };
        let cfg: Config = serde_json::from_value(inner)
            .map_err(|e| ModelError::Config(format!("config.json: invalid model config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read and parse `config.json` at `path`; a missing file gives the defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            let cfg = Config::default();
            cfg.validate()?;
            return Ok(cfg);
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json_str(&text)
    }

    /// Check that the dimensions are consistent; the error names the offending fields.
    pub fn validate(&self) -> Result<()> {
        let t = &self.text;
        let v = &self.vision;
        let r = &self.region;
        let mut errs: Vec<String> = Vec::new();
        let mut pos = |name: &str, val: usize| {
            if val == 0 {
                errs.push(format!("{name} must be > 0"));
            }
        };
        pos("text.dim", t.dim);
        pos("text.ff_dim", t.ff_dim);
        pos("text.n_layers", t.n_layers);
        pos("text.vocab_size", t.vocab_size);
        pos("text.max_context", t.max_context);
        pos("text.n_heads", t.n_heads);
        pos("text.n_kv_heads", t.n_kv_heads);
        pos("vision.enc_dim", v.enc_dim);
        pos("vision.enc_patch_size", v.enc_patch_size);
        pos("vision.enc_n_layers", v.enc_n_layers);
        pos("vision.enc_ff_dim", v.enc_ff_dim);
        pos("vision.enc_n_heads", v.enc_n_heads);
        pos("vision.crop_size", v.crop_size);
        pos("vision.in_channels", v.in_channels);
        pos("vision.max_crops", v.max_crops);
        pos("vision.proj_inner_dim", v.proj_inner_dim);
        pos("region.coord_out_dim", r.coord_out_dim);
        pos("region.size_out_dim", r.size_out_dim);
        if t.n_heads > 0 && !t.dim.is_multiple_of(t.n_heads) {
            errs.push(format!(
                "text.dim ({}) must be divisible by text.n_heads ({})",
                t.dim, t.n_heads
            ));
        }
        if t.n_heads > 0 && t.dim.is_multiple_of(t.n_heads) && !t.head_dim().is_multiple_of(4) {
            errs.push(format!(
                "text head_dim ({}) must be a multiple of 4 (rotary split-half)",
                t.head_dim()
            ));
        }
        if t.n_kv_heads > 0 && !t.n_heads.is_multiple_of(t.n_kv_heads) {
            errs.push(format!(
                "text.n_heads ({}) must be a multiple of text.n_kv_heads ({})",
                t.n_heads, t.n_kv_heads
            ));
        }
        if t.tau_attn && t.n_kv_heads != t.n_heads {
            errs.push("tau attention requires text.n_kv_heads == text.n_heads".into());
        }
        if let Some(m) = &t.moe {
            if m.num_experts == 0 || m.experts_per_token == 0 || m.expert_inner_dim == 0 {
                errs.push(
                    "text.moe: num_experts, experts_per_token and expert_inner_dim must be > 0"
                        .into(),
                );
            }
            if m.experts_per_token > m.num_experts {
                errs.push(format!(
                    "text.moe.experts_per_token ({}) exceeds text.moe.num_experts ({})",
                    m.experts_per_token, m.num_experts
                ));
            }
        }
        if v.enc_n_heads > 0 && !v.enc_dim.is_multiple_of(v.enc_n_heads) {
            errs.push(format!(
                "vision.enc_dim ({}) must be divisible by vision.enc_n_heads ({})",
                v.enc_dim, v.enc_n_heads
            ));
        }
        if v.enc_patch_size > 0 && !v.crop_size.is_multiple_of(v.enc_patch_size) {
            errs.push(format!(
                "vision.crop_size ({}) must be a multiple of vision.enc_patch_size ({})",
                v.crop_size, v.enc_patch_size
            ));
        }
        if v.enc_patch_size > 0 && v.grid() <= 2 * v.overlap_margin {
            errs.push(format!(
                "vision.overlap_margin ({}) leaves no usable window in a {}-patch grid",
                v.overlap_margin,
                v.grid()
            ));
        }
        if v.proj_out_dim != t.dim {
            errs.push(format!(
                "vision.proj_out_dim ({}) must equal text.dim ({})",
                v.proj_out_dim, t.dim
            ));
        }
        if r.dim != t.dim {
            errs.push(format!(
                "region.dim ({}) must equal text.dim ({})",
                r.dim, t.dim
            ));
        }
        if r.coord_feat_dim == 0 || !r.coord_feat_dim.is_multiple_of(2) {
            errs.push(format!(
                "region.coord_feat_dim ({}) must be a positive even number",
                r.coord_feat_dim
            ));
        }
        if r.size_feat_dim == 0 || !r.size_feat_dim.is_multiple_of(2) {
            errs.push(format!(
                "region.size_feat_dim ({}) must be a positive even number",
                r.size_feat_dim
            ));
        }
        if !r.size_out_dim.is_multiple_of(2) {
            errs.push(format!(
                "region.size_out_dim ({}) must be even (width bins then height bins)",
                r.size_out_dim
            ));
        }
        let tk = &self.tokenizer;
        for (name, id) in [
            ("bos_id", tk.bos_id),
            ("eos_id", tk.eos_id),
            ("answer_id", tk.answer_id),
            ("thinking_id", tk.thinking_id),
            ("coord_id", tk.coord_id),
            ("size_id", tk.size_id),
            ("start_ground_points_id", tk.start_ground_points_id),
            ("end_ground_id", tk.end_ground_id),
        ] {
            if t.vocab_size > 0 && id as usize >= t.vocab_size {
                errs.push(format!(
                    "tokenizer.{name} ({id}) is outside the vocabulary ({})",
                    t.vocab_size
                ));
            }
        }
        let tp = &tk.templates;
        let lists: [(&str, &Vec<u32>); 11] = [
            ("caption.short", &tp.caption.short),
            ("caption.normal", &tp.caption.normal),
            ("caption.long", &tp.caption.long),
            ("query.prefix", &tp.query.prefix),
            ("query.answer_prefix", &tp.query.answer_prefix),
            ("query.reasoning_prefix", &tp.query.reasoning_prefix),
            (
                "query.post_reasoning_prefix",
                &tp.query.post_reasoning_prefix,
            ),
            ("detect.prefix", &tp.detect.prefix),
            ("detect.suffix", &tp.detect.suffix),
            ("point.prefix", &tp.point.prefix),
            ("point.suffix", &tp.point.suffix),
        ];
        for (name, ids) in lists {
            if let Some(bad) = ids
                .iter()
                .find(|&&id| t.vocab_size > 0 && id as usize >= t.vocab_size)
            {
                errs.push(format!(
                    "tokenizer.templates.{name} holds id {bad} outside the vocabulary"
                ));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Config(format!(
                "inconsistent model config: {}",
                errs.join("; ")
            )))
        }
    }

    /// The query answer opener, honouring the older `suffix` field.
    pub fn query_answer_prefix(&self) -> &[u32] {
        let q = &self.tokenizer.templates.query;
        match &q.suffix {
            Some(s) if q.answer_prefix.is_empty() => s,
            _ => &q.answer_prefix,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gives_preview_defaults() {
        let c =
            Config::from_json_str(r#"{"architectures": ["HfMoondream"], "config": {}}"#).unwrap();
        assert_eq!(c.text.dim, 2048);
        assert_eq!(c.text.head_dim(), 64);
        assert_eq!(c.text.rot_dim(), 32);
        assert_eq!(c.text.qkv_dim(), 6144);
        assert_eq!(c.vision.grid(), 27);
        assert_eq!(c.vision.n_image_tokens(), 729);
        assert_eq!(
            c.tokenizer.templates.caption.normal,
            vec![1, 32708, 2, 6382, 3]
        );
        assert!(c.text.is_moe_layer(4) && !c.text.is_moe_layer(3));
        let c2 = Config::from_json_str(r#"{"model_type": "moondream3"}"#).unwrap();
        assert_eq!(c, c2);
    }

    #[test]
    fn vllm_moe_names_are_accepted() {
        let c = Config::from_json_str(
            r#"{"config": {"text": {"moe": {"n_experts": 16, "n_experts_per_tok": 2}}}}"#,
        )
        .unwrap();
        let m = c.text.moe.unwrap();
        assert_eq!(
            (m.num_experts, m.experts_per_token, m.start_layer),
            (16, 2, 4)
        );
    }

    #[test]
    fn null_moe_means_dense() {
        let c = Config::from_json_str(r#"{"config": {"text": {"moe": null}}}"#).unwrap();
        assert!(c.text.moe.is_none());
        assert!(!c.text.is_moe_layer(23));
    }

    #[test]
    fn inconsistent_dimensions_are_rejected_with_field_names() {
        let e = Config::from_json_str(r#"{"config": {"text": {"dim": 100, "n_heads": 3}}}"#)
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("text.dim (100)"), "{msg}");
        assert!(msg.contains("vision.proj_out_dim"), "{msg}");
        let e = Config::from_json_str(r#"{"config": {"vision": {"crop_size": 380}}}"#).unwrap_err();
        assert!(e.to_string().contains("vision.crop_size (380)"), "{e}");
        let e =
            Config::from_json_str(r#"{"config": {"text": {"moe": {"experts_per_token": 99}}}}"#)
                .unwrap_err();
        assert!(e.to_string().contains("experts_per_token (99)"), "{e}");
        let e = Config::from_json_str(r#"{"config": {"text": {"dim": "wide"}}}"#).unwrap_err();
        assert!(e.to_string().contains("invalid model config"), "{e}");
        let e = Config::from_json_str("[1, 2]").unwrap_err();
        assert!(e.to_string().contains("JSON object"), "{e}");
        let e = Config::from_json_str("{ not json").unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
    }

    #[test]
    fn fixture_config_parses() {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/md3-tiny/config.json");
        let c = Config::from_file(&p).unwrap();
        assert_eq!(c.text.dim, 64);
        assert_eq!(c.text.moe.as_ref().unwrap().experts_per_token, 3);
        assert_eq!(c.vision.enc_n_layers, 2);
        assert_eq!(c.vision.grid(), 27);
        assert_eq!(c.tokenizer.templates.detect.prefix, vec![1, 313, 312, 2]);
    }
}
