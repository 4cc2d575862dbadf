//! Result and error types of a request, and [`Engine`]: the synchronous front of the scheduler
//! (CLI, tests). The server uses [`crate::EngineHandle`], which runs the same scheduler on its
//! own thread.

use std::sync::{Arc, Mutex};

use crescent_image::{CropConfig, DecodeLimits, ImageError};
use crescent_model::{ModelError, Moondream, TextTokenizer, Token};
use crescent_skills::{FinishReason, SkillContext, SkillError, SkillOutput};

use crate::metrics::Metrics;
use crate::scheduler::{EngineConfig, Event, ImageInput, Scheduler, Submission};

/// Errors of a generation request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid (the client's fault).
    #[error("{0}")]
    Skill(#[from] SkillError),
    /// The model rejected or failed the request.
    #[error("{0}")]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error("tensor op: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The image could not be decoded.
    #[error("image: {0}")]
    Image(#[from] ImageError),
    /// Too many jobs are waiting.
    #[error("the queue is full; retry later")]
    QueueFull,
    /// The request can never fit this engine (KV cache too small for it).
    #[error("{0}")]
    TooLarge(String),
    /// The engine is shutting down or gone.
    #[error("the engine is not running")]
    Unavailable,
    /// An internal failure confined to this request.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Whether the error is the client's fault (a 4xx in HTTP terms).
    pub fn is_client_error(&self) -> bool {
        match self {
            EngineError::Skill(e) => e.is_client_error(),
            EngineError::Model(ModelError::Input(_))
            | EngineError::Image(_)
            | EngineError::TooLarge(_) => true,
            _ => false,
        }
    }
}

/// Wall-clock timings of one request in milliseconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Submission → admission into the batch.
    pub queue_ms: f64,
    /// Admission → first token (vision, image and prompt prefill).
    pub prefill_ms: f64,
    /// First token → finish.
    pub decode_ms: f64,
    /// Submission → finish.
    pub total_ms: f64,
}

/// Optional per-step record for tests and debugging.
#[derive(Clone, Debug, Default)]
pub struct GenerationTrace {
    /// Logits at the last prompt position (before constraints).
    pub first_logits: Vec<f32>,
    /// Maximum masked logit at every sampled step that had a choice.
    pub step_top1: Vec<f32>,
    /// Chosen bins of every coordinate (`[bin]`) and size (`[width bin, height bin]`) token.
    pub bins: Vec<Vec<usize>>,
}

/// The result of one request.
#[derive(Debug)]
pub struct Generation {
    /// API-shaped output.
    pub output: SkillOutput,
    /// Why generation ended.
    pub finish: FinishReason,
    /// Generated ids (coord/size tokens as their ids), without the final eos.
    pub ids: Vec<u32>,
    /// Generated typed tokens, without the final eos.
    pub tokens: Vec<Token>,
    /// Prompt positions (BOS + image + template).
    pub input_tokens: usize,
    /// Sampled tokens including a final eos.
    pub output_tokens: usize,
    /// Prompt positions reused from the prefix cache.
    pub cached_tokens: usize,
    /// Timings.
    pub timings: Timings,
    /// Per-step record when requested.
    pub trace: Option<GenerationTrace>,
}

/// The crop geometry of a model.
pub fn crop_config(model: &Moondream) -> CropConfig {
    let v = &model.config.vision;
    CropConfig {
        crop_size: v.crop_size,
        patch_size: v.enc_patch_size,
        overlap_margin: v.overlap_margin,
        max_crops: v.max_crops,
    }
}

