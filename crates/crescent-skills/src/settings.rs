//! Sampling settings: user overrides, validation and the per-skill defaults of spec §8.10.

use crate::error::SkillError;
use crate::request::SkillRequest;

/// Default token budget of query, caption and (without `max_objects`) point.
pub const DEFAULT_MAX_TOKENS: usize = 768;
/// Default `max_objects` of detect (Kestrel, HF reference).
pub const DEFAULT_DETECT_MAX_OBJECTS: usize = 50;
/// Default temperature of the text skills (query, caption).
pub const DEFAULT_TEXT_TEMPERATURE: f32 = 0.2;
/// Default nucleus mass of the text skills (query, caption).
pub const DEFAULT_TEXT_TOP_P: f32 = 0.9;

/// Validated sampling settings of one request, skill defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerationSettings {
    /// Softmax temperature; `<= 0` means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// Budget of sampled tokens, the final eos and coord/size tokens included (spec §8.1).
    pub max_new_tokens: usize,
    /// RNG seed for sampling, if the user fixed one.
    pub seed: Option<u64>,
}

/// User-supplied setting overrides; `None` means "use the skill default".
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SettingsOverrides {
    /// Temperature, finite and `>= 0`.
    pub temperature: Option<f32>,
    /// Nucleus mass, `0 < top_p <= 1`.
    pub top_p: Option<f32>,
    /// Token budget, `> 0` (ignored by detect, whose budget follows `max_objects`).
    pub max_tokens: Option<usize>,
    /// Most objects for detect/point, `> 0` (ignored by query and caption). A value in the
    /// request itself takes precedence; giving two different values is an error.
    pub max_objects: Option<usize>,
    /// RNG seed.
    pub seed: Option<u64>,
}

impl SettingsOverrides {
    /// Check every given value's range; the error names the field.
    pub fn validate(&self) -> Result<(), SkillError> {
        if let Some(t) = self.temperature {
            if !t.is_finite() || t < 0.0 {
                return Err(SkillError::InvalidSetting {
                    field: "temperature",
                    message: format!("must be a finite number >= 0, got {t}"),
                });
            }
        }
        if let Some(p) = self.top_p {
            // Written so that NaN fails too.
            if !(p > 0.0 && p <= 1.0) {
                return Err(SkillError::InvalidSetting {
                    field: "top_p",
                    message: format!("must be in (0, 1], got {p}"),
                });
            }
        }
        if self.max_tokens == Some(0) {
            return Err(SkillError::InvalidSetting {
                field: "max_tokens",
                message: "must be > 0, got 0".into(),
            });
        }
        if self.max_objects == Some(0) {
            return Err(SkillError::InvalidSetting {
                field: "max_objects",
                message: "must be > 0, got 0".into(),
            });
        }
        Ok(())
    }
}

/// Resolve the `max_objects` given in the request and/or the overrides.
fn max_objects(
    from_request: Option<usize>,
    overrides: &SettingsOverrides,
) -> Result<Option<usize>, SkillError> {
    if from_request == Some(0) {
        return Err(SkillError::InvalidSetting {
            field: "max_objects",
            message: "must be > 0, got 0".into(),
        });
    }
    match (from_request, overrides.max_objects) {
        (Some(a), Some(b)) if a != b => Err(SkillError::InvalidSetting {
            field: "max_objects",
            message: format!("given twice with different values ({a} and {b})"),
        }),
        (a, b) => Ok(a.or(b)),
    }
}

/// Validate `overrides` and fill in the defaults of `req`'s skill (spec §8.10):
///
/// | skill | temperature | top_p | max_new_tokens |
/// |---|---|---|---|
/// | query, caption | 0.2 | 0.9 | `max_tokens` or 768 |
/// | detect | 0 | 1 | `max(3·max_objects + 1, 3)`, `max_objects` default 50; `max_tokens` ignored |
/// | point | 0 | 1 | `max(2·max_objects + 1, 2)` when `max_objects` is given, else `max_tokens` or 768 |
pub fn resolve_settings(
    req: &SkillRequest,
    overrides: &SettingsOverrides,
) -> Result<GenerationSettings, SkillError> {
    overrides.validate()?;
    let (temperature, top_p, max_new_tokens) = match req {
        SkillRequest::Query { .. } | SkillRequest::Caption { .. } => (
            DEFAULT_TEXT_TEMPERATURE,
            DEFAULT_TEXT_TOP_P,
            overrides.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        ),
        SkillRequest::Detect { max_objects: m, .. } => {
            let n = max_objects(*m, overrides)?.unwrap_or(DEFAULT_DETECT_MAX_OBJECTS);
            (0.0, 1.0, n.saturating_mul(3).saturating_add(1).max(3))
        }
        SkillRequest::Point { max_objects: m, .. } => {
            let budget = match max_objects(*m, overrides)? {
                Some(n) => n.saturating_mul(2).saturating_add(1).max(2),
                None => overrides.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            };
            (0.0, 1.0, budget)
        }
    };
    Ok(GenerationSettings {
        temperature: overrides.temperature.unwrap_or(temperature),
        top_p: overrides.top_p.unwrap_or(top_p),
        max_new_tokens,
        seed: overrides.seed,
    })
}
