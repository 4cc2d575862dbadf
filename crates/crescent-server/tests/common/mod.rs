//! Shared test helpers: the fixture model, an in-process server on a loopback port, a tiny
//! HTTP/1.1 client over `tokio::net::TcpStream`, the reference (synchronous) engine and the
//! Python client runner.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use crescent_engine::{Engine, EngineConfig, EngineHandle, Generation, ImageInput, Job};
use crescent_model::{load_tokenizer, LoadOptions, Moondream, TextTokenizer};
use crescent_server::{serve, AppState, ServerConfig};
use crescent_skills::{SettingsOverrides, SkillRequest};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The md3-tiny fixture folder.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/md3-tiny")
}

/// A fixture image path.
pub fn image_path(name: &str) -> PathBuf {
    fixture_dir().join("images").join(name)
}

/// Bytes of a fixture image.
pub fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(image_path(name)).expect("reading a fixture image")
}

/// A `data:` URI of bytes.
pub fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Decode the base64 payload of a data URI.
pub fn data_uri_bytes(uri: &str) -> Vec<u8> {
    let payload = uri.split_once(',').map_or(uri, |(_, p)| p);
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .expect("valid base64")
}

/// The fixture model and tokenizer, loaded once per test binary.
pub fn model() -> (Arc<Moondream>, Arc<TextTokenizer>) {
    static M: OnceLock<(Arc<Moondream>, Arc<TextTokenizer>)> = OnceLock::new();
    M.get_or_init(|| {
        let m = Moondream::load(&fixture_dir(), &LoadOptions::default()).expect("loading md3-tiny");
        let t = load_tokenizer(&fixture_dir().join("tokenizer.json")).expect("loading tokenizer");
        (Arc::new(m), Arc::new(t))
    })
    .clone()
}

/// Engine sizing used by the tests (small KV pool).
pub fn engine_config() -> EngineConfig {
    EngineConfig {
        kv_cache_mb: 96,
        ..EngineConfig::default()
    }
}

/// A synchronous engine over the same model: the reference for server outputs.
pub fn reference_engine() -> Engine {
    let (m, t) = model();
    Engine::with_config(m, t, engine_config())
}

/// Run one job on the reference engine; returns the generation and the streamed deltas.
pub fn reference(
    engine: &Engine,
    request: SkillRequest,
    overrides: SettingsOverrides,
    image: Option<&[u8]>,
) -> (Generation, Vec<String>) {
    let image: Option<ImageInput> = image.map(|b| engine.prepare_image(b).expect("image"));
    let mut deltas = Vec::new();
    let g = engine
        .run(
            Job {
                request,
                overrides,
                image,
                trace: false,
            },
            |d| {
                if !d.is_empty() {
                    deltas.push(d.to_string())
                }
            },
        )
        .expect("reference run");
    (g, deltas)
}

/// Greedy overrides with a token budget.
pub fn greedy(max_tokens: usize) -> SettingsOverrides {
    SettingsOverrides {
        temperature: Some(0.0),
        top_p: Some(1.0),
        max_tokens: Some(max_tokens),
        ..SettingsOverrides::default()
    }
}

