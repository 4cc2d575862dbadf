//! Moondream 3 skills: per-request state machines between the text decoder and the engine.
//!
//! A skill turns a [`SkillRequest`] into a [`Prompt`] of typed tokens, tells the engine which
//! token ids it may sample next ([`Constraint`]), consumes the typed tokens the engine generates
//! ([`SkillState::consume`]), streams text deltas and produces the API-shaped [`SkillOutput`].
//! Nothing here touches tensors; the engine drives every skill through [`SkillState`].

#![warn(missing_docs)]

pub mod error;
pub mod output;
pub mod prompt;
pub mod request;
pub mod settings;
pub mod state;
pub mod stream;

mod spatial;
mod text;

use std::sync::Arc;

use crescent_model::config::TokenizerConfig;
use crescent_model::{Config, Conventions, TextTokenizer};

pub use error::SkillError;
pub use output::{
    BoundingBox, CaptionOutput, DetectOutput, GroundingSpan, Point, PointOutput, QueryOutput,
    Reasoning, SkillOutput,
};
pub use prompt::{build_prompt, Prompt};
pub use request::{CaptionLength, SkillRequest, SpatialRef};
pub use settings::{resolve_settings, GenerationSettings, SettingsOverrides};
pub use state::{Constraint, FinishReason, SkillState};
pub use stream::TextStream;

use spatial::{DetectState, PointState};
use text::{TextKind, TextState};

/// What [`start`] returns: the prompt to prefill, the state to drive, the resolved settings.
pub type StartedSkill = (Prompt, Box<dyn SkillState>, GenerationSettings);

/// Everything the skills need from the model, prepared once per loaded model.
#[derive(Clone, Debug)]
pub struct SkillContext {
    tokens: TokenizerConfig,
    answer_prefix: Vec<u32>,
    tokenizer: Arc<TextTokenizer>,
    clamp_boxes: bool,
}

impl SkillContext {
    /// Take the token ids/templates from `cfg`, the box clamping rule from `conventions`.
    pub fn new(cfg: &Config, tokenizer: Arc<TextTokenizer>, conventions: &Conventions) -> Self {
        Self {
            tokens: cfg.tokenizer.clone(),
            answer_prefix: cfg.query_answer_prefix().to_vec(),
            tokenizer,
            clamp_boxes: conventions.clamp_boxes,
        }
    }

    /// The text tokenizer.
    pub fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }

    /// Special token ids and templates.
    pub fn token_config(&self) -> &TokenizerConfig {
        &self.tokens
    }

    /// Validate `req` and `overrides` and build the prompt, the state and the settings.
    /// `has_image` says whether the request carries an image (caption, detect and point need
    /// one; query works without, unless it has spatial references).
    pub fn start(
        &self,
        req: &SkillRequest,
        overrides: &SettingsOverrides,
        has_image: bool,
    ) -> Result<StartedSkill, SkillError> {
        let prompt = build_prompt(
            req,
            has_image,
            &self.tokens,
            &self.answer_prefix,
            &self.tokenizer,
        )?;
        let settings = resolve_settings(req, overrides)?;
        let state: Box<dyn SkillState> = match req {
            SkillRequest::Query { reasoning, .. } => Box::new(TextState::new(
                TextKind::Query {
                    reasoning: *reasoning,
                },
                &self.tokens,
                Arc::clone(&self.tokenizer),
            )),
            SkillRequest::Caption { .. } => Box::new(TextState::new(
                TextKind::Caption,
                &self.tokens,
                Arc::clone(&self.tokenizer),
            )),
            SkillRequest::Detect { .. } => {
                Box::new(DetectState::new(&self.tokens, self.clamp_boxes))
            }
            SkillRequest::Point { .. } => Box::new(PointState::new(&self.tokens)),
        };
        Ok((prompt, state, settings))
    }
}

/// One-shot form of [`SkillContext::start`]: build the prompt, state and settings of `req`.
pub fn start(
    req: &SkillRequest,
    overrides: &SettingsOverrides,
    has_image: bool,
    cfg: &Config,
    tok: &Arc<TextTokenizer>,
    conventions: &Conventions,
) -> Result<StartedSkill, SkillError> {
    SkillContext::new(cfg, Arc::clone(tok), conventions).start(req, overrides, has_image)
}
