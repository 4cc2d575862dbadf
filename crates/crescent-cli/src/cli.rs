//! Command-line arguments (clap derive).

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use crescent_model::hub::DEFAULT_MODEL;
use crescent_model::{KvDtype, Quantize, WeightStorage};
use crescent_skills::{CaptionLength, SpatialRef};

/// Moondream 3 inference on the CPU.
///
/// Prints exactly one JSON object (the Moondream API shape) on stdout; logs, streamed text
/// and statistics go to stderr.
#[derive(Parser, Debug)]
#[command(name = "crescent", version, propagate_version = true)]
pub struct Cli {
    /// More logging on stderr: -v info, -vv debug, -vvv trace (default: warnings only;
    /// RUST_LOG, when set, takes precedence).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    /// The skill to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The skills.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Answer a question about an image (or a text-only question without --image).
    Query(QueryArgs),
    /// Caption an image.
    Caption(CaptionArgs),
    /// Detect objects: bounding boxes normalised to the image.
    Detect(DetectArgs),
    /// Point at objects: centre points normalised to the image.
    Point(PointArgs),
    /// Write a random-weight checkpoint with the real tensor names, shapes and dtype.
    SynthCheckpoint(SynthArgs),
    /// Measure vision, prefill and decode speed against this machine's rooflines.
    Bench(BenchArgs),
    /// Serve the Moondream and OpenAI HTTP APIs with continuous batching.
    Serve(ServeArgs),
}

/// `crescent serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model folder or Hub id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 2020)]
    pub port: u16,
    /// Most requests decoded together.
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// KV cache size in MiB (default: a quarter of the memory available after loading the model).
    #[arg(long)]
    pub kv_cache_mb: Option<usize>,
    /// Require this key (`X-Moondream-Auth: KEY` or `Authorization: Bearer KEY`) on every
    /// endpoint but /health. Also read from CRESCENT_API_KEY.
    #[arg(long, env = "CRESCENT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most requests waiting for a batch slot; beyond it requests get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Per-request deadline in seconds (0 = none).
    #[arg(long, default_value_t = 0)]
    pub request_timeout: u64,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 32)]
    pub max_body_mb: usize,
    /// Largest decoded image in megapixels.
    #[arg(long, default_value_t = 50)]
    pub max_image_mp: u64,
    /// How weights are held in memory.
    #[arg(long, value_enum, value_name = "KIND", default_value_t = WeightsArg::Checkpoint)]
    pub weights: WeightsArg,
    /// Quantize the text decoder's large matrices at load (attention, MLPs, MoE experts, LM
    /// head): `int8` (per output channel) or `int4` (groups of 32); the vision encoder stays in
    /// the --weights dtype. Lower memory and faster decoding, slightly different outputs.
    #[arg(long, value_enum, value_name = "KIND", default_value_t = QuantizeArg::None)]
    pub quantize: QuantizeArg,
    /// Element type of the KV cache: `auto` is f32 with unquantized weights (the reference's
    /// numerics) and f16 with --quantize (half the bytes per decode step, twice the positions
    /// per MiB; its rounding is far below the weights').
    #[arg(long, value_enum, value_name = "KIND", default_value_t = KvDtypeArg::Auto)]
    pub kv_dtype: KvDtypeArg,
}

/// `crescent bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model folder or Hub id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Print one JSON object on stdout (the default prints it indented).
    #[arg(long)]
    pub json: bool,
    /// Decode batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub batch: Vec<usize>,
    /// Decode steps timed per batch size (median).
    #[arg(long, default_value_t = 8)]
    pub decode_steps: usize,
    /// Rounds of batch-1 decode, each after its own bandwidth probe (the roofline ratio is
    /// the median of the rounds' ratios).
    #[arg(long, default_value_t = 3)]
    pub decode_rounds: usize,
    /// Crops per vision-encoder batch.
    #[arg(long, default_value_t = 4)]
    pub crops: usize,
    /// Timed repetitions of vision and prefill (median).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// KV cache size in MiB.
    #[arg(long, default_value_t = 4096)]
    pub kv_mb: usize,
    /// An image for an end-to-end time-to-first-token measurement (caption, 1 token).
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// How weights are held in memory (`checkpoint`: the stored dtype; `f32`: upcast at load).
    #[arg(long, value_enum, value_name = "KIND", default_value_t = WeightsArg::Checkpoint)]
    pub weights: WeightsArg,
    /// Quantize the text decoder's large matrices at load (attention, MLPs, MoE experts, LM
    /// head): `int8` (per output channel) or `int4` (groups of 32); the vision encoder stays in
    /// the --weights dtype. Lower memory and faster decoding, slightly different outputs.
    #[arg(long, value_enum, value_name = "KIND", default_value_t = QuantizeArg::None)]
    pub quantize: QuantizeArg,
    /// Element type of the KV cache: `auto` is f32 with unquantized weights (the reference's
    /// numerics) and f16 with --quantize (half the bytes per decode step, twice the positions
    /// per MiB; its rounding is far below the weights').
    #[arg(long, value_enum, value_name = "KIND", default_value_t = KvDtypeArg::Auto)]
    pub kv_dtype: KvDtypeArg,
}

