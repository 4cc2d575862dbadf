//! Integration tests of the skills crate, driven by scripted typed-token streams and the
//! md3-tiny fixture's tokenizer, config and expected outputs.

mod common;
mod json;
mod prompts;
mod settings;
mod spatial;
mod text;
