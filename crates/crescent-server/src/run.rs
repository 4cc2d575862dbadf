//! Running one job for a request: validation, image decoding, submission, and either collecting
//! the result or streaming it as server-sent events. The [`JobStream`] lives only inside the
//! handler future (non-streaming) or the response body stream (streaming), so a client that
//! goes away drops it and the engine cancels the job.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Instant;

use axum::response::sse::{Event as SseEvent, Sse};
use crescent_engine::{Event, Generation, Job, JobStream};
use crescent_skills::{SettingsOverrides, SkillError, SkillRequest};
use futures_util::Stream;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::image::load_image;
use crate::state::{AppState, RequestGuard};

/// What a request asks the engine to do.
pub(crate) struct JobSpec {
    /// The skill request.
    pub request: SkillRequest,
    /// Sampling overrides.
    pub overrides: SettingsOverrides,
    /// The image URL (data URI or bare base64), if any.
    pub image_url: Option<String>,
    /// Name of the image field in error messages.
    pub image_field: &'static str,
    /// Prefix of setting names in error messages (`"settings."` or `""`).
    pub settings_prefix: &'static str,
}

/// A submitted job with its bookkeeping.
pub(crate) struct Started {
    /// The engine's stream of the job (dropping it cancels the job).
    pub stream: JobStream,
    /// The request id.
    pub request_id: String,
    /// When the request must be done by.
    pub deadline: Option<Instant>,
    /// In-flight / disconnect accounting.
    pub guard: RequestGuard,
    /// The server state.
    pub state: AppState,
}

/// Map a settings validation error to a 422 naming the field with `prefix`.
pub(crate) fn validate_overrides(ov: &SettingsOverrides, prefix: &str) -> Result<(), ApiError> {
    ov.validate().map_err(|e| skill_error(e, prefix))
}

fn skill_error(e: SkillError, prefix: &str) -> ApiError {
    ApiError::from_engine(e.into(), prefix)
}