impl Command {
    /// The options shared by every skill (`None` for the tool subcommands).
    pub fn common(&self) -> Option<&CommonArgs> {
        match self {
            Command::Query(a) => Some(&a.common),
            Command::Caption(a) => Some(&a.common),
            Command::Detect(a) => Some(&a.common),
            Command::Point(a) => Some(&a.common),
            _ => None,
        }
    }
}

/// `crescent synth-checkpoint`.
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Model size: `moondream3-preview` (real size, ≈ 18.5 GB) or `md3-medium` (real widths,
    /// 6 vision and 6 text layers of which 2 dense).
    #[arg(long, default_value = "moondream3-preview")]
    pub preset: String,
    /// Output folder (created).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Weight RNG seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest shard in MiB.
    #[arg(long, default_value_t = 4096)]
    pub shard_mb: u64,
    /// tokenizer.json to copy next to the weights (default: a small byte-level BPE tokenizer
    /// built in; the real one lives in the Hub repository moondream/starmie-v1).
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
}

/// `crescent query`.
#[derive(Args, Debug)]
pub struct QueryArgs {
    /// Image file (PNG, JPEG, WebP, GIF, BMP, TIFF; `-` reads stdin). Without it the question
    /// is answered from text alone.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// The question.
    #[arg(long, value_name = "TEXT")]
    pub question: String,
    /// Grounded reasoning before the answer (adds "reasoning" to the output).
    #[arg(long)]
    pub reasoning: bool,
    /// A point `x,y` or a box `x_min,y_min,x_max,y_max` (normalised to [0, 1]) the question
    /// refers to; repeatable; needs --image.
    #[arg(long = "spatial-ref", value_name = "X,Y[,X2,Y2]", value_parser = parse_spatial_ref, allow_negative_numbers = true)]
    pub spatial_refs: Vec<SpatialRef>,
    /// Print the answer text to stderr as it is generated.
    #[arg(long)]
    pub stream: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
}

/// `crescent caption`.
#[derive(Args, Debug)]
pub struct CaptionArgs {
    /// Image file (`-` reads stdin).
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// Caption length.
    #[arg(long, value_name = "short|normal|long", default_value = "normal", value_parser = parse_length)]
    pub length: CaptionLength,
    /// Print the caption to stderr as it is generated.
    #[arg(long)]
    pub stream: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
}

/// `crescent detect`.
#[derive(Args, Debug)]
pub struct DetectArgs {
    /// Image file (`-` reads stdin).
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// What to detect.
    #[arg(long, value_name = "TEXT")]
    pub object: String,
    /// Most boxes to return (default 50).
    #[arg(long, value_name = "N")]
    pub max_objects: Option<usize>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
}

/// `crescent point`.
#[derive(Args, Debug)]
pub struct PointArgs {
    /// Image file (`-` reads stdin).
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// What to point at.
    #[arg(long, value_name = "TEXT")]
    pub object: String,
    /// Most points to return (default: limited by --max-tokens).
    #[arg(long, value_name = "N")]
    pub max_objects: Option<usize>,
    /// A point `x,y` or a box `x_min,y_min,x_max,y_max` (normalised to [0, 1]) the prompt
    /// refers to; repeatable.
    #[arg(long = "spatial-ref", value_name = "X,Y[,X2,Y2]", value_parser = parse_spatial_ref, allow_negative_numbers = true)]
    pub spatial_refs: Vec<SpatialRef>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
}

