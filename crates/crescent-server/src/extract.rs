//! Request body extraction: a JSON extractor whose failures are our JSON errors (not axum's
//! plain-text rejections), and typed accessors that name the offending field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::state::AppState;

/// The request body as a JSON object. Malformed JSON or a non-object body → 400, a body over
/// the limit → 413.
pub struct JsonBody(pub Map<String, Value>);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.config().max_body_bytes;
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::body_too_large(limit));
        }
        let bytes = match Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::body_too_large(limit));
            }
            Err(rej) => {
                return Err(ApiError::invalid_json(format!(
                    "failed to read the request body: {}",
                    rej.body_text()
                )))
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid_json(
                "the request body is empty; expected a JSON object",
            ));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonBody(map)),
            Ok(_) => Err(ApiError::invalid_json(
                "the request body must be a JSON object",
            )),
            Err(e) => Err(ApiError::invalid_json(format!(
                "the request body is not valid JSON: {e}"
            ))),
        }
    }
}

/// Typed, field-naming access to a JSON object. `null` counts as absent.
#[derive(Clone, Copy)]
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    /// Access `map`, whose fields are reported as `prefix` + name (e.g. `"settings."`).
    pub fn new(map: &'a Map<String, Value>, prefix: &'a str) -> Self {
        Self { map, prefix }
    }

    /// The full name of field `key`.
    pub fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A required string.
    pub fn req_str(&self, key: &str) -> Result<&'a str, ApiError> {
        self.opt_str(key)?
            .ok_or_else(|| ApiError::missing_field(&self.name(key)))
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid_type(&self.name(key), "a string")),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::invalid_type(&self.name(key), "a boolean")),
        }
    }

    /// An optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid_type(&self.name(key), "a number")),
            Some(_) => Err(ApiError::invalid_type(&self.name(key), "a number")),
        }
    }

    /// An optional non-negative integer (a number that is not one → 422; not a number → 400).
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Number(n) = v else {
            return Err(ApiError::invalid_type(&self.name(key), "an integer"));
        };
        if let Some(u) = n.as_u64() {
            return Ok(Some(u));
        }
        match n.as_f64() {
            Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= u64::MAX as f64 => Ok(Some(f as u64)),
            _ => Err(ApiError::invalid_value(
                &self.name(key),
                "invalid_setting",
                format!("must be a non-negative integer, got {n}"),
            )),
        }
    }

    /// An optional `usize`.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ApiError> {
        Ok(self
            .opt_u64(key)?
            .map(|v| usize::try_from(v).unwrap_or(usize::MAX)))
    }

    /// An optional number as `f32` (range checks are left to the settings validation).
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, ApiError> {
        Ok(self.opt_f64(key)?.map(|v| v as f32))
    }

    /// An optional object.
    pub fn opt_obj(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(_) => Err(ApiError::invalid_type(&self.name(key), "an object")),
        }
    }

    /// An optional array.
    pub fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(ApiError::invalid_type(&self.name(key), "an array")),
        }
    }
}
