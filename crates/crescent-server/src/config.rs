//! Server configuration.

use std::time::Duration;

use crescent_image::DecodeLimits;

/// Default port (the one the official `moondream` client documents for local servers).
pub const DEFAULT_PORT: u16 = 2020;
/// Default request body limit: 32 MiB (a base64 image of about 24 MB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 << 20;
/// Default model id reported by `/v1/models` and in chat completions.
pub const DEFAULT_MODEL_ID: &str = "moondream3";

/// How the HTTP server behaves.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to bind (used by the CLI; [`crate::serve`] takes a bound listener).
    pub host: String,
    /// Port to bind (used by the CLI).
    pub port: u16,
    /// When set, every endpoint except `/health` requires this key, given as
    /// `X-Moondream-Auth: KEY` or `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Largest accepted request body in bytes (larger → 413).
    pub max_body_bytes: usize,
    /// Limits on decoded images (a header announcing a larger image → 413).
    pub decode_limits: DecodeLimits,
    /// Per-request deadline: past it the job is cancelled and the request answered with 504
    /// (or, once streaming, ended with an error event). `None`: no deadline.
    pub request_timeout: Option<Duration>,
    /// Model id reported by `/v1/models` and chat completions.
    pub model_id: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: DEFAULT_PORT,
            api_key: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            decode_limits: DecodeLimits::default(),
            request_timeout: None,
            model_id: DEFAULT_MODEL_ID.into(),
        }
    }
}

impl ServerConfig {
    /// `host:port`, ready for `TcpListener::bind` (IPv6 hosts are bracketed).
    pub fn bind_addr(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}
