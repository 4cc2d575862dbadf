//! Text skills: query (with optional grounded reasoning) and caption (spec §8.2, §8.3).

use std::collections::VecDeque;
use std::sync::Arc;

use crescent_model::config::TokenizerConfig;
use crescent_model::{TextTokenizer, Token};

use crate::error::SkillError;
use crate::output::{CaptionOutput, GroundingSpan, QueryOutput, Reasoning, SkillOutput};
use crate::state::{Constraint, FinishReason, SkillState};
use crate::stream::TextStream;

/// One reasoning chunk: its text token ids and its grounding points.
#[derive(Clone, Debug, Default, PartialEq)]
struct Chunk {
    text: Vec<u32>,
    points: Vec<[f32; 2]>,
}

/// The grounded-reasoning parser of spec §8.2 (Kestrel; equivalent to the reference).
#[derive(Clone, Debug, Default)]
struct ReasoningParser {
    chunks: Vec<Chunk>,
    cur: Chunk,
    pending: Option<f32>,
}

impl ReasoningParser {
    fn text(&mut self, id: u32) {
        self.cur.text.push(id);
    }

    fn coord(&mut self, v: f32) {
        match self.pending.take() {
            None => self.pending = Some(v),
            Some(x) => self.cur.points.push([x, v]),
        }
    }

    /// Close the current chunk (at ground markers, the answer id and the end); a dangling
    /// x coordinate is dropped.
    fn flush(&mut self) {
        if !self.cur.text.is_empty() || !self.cur.points.is_empty() {
            self.chunks.push(std::mem::take(&mut self.cur));
        }
        self.pending = None;
    }

    /// Decode the text and the grounding spans (indices in code points, per-chunk decodes).
    fn output(&self, tok: &TextTokenizer) -> Result<Reasoning, SkillError> {
        let all: Vec<u32> = self
            .chunks
            .iter()
            .flat_map(|c| c.text.iter().copied())
            .collect();
        let text = if all.is_empty() {
            String::new()
        } else {
            tok.decode(&all)?
        };
        let mut grounding = Vec::new();
        let mut cursor = 0usize;
        for chunk in &self.chunks {
            let n = if chunk.text.is_empty() {
                0
            } else {
                tok.decode(&chunk.text)?.chars().count()
            };
            if !chunk.points.is_empty() {
                grounding.push(GroundingSpan {
                    start_idx: cursor,
                    end_idx: cursor + n,
                    points: chunk
                        .points
                        .iter()
                        .map(|&[x, y]| [f64::from(x), f64::from(y)])
                        .collect(),
                });
            }
            cursor += n;
        }
        Ok(Reasoning { text, grounding })
    }
}

/// Which text skill a [`TextState`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TextKind {
    /// Query; `reasoning` adds the reasoning phase and the `reasoning` output key.
    Query { reasoning: bool },
    /// Caption.
    Caption,
}

/// State of a query or caption request.
pub(crate) struct TextState {
    tok: Arc<TextTokenizer>,
    kind: TextKind,
    answer_id: u32,
    ground_ids: [u32; 2],
    post_reasoning_prefix: Vec<u32>,
    in_reasoning: bool,
    /// Text ids the state forces next (`post_reasoning_prefix`); not part of the answer.
    forced: VecDeque<u32>,
    reasoning: ReasoningParser,
    answer: Vec<u32>,
    stream: TextStream,
    dirty: bool,
    finished: bool,
    flushed: bool,
}

impl TextState {
    /// A fresh state. For a reasoning query the model reasons until it emits `answer_id`;
    /// a non-empty `post_reasoning_prefix` (not used by Moondream 3) is then forced through
    /// single-id [`Constraint::Allow`]s, costs budget like any token and is not part of the answer.
    pub(crate) fn new(kind: TextKind, tk: &TokenizerConfig, tok: Arc<TextTokenizer>) -> Self {
        Self {
            tok,
            kind,
            answer_id: tk.answer_id,
            ground_ids: [tk.start_ground_points_id, tk.end_ground_id],
            post_reasoning_prefix: tk.templates.query.post_reasoning_prefix.clone(),
            in_reasoning: matches!(kind, TextKind::Query { reasoning: true }),
            forced: VecDeque::new(),
            reasoning: ReasoningParser::default(),
            answer: Vec::new(),
            stream: TextStream::new(),
            dirty: false,
            finished: false,
            flushed: false,
        }
    }
}

impl SkillState for TextState {
    fn constraint(&self) -> Constraint {
        match self.forced.front() {
            Some(&id) => Constraint::Allow(vec![id]),
            None => Constraint::Any,
        }
    }

    fn consume(&mut self, token: &Token) -> Result<(), SkillError> {
        if let Some(&want) = self.forced.front() {
            return if token.text_id() == Some(want) {
                self.forced.pop_front();
                Ok(())
            } else {
                Err(SkillError::UnexpectedToken(format!(
                    "expected forced text id {want}, got {token:?}"
                )))
            };
        }
        if self.in_reasoning {
            match *token {
                Token::Text(id) if id == self.answer_id => {
                    self.reasoning.flush();
                    self.in_reasoning = false;
                    self.forced = self.post_reasoning_prefix.iter().copied().collect();
                }
                Token::Text(id) if self.ground_ids.contains(&id) => self.reasoning.flush(),
                Token::Text(id) => self.reasoning.text(id),
                Token::Coord(v) => self.reasoning.coord(v),
                Token::Size(..) => {}
            }
        } else if let Token::Text(id) = *token {
            // Coordinates and sizes are not text; special ids are kept (decode skips them).
            self.answer.push(id);
            self.dirty = true;
        }
        Ok(())
    }

    fn take_delta(&mut self) -> Option<String> {
        let flush_now = self.finished && !self.flushed;
        if !(self.dirty || flush_now) {
            return None;
        }
        self.dirty = false;
        if self.finished {
            self.flushed = true;
        }
        if self.answer.is_empty() {
            return None;
        }
        let full = self.tok.decode(&self.answer).ok()?;
        self.stream.delta(&full, self.finished)
    }

    fn finish(&mut self, _reason: FinishReason) -> Result<SkillOutput, SkillError> {
        self.finished = true;
        self.reasoning.flush();
        let text = if self.answer.is_empty() {
            String::new()
        } else {
            self.tok.decode(&self.answer)?
        };
        Ok(match self.kind {
            TextKind::Caption => SkillOutput::Caption(CaptionOutput { caption: text }),
            TextKind::Query { reasoning } => SkillOutput::Query(QueryOutput {
                answer: text,
                reasoning: if reasoning {
                    Some(self.reasoning.output(&self.tok)?)
                } else {
                    None
                },
            }),
        })
    }
}
