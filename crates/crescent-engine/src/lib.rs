//! The engine: runs skills on the model with continuous batching. It owns image encoding
//! (vision + the BOS/image prefill, shared through the prefix cache), the paged KV cache, the
//! batched decode loop, constraints and sampling; it knows nothing of what a skill means — it
//! only drives [`crescent_skills::SkillState`] with typed tokens.

pub mod generate;
pub mod handle;
pub mod metrics;
pub mod prefix;
pub mod sampler;
pub mod scheduler;

pub use generate::{
    crop_config, prepare_image, Engine, EngineError, Generation, GenerationTrace, Timings,
};
pub use handle::{EngineHandle, EngineStats, JobStream};
pub use metrics::Metrics;
pub use scheduler::{CustomJob, EngineConfig, Event, ImageInput, Job, Scheduler, Submission};