/// Decode and preprocess image bytes for `model`.
pub fn prepare_image(
    model: &Moondream,
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<ImageInput, ImageError> {
    let (rgb, crops) = crescent_image::preprocess(bytes, &crop_config(model), limits)?;
    Ok(ImageInput::new(&rgb, crops))
}

/// Synchronous engine: submit a job and drive the scheduler until it completes.
pub struct Engine {
    model: Arc<Moondream>,
    skills: SkillContext,
    sched: Mutex<Scheduler>,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// An engine over `model` with default sizing.
    pub fn new(model: Arc<Moondream>, tokenizer: Arc<TextTokenizer>) -> Self {
        Self::with_config(model, tokenizer, EngineConfig::default())
    }

    /// An engine with explicit sizing.
    pub fn with_config(
        model: Arc<Moondream>,
        tokenizer: Arc<TextTokenizer>,
        cfg: EngineConfig,
    ) -> Self {
        let skills = SkillContext::new(&model.config, tokenizer, &model.conventions);
        let metrics = Arc::new(Metrics::default());
        let sched = Scheduler::new(
            Arc::clone(&model),
            skills.clone(),
            cfg,
            Arc::clone(&metrics),
        );
        Self {
            model,
            skills,
            sched: Mutex::new(sched),
            metrics,
        }
    }

    /// The model.
    pub fn model(&self) -> &Arc<Moondream> {
        &self.model
    }

    /// The skill context (tokenizer, templates).
    pub fn skills(&self) -> &SkillContext {
        &self.skills
    }

    /// Metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Decode and preprocess image bytes with default limits.
    pub fn prepare_image(&self, bytes: &[u8]) -> Result<ImageInput, ImageError> {
        prepare_image(&self.model, bytes, &DecodeLimits::default())
    }

    /// Run one job (a [`crate::Job`] or a [`crate::CustomJob`]) to completion; `on_delta`
    /// receives streamed text.
    pub fn run(
        &self,
        job: impl Into<Submission>,
        mut on_delta: impl FnMut(&str),
    ) -> Result<Generation, EngineError> {
        let mut sched = self.sched.lock().map_err(|_| EngineError::Unavailable)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        sched.submit(job, tx)?;
        loop {
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    Event::Delta(d) => on_delta(&d),
                    Event::Done(r) => return *r,
                }
            }
            if !sched.step() {
                // Nothing left to run, yet no result: the job was dropped.
                while let Ok(ev) = rx.try_recv() {
                    if let Event::Done(r) = ev {
                        return *r;
                    }
                }
                return Err(EngineError::Internal(
                    "job vanished from the scheduler".into(),
                ));
            }
        }
    }

    /// Run several jobs in one continuously batched loop; results in submission order.
    pub fn run_many<J: Into<Submission>>(
        &self,
        jobs: Vec<J>,
    ) -> Vec<Result<Generation, EngineError>> {
        let Ok(mut sched) = self.sched.lock() else {
            return jobs.iter().map(|_| Err(EngineError::Unavailable)).collect();
        };
        let mut rxs = Vec::with_capacity(jobs.len());
        let mut results: Vec<Option<Result<Generation, EngineError>>> =
            Vec::with_capacity(jobs.len());
        for job in jobs {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            match sched.submit(job, tx) {
                Ok(_) => results.push(None),
                Err(e) => results.push(Some(Err(e))),
            }
            rxs.push(rx);
        }
        loop {
            for (rx, slot) in rxs.iter_mut().zip(results.iter_mut()) {
                while let Ok(ev) = rx.try_recv() {
                    if let Event::Done(r) = ev {
                        *slot = Some(*r);
                    }
                }
            }
            if results.iter().all(Option::is_some) || !sched.step() {
                break;
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(EngineError::Internal(
                        "job vanished from the scheduler".into(),
                    ))
                })
            })
            .collect()
    }

    /// KV blocks in use (prefix cache included).
    pub fn kv_blocks_used(&self) -> usize {
        self.sched.lock().map(|s| s.kv_blocks_used()).unwrap_or(0)
    }

    /// Empty the prefix cache.
    pub fn clear_prefix_cache(&self) {
        if let Ok(mut s) = self.sched.lock() {
            s.clear_prefix_cache();
        }
    }
}
