//! `crescent serve` as a process: graceful shutdown on SIGTERM (in-flight streams complete, new
//! connections are refused, exit code 0) and API-key authentication from `--api-key` and from
//! `CRESCENT_API_KEY`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/md3-tiny");

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `crescent serve` child process, killed on drop if still running.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crescent"));
        cmd.args(["serve", "--model", FIXTURE, "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--kv-cache-mb", "64"])
            .args(extra)
            .env_remove("CRESCENT_API_KEY")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("starting crescent serve");
        let s = Server {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        };
        let t0 = Instant::now();
        loop {
            if let Ok(r) = try_http(s.addr, "GET", "/health", &[], b"") {
                if r.status == 200 {
                    return s;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "server not ready in 60 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Wait for the process to exit (at most `limit`); its exit code.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code();
            }
            assert!(t0.elapsed() < limit, "server still running after {limit:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    let mut b = req.into_bytes();
    b.extend_from_slice(body);
    b
}

/// Read status line and headers; the reader is left at the body.
fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..i])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(n) = size.filter(|&n| n > 0) else {
            break;
        };
        let start = i + 2;
        let end = (start + n).min(b.len());
        out.extend_from_slice(&b[start..end]);
        b = &b[(end + 2).min(b.len())..];
    }
    out
}

fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(&request_bytes(method, path, headers, body))?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let mut body = Vec::new();
    r.read_to_end(&mut body)?;
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    try_http(addr, method, path, headers, body).expect("HTTP exchange")
}

fn image_uri(name: &str) -> String {
    use std::fmt::Write;
    let bytes = std::fs::read(format!("{FIXTURE}/images/{name}")).expect("fixture image");
    // Standard base64, written out here to keep the test free of extra dependencies.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::from("data:image/png;base64,");
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                let _ = s.write_char(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn sigterm_lets_in_flight_streams_finish_refuses_new_connections_and_exits_0() {
    // One row at a time: the long streams run one after the other, so that most of them are
    // still in flight (running or queued) well after the signal.
    let mut server = Server::start(&["--max-batch-size", "1"], &[]);
    let addr = server.addr;
    let images = [
        "rgba_640x480.png",
        "landscape_800x600.png",
        "gray_500x375.png",
        "tall_300x1400.png",
    ];
    let n_streams = 8;
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let streams: Vec<_> = (0..n_streams)
        .map(|i| {
            let body = json!({
                "image_url": image_uri(images[i % images.len()]),
                "length": "long",
                "stream": true,
                "settings": {"temperature": 0, "top_p": 1, "max_tokens": 500},
            })
            .to_string();
            let started_tx = started_tx.clone();
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(120))).ok();
                s.write_all(&request_bytes("POST", "/v1/caption", &[], body.as_bytes()))
                    .expect("send");
                let mut r = BufReader::new(s);
                let (status, _) = read_head(&mut r).expect("response head");
                let _ = started_tx.send(());
                let mut rest = Vec::new();
                r.read_to_end(&mut rest).expect("the whole stream");
                (
                    status,
                    String::from_utf8_lossy(&dechunk(&rest)).into_owned(),
                    Instant::now(),
                )
            })
        })
        .collect();
    // Every request is in (its response head arrived: the server holds all three).
    for _ in 0..n_streams {
        started_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("stream started");
    }
    let signalled = Instant::now();
    server.sigterm();
    // New connections are refused while the streams are still running.
    let refused_at = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Err(_) => break Instant::now(),
            Ok(_) => {
                assert!(
                    signalled.elapsed() < Duration::from_secs(5),
                    "still accepting connections 5 s after SIGTERM"
                );
                thread::sleep(Duration::from_millis(10));
            }
        }
    };
    let mut last_done = signalled;
    for t in streams {
        let (status, text, done_at) = t.join().expect("stream thread");
        assert_eq!(status, 200);
        let last = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .next_back()
            .unwrap_or_else(|| panic!("no events: {text}"));
        let v: Value = serde_json::from_str(last).unwrap_or_else(|_| panic!("{text}"));
        assert_eq!(v["completed"], true, "the stream completed: {last}");
        assert!(v.get("error").is_none(), "{last}");
        assert!(
            v["caption"].as_str().is_some_and(|c| !c.is_empty()),
            "{last}"
        );
        last_done = last_done.max(done_at);
    }
    eprintln!(
        "refused {:?} after SIGTERM; last stream done {:?} after SIGTERM",
        refused_at - signalled,
        last_done - signalled
    );
    assert!(
        refused_at < last_done,
        "connections were refused only after the streams ended"
    );
    assert_eq!(server.wait(Duration::from_secs(40)), Some(0), "exit code");
}

fn check_auth(addr: SocketAddr, key: &str) {
    // /health is open.
    let r = http(addr, "GET", "/health", &[], b"");
    assert_eq!(r.status, 200);
    let wrong = format!("{key}x");
    let bearer = format!("Bearer {key}");
    let wrong_bearer = format!("Bearer {wrong}");
    let query =
        json!({"question": "hi", "settings": {"max_tokens": 2, "temperature": 0}}).to_string();
    for (method, path, body) in [
        ("GET", "/v1/models", ""),
        ("GET", "/metrics", ""),
        ("POST", "/v1/query", query.as_str()),
        ("GET", "/v1/unknown", ""),
    ] {
        for headers in [
            vec![],
            vec![("X-Moondream-Auth", wrong.as_str())],
            vec![("Authorization", wrong_bearer.as_str())],
            vec![("Authorization", key)], // not a Bearer credential
        ] {
            let r = http(addr, method, path, &headers, body.as_bytes());
            assert_eq!(r.status, 401, "{method} {path} with {headers:?}");
            assert_eq!(r.json()["error"]["code"], "invalid_api_key");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
        if path == "/v1/unknown" {
            continue;
        }
        for headers in [
            vec![("X-Moondream-Auth", key)],
            vec![("Authorization", bearer.as_str())],
        ] {
            let r = http(addr, method, path, &headers, body.as_bytes());
            assert_eq!(r.status, 200, "{method} {path} with {headers:?}");
        }
    }
}

#[test]
fn api_key_from_the_flag_and_from_the_environment() {
    let flag = Server::start(&["--api-key", "s3cret-flag"], &[]);
    let env = Server::start(&[], &[("CRESCENT_API_KEY", "s3cret-env")]);
    check_auth(flag.addr, "s3cret-flag");
    check_auth(env.addr, "s3cret-env");
    // The flag's key is not the environment's.
    let r = http(
        env.addr,
        "GET",
        "/v1/models",
        &[("X-Moondream-Auth", "s3cret-flag")],
        b"",
    );
    assert_eq!(r.status, 401);
}
