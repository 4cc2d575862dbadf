//! Spatial skills: detect (boxes) and point (spec §8.4, §8.5).

use crescent_model::config::TokenizerConfig;
use crescent_model::Token;

use crate::error::SkillError;
use crate::output::{BoundingBox, DetectOutput, Point, PointOutput, SkillOutput};
use crate::state::{Constraint, FinishReason, SkillState};

/// Where a detect request is in the x → y → size cycle.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DetectStage {
    /// Next: a box centre x, or eos.
    X,
    /// Next: the centre y.
    Y { x: f32 },
    /// Next: the size.
    S { x: f32, y: f32 },
}

/// State of a detect request: stages X {coord, eos} → Y {coord} → S {size}.
pub(crate) struct DetectState {
    coord_id: u32,
    size_id: u32,
    eos_id: u32,
    clamp: bool,
    stage: DetectStage,
    objects: Vec<BoundingBox>,
}

impl DetectState {
    /// A fresh state; `clamp` clamps box edges to [0, 1] (Kestrel).
    pub(crate) fn new(tk: &TokenizerConfig, clamp: bool) -> Self {
        Self {
            coord_id: tk.coord_id,
            size_id: tk.size_id,
            eos_id: tk.eos_id,
            clamp,
            stage: DetectStage::X,
            objects: Vec::new(),
        }
    }
}

impl SkillState for DetectState {
    fn constraint(&self) -> Constraint {
        match self.stage {
            DetectStage::X => Constraint::Allow(vec![self.coord_id, self.eos_id]),
            DetectStage::Y { .. } => Constraint::Allow(vec![self.coord_id]),
            DetectStage::S { .. } => Constraint::Allow(vec![self.size_id]),
        }
    }

    fn consume(&mut self, token: &Token) -> Result<(), SkillError> {
        self.stage = match (self.stage, *token) {
            (DetectStage::X, Token::Coord(x)) => DetectStage::Y { x },
            (DetectStage::Y { x }, Token::Coord(y)) => DetectStage::S { x, y },
            (DetectStage::S { x, y }, Token::Size(w, h)) => {
                self.objects
                    .push(BoundingBox::from_center_size(x, y, w, h, self.clamp));
                DetectStage::X
            }
            (stage, token) => {
                return Err(SkillError::UnexpectedToken(format!(
                    "detect at stage {stage:?} got {token:?}"
                )));
            }
        };
        Ok(())
    }

    fn take_delta(&mut self) -> Option<String> {
        None
    }

    fn finish(&mut self, _reason: FinishReason) -> Result<SkillOutput, SkillError> {
        // A partial trailing object (stage Y or S) is dropped.
        Ok(SkillOutput::Detect(DetectOutput {
            objects: self.objects.clone(),
        }))
    }
}

/// State of a point request: {coord, eos} for x, then {coord} for y.
pub(crate) struct PointState {
    coord_id: u32,
    eos_id: u32,
    pending_x: Option<f32>,
    points: Vec<Point>,
}

impl PointState {
    /// A fresh state.
    pub(crate) fn new(tk: &TokenizerConfig) -> Self {
        Self {
            coord_id: tk.coord_id,
            eos_id: tk.eos_id,
            pending_x: None,
            points: Vec::new(),
        }
    }
}

impl SkillState for PointState {
    fn constraint(&self) -> Constraint {
        match self.pending_x {
            None => Constraint::Allow(vec![self.coord_id, self.eos_id]),
            Some(_) => Constraint::Allow(vec![self.coord_id]),
        }
    }

    fn consume(&mut self, token: &Token) -> Result<(), SkillError> {
        let Token::Coord(v) = *token else {
            return Err(SkillError::UnexpectedToken(format!(
                "point expects a coordinate, got {token:?}"
            )));
        };
        match self.pending_x.take() {
            None => self.pending_x = Some(v),
            Some(x) => self.points.push(Point {
                x: f64::from(x),
                y: f64::from(v),
            }),
        }
        Ok(())
    }

    fn take_delta(&mut self) -> Option<String> {
        None
    }

    fn finish(&mut self, _reason: FinishReason) -> Result<SkillOutput, SkillError> {
        // A dangling x is dropped.
        Ok(SkillOutput::Point(PointOutput {
            points: self.points.clone(),
        }))
    }
}
