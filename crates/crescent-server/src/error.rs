//! API errors: every failure becomes a real HTTP status with the JSON body
//! `{"error": {"message", "type", "param", "code"}}` (the OpenAI error shape).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use crescent_engine::EngineError;
use crescent_image::ImageError;
use crescent_skills::SkillError;
use serde_json::json;

/// An error answered to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Error class (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// Machine-readable code (`invalid_json`, `missing_field`, `queue_full`, ...).
    pub code: &'static str,
    /// Human-readable message; names the offending field where there is one.
    pub message: String,
    /// The offending request field, if any (e.g. `settings.temperature`).
    pub param: Option<String>,
}

impl ApiError {
    /// A new error.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
        }
    }

    /// Attach the offending field.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// 400: the body is not valid JSON (or not a JSON object).
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            message,
        )
    }

    /// 400: a required field is absent.
    pub fn missing_field(field: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "missing_field",
            format!("missing required field `{field}`"),
        )
        .with_param(field)
    }

    /// 400: a field has the wrong JSON type.
    pub fn invalid_type(field: &str, expected: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_type",
            format!("field `{field}` must be {expected}"),
        )
        .with_param(field)
    }

    /// 400: a field is malformed in some other way (bad base64, unsupported URL, ...).
    pub fn bad_field(field: &str, code: &'static str, message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            format!("field `{field}`: {message}"),
        )
        .with_param(field)
    }

    /// 422: a field is well-typed but its value is not acceptable.
    pub fn invalid_value(field: &str, code: &'static str, message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            code,
            format!("field `{field}`: {message}"),
        )
        .with_param(field)
    }

    /// 413: the request body exceeds the configured limit.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("request body exceeds the limit of {limit} bytes"),
        )
    }

    /// 401: missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message,
        )
    }

    /// 503: the model is still loading.
    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "not_ready",
            "the model is still loading; retry later",
        )
    }

    /// 404: unknown route.
    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "not_found",
            format!("no route for {path}"),
        )
    }

    /// 405: known route, wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            format!("method {method} is not allowed on {path}"),
        )
    }

    /// 504: the request deadline passed.
    pub fn timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            "timeout",
            "the request did not finish within the server's request timeout",
        )
    }

    /// 500: an internal failure confined to this request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal_error",
            message,
        )
    }

    /// Map an image decoding error found in field `field`.
    pub fn from_image(field: &str, e: &ImageError) -> Self {
        match e {
            ImageError::TooLarge { .. } | ImageError::LimitExceeded(_) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "image_too_large",
                format!("field `{field}`: {e}"),
            )
            .with_param(field),
            _ => Self::bad_field(field, "invalid_image", e),
        }
    }

    /// Map an engine error; `settings_prefix` is put before the name of an invalid setting
    /// (`"settings."` for the Moondream API, `""` for the OpenAI API).
    pub fn from_engine(e: EngineError, settings_prefix: &str) -> Self {
        match e {
            EngineError::Skill(SkillError::InvalidSetting { field, message }) => {
                Self::invalid_value(
                    &format!("{settings_prefix}{field}"),
                    "invalid_setting",
                    message,
                )
            }
            EngineError::Skill(SkillError::InvalidRequest(msg)) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "invalid_request",
                msg,
            ),
            EngineError::Image(ref ie) => Self::from_image("image_url", ie),
            EngineError::QueueFull => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                e.to_string(),
            ),
            EngineError::TooLarge(msg) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                msg,
            ),
            EngineError::Unavailable => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "engine_unavailable",
                e.to_string(),
            ),
            ref other if other.is_client_error() => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "invalid_request",
                other.to_string(),
            ),
            other => Self::internal(other.to_string()),
        }
    }

    /// The JSON body `{"error": {...}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() && self.status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(
                status = self.status.as_u16(),
                code = self.code,
                "{}",
                self.message
            );
        } else {
            tracing::debug!(
                status = self.status.as_u16(),
                code = self.code,
                "{}",
                self.message
            );
        }
        let status = self.status;
        let mut resp = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
