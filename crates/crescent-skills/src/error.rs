//! Errors of the skills crate.

use crescent_model::ModelError;

/// Everything that can go wrong while building a skill request or consuming its tokens.
#[derive(Debug, thiserror::Error)]
pub enum SkillError {
    /// The request itself is malformed (empty question, bad spatial reference, missing image,
    /// unknown caption length, ...). A client error.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A sampling setting is out of range. A client error; `field` names the setting.
    #[error("invalid setting `{field}`: {message}")]
    InvalidSetting {
        /// The offending setting (`temperature`, `top_p`, `max_tokens`, `max_objects`).
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer failed while encoding the prompt or decoding the output.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The engine fed a token the skill's constraint did not allow (an engine bug, not a
    /// client error).
    #[error("unexpected token for skill state: {0}")]
    UnexpectedToken(String),
}

impl SkillError {
    /// Whether the error is the client's fault (a bad request or setting), as opposed to an
    /// internal failure.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            SkillError::InvalidRequest(_) | SkillError::InvalidSetting { .. }
        )
    }
}