async fn until<T>(
    deadline: Option<Instant>,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ApiError> {
    match deadline {
        None => Ok(fut.await),
        Some(d) => tokio::time::timeout_at(tokio::time::Instant::from_std(d), fut)
            .await
            .map_err(|_| ApiError::timeout()),
    }
}

/// Validate, decode the image and submit. Cheap checks (settings, prompt) come before the
/// image is decoded.
pub(crate) async fn start(state: &AppState, spec: JobSpec) -> Result<Started, ApiError> {
    let mut guard = RequestGuard::new(state);
    let deadline = state.config().request_timeout.map(|t| Instant::now() + t);
    match submit(state, spec, deadline).await {
        Ok(stream) => Ok(Started {
            stream,
            request_id: state.next_request_id(),
            deadline,
            guard,
            state: state.clone(),
        }),
        Err(e) => {
            guard.finish();
            if e.code == "timeout" {
                state.http_metrics().timed_out();
            }
            Err(e)
        }
    }
}

async fn submit(
    state: &AppState,
    spec: JobSpec,
    deadline: Option<Instant>,
) -> Result<JobStream, ApiError> {
    let engine = state.ready_engine()?;
    let prefix = spec.settings_prefix;
    validate_overrides(&spec.overrides, prefix)?;
    // Build the prompt once without the image to report request errors before decoding it.
    engine
        .skills()
        .start(&spec.request, &spec.overrides, spec.image_url.is_some())
        .map_err(|e| skill_error(e, prefix))?;
    let image = match spec.image_url {
        Some(url) => Some(
            until(
                deadline,
                load_image(engine, spec.image_field, url, state.config().decode_limits),
            )
            .await??,
        ),
        None => None,
    };
    let job = Job {
        request: spec.request,
        overrides: spec.overrides,
        image,
        trace: false,
    };
    let stream = until(deadline, engine.submit(job))
        .await?
        .map_err(|e| ApiError::from_engine(e, prefix))?;
    Ok(stream)
}

/// Wait for the job's result (non-streaming requests).
pub(crate) async fn collect(started: &mut Started, prefix: &str) -> Result<Generation, ApiError> {
    let deadline = started.deadline;
    let res = until(deadline, async {
        loop {
            match started.stream.recv().await {
                Some(Event::Delta(_)) => continue,
                Some(Event::Done(r)) => return (*r).map_err(|e| ApiError::from_engine(e, prefix)),
                None => return Err(ApiError::internal("the engine dropped the request")),
            }
        }
    })
    .await
    .and_then(|r| r);
    if matches!(&res, Err(e) if e.code == "timeout") {
        started.stream.cancel();
        started.state.http_metrics().timed_out();
    }
    started.guard.finish();
    res
}

/// The `metrics` object of a response.
pub(crate) fn metrics_json(g: &Generation) -> Value {
    json!({
        "input_tokens": g.input_tokens,
        "output_tokens": g.output_tokens,
        "cached_tokens": g.cached_tokens,
        "queue_ms": round_ms(g.timings.queue_ms),
        "prefill_ms": round_ms(g.timings.prefill_ms),
        "decode_ms": round_ms(g.timings.decode_ms),
        "total_ms": round_ms(g.timings.total_ms),
    })
}

fn round_ms(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Turns engine events into SSE `data:` payloads.
pub(crate) trait StreamFormat: Send + 'static {
    /// Events sent before any output.
    fn start(&mut self, request_id: &str) -> Vec<String>;
    /// Newly generated text.
    fn delta(&mut self, text: &str) -> Vec<String>;
    /// The final result.
    fn done(&mut self, g: &Generation, request_id: &str) -> Vec<String>;
    /// A failure after the response started.
    fn error(&mut self, e: &ApiError, request_id: &str) -> Vec<String>;
}

struct Driver<F> {
    started: Option<Started>,
    fmt: F,
    queue: VecDeque<String>,
    prefix: &'static str,
}

impl<F: StreamFormat> Driver<F> {
    fn finish(&mut self, mut s: Started, events: Vec<String>) {
        s.guard.finish();
        self.queue.extend(events);
        // Dropping `s` here drops the job stream (a no-op once the job is done).
    }

    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(ev);
            }
            let mut s = self.started.take()?;
            let ev = match until(s.deadline, s.stream.recv()).await {
                Ok(ev) => ev,
                Err(e) => {
                    s.stream.cancel();
                    s.state.http_metrics().timed_out();
                    let evs = self.fmt.error(&e, &s.request_id);
                    self.finish(s, evs);
                    continue;
                }
            };
            match ev {
                Some(Event::Delta(d)) => {
                    let evs = self.fmt.delta(&d);
                    self.queue.extend(evs);
                    self.started = Some(s);
                }
                Some(Event::Done(r)) => {
                    let evs = match *r {
                        Ok(g) => self.fmt.done(&g, &s.request_id),
                        Err(e) => {
                            let e = ApiError::from_engine(e, self.prefix);
                            self.fmt.error(&e, &s.request_id)
                        }
                    };
                    self.finish(s, evs);
                }
                None => {
                    let e = ApiError::internal("the engine dropped the request");
                    let evs = self.fmt.error(&e, &s.request_id);
                    self.finish(s, evs);
                }
            }
        }
    }
}

/// Stream the job as server-sent events formatted by `fmt`. The returned body owns the job:
/// when the client disconnects, hyper drops the body and with it the job stream.
pub(crate) fn sse<F: StreamFormat>(
    started: Started,
    mut fmt: F,
    prefix: &'static str,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    started.state.http_metrics().stream_started();
    let first = fmt.start(&started.request_id);
    let driver = Driver {
        started: Some(started),
        fmt,
        queue: first.into(),
        prefix,
    };
    let stream = futures_util::stream::unfold(driver, |mut d| async move {
        let data = d.next().await?;
        Some((Ok(SseEvent::default().data(data)), d))
    });
    Sse::new(stream)
}
