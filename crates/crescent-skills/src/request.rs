//! What the user asked: skill requests, caption lengths and spatial references.

use std::fmt;
use std::str::FromStr;

use crescent_model::Token;

use crate::error::SkillError;

/// A skill request: what the user asked. Field contents are checked by [`crate::start`]
/// (empty question/object, refs without an image, ...).
#[derive(Clone, Debug, PartialEq)]
pub enum SkillRequest {
    /// Visual (or text-only) question answering, spec §8.2.
    Query {
        /// The question; surrounding whitespace is stripped before encoding.
        question: String,
        /// Grounded reasoning before the answer (Kestrel default: on).
        reasoning: bool,
        /// Points/boxes referred to by the question (need an image).
        spatial_refs: Vec<SpatialRef>,
    },
    /// Image captioning, spec §8.3.
    Caption {
        /// Caption length template.
        length: CaptionLength,
    },
    /// Object detection (bounding boxes), spec §8.4.
    Detect {
        /// What to detect; surrounding whitespace is stripped.
        object: String,
        /// Most boxes to return (default 50); sets the token budget `3·N + 1`.
        max_objects: Option<usize>,
    },
    /// Object pointing (centre points), spec §8.5.
    Point {
        /// What to point at; surrounding whitespace is stripped.
        object: String,
        /// Most points to return; when given the token budget is `2·N + 1`.
        max_objects: Option<usize>,
        /// Points/boxes referred to by the prompt (Kestrel extension).
        spatial_refs: Vec<SpatialRef>,
    },
}

impl SkillRequest {
    /// The skill's API name: `"query"`, `"caption"`, `"detect"` or `"point"`.
    pub fn skill_name(&self) -> &'static str {
        match self {
            SkillRequest::Query { .. } => "query",
            SkillRequest::Caption { .. } => "caption",
            SkillRequest::Detect { .. } => "detect",
            SkillRequest::Point { .. } => "point",
        }
    }

    /// Whether the skill can stream text deltas (query answers and captions).
    pub fn streams_text(&self) -> bool {
        matches!(
            self,
            SkillRequest::Query { .. } | SkillRequest::Caption { .. }
        )
    }
}

/// Caption length (selects one of the three caption templates).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CaptionLength {
    /// `short`.
    Short,
    /// `normal` (the default).
    #[default]
    Normal,
    /// `long`.
    Long,
}

impl CaptionLength {
    /// The API spelling: `"short"`, `"normal"` or `"long"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CaptionLength::Short => "short",
            CaptionLength::Normal => "normal",
            CaptionLength::Long => "long",
        }
    }
}

impl fmt::Display for CaptionLength {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CaptionLength {
    type Err = SkillError;

    /// Parse a length after trimming and lower-casing (Kestrel); anything other than
    /// short/normal/long is an error.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_lowercase().as_str() {
            "short" => Ok(CaptionLength::Short),
            "normal" => Ok(CaptionLength::Normal),
            "long" => Ok(CaptionLength::Long),
            _ => Err(SkillError::InvalidRequest(format!(
                "unknown caption length {s:?}; expected \"short\", \"normal\" or \"long\""
            ))),
        }
    }
}

/// A spatial reference in a prompt (spec §7.4): a point or a box, normalised to [0, 1].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SpatialRef {
    /// A point `(x, y)`.
    Point {
        /// Horizontal position (0 = left edge).
        x: f32,
        /// Vertical position (0 = top edge).
        y: f32,
    },
    /// A box given by its corners.
    Box {
        /// Left edge.
        x_min: f32,
        /// Top edge.
        y_min: f32,
        /// Right edge.
        x_max: f32,
        /// Bottom edge.
        y_max: f32,
    },
}

impl SpatialRef {
    /// Validate a reference given as 2 values `[x, y]` or 4 values
    /// `[x_min, y_min, x_max, y_max]`: every value finite and in [0, 1], boxes with
    /// `min <= max` on both axes.
    pub fn from_values(values: &[f64]) -> Result<Self, SkillError> {
        let bad = |msg: String| {
            SkillError::InvalidRequest(format!("spatial reference {values:?}: {msg}"))
        };
        if values.len() != 2 && values.len() != 4 {
            return Err(bad(format!(
                "expected 2 values [x, y] or 4 values [x_min, y_min, x_max, y_max], got {}",
                values.len()
            )));
        }
        for (i, v) in values.iter().enumerate() {
            if !v.is_finite() {
                return Err(bad(format!("value {i} is not finite")));
            }
            if !(0.0..=1.0).contains(v) {
                return Err(bad(format!("value {i} ({v}) is outside [0, 1]")));
            }
        }
        if let [x, y] = values {
            return Ok(SpatialRef::Point {
                x: *x as f32,
                y: *y as f32,
            });
        }
        let (x_min, y_min, x_max, y_max) = (values[0], values[1], values[2], values[3]);
        if x_min > x_max {
            return Err(bad(format!(
                "x_min ({x_min}) is greater than x_max ({x_max})"
            )));
        }
        if y_min > y_max {
            return Err(bad(format!(
                "y_min ({y_min}) is greater than y_max ({y_max})"
            )));
        }
        Ok(SpatialRef::Box {
            x_min: x_min as f32,
            y_min: y_min as f32,
            x_max: x_max as f32,
            y_max: y_max as f32,
        })
    }

    /// The placeholder tokens this reference expands to (spec §7.4): a point gives
    /// `coord(x), coord(y)`; a box gives `coord(cx), coord(cy), size(w, h)`.
    pub fn tokens(&self) -> Vec<Token> {
        match *self {
            SpatialRef::Point { x, y } => vec![Token::Coord(x), Token::Coord(y)],
            SpatialRef::Box {
                x_min,
                y_min,
                x_max,
                y_max,
            } => {
                let (x0, y0, x1, y1) = (
                    f64::from(x_min),
                    f64::from(y_min),
                    f64::from(x_max),
                    f64::from(y_max),
                );
                vec![
                    Token::Coord(((x0 + x1) / 2.0) as f32),
                    Token::Coord(((y0 + y1) / 2.0) as f32),
                    Token::Size((x1 - x0) as f32, (y1 - y0) as f32),
                ]
            }
        }
    }
}