/// Options shared by every skill: the model, sampling settings and output extras.
#[derive(Args, Debug)]
pub struct CommonArgs {
    /// Model folder (config.json, model.safetensors or a sharded index, tokenizer.json) or a
    /// Hugging Face Hub id (downloaded into the HF cache; HF_HUB_OFFLINE=1 uses the cache only).
    #[arg(long, value_name = "DIR|ID", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Token budget (default 768; detect's budget follows --max-objects instead).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Sampling temperature, >= 0; 0 is greedy (default: 0.2 for query/caption, 0 for
    /// detect/point).
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1] (default: 0.9 for query/caption, 1 for detect/point).
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Seed of the sampler (default 0).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Print timings and token counts as one JSON line on stderr.
    #[arg(long)]
    pub stats: bool,
    /// Follow the HF release / vLLM where public implementations disagree (exact-erf GELU in
    /// the tau gate, `bin / bins` coordinates, unclamped boxes) instead of Kestrel.
    #[arg(long)]
    pub hf_conventions: bool,
    /// How weights are held in memory: `checkpoint` keeps the stored dtype (bf16) and upcasts
    /// per matmul; `f32` upcasts once at load (twice the memory).
    #[arg(long, value_enum, value_name = "KIND", default_value_t = WeightsArg::Checkpoint)]
    pub weights: WeightsArg,
    /// Quantize the text decoder's large matrices at load (attention, MLPs, MoE experts, LM
    /// head): `int8` (per output channel) or `int4` (groups of 32); the vision encoder stays in
    /// the --weights dtype. Lower memory and faster decoding, slightly different outputs.
    #[arg(long, value_enum, value_name = "KIND", default_value_t = QuantizeArg::None)]
    pub quantize: QuantizeArg,
    /// Element type of the KV cache: `auto` is f32 with unquantized weights (the reference's
    /// numerics) and f16 with --quantize (half the bytes per decode step, twice the positions
    /// per MiB; its rounding is far below the weights').
    #[arg(long, value_enum, value_name = "KIND", default_value_t = KvDtypeArg::Auto)]
    pub kv_dtype: KvDtypeArg,
}

/// `--weights` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WeightsArg {
    /// Keep the checkpoint dtype.
    Checkpoint,
    /// Upcast to f32 at load.
    F32,
}

impl From<WeightsArg> for WeightStorage {
    fn from(w: WeightsArg) -> Self {
        match w {
            WeightsArg::Checkpoint => WeightStorage::Checkpoint,
            WeightsArg::F32 => WeightStorage::F32,
        }
    }
}

/// `--quantize` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    /// No quantization.
    None,
    /// int8, one scale per output channel.
    Int8,
    /// int4, one scale per group of 32 input columns.
    Int4,
}

impl From<QuantizeArg> for Quantize {
    fn from(q: QuantizeArg) -> Self {
        match q {
            QuantizeArg::None => Quantize::None,
            QuantizeArg::Int8 => Quantize::Int8,
            QuantizeArg::Int4 => Quantize::INT4,
        }
    }
}

/// `--kv-dtype` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvDtypeArg {
    /// f32 for unquantized weights, f16 for quantized ones.
    Auto,
    /// f32 (exact).
    F32,
    /// f16.
    F16,
}

impl KvDtypeArg {
    /// The load option (`None` = decided by the quantization).
    pub fn option(self) -> Option<KvDtype> {
        match self {
            KvDtypeArg::Auto => None,
            KvDtypeArg::F32 => Some(KvDtype::F32),
            KvDtypeArg::F16 => Some(KvDtype::F16),
        }
    }
}

/// Parse `x,y` or `x_min,y_min,x_max,y_max` into a validated spatial reference.
fn parse_spatial_ref(s: &str) -> Result<SpatialRef, String> {
    let values = s
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .map_err(|_| format!("{:?} is not a number", v.trim()))
        })
        .collect::<Result<Vec<f64>, String>>()?;
    SpatialRef::from_values(&values).map_err(|e| e.to_string())
}

/// Parse a caption length (`short`, `normal` or `long`).
fn parse_length(s: &str) -> Result<CaptionLength, String> {
    s.parse::<CaptionLength>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn spatial_refs_parse_and_validate() {
        assert_eq!(
            parse_spatial_ref("0.25, 0.5").unwrap(),
            SpatialRef::Point { x: 0.25, y: 0.5 }
        );
        assert!(matches!(
            parse_spatial_ref("0.1,0.2,0.3,0.4").unwrap(),
            SpatialRef::Box { .. }
        ));
        assert!(parse_spatial_ref("2,3")
            .unwrap_err()
            .contains("outside [0, 1]"));
        assert!(parse_spatial_ref("0.1,0.2,0.3").is_err());
        assert!(parse_spatial_ref("a,b")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_spatial_ref("0.5,0.5,0.1,0.9").is_err());
    }
}
