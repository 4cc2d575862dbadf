//! Running one skill request: arguments → request and settings → model → image → engine →
//! JSON on stdout.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::anyhow;
use crescent_engine::{Engine, EngineConfig, EngineError, Generation, ImageInput, Job};
use crescent_image::{preprocess, CropConfig, DecodeLimits};
use crescent_model::config::TextConfig;
use crescent_model::weights::Checkpoint;
use crescent_model::{
    load_tokenizer, Config, Conventions, KvDtype, KvPool, LoadOptions, Moondream,
};
use crescent_skills::{
    resolve_settings, SettingsOverrides, SkillContext, SkillError, SkillRequest,
};

use crate::cli::{Command, CommonArgs};
use crate::offline::resolve_model;

/// Exit status of usage errors (bad arguments, invalid settings or requests).
pub const EXIT_USAGE: u8 = 2;
/// Exit status of runtime errors (unreadable image, broken model, ...).
pub const EXIT_RUNTIME: u8 = 1;

/// A failed run: what to print and the exit status.
#[derive(Debug)]
pub struct Failure {
    /// Exit status ([`EXIT_USAGE`] or [`EXIT_RUNTIME`]).
    pub code: u8,
    /// The error (printed with its context chain on one line).
    pub error: anyhow::Error,
}

impl Failure {
    /// A usage error (exit status 2).
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: EXIT_USAGE,
            error: error.into(),
        }
    }

    /// A runtime error (exit status 1).
    pub fn runtime(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: EXIT_RUNTIME,
            error: error.into(),
        }
    }
}

/// A skill error as the CLI words it: settings are named by their flag.
fn skill_failure(e: SkillError) -> Failure {
    match e {
        SkillError::InvalidSetting { field, message } => {
            Failure::usage(anyhow!("invalid --{}: {message}", field.replace('_', "-")))
        }
        e if e.is_client_error() => Failure::usage(e),
        e => Failure::runtime(e),
    }
}

/// The request, image path and streaming flag of a command.
fn request_of(cmd: &Command) -> Option<(SkillRequest, Option<&Path>, bool)> {
    Some(match cmd {
        Command::Query(a) => (
            SkillRequest::Query {
                question: a.question.clone(),
                reasoning: a.reasoning,
                spatial_refs: a.spatial_refs.clone(),
            },
            a.image.as_deref(),
            a.stream,
        ),
        Command::Caption(a) => (
            SkillRequest::Caption { length: a.length },
            Some(a.image.as_path()),
            a.stream,
        ),
        Command::Detect(a) => (
            SkillRequest::Detect {
                object: a.object.clone(),
                max_objects: a.max_objects,
            },
            Some(a.image.as_path()),
            false,
        ),
        Command::Point(a) => (
            SkillRequest::Point {
                object: a.object.clone(),
                max_objects: a.max_objects,
                spatial_refs: a.spatial_refs.clone(),
            },
            Some(a.image.as_path()),
            false,
        ),
        _ => return None,
    })
}

/// Sampling overrides from the common flags; `None` where a flag is absent, so the skill
/// defaults apply (`max_objects` travels in the request itself).
fn overrides_of(c: &CommonArgs) -> SettingsOverrides {
    SettingsOverrides {
        temperature: c.temperature,
        top_p: c.top_p,
        max_tokens: c.max_tokens,
        max_objects: None,
        seed: c.seed,
    }
}

/// Read the image bytes of `path` (`-`: stdin).
fn read_image(path: &Path) -> Result<Vec<u8>, Failure> {
    if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::runtime(anyhow!("cannot read the image from stdin: {e}")))?;
        return Ok(bytes);
    }
    std::fs::read(path)
        .map_err(|e| Failure::runtime(anyhow!("cannot read image {}: {e}", path.display())))
}

/// Decode and tile the image at `path` for the model's vision configuration.
fn load_image(path: &Path, config: &Config) -> Result<ImageInput, Failure> {
    let bytes = read_image(path)?;
    let v = &config.vision;
    let cfg = CropConfig {
        crop_size: v.crop_size,
        patch_size: v.enc_patch_size,
        overlap_margin: v.overlap_margin,
        max_crops: v.max_crops,
    };
    let (img, crops) = preprocess(&bytes, &cfg, &DecodeLimits::default())
        .map_err(|e| Failure::runtime(anyhow!("image {}: {e}", path.display())))?;
    tracing::info!(
        width = img.width,
        height = img.height,
        tiling = ?crops.tiling,
        "image decoded"
    );
    Ok(ImageInput::new(&img, crops))
}

/// Engine sizing for one request: a batch of one and a KV pool that holds two whole contexts
/// (the prefix cache keeps its own copy of the image blocks besides the sequence's), so no
/// request is refused or left waiting, and not much more memory is reserved than it can use.
fn engine_config(text: &TextConfig, kv: KvDtype) -> EngineConfig {
    let base = EngineConfig::default();
    let blocks = 2 * text.max_context.div_ceil(base.block_size.max(1)) + 2;
    let bytes = KvPool::bytes_per_block(text, base.block_size, kv).saturating_mul(blocks);
    EngineConfig {
        max_batch_size: 1,
        kv_cache_mb: bytes.div_ceil(1 << 20).max(1),
        ..base
    }
}

/// Write one line to stderr, best effort (unlike `eprintln!`, a closed stderr is no panic).
pub fn stderr_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}").and_then(|_| err.flush());
}

