//! Single-request generation (spec §8.1): prefill the prompt after the cached image prefix,
//! then sample typed tokens under the skill's constraints until eos, the token budget or the
//! context end.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use crescent_image::Crops;
use crescent_model::{KvCache, ModelError, Moondream, TextTokenizer, Token};
use crescent_skills::{
    Constraint, FinishReason, GenerationSettings, SettingsOverrides, SkillContext, SkillError,
    SkillOutput, SkillRequest,
};

use crate::sampler::{pick, SplitMix64};

/// Errors of a generation request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid (the client's fault).
    #[error("{0}")]
    Skill(#[from] SkillError),
    /// The model failed.
    #[error("{0}")]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error("tensor op: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl EngineError {
    /// Whether the error is the client's fault (a 4xx in HTTP terms).
    pub fn is_client_error(&self) -> bool {
        match self {
            EngineError::Skill(e) => e.is_client_error(),
            EngineError::Model(ModelError::Input(_)) => true,
            _ => false,
        }
    }
}

/// An image after the vision encoder and the `[BOS] + image` prefill; reusable for any number
/// of requests on the same image.
#[derive(Clone, Debug)]
pub struct EncodedImage {
    /// Image-token embeddings `[g², D]`.
    pub embeds: Tensor,
    /// KV cache holding BOS + the image tokens.
    pub cache: KvCache,
    /// Tiling used.
    pub tiling: (usize, usize),
    /// Milliseconds spent in the vision encoder.
    pub vision_ms: f64,
    /// Milliseconds spent prefilling BOS + image.
    pub prefill_ms: f64,
}

/// Wall-clock timings of one request.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Prompt prefill (after the image prefix) until the first logits.
    pub prefill_ms: f64,
    /// First token → finish.
    pub decode_ms: f64,
}

/// Optional per-step record for tests and debugging.
#[derive(Clone, Debug, Default)]
pub struct GenerationTrace {
    /// Logits at the last prompt position (before constraints).
    pub first_logits: Vec<f32>,
    /// Maximum masked logit at every sampled step.
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
    /// Timings.
    pub timings: Timings,
    /// Per-step record when requested.
    pub trace: Option<GenerationTrace>,
}

/// Runs requests on one loaded model.
pub struct Engine {
    model: Arc<Moondream>,
    skills: SkillContext,
}

impl Engine {
    /// An engine over `model` with its tokenizer.
    pub fn new(model: Arc<Moondream>, tokenizer: Arc<TextTokenizer>) -> Self {
        let skills = SkillContext::new(&model.config, tokenizer, &model.conventions);
        Self { model, skills }
    }

    /// The model.
    pub fn model(&self) -> &Arc<Moondream> {
        &self.model
    }

    /// The skill context (tokenizer, templates).
    pub fn skills(&self) -> &SkillContext {
        &self.skills
    }

    /// Run the vision encoder on preprocessed crops and prefill `[BOS] + image`.
    pub fn encode_image(&self, crops: &Crops) -> Result<EncodedImage, EngineError> {
        let t0 = Instant::now();
        let pixels = crops.normalized_chw();
        let embeds = self.model.encode_image(&pixels, crops.tiling, None)?;
        let vision_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let (cache, _) = self.model.prefill_image(&embeds, 0, None)?;
        let prefill_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(EncodedImage {
            embeds,
            cache,
            tiling: crops.tiling,
            vision_ms,
            prefill_ms,
        })
    }

