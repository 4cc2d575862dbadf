//! The crescent HTTP server: the Moondream API (`/v1/query`, `/v1/caption`, `/v1/detect`,
//! `/v1/point`, with SSE streaming), an OpenAI-compatible chat API (`/v1/chat/completions`,
//! `/v1/models`), `/health` and Prometheus `/metrics`, on top of [`crescent_engine::EngineHandle`].
//!
//! ```no_run
//! # async fn demo(engine: crescent_engine::EngineHandle) -> std::io::Result<()> {
//! use crescent_server::{serve, AppState, ServerConfig};
//! let config = ServerConfig::default();
//! let listener = tokio::net::TcpListener::bind(config.bind_addr()).await?;
//! let state = AppState::new(config);
//! // The port answers `/health` with 503 while the model loads...
//! state.set_engine(engine).ok();
//! // ...and serves once the engine is installed.
//! serve(listener, state, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! Every error is a real HTTP status with the body `{"error": {"message", "type", "param",
//! "code"}}`; see `docs/api.md` for the full API.

#![warn(missing_docs)]

mod config;
mod error;
mod extract;
mod image;
mod moondream;
mod openai;
mod run;
mod state;

use std::future::Future;
use std::io;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

pub use config::{ServerConfig, DEFAULT_MAX_BODY_BYTES, DEFAULT_MODEL_ID, DEFAULT_PORT};
pub use error::ApiError;
pub use image::decode_image_url;
pub use state::{AppState, EngineAlreadySet, HttpMetrics};

/// The HTTP router with every endpoint, auth, readiness gating, body limit and HTTP metrics.
pub fn router(state: AppState) -> Router {
    let max_body = state.config().max_body_bytes;
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{id}", get(openai::get_model))
        .route("/v1/query", post(moondream::query))
        .route("/v1/caption", post(moondream::caption))
        .route("/v1/detect", post(moondream::detect))
        .route("/v1/point", post(moondream::point))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_ready));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}

/// Serve `router(state)` on `listener` until `shutdown` completes, then stop accepting
/// connections and wait for in-flight requests (streams included) to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use axum::serve::ListenerExt;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "crescent server listening");
    }
    let listener = listener.tap_io(|tcp| {
        // Streamed tokens should leave at once, not wait for Nagle.
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `GET /health`: 200 `{"status":"ok"}` once the model is loaded, 503 `{"status":"loading"}`
/// before.
async fn health(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        let mut r = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }
}

/// `GET /metrics`: the engine's Prometheus metrics followed by the HTTP counters.
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let engine = state.ready_engine()?;
    let mut text = engine.metrics().render_prometheus();
    text.push_str(&state.http_metrics().render_prometheus());
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

/// 503 on every route but `/health` until the engine is installed.
async fn require_ready(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.is_ready() {
        next.run(req).await
    } else {
        ApiError::not_ready().into_response()
    }
}

/// Compare in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut acc = u8::from(a.len() != b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        acc |= x ^ y;
    }
    std::hint::black_box(acc) == 0
}

fn presented_keys(headers: &HeaderMap) -> Vec<&[u8]> {
    let mut keys = Vec::new();
    for v in headers.get_all("x-moondream-auth") {
        keys.push(trim_ascii(v.as_bytes()));
    }
    for v in headers.get_all(header::AUTHORIZATION) {
        let b = trim_ascii(v.as_bytes());
        if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ") {
            keys.push(trim_ascii(&b[7..]));
        }
    }
    keys
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// 401 unless the configured API key is presented (`/health` is open).
async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = state.config().api_key.as_deref() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let keys = presented_keys(req.headers());
    if keys.is_empty() {
        return ApiError::unauthorized(
            "missing API key; send `X-Moondream-Auth: KEY` or `Authorization: Bearer KEY`",
        )
        .into_response();
    }
    // Check every presented key so that timing does not depend on which one matched.
    let ok = keys
        .iter()
        .fold(false, |ok, k| constant_time_eq(k, key.as_bytes()) | ok);
    if !ok {
        return ApiError::unauthorized("invalid API key").into_response();
    }
    next.run(req).await
}

fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/query" => "/v1/query",
        "/v1/caption" => "/v1/caption",
        "/v1/detect" => "/v1/detect",
        "/v1/point" => "/v1/point",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    }
}

/// Count responses by endpoint and status.
async fn count_responses(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = endpoint_label(req.uri().path());
    let resp = next.run(req).await;
    state
        .http_metrics()
        .record_response(endpoint, resp.status().as_u16());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_and_header_keys() {
        let mut h = HeaderMap::new();
        h.insert("x-moondream-auth", HeaderValue::from_static(" k1 "));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer k2"));
        assert_eq!(presented_keys(&h), vec![&b"k1"[..], &b"k2"[..]]);
    }

    #[test]
    fn internal_engine_errors_are_500() {
        use crescent_engine::EngineError;
        use crescent_skills::SkillError;
        for e in [
            EngineError::Internal("skill state panicked".into()),
            EngineError::Skill(SkillError::UnexpectedToken("x".into())),
        ] {
            let a = ApiError::from_engine(e, "");
            assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(a.code, "internal_error");
        }
        let a = ApiError::from_engine(EngineError::QueueFull, "");
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn image_urls() {
        assert_eq!(decode_image_url("f", "aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_image_url("f", "aGVsbG8").unwrap(), b"hello");
        assert_eq!(
            decode_image_url("f", "data:image/png;base64,aGVs\nbG8=").unwrap(),
            b"hello"
        );
        let e = decode_image_url("image_url", "data:image/png,abc").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = decode_image_url("image_url", "not base64 !!").unwrap_err();
        assert_eq!(e.code, "invalid_base64");
        assert!(e.message.contains("image_url"));
        let e = decode_image_url("image_url", "https://example.com/a.png").unwrap_err();
        assert_eq!(e.code, "invalid_image_url");
    }
}
