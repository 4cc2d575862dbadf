//! Errors of the model crate.

/// Everything that can go wrong while loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` is unreadable or inconsistent.
    #[error("{0}")]
    Config(String),
    /// A checkpoint file is missing, unreadable or malformed.
    #[error("{0}")]
    Checkpoint(String),
    /// A tensor the model needs is absent from the checkpoint.
    #[error("missing tensor `{name}` in the checkpoint (expected shape {expected:?})")]
    MissingTensor {
        /// Tensor name.
        name: String,
        /// Shape the model expects.
        expected: Vec<usize>,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Shape the model expects.
        expected: Vec<usize>,
        /// Shape found in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype the loader does not accept.
    #[error("tensor `{name}` has dtype {found}, expected one of bf16, f16, f32")]
    BadDtype {
        /// Tensor name.
        name: String,
        /// Dtype found in the file.
        found: String,
    },
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request does not fit the model (too long, bad token id, ...).
    #[error("{0}")]
    Input(String),
    /// Downloading from the Hugging Face Hub failed.
    #[error("download: {0}")]
    Download(String),
    /// A tensor operation failed.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;
