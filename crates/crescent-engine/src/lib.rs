//! The engine: runs skills on the model. It owns image encoding (vision + the BOS/image
//! prefill), the decode loop, constraints and sampling; it knows nothing of what a skill means —
//! it only drives [`crescent_skills::SkillState`] with typed tokens.

pub mod generate;
pub mod sampler;

pub use generate::{EncodedImage, Engine, EngineError, Generation, GenerationTrace, Timings};
