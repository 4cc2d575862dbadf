//! Prompt building for every skill (spec §7.4, §8.2–§8.5).

use crescent_model::config::TokenizerConfig;
use crescent_model::{TextTokenizer, Token};

use crate::error::SkillError;
use crate::request::{CaptionLength, SkillRequest, SpatialRef};

/// The prompt a skill asks the engine to run: `BOS`, then the image block when `image` is set,
/// then `tokens`. The engine prepends BOS (and the image tokens) itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    /// Whether the image block follows BOS.
    pub image: bool,
    /// Typed template/user tokens after BOS (+ image); spatial references are coord/size tokens.
    pub tokens: Vec<Token>,
}

impl Prompt {
    /// Number of sequence positions the prompt fills: BOS + `n_image_tokens` (if
    /// [`Prompt::image`]) + `tokens`.
    pub fn positions(&self, n_image_tokens: usize) -> usize {
        1 + if self.image { n_image_tokens } else { 0 } + self.tokens.len()
    }

    /// The tokens as ids, coordinates and sizes replaced by their placeholder ids
    /// (`coord_id`, `size_id`), i.e. the reference's `prompt_ids`.
    pub fn placeholder_ids(&self, tk: &TokenizerConfig) -> Vec<u32> {
        self.tokens
            .iter()
            .map(|t| match t {
                Token::Text(id) => *id,
                Token::Coord(_) => tk.coord_id,
                Token::Size(..) => tk.size_id,
            })
            .collect()
    }
}

fn text(ids: &[u32]) -> impl Iterator<Item = Token> + '_ {
    ids.iter().map(|&id| Token::Text(id))
}

fn spatial(refs: &[SpatialRef]) -> impl Iterator<Item = Token> + '_ {
    refs.iter().flat_map(SpatialRef::tokens)
}

fn non_empty<'a>(what: &str, s: &'a str) -> Result<&'a str, SkillError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SkillError::InvalidRequest(format!(
            "{what} must not be empty"
        )));
    }
    Ok(t)
}

fn need_image(skill: &str, has_image: bool) -> Result<(), SkillError> {
    if has_image {
        Ok(())
    } else {
        Err(SkillError::InvalidRequest(format!(
            "{skill} requires an image"
        )))
    }
}

/// Build the prompt of `req` (spec §8):
///
/// - query: `query.prefix + SPATIAL + enc(question.trim()) + opener` (opener = the answer
///   prefix, or `reasoning_prefix` when reasoning); the image is optional, spatial refs need it;
/// - caption: `caption[length]` (needs an image);
/// - detect: `detect.prefix + enc(" " + object.trim()) + detect.suffix` (needs an image);
/// - point: `point.prefix + SPATIAL + enc(" " + object.trim()) + point.suffix` (needs an image).
///
/// `answer_prefix` is [`crescent_model::Config::query_answer_prefix`]. Empty questions/objects
/// are errors.
pub fn build_prompt(
    req: &SkillRequest,
    has_image: bool,
    tk: &TokenizerConfig,
    answer_prefix: &[u32],
    tok: &TextTokenizer,
) -> Result<Prompt, SkillError> {
    let tp = &tk.templates;
    let mut tokens = Vec::new();
    match req {
        SkillRequest::Query {
            question,
            reasoning,
            spatial_refs,
        } => {
            let q = non_empty("question", question)?;
            if !spatial_refs.is_empty() && !has_image {
                return Err(SkillError::InvalidRequest(
                    "spatial references require an image".into(),
                ));
            }
            let opener: &[u32] = if *reasoning {
                &tp.query.reasoning_prefix
            } else {
                answer_prefix
            };
            tokens.extend(text(&tp.query.prefix));
            tokens.extend(spatial(spatial_refs));
            tokens.extend(text(&tok.encode(q)?));
            tokens.extend(text(opener));
            Ok(Prompt {
                image: has_image,
                tokens,
            })
        }
        SkillRequest::Caption { length } => {
            need_image("caption", has_image)?;
            let ids = match length {
                CaptionLength::Short => &tp.caption.short,
                CaptionLength::Normal => &tp.caption.normal,
                CaptionLength::Long => &tp.caption.long,
            };
            tokens.extend(text(ids));
            Ok(Prompt {
                image: true,
                tokens,
            })
        }
        SkillRequest::Detect { object, .. } => {
            need_image("detect", has_image)?;
            let o = non_empty("object", object)?;
            tokens.extend(text(&tp.detect.prefix));
            tokens.extend(text(&tok.encode(&format!(" {o}"))?));
            tokens.extend(text(&tp.detect.suffix));
            Ok(Prompt {
                image: true,
                tokens,
            })
        }
        SkillRequest::Point {
            object,
            spatial_refs,
            ..
        } => {
            need_image("point", has_image)?;
            let o = non_empty("object", object)?;
            tokens.extend(text(&tp.point.prefix));
            tokens.extend(spatial(spatial_refs));
            tokens.extend(text(&tok.encode(&format!(" {o}"))?));
            tokens.extend(text(&tp.point.suffix));
            Ok(Prompt {
                image: true,
                tokens,
            })
        }
    }
}