    /// Run one skill request to completion; `on_delta` receives streamed text.
    pub fn generate(
        &self,
        image: Option<&EncodedImage>,
        req: &SkillRequest,
        overrides: &SettingsOverrides,
        trace: bool,
        mut on_delta: impl FnMut(&str),
    ) -> Result<Generation, EngineError> {
        let model = &self.model;
        let tk = &model.config.tokenizer;
        let max_context = model.config.text.max_context;
        let (prompt, mut state, settings) = self.skills.start(req, overrides, image.is_some())?;
        let GenerationSettings {
            temperature,
            top_p,
            max_new_tokens,
            seed,
        } = settings;
        let t0 = Instant::now();
        // Prefill.
        let (mut cache, hidden) = match image {
            Some(img) => {
                let need = img.cache.len() + prompt.tokens.len() + max_new_tokens + 1;
                if img.cache.len() + prompt.tokens.len() >= max_context {
                    return Err(ModelError::Input(format!(
                        "prompt of {} positions does not fit the context of {max_context}",
                        img.cache.len() + prompt.tokens.len()
                    ))
                    .into());
                }
                let mut cache = img.cache.fork(need.min(max_context) - img.cache.len())?;
                let h = model.forward_tokens(&prompt.tokens, &mut cache, None)?;
                (cache, h)
            }
            None => {
                let mut toks = vec![Token::Text(tk.bos_id)];
                toks.extend(prompt.tokens.iter().copied());
                if toks.len() >= max_context {
                    return Err(ModelError::Input(format!(
                        "prompt of {} positions does not fit the context of {max_context}",
                        toks.len()
                    ))
                    .into());
                }
                let mut cache = KvCache::new(
                    &model.config.text,
                    (toks.len() + max_new_tokens + 1).min(max_context),
                )?;
                let h = model.forward_tokens(&toks, &mut cache, None)?;
                (cache, h)
            }
        };
        let input_tokens = cache.len();
        let mut h = hidden.get(hidden.dims()[0] - 1)?;
        let mut logits = model.logits(&h)?;
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let mut tr = trace.then(|| GenerationTrace {
            first_logits: logits.clone(),
            ..Default::default()
        });
        let mut rng = SplitMix64::new(seed.unwrap_or(0));
        let mut ids = Vec::new();
        let mut tokens = Vec::new();
        let mut n_sampled = 0usize;
        let finish = loop {
            let constraint = state.constraint();
            let id = match &constraint {
                Constraint::Allow(allowed) if allowed.len() == 1 => allowed[0],
                Constraint::Allow(allowed) => {
                    let mut masked = vec![f32::NEG_INFINITY; logits.len()];
                    for &a in allowed {
                        if let Some(v) = logits.get(a as usize) {
                            masked[a as usize] = *v;
                        }
                    }
                    if let Some(t) = tr.as_mut() {
                        t.step_top1
                            .push(masked.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
                    }
                    pick(&masked, temperature, top_p, &mut rng) as u32
                }
                Constraint::Any => {
                    if let Some(t) = tr.as_mut() {
                        t.step_top1
                            .push(logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
                    }
                    pick(&logits, temperature, top_p, &mut rng) as u32
                }
            };
            n_sampled += 1;
            if id == tk.eos_id {
                break FinishReason::Stop;
            }
            let tok = if id == tk.coord_id {
                let bins = model.region.coord_logits(&h)?;
                let b = pick(&bins, temperature, top_p, &mut rng);
                if let Some(t) = tr.as_mut() {
                    t.bins.push(vec![b]);
                }
                Token::Coord(model.region.coord_value(b))
            } else if id == tk.size_id {
                let (wl, hl) = model.region.size_logits(&h)?;
                let wb = pick(&wl, temperature, top_p, &mut rng);
                let hb = pick(&hl, temperature, top_p, &mut rng);
                if let Some(t) = tr.as_mut() {
                    t.bins.push(vec![wb, hb]);
                }
                Token::Size(model.region.size_value(wb), model.region.size_value(hb))
            } else {
                Token::Text(id)
            };
            state.consume(&tok)?;
            ids.push(id);
            tokens.push(tok);
            if let Some(d) = state.take_delta() {
                on_delta(&d);
            }
            if ids.len() >= max_new_tokens || cache.len() + 1 > max_context {
                break FinishReason::Length;
            }
            let hs = model.forward_tokens(&[tok], &mut cache, None)?;
            h = hs.get(0)?;
            logits = model.logits(&h)?;
        };
        let output = state.finish(finish)?;
        if let Some(d) = state.take_delta() {
            on_delta(&d);
        }
        let decode_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(Generation {
            output,
            finish,
            ids,
            tokens,
            input_tokens,
            output_tokens: n_sampled,
            timings: Timings {
                prefill_ms,
                decode_ms,
            },
            trace: tr,
        })
    }
}