/// A multi-threaded runtime for the server (the test thread stays free to block).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// An in-process server on a loopback port.
pub struct TestServer {
    /// `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    /// The server state.
    pub state: AppState,
    /// The engine (also installed in `state` unless started "loading").
    pub engine: EngineHandle,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Start a server; with `ready == false` the engine is not installed yet (see
    /// [`TestServer::make_ready`]).
    pub async fn start(config: ServerConfig, ready: bool) -> Self {
        Self::start_with(config, engine_config(), ready).await
    }

    /// Start with explicit engine sizing.
    pub async fn start_with(config: ServerConfig, ecfg: EngineConfig, ready: bool) -> Self {
        let (m, t) = model();
        let engine = EngineHandle::spawn(m, t, ecfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let state = AppState::new(config);
        if ready {
            state.set_engine(engine.clone()).expect("engine set once");
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            state,
            engine,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Install the engine (the model "finished loading").
    pub fn make_ready(&self) {
        self.state
            .set_engine(self.engine.clone())
            .expect("engine set once");
    }

    /// `http://127.0.0.1:PORT/v1`.
    pub fn v1(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Graceful shutdown; waits for the server task.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("server shut down in time")
                .expect("server task")
                .expect("serve result");
        }
    }

    /// Poll the engine until `kv_blocks_used` equals `want` (or fail after ~10 s).
    pub async fn wait_kv_blocks(&self, want: usize) {
        let mut last = usize::MAX;
        for _ in 0..200 {
            last = self.engine.stats().await.expect("stats").kv_blocks_used;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("kv_blocks_used stayed at {last}, expected {want}");
    }

    /// Poll the engine until nothing is in flight.
    pub async fn wait_idle(&self) {
        for _ in 0..200 {
            if self.engine.stats().await.expect("stats").in_flight == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("engine still busy");
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers (names lower-cased).
    pub headers: Vec<(String, String)>,
    /// Body (chunked encoding removed).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    /// Body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        sse_data(&self.text())
    }
}

/// The `data:` payloads of an SSE text.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|ev| {
            let lines: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect();
            (!lines.is_empty()).then(|| lines.join("\n"))
        })
        .collect()
}

/// Build a raw HTTP/1.1 request (`Connection: close`).
pub fn raw_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Send a request and read the whole response.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let s = TcpStream::connect(addr).await.expect("connect");
    let req = raw_request(method, path, headers, body);
    let (mut rd, mut wr) = s.into_split();
    // Write while reading: a server that answers early (413) may stop reading the body.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&req).await;
        wr
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    drop(writer.await);
    parse_response(&buf)
}

/// POST a JSON value.
pub async fn post_json(addr: SocketAddr, path: &str, body: &Value) -> HttpResponse {
    http(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await
}

/// GET a path.
pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http(addr, "GET", path, &[], b"").await
}

/// Parse a complete HTTP/1.1 response.
pub fn parse_response(buf: &[u8]) -> HttpResponse {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let raw = &buf[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_str = String::from_utf8_lossy(&raw[..eol]);
        let size =
            usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        raw = &raw[eol + 2..];
        if size == 0 || raw.len() < size {
            out.extend_from_slice(&raw[..size.min(raw.len())]);
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or(&[]);
    }
    out
}

/// Fail (never skip) when the Python clients are missing.
pub fn require_python_clients() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import moondream, openai"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "the Python clients `moondream` and `openai` are required by these tests: \
         run `pip install -r scripts/requirements-test.txt`"
    );
}

/// Run `tests/clients/<script>` with `args`; returns its stdout parsed as JSON.
pub fn run_python(script: &str, args: &[&str]) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let out = std::process::Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("{script} printed no JSON ({e}):\nstdout: {stdout}\nstderr: {stderr}")
    })
}

/// Compare JSON values; numbers compare as f64.
pub fn assert_json_eq(got: &Value, want: &Value, path: &str) {
    match (got, want) {
        (Value::Object(a), Value::Object(b)) => {
            let mut ka: Vec<_> = a.keys().collect();
            let mut kb: Vec<_> = b.keys().collect();
            ka.sort();
            kb.sort();
            assert_eq!(ka, kb, "{path}: keys differ\n got: {got}\nwant: {want}");
            for k in kb {
                assert_json_eq(&a[k], &b[k], &format!("{path}.{k}"));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(
                a.len(),
                b.len(),
                "{path}: lengths differ\n got: {got}\nwant: {want}"
            );
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_json_eq(x, y, &format!("{path}[{i}]"));
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            assert_eq!(a.as_f64(), b.as_f64(), "{path}: {a} vs {b}");
        }
        _ => assert_eq!(got, want, "{path}"),
    }
}

/// The value of a Prometheus sample line `name{labels} value` (labels matched exactly).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok()).flatten()
    })
}
