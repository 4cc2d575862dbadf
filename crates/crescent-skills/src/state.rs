//! The interface between the engine and a running skill.

use crescent_model::Token;
use serde::{Deserialize, Serialize};

use crate::error::SkillError;
use crate::output::SkillOutput;

/// What the engine may sample as the next token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Constraint {
    /// Any vocabulary id.
    Any,
    /// Only these ids (every other logit is masked to −∞ before temperature / top-p). A
    /// single id forces that token.
    Allow(Vec<u32>),
}

impl Constraint {
    /// Whether `id` may be sampled.
    pub fn allows(&self, id: u32) -> bool {
        match self {
            Constraint::Any => true,
            Constraint::Allow(ids) => ids.contains(&id),
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model emitted eos.
    Stop,
    /// The token budget or the context ran out.
    Length,
}

impl FinishReason {
    /// The API spelling: `"stop"` or `"length"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Per-request skill state, driven by the engine's decode loop (spec §8.1):
///
/// 1. before sampling each token (the first one included) the engine asks [`constraint`];
/// 2. it samples an id; eos ends generation (the state never sees it); a coord/size id is
///    turned into [`Token::Coord`] / [`Token::Size`] by the region head;
/// 3. it hands the typed token to [`consume`] and then may call [`take_delta`] to stream text;
/// 4. on eos or when the budget/context is exhausted it calls [`finish`] once, then
///    [`take_delta`] once more to flush any held-back text (so the concatenated deltas equal the
///    final text).
///
/// [`constraint`]: SkillState::constraint
/// [`consume`]: SkillState::consume
/// [`take_delta`]: SkillState::take_delta
/// [`finish`]: SkillState::finish
pub trait SkillState: Send {
    /// Constraint for the next sampled token.
    fn constraint(&self) -> Constraint;
    /// Consume one generated typed token (never the eos).
    fn consume(&mut self, token: &Token) -> Result<(), SkillError>;
    /// Text produced since the last call, for streaming: answer text of query, caption text;
    /// nothing during reasoning and nothing for detect/point. A trailing U+FFFD (an incomplete
    /// multi-byte character) is held back until the next token or until [`finish`].
    ///
    /// [`finish`]: SkillState::finish
    fn take_delta(&mut self) -> Option<String>;
    /// Final output once generation ended; incomplete trailing objects are dropped.
    fn finish(&mut self, reason: FinishReason) -> Result<SkillOutput, SkillError>;
}
