//! Moondream 3 model core: configuration, checkpoint loading, vision encoder, text decoder,
//! region module and tokenizer. Knows nothing of skills, batching or HTTP.
//!
//! Data flow: normalised crops → [`vision::VisionEncoder`] → image embeddings →
//! [`text::TextDecoder`] (with [`region::Region`] for coordinate/size tokens) → logits and
//! hidden states for the skills and the engine.

pub mod config;
pub mod error;
pub mod hub;
pub mod kv;
pub mod layers;
pub mod model;
pub mod region;
pub mod synth;
pub mod text;
pub mod tokenizer;
pub mod tokens;
pub mod vision;
pub mod weights;

pub use config::{Config, Conventions};
pub use error::{ModelError, Result};
pub use kv::{KvDtype, KvPool, SeqKv};
pub use layers::{Quantize, WeightStorage};
pub use model::{load_tokenizer, LoadOptions, Moondream};
pub use text::{KvCache, SeqInput};
pub use tokenizer::TextTokenizer;
pub use tokens::Token;
