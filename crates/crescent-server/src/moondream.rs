//! The Moondream API (`/v1/query`, `/v1/caption`, `/v1/detect`, `/v1/point`), as the official
//! `moondream` Python client speaks it.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use crescent_engine::Generation;
use crescent_skills::{CaptionLength, SettingsOverrides, SkillRequest, SpatialRef};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::extract::{Fields, JsonBody};
use crate::run::{self, JobSpec, StreamFormat};
use crate::state::AppState;

const SETTINGS: &str = "settings.";

/// Parse the `settings` object: `temperature`, `top_p`, `max_tokens`, `max_objects`, `seed`.
pub(crate) fn parse_settings(f: &Fields<'_>) -> Result<SettingsOverrides, ApiError> {
    let Some(map) = f.opt_obj("settings")? else {
        return Ok(SettingsOverrides::default());
    };
    let s = Fields::new(map, SETTINGS);
    Ok(SettingsOverrides {
        temperature: s.opt_f32("temperature")?,
        top_p: s.opt_f32("top_p")?,
        max_tokens: s.opt_usize("max_tokens")?,
        max_objects: s.opt_usize("max_objects")?,
        seed: s.opt_u64("seed")?,
    })
}

/// Parse `spatial_refs`: a list of `[x, y]` points or `[x_min, y_min, x_max, y_max]` boxes.
pub(crate) fn parse_spatial_refs(f: &Fields<'_>) -> Result<Vec<SpatialRef>, ApiError> {
    let Some(items) = f.opt_array("spatial_refs")? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("{}[{i}]", f.name("spatial_refs"));
        let Value::Array(vals) = item else {
            return Err(ApiError::invalid_type(&field, "an array of numbers"));
        };
        let nums: Option<Vec<f64>> = vals.iter().map(Value::as_f64).collect();
        let nums = nums.ok_or_else(|| ApiError::invalid_type(&field, "an array of numbers"))?;
        let r = SpatialRef::from_values(&nums)
            .map_err(|e| ApiError::invalid_value(&field, "invalid_spatial_ref", e))?;
        out.push(r);
    }
    Ok(out)
}

/// The JSON response of a finished job: the skill output plus `request_id`, `finish_reason`
/// and `metrics`.
fn result_object(g: &Generation, request_id: &str) -> Map<String, Value> {
    let mut obj = match g.output.to_json() {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    obj.insert("request_id".into(), json!(request_id));
    obj.insert("finish_reason".into(), json!(g.finish.as_str()));
    obj.insert("metrics".into(), run::metrics_json(g));
    obj
}

/// SSE format of the Moondream API: `{"chunk": "..."}` per delta, then one event with
/// `"completed": true` and the full result.
struct MoondreamStream;

impl StreamFormat for MoondreamStream {
    fn start(&mut self, _request_id: &str) -> Vec<String> {
        Vec::new()
    }

    fn delta(&mut self, text: &str) -> Vec<String> {
        if text.is_empty() {
            return Vec::new();
        }
        vec![json!({ "chunk": text }).to_string()]
    }

    fn done(&mut self, g: &Generation, request_id: &str) -> Vec<String> {
        let mut obj = result_object(g, request_id);
        obj.insert("completed".into(), json!(true));
        vec![Value::Object(obj).to_string()]
    }

    fn error(&mut self, e: &ApiError, request_id: &str) -> Vec<String> {
        let mut body = e.body();
        if let Value::Object(m) = &mut body {
            m.insert("completed".into(), json!(true));
            m.insert("request_id".into(), json!(request_id));
        }
        vec![body.to_string()]
    }
}

async fn execute(state: AppState, spec: JobSpec, stream: bool) -> Result<Response, ApiError> {
    let mut started = run::start(&state, spec).await?;
    if stream {
        return Ok(run::sse(started, MoondreamStream, SETTINGS).into_response());
    }
    let g = run::collect(&mut started, SETTINGS).await?;
    Ok(Json(Value::Object(result_object(&g, &started.request_id))).into_response())
}

/// `POST /v1/query`.
pub(crate) async fn query(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let f = Fields::new(&body, "");
    let question = f.req_str("question")?.to_string();
    let image_url = f.opt_str("image_url")?.map(str::to_string);
    let stream = f.opt_bool("stream")?.unwrap_or(false);
    let reasoning = f.opt_bool("reasoning")?.unwrap_or(false);
    let spatial_refs = parse_spatial_refs(&f)?;
    let overrides = parse_settings(&f)?;
    let spec = JobSpec {
        request: SkillRequest::Query {
            question,
            reasoning,
            spatial_refs,
        },
        overrides,
        image_url,
        image_field: "image_url",
        settings_prefix: SETTINGS,
    };
    execute(state, spec, stream).await
}

/// `POST /v1/caption`.
pub(crate) async fn caption(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let f = Fields::new(&body, "");
    let image_url = f.req_str("image_url")?.to_string();
    let stream = f.opt_bool("stream")?.unwrap_or(false);
    let length = match f.opt_str("length")? {
        None => CaptionLength::default(),
        Some(s) => s.parse::<CaptionLength>().map_err(|_| {
            ApiError::invalid_value(
                "length",
                "invalid_value",
                format!("unknown caption length {s:?}; expected \"short\", \"normal\" or \"long\""),
            )
        })?,
    };
    let overrides = parse_settings(&f)?;
    let spec = JobSpec {
        request: SkillRequest::Caption { length },
        overrides,
        image_url: Some(image_url),
        image_field: "image_url",
        settings_prefix: SETTINGS,
    };
    execute(state, spec, stream).await
}

/// `POST /v1/detect`.
pub(crate) async fn detect(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    spatial(state, &body, false).await
}

/// `POST /v1/point`.
pub(crate) async fn point(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    spatial(state, &body, true).await
}

/// Detect (`point = false`) or point: same fields, point also takes spatial refs.
async fn spatial(
    state: AppState,
    body: &serde_json::Map<String, serde_json::Value>,
    point: bool,
) -> Result<Response, ApiError> {
    let f = Fields::new(body, "");
    let image_url = f.req_str("image_url")?.to_string();
    let object = f.req_str("object")?.to_string();
    let max_objects = f.opt_usize("max_objects")?;
    let request = if point {
        SkillRequest::Point {
            object,
            max_objects,
            spatial_refs: parse_spatial_refs(&f)?,
        }
    } else {
        SkillRequest::Detect {
            object,
            max_objects,
        }
    };
    let overrides = parse_settings(&f)?;
    let spec = JobSpec {
        request,
        overrides,
        image_url: Some(image_url),
        image_field: "image_url",
        settings_prefix: SETTINGS,
    };
    execute(state, spec, false).await
}
