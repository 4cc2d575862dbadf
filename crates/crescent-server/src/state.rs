//! Shared server state: the engine (set once the model is loaded), the configuration, the
//! readiness flag, HTTP-level metrics and request ids.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crescent_engine::EngineHandle;

use crate::config::ServerConfig;
use crate::error::ApiError;

/// State shared by every request. Cheap to clone.
///
/// It can be built before the model is loaded ([`AppState::new`]): the server then answers
/// `/health` with 503 `{"status":"loading"}` and every other endpoint with 503 until
/// [`AppState::set_engine`] is called.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: ServerConfig,
    engine: OnceLock<EngineHandle>,
    ready: AtomicBool,
    http: HttpMetrics,
    ids: RequestIds,
}

impl AppState {
    /// State without an engine yet (not ready).
    pub fn new(config: ServerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                engine: OnceLock::new(),
                ready: AtomicBool::new(false),
                http: HttpMetrics::default(),
                ids: RequestIds::new(),
            }),
        }
    }

    /// State with a running engine (ready at once).
    pub fn with_engine(config: ServerConfig, engine: EngineHandle) -> Self {
        let s = Self::new(config);
        // A fresh state has no engine, so this cannot fail.
        let _ = s.set_engine(engine);
        s
    }

    /// Install the engine once the model is loaded and mark the server ready. Fails when an
    /// engine is already installed (the new handle is dropped).
    pub fn set_engine(&self, engine: EngineHandle) -> Result<(), EngineAlreadySet> {
        self.inner
            .engine
            .set(engine)
            .map_err(|_| EngineAlreadySet)?;
        self.inner.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the model is loaded and requests are served.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// The engine, once ready.
    pub fn engine(&self) -> Option<&EngineHandle> {
        if self.is_ready() {
            self.inner.engine.get()
        } else {
            None
        }
    }

    /// The engine, or the 503 answered while loading.
    pub fn ready_engine(&self) -> Result<&EngineHandle, ApiError> {
        self.engine().ok_or_else(ApiError::not_ready)
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// HTTP-level metrics.
    pub fn http_metrics(&self) -> &HttpMetrics {
        &self.inner.http
    }

    /// A fresh, unique request id (UUID-shaped).
    pub fn next_request_id(&self) -> String {
        self.inner.ids.next()
    }
}

/// [`AppState::set_engine`] was called twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineAlreadySet;

impl std::fmt::Display for EngineAlreadySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the engine is already installed")
    }
}

impl std::error::Error for EngineAlreadySet {}

/// Unique request ids: process start time plus a counter, printed as a UUID.
struct RequestIds {
    epoch: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // Mix in the pid so that two servers started in the same nanosecond differ.
        let epoch = nanos ^ (u64::from(std::process::id()) << 40);
        Self {
            epoch,
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let e = self.epoch;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (e >> 32) as u32,
            (e >> 16) & 0xffff,
            e & 0xffff,
            (n >> 48) & 0xffff,
            n & 0xffff_ffff_ffff
        )
    }
}

/// HTTP-level counters, rendered after the engine's metrics on `/metrics`.
#[derive(Default, Debug)]
pub struct HttpMetrics {
    /// Responses by (endpoint, status code).
    responses: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Requests being handled (streams included until they end).
    in_flight: AtomicU64,
    /// Requests whose client went away before the response was complete.
    client_disconnects: AtomicU64,
    /// Requests that ran past the request timeout.
    timeouts: AtomicU64,
    /// Streaming responses started.
    streams: AtomicU64,
}

impl HttpMetrics {
    /// Count one response.
    pub fn record_response(&self, endpoint: &'static str, status: u16) {
        if let Ok(mut m) = self.responses.lock() {
            *m.entry((endpoint, status)).or_insert(0) += 1;
        }
    }

    /// Responses counted for `status` over all endpoints.
    pub fn responses_with_status(&self, status: u16) -> u64 {
        self.responses
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|((_, s), _)| *s == status)
                    .map(|(_, n)| *n)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Requests whose client disconnected early.
    pub fn client_disconnects(&self) -> u64 {
        self.client_disconnects.load(Ordering::Relaxed)
    }

    pub(crate) fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn disconnected(&self) {
        self.client_disconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn timed_out(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_started(&self) {
        self.streams.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition of the HTTP counters.
    pub fn render_prometheus(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP crescent_http_responses_total HTTP responses by endpoint and status code.\n\
             # TYPE crescent_http_responses_total counter"
        );
        if let Ok(m) = self.responses.lock() {
            for ((endpoint, status), n) in m.iter() {
                let _ = writeln!(
                    s,
                    "crescent_http_responses_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                );
            }
        }
        for (name, kind, help, v) in [
            (
                "crescent_http_requests_in_flight",
                "gauge",
                "Generation requests being handled (open streams included).",
                &self.in_flight,
            ),
            (
                "crescent_http_client_disconnects_total",
                "counter",
                "Generation requests abandoned by the client before completion (job cancelled).",
                &self.client_disconnects,
            ),
            (
                "crescent_http_timeouts_total",
                "counter",
                "Generation requests that ran past the request timeout (job cancelled).",
                &self.timeouts,
            ),
            (
                "crescent_http_streams_total",
                "counter",
                "Streaming (SSE) responses started.",
                &self.streams,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        s
    }
}

/// Tracks one generation request: counts it in flight and, if dropped before [`finish`] (the
/// handler future or the response stream was dropped because the client went away), counts a
/// client disconnect.
///
/// [`finish`]: RequestGuard::finish
pub(crate) struct RequestGuard {
    state: AppState,
    finished: bool,
}

impl RequestGuard {
    pub(crate) fn new(state: &AppState) -> Self {
        state.http_metrics().request_started();
        Self {
            state: state.clone(),
            finished: false,
        }
    }

    /// The request completed (successfully or with an error answered to the client).
    pub(crate) fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let m = self.state.http_metrics();
        m.request_ended();
        if !self.finished {
            m.disconnected();
            tracing::debug!("client went away; request cancelled");
        }
    }
}