/// Milliseconds since `t`.
fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Run the command: print the output JSON on stdout (and streamed text / statistics on
/// stderr when asked).
pub fn run(cmd: &Command) -> Result<(), Failure> {
    let t_start = Instant::now();
    let not_skill = || Failure::usage(anyhow::anyhow!("not a skill command"));
    let common = cmd.common().ok_or_else(not_skill)?;
    let (req, image_path, stream) = request_of(cmd).ok_or_else(not_skill)?;
    let overrides = overrides_of(common);
    // Settings first: they need neither the model nor the image.
    let settings = resolve_settings(&req, &overrides).map_err(skill_failure)?;
    tracing::debug!(?settings, "settings");
    if matches!(req, SkillRequest::Detect { .. }) && common.max_tokens.is_some() {
        tracing::warn!("--max-tokens is ignored by detect; its budget follows --max-objects");
    }

    // Model files, config and tokenizer; then validate the whole request before the weights.
    let t_load = Instant::now();
    let files = resolve_model(&common.model).map_err(Failure::runtime)?;
    let model_dir = files.dir.display().to_string();
    let in_model = |e: crescent_model::ModelError| {
        Failure::runtime(anyhow::Error::new(e).context(format!("model {model_dir}")))
    };
    let config = Config::from_file(&files.config).map_err(in_model)?;
    let tokenizer = Arc::new(load_tokenizer(&files.tokenizer).map_err(in_model)?);
    let conventions = if common.hf_conventions {
        Conventions::hf()
    } else {
        Conventions::default()
    };
    SkillContext::new(&config, Arc::clone(&tokenizer), &conventions)
        .start(&req, &overrides, image_path.is_some())
        .map_err(skill_failure)?;
    let mut load_ms = ms(t_load);

    // The image, before the (possibly large) weights.
    let t_image = Instant::now();
    let image = image_path.map(|p| load_image(p, &config)).transpose()?;
    let tiling = image.as_ref().map(|i| i.crops.tiling);
    let image_ms = ms(t_image);

    // Weights.
    let t_weights = Instant::now();
    let opts = LoadOptions {
        weights: common.weights.into(),
        quantize: common.quantize.into(),
        kv_dtype: common.kv_dtype.option(),
        conventions,
        ..LoadOptions::default()
    };
    let ck = Checkpoint::open(&files.dir).map_err(in_model)?;
    let model = Moondream::from_checkpoint(config, &ck, &opts).map_err(in_model)?;
    drop(ck);
    load_ms += ms(t_weights);
    tracing::info!(dir = %model_dir, load_ms, "model loaded");
    let engine_cfg = engine_config(&model.config.text, model.kv_dtype());
    let engine = Engine::with_config(Arc::new(model), tokenizer, engine_cfg);

    // Vision, prefill and decoding.
    let job = Job {
        request: req.clone(),
        overrides,
        image,
        trace: false,
    };
    let mut streamed = false;
    let generation = engine
        .run(job, |delta| {
            if stream && !delta.is_empty() {
                let mut err = std::io::stderr().lock();
                // Streaming is best effort: a closed stderr must not fail the request.
                let _ = err.write_all(delta.as_bytes()).and_then(|_| err.flush());
                streamed = true;
            }
        })
        .map_err(engine_failure)?;
    if streamed {
        stderr_line("");
    }

    // The API object (`Generation.output.to_json()`), serialised from the struct so that the
    // fields keep their API order (x_min, y_min, x_max, y_max).
    let line = serde_json::to_string(&generation.output)
        .map_err(|e| Failure::runtime(anyhow!("cannot serialise the output: {e}")))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|_| out.flush())
        .map_err(|e| Failure::runtime(anyhow!("cannot write to stdout: {e}")))?;

    if common.stats {
        let stats = Stats {
            req: &req,
            generation: &generation,
            tiling,
            load_ms,
            image_ms,
            total_ms: ms(t_start),
        };
        stderr_line(&stats.to_json().to_string());
    }
    Ok(())
}

/// An engine error: client errors (bad request) are usage errors, the rest runtime errors.
fn engine_failure(e: EngineError) -> Failure {
    match e {
        EngineError::Skill(s) => skill_failure(s),
        e if e.is_client_error() => Failure::usage(e),
        e => Failure::runtime(e),
    }
}

/// What `--stats` prints.
struct Stats<'a> {
    req: &'a SkillRequest,
    generation: &'a Generation,
    tiling: Option<(usize, usize)>,
    load_ms: f64,
    image_ms: f64,
    total_ms: f64,
}

impl Stats<'_> {
    /// One JSON object: counts and timings (milliseconds).
    fn to_json(&self) -> serde_json::Value {
        let g = self.generation;
        // Tokens after the first one over the decode time (the first comes out of prefill,
        // which includes the vision encoder).
        let decode_tps = if g.timings.decode_ms > 0.0 && g.output_tokens > 1 {
            (g.output_tokens - 1) as f64 / (g.timings.decode_ms / 1e3)
        } else {
            0.0
        };
        serde_json::json!({
            "skill": self.req.skill_name(),
            "finish_reason": g.finish.as_str(),
            "input_tokens": g.input_tokens,
            "output_tokens": g.output_tokens,
            "cached_tokens": g.cached_tokens,
            "tiling": self.tiling.map(|t| [t.0, t.1]),
            "load_ms": round3(self.load_ms),
            "image_decode_ms": round3(self.image_ms),
            "prefill_ms": round3(g.timings.prefill_ms),
            "decode_ms": round3(g.timings.decode_ms),
            "decode_tokens_per_s": round3(decode_tps),
            "total_ms": round3(self.total_ms),
        })
    }
}

/// `x` rounded to 3 decimals (microseconds for milliseconds).
fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}
