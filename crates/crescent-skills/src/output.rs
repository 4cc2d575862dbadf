//! Skill outputs in the Moondream API shapes (spec §8).
//!
//! Values come from the engine as `f32`; they are stored as the `f64` of that `f32` (exact), so
//! JSON prints them like the reference (e.g. `0.33184814453125`).

use serde::{Deserialize, Serialize};

/// The final result of a skill; serialises to the bare API object (no tag).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SkillOutput {
    /// `{"answer": ..., "reasoning"?: {...}}`.
    Query(QueryOutput),
    /// `{"caption": ...}`.
    Caption(CaptionOutput),
    /// `{"objects": [...]}`.
    Detect(DetectOutput),
    /// `{"points": [...]}`.
    Point(PointOutput),
}

impl SkillOutput {
    /// The output as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        // Serialising these plain structs cannot fail (string keys, finite or null numbers).
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Query result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueryOutput {
    /// The answer text.
    pub answer: String,
    /// Present only when reasoning was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<Reasoning>,
}

/// The reasoning trace of a query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reasoning {
    /// Decoded reasoning text.
    pub text: String,
    /// Grounded spans of `text`.
    pub grounding: Vec<GroundingSpan>,
}

/// A span of the reasoning text together with the points it refers to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroundingSpan {
    /// Start of the span in Unicode code points (chars) of the reasoning text.
    pub start_idx: usize,
    /// End (exclusive) of the span in code points.
    pub end_idx: usize,
    /// The `[x, y]` points of the span, normalised to the image.
    pub points: Vec<[f64; 2]>,
}

/// Caption result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptionOutput {
    /// The caption text.
    pub caption: String,
}

/// Detect result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectOutput {
    /// Detected boxes, in generation order.
    pub objects: Vec<BoundingBox>,
}

/// A box normalised to the image (origin top-left).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoundingBox {
    /// Left edge.
    pub x_min: f64,
    /// Top edge.
    pub y_min: f64,
    /// Right edge.
    pub x_max: f64,
    /// Bottom edge.
    pub y_max: f64,
}

impl BoundingBox {
    /// The box `center ± size / 2` (computed in f64 from the f32 values, like the reference's
    /// Python floats), each edge clamped to [0, 1] when `clamp` is set (Kestrel, spec §11 #6).
    pub fn from_center_size(x: f32, y: f32, w: f32, h: f32, clamp: bool) -> Self {
        let (x, y, w, h) = (f64::from(x), f64::from(y), f64::from(w), f64::from(h));
        let b = BoundingBox {
            x_min: x - w / 2.0,
            y_min: y - h / 2.0,
            x_max: x + w / 2.0,
            y_max: y + h / 2.0,
        };
        if clamp {
            BoundingBox {
                x_min: b.x_min.clamp(0.0, 1.0),
                y_min: b.y_min.clamp(0.0, 1.0),
                x_max: b.x_max.clamp(0.0, 1.0),
                y_max: b.y_max.clamp(0.0, 1.0),
            }
        } else {
            b
        }
    }
}

/// Point result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointOutput {
    /// Points, in generation order.
    pub points: Vec<Point>,
}

/// A point normalised to the image (origin top-left).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Horizontal position.
    pub x: f64,
    /// Vertical position.
    pub y: f64,
}
