//! Deterministic fuzzing of the request parsing and validation of every generation endpoint,
//! through the real router (`tower::ServiceExt::oneshot` on `crescent_server::router`) over a
//! real engine with the tiny fixture model.
//!
//! Bodies: JSON objects whose fields are absent, valid, edge values or random JSON of a random
//! type, with random extra keys; garbage (invalid UTF-8, truncated JSON, non-objects, deep
//! nesting, huge numbers and strings, lone surrogates, bodies over the limit). Every response
//! must be either a proper JSON error with a 4xx status (`{"error": {"message", "type",
//! "param", "code"}}`) or a 200 of the endpoint's exact shape (a complete SSE stream when
//! streaming) with no error inside — never a panic, never a 5xx. The nasty-image corpus
//! (`tests/corpus/`) goes through `/v1/caption` too. `FUZZ_SEED=<n>` reruns with another seed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request};
use common::*;
use crescent_engine::EngineHandle;
use crescent_server::{router, AppState, ServerConfig};
use serde_json::{json, Map, Value};
use tower::ServiceExt;

/// Small body limit so that the over-limit case is cheap.
const MAX_BODY: usize = 1 << 20;

fn state() -> AppState {
    let (m, t) = model();
    let engine = EngineHandle::spawn(m, t, engine_config());
    AppState::with_engine(
        ServerConfig {
            max_body_bytes: MAX_BODY,
            ..ServerConfig::default()
        },
        engine,
    )
}

/// Deterministic xorshift64*, with the share of valid field values of the case being built.
struct Rng {
    state: u64,
    valid_pct: usize,
}

impl Rng {
    fn new(seed: u64) -> Self {
        Rng {
            state: seed | 1,
            valid_pct: 50,
        }
    }
    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

fn seed(default: u64) -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// How many of [`image_urls`] are valid images (they come first).
const GOOD_URLS: usize = 5;

/// Image URLs: valid images (data URI, bare base64, URL-safe), broken ones and non-images.
fn image_urls() -> Vec<String> {
    use base64::Engine as _;
    let tiny = image_bytes("tiny_40x30.png");
    let square = image_bytes("square_378x378.png");
    let corpus = |n: &str| {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/corpus")
                .join(n),
        )
        .expect("corpus file")
    };
    // The first five are valid images.
    vec![
        data_uri("image/png", &tiny),
        data_uri("image/png", &square),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(&tiny),
        base64::engine::general_purpose::URL_SAFE.encode(&square),
        data_uri("image/jpeg", &corpus("ok_tiny_16x16.jpg")),
        data_uri("image/png", &corpus("toolarge_bomb_30000x30000.png")),
        data_uri("image/png", &corpus("bad_truncated_half.png")),
        data_uri("image/gif", &corpus("toolarge_gif_screen_65535x65535.gif")),
        "data:image/png;base64,!!!not base64!!!".into(),
        "data:image/png,notbase64encoded".into(),
        "data:;base64,".into(),
        "https://example.com/cat.png".into(),
        "aGVsbG8gd29ybGQ=".into(), // base64 of a non-image
        String::new(),
        "data:image/png;base64,".to_string() + &"A".repeat(5000),
    ]
}

/// An image URL: mostly a valid one in nearly-valid cases.
fn url(rng: &mut Rng, urls: &[String]) -> Value {
    if rng.valid_pct > 90 && rng.chance(90) {
        json!(urls[rng.below(GOOD_URLS)])
    } else {
        json!(rng.pick(urls))
    }
}

/// A random JSON value of a random type (`depth` bounds nesting).
fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(50)),
        2 => json!(rng.next() as i64),
        3 => json!((rng.next() as f64) / (rng.next() as f64 + 1.0) - 0.5),
        4 => json!(random_string(rng)),
        5 => json!(*rng.pick(&[0, 1, -1, 2, 1000])),
        6 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(4) {
                m.insert(random_string(rng), random_value(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

fn random_string(rng: &mut Rng) -> String {
    const PIECES: [&str; 12] = [
        "",
        "a",
        "car",
        "What is this?",
        " ",
        "\u{0}",
        "\u{feff}",
        "日本語",
        "🚗🚕",
        "\"quoted\"",
        "\\",
        "<|endoftext|>",
    ];
    let mut s = String::new();
    for _ in 0..rng.below(4) {
        s.push_str(PIECES[rng.below(PIECES.len())]);
    }
    s
}

/// Edge values of every type.
fn edge_value(rng: &mut Rng) -> Value {
    match rng.below(16) {
        0 => Value::Null,
        1 => json!(""),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(1.5),
        5 => json!(1e308),
        6 => json!(-1e308),
        7 => json!(u64::MAX),
        8 => json!(i64::MIN),
        9 => json!(usize::MAX as u64 - 1),
        10 => json!("x".repeat(100_000)),
        11 => json!(1e-320),
        12 => json!([[[[[[[[[[1]]]]]]]]]]),
        13 => json!({"nested": {"deeper": [1, {"x": null}]}}),
        14 => json!(true),
        _ => json!(9007199254740993u64),
    }
}

/// A field value: absent, a valid one from `valid` (`rng.valid_pct` percent of the time), an
/// edge value or a random one.
fn field(rng: &mut Rng, valid: impl FnOnce(&mut Rng) -> Value) -> Option<Value> {
    let roll = rng.below(100);
    let invalid = 100 - rng.valid_pct;
    if roll < invalid / 2 {
        Some(edge_value(rng))
    } else if roll < invalid {
        Some(random_value(rng, 3))
    } else if roll < invalid + (100 - invalid) / 4 {
        None
    } else {
        Some(valid(rng))
    }
}

fn valid_settings(rng: &mut Rng) -> Value {
    let mut m = Map::new();
    let put = |m: &mut Map<String, Value>, k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    };
    // Keep valid budgets small so that accepted requests stay cheap.
    let v = field(rng, |r| json!(*r.pick(&[0.0, 0.0, 0.5, 1.0, 2.0])));
    put(&mut m, "temperature", v);
    let v = field(rng, |r| json!(*r.pick(&[1.0, 0.9, 0.5, 0.01])));
    put(&mut m, "top_p", v);
    let v = Some(field(rng, |r| json!(1 + r.below(6))).unwrap_or(json!(1 + rng.below(6))));
    put(&mut m, "max_tokens", v);
    let v = field(rng, |r| json!(1 + r.below(3)));
    put(&mut m, "max_objects", v);
    let v = field(rng, |r| json!(r.next() >> 1));
    put(&mut m, "seed", v);
    Value::Object(m)
}

fn spatial_refs(rng: &mut Rng) -> Value {
    let mut refs = Vec::new();
    for _ in 0..rng.below(3) {
        refs.push(if rng.chance(50) {
            json!([0.25, 0.5])
        } else {
            json!([0.1, 0.2, 0.6, 0.9])
        });
    }
    if rng.chance(20) {
        refs.push(edge_value(rng));
    }
    Value::Array(refs)
}

/// A request object for a Moondream endpoint.
fn moondream_body(rng: &mut Rng, endpoint: &str, urls: &[String]) -> Value {
    let mut m = Map::new();
    let put = |m: &mut Map<String, Value>, k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    };
    let img = field(rng, |r| url(r, urls));
    put(&mut m, "image_url", img);
    match endpoint {
        "/v1/query" => {
            let v = field(rng, |r| json!(random_string(r) + "?"));
            put(&mut m, "question", v);
            let v = field(rng, |r| json!(r.chance(30)));
            put(&mut m, "reasoning", v);
            let v = field(rng, spatial_refs);
            put(&mut m, "spatial_refs", v);
            let v = field(rng, |r| json!(r.chance(50)));
            put(&mut m, "stream", v);
        }
        "/v1/caption" => {
            let v = field(
                rng,
                |r| json!(*r.pick(&["short", "normal", "long", "huge"])),
            );
            put(&mut m, "length", v);
            let v = field(rng, |r| json!(r.chance(50)));
            put(&mut m, "stream", v);
        }
        "/v1/detect" | "/v1/point" => {
            let v = field(rng, |r| json!(*r.pick(&["car", "tree", "", "the red 🚗"])));
            put(&mut m, "object", v);
            let v = field(rng, |r| json!(1 + r.below(3)));
            put(&mut m, "max_objects", v);
            if endpoint == "/v1/point" {
                let v = field(rng, spatial_refs);
                put(&mut m, "spatial_refs", v);
            }
        }
        _ => unreachable!(),
    }
    // Settings are present (and valid-ish) most of the time to keep budgets small.
    let v = if rng.chance(85) {
        Some(valid_settings(rng))
    } else {
        field(rng, valid_settings)
    };
    put(&mut m, "settings", v);
    for _ in 0..rng.below(3) {
        m.insert(random_string(rng) + "_extra", random_value(rng, 2));
    }
    Value::Object(m)
}

fn chat_content(rng: &mut Rng, urls: &[String]) -> Value {
    if rng.chance(30) {
        return json!(random_string(rng) + "?");
    }
    let mut parts = Vec::new();
    let n = if rng.valid_pct > 90 {
        1 + rng.below(3)
    } else {
        rng.below(4)
    };
    for _ in 0..n {
        let kinds = if rng.valid_pct > 90 { 4 } else { 6 };
        parts.push(match rng.below(kinds) {
            0 | 1 => json!({"type": "text", "text": random_string(rng) + "?"}),
            2 => json!({"type": "image_url", "image_url": {"url": url(rng, urls)}}),
            3 => json!({"type": "image_url", "image_url": url(rng, urls)}),
            4 => json!({"type": *rng.pick(&["input_audio", "file", "text"]), "text": random_value(rng, 1)}),
            _ => random_value(rng, 2),
        });
    }
    Value::Array(parts)
}

/// A request object for `/v1/chat/completions`.
fn chat_body(rng: &mut Rng, urls: &[String]) -> Value {
    let mut m = Map::new();
    let put = |m: &mut Map<String, Value>, k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    };
    let msgs = field(rng, |r| {
        let mut msgs = Vec::new();
        for _ in 0..1 + r.below(3) {
            let role = *r.pick(&["user", "user", "system", "assistant", "developer", "robot"]);
            let mut msg = json!({"role": role, "content": chat_content(r, urls)});
            if r.chance(5) {
                msg = random_value(r, 2);
            }
            msgs.push(msg);
        }
        Value::Array(msgs)
    });
    put(&mut m, "messages", msgs);
    put(&mut m, "model", Some(json!("moondream3")));
    let v = Some(field(rng, |r| json!(1 + r.below(6))).unwrap_or(json!(1 + rng.below(6))));
    put(
        &mut m,
        if rng.chance(50) {
            "max_tokens"
        } else {
            "max_completion_tokens"
        },
        v,
    );
    let v = field(rng, |r| json!(*r.pick(&[0.0, 0.7])));
    put(&mut m, "temperature", v);
    let v = field(rng, |r| json!(*r.pick(&[1.0, 0.5])));
    put(&mut m, "top_p", v);
    let v = field(rng, |r| json!(r.below(100)));
    put(&mut m, "seed", v);
    let v = field(rng, |r| json!(*r.pick(&[1, 1, 2])));
    put(&mut m, "n", v);
    let v = field(rng, |r| json!(r.chance(50)));
    put(&mut m, "stream", v);
    let v = field(rng, |r| json!({"include_usage": r.chance(50)}));
    put(&mut m, "stream_options", v);
    let v = field(rng, |r| json!(r.chance(20)));
    put(&mut m, "reasoning", v);
    let v = field(rng, |r| {
        json!({
            "moondream3_task": *r.pick(&["query", "caption", "detect", "point", "segment"]),
            "moondream3_max_objects": 1 + r.below(3),
            "moondream3_length": *r.pick(&["short", "normal", "tiny"]),
        })
    });
    put(&mut m, "vllm_xargs", v);
    for _ in 0..rng.below(3) {
        m.insert(random_string(rng) + "_extra", random_value(rng, 2));
    }
    Value::Object(m)
}

/// Bodies that are not a well-formed JSON object.
fn garbage_body(rng: &mut Rng, valid: &Value) -> Vec<u8> {
    let text = valid.to_string();
    match rng.below(14) {
        0 => Vec::new(),
        1 => b"   \n\t ".to_vec(),
        2 => {
            let cut = rng.below(text.len().max(1));
            text.as_bytes()[..cut].to_vec()
        }
        3 => {
            // Invalid UTF-8 inside a string and outside.
            let mut b = br#"{"question": "caf"#.to_vec();
            b.extend([0xc3, 0x28, 0xff, 0xfe]);
            b.extend(br#"", "image_url": "x"}"#);
            b
        }
        4 => vec![0xff; 1 + rng.below(64)],
        5 => (*rng.pick(&["[]", "null", "42", "\"string\"", "true", "[{}]"]))
            .as_bytes()
            .to_vec(),
        6 => format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        7 => {
            let mut s = String::new();
            for _ in 0..5000 {
                s.push_str("{\"a\":");
            }
            s.push('1');
            s.push_str(&"}".repeat(5000));
            s.into_bytes()
        }
        8 => format!(
            r#"{{"question": "q", "settings": {{"max_tokens": 1{}}}}}"#,
            "0".repeat(400)
        )
        .into_bytes(),
        9 => br#"{"question": "\ud800", "settings": {"temperature": 1e999}}"#.to_vec(),
        10 => format!(r#"{{"question": "{}"}}"#, "q".repeat(MAX_BODY + 1)).into_bytes(),
        11 => {
            // Random bytes flipped in a valid body.
            let mut b = text.into_bytes();
            for _ in 0..1 + rng.below(4) {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
            }
            b
        }
        12 => {
            // Duplicate keys, trailing data, comments.
            let mut b = text.into_bytes();
            b.extend(b" {}");
            b
        }
        _ => br#"{"question": "q", "question": 5} // comment"#.to_vec(),
    }
}

#[derive(Debug)]
struct Case {
    method: &'static str,
    path: &'static str,
    body: Vec<u8>,
    /// What the body asked for, when it is a JSON object.
    json: Option<Value>,
}

fn gen_case(rng: &mut Rng, urls: &[String]) -> Case {
    const POSTS: [&str; 5] = [
        "/v1/query",
        "/v1/caption",
        "/v1/detect",
        "/v1/point",
        "/v1/chat/completions",
    ];
    if rng.chance(3) {
        let (method, path) = *rng.pick(&[
            ("GET", "/v1/query"),
            ("GET", "/v1/models"),
            ("GET", "/v1/models/moondream3"),
            ("GET", "/v1/models/gpt-4"),
            ("POST", "/v1/nope"),
            ("DELETE", "/v1/chat/completions"),
            ("GET", "/health"),
        ]);
        return Case {
            method,
            path,
            body: Vec::new(),
            json: None,
        };
    }
    let path = *rng.pick(&POSTS);
    // Half the cases are nearly valid (they reach the engine), half are chaos.
    rng.valid_pct = if rng.chance(50) { 96 } else { 50 };
    let v = if path == "/v1/chat/completions" {
        chat_body(rng, urls)
    } else {
        moondream_body(rng, path, urls)
    };
    if rng.chance(15) {
        Case {
            method: "POST",
            path,
            body: garbage_body(rng, &v),
            json: None,
        }
    } else {
        Case {
            method: "POST",
            path,
            body: v.to_string().into_bytes(),
            json: Some(v),
        }
    }
}

/// Check one response; returns a label for the histogram.
fn check_response(case: &Case, status: u16, content_type: &str, body: &[u8]) -> String {
    let ctx = || {
        format!(
            "{} {} body {} -> {status} {}",
            case.method,
            case.path,
            String::from_utf8_lossy(&case.body[..case.body.len().min(600)]),
            String::from_utf8_lossy(&body[..body.len().min(600)])
        )
    };
    assert!(
        status < 500,
        "server error (a bug: nothing here is overload): {}",
        ctx()
    );
    if status != 200 {
        assert!((400..500).contains(&status), "{}", ctx());
        assert!(content_type.starts_with("application/json"), "{}", ctx());
        let v: Value = serde_json::from_slice(body).unwrap_or_else(|_| panic!("{}", ctx()));
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            ctx()
        );
        assert!(e["type"].is_string() && e["code"].is_string(), "{}", ctx());
        assert!(e["param"].is_null() || e["param"].is_string(), "{}", ctx());
        return format!("{status} {}", e["code"].as_str().unwrap_or(""));
    }
    match case.path {
        "/v1/models" | "/v1/models/moondream3" | "/health" => return "200 get".into(),
        _ => {}
    }
    if content_type.starts_with("text/event-stream") {
        let text = String::from_utf8_lossy(body);
        let events = sse_data(&text);
        assert!(!events.is_empty(), "empty stream: {}", ctx());
        if case.path == "/v1/chat/completions" {
            assert_eq!(
                events.last().map(String::as_str),
                Some("[DONE]"),
                "{}",
                ctx()
            );
            for ev in &events[..events.len() - 1] {
                let v: Value = serde_json::from_str(ev).unwrap_or_else(|_| panic!("{}", ctx()));
                assert!(v.get("error").is_none(), "error inside a 200: {}", ctx());
                assert_eq!(v["object"], "chat.completion.chunk", "{}", ctx());
            }
            let finish = events
                .iter()
                .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                .filter_map(|v| v["choices"][0]["finish_reason"].as_str().map(String::from))
                .collect::<Vec<_>>();
            assert_eq!(finish.len(), 1, "one finish_reason: {}", ctx());
        } else {
            let (last, chunks) = events.split_last().unwrap_or_else(|| panic!("{}", ctx()));
            let mut text = String::new();
            for ev in chunks {
                let v: Value = serde_json::from_str(ev).unwrap_or_else(|_| panic!("{}", ctx()));
                text.push_str(v["chunk"].as_str().unwrap_or_else(|| panic!("{}", ctx())));
            }
            let v: Value = serde_json::from_str(last).unwrap_or_else(|_| panic!("{}", ctx()));
            assert!(v.get("error").is_none(), "error inside a 200: {}", ctx());
            assert_eq!(v["completed"], true, "{}", ctx());
            let key = if case.path == "/v1/query" {
                "answer"
            } else {
                "caption"
            };
            assert_eq!(v[key].as_str(), Some(text.as_str()), "chunks: {}", ctx());
        }
        return "200 stream".into();
    }
    assert!(content_type.starts_with("application/json"), "{}", ctx());
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|_| panic!("{}", ctx()));
    assert!(v.get("error").is_none(), "error inside a 200: {}", ctx());
    let unit = |x: &Value| x.as_f64().is_some_and(|f| (0.0..=1.0).contains(&f));
    match case.path {
        "/v1/query" => assert!(v["answer"].is_string(), "{}", ctx()),
        "/v1/caption" => assert!(v["caption"].is_string(), "{}", ctx()),
        "/v1/detect" => {
            for o in v["objects"]
                .as_array()
                .unwrap_or_else(|| panic!("{}", ctx()))
            {
                for k in ["x_min", "y_min", "x_max", "y_max"] {
                    assert!(unit(&o[k]), "{}", ctx());
                }
            }
        }
        "/v1/point" => {
            for p in v["points"]
                .as_array()
                .unwrap_or_else(|| panic!("{}", ctx()))
            {
                assert!(unit(&p["x"]) && unit(&p["y"]), "{}", ctx());
            }
        }
        "/v1/chat/completions" => {
            assert_eq!(v["object"], "chat.completion", "{}", ctx());
            assert!(
                v["choices"][0]["message"]["content"].is_string(),
                "{}",
                ctx()
            );
            assert!(v["usage"]["total_tokens"].is_u64(), "{}", ctx());
        }
        _ => {}
    }
    if case.path != "/v1/chat/completions" {
        assert!(v["request_id"].is_string(), "{}", ctx());
    }
    let finish = if case.path == "/v1/chat/completions" {
        &v["choices"][0]["finish_reason"]
    } else {
        &v["finish_reason"]
    };
    assert!(
        finish == "stop" || finish == "length",
        "finish_reason: {}",
        ctx()
    );
    "200".into()
}

async fn send(app: axum::Router, case: &Case) -> (u16, String, Vec<u8>) {
    let req = Request::builder()
        .method(case.method)
        .uri(case.path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(case.body.clone()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(120), app.oneshot(req))
        .await
        .unwrap_or_else(|_| panic!("no response in 120 s: {case:?}"))
        .expect("infallible");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = tokio::time::timeout(
        Duration::from_secs(120),
        axum::body::to_bytes(resp.into_body(), 64 << 20),
    )
    .await
    .unwrap_or_else(|_| panic!("body not complete in 120 s: {} {}", case.method, case.path))
    .expect("body");
    (status, ct, body.to_vec())
}

#[test]
fn fuzz_request_bodies_through_the_router() {
    let rt = runtime();
    rt.block_on(async {
        let state = state();
        let app = router(state.clone());
        let urls = image_urls();
        let seed0 = seed(0x5e77_1e55_f022);
        let mut rng = Rng::new(seed0);
        let n_cases = 1200;
        let cases: Vec<Case> = (0..n_cases).map(|_| gen_case(&mut rng, &urls)).collect();
        let mut hist: BTreeMap<String, usize> = BTreeMap::new();
        // A few at a time, as concurrent clients: the engine batches the accepted ones.
        for (k, batch) in cases.chunks(8).enumerate() {
            let mut set = tokio::task::JoinSet::new();
            for (j, case) in batch.iter().enumerate() {
                let app = app.clone();
                let case = Case {
                    method: case.method,
                    path: case.path,
                    body: case.body.clone(),
                    json: case.json.clone(),
                };
                set.spawn(async move {
                    let (status, ct, body) = send(app, &case).await;
                    (k * 8 + j, check_response(&case, status, &ct, &body))
                });
            }
            while let Some(r) = set.join_next().await {
                match r {
                    Ok((_, label)) => *hist.entry(label).or_insert(0) += 1,
                    Err(e) if e.is_panic() => {
                        std::panic::resume_unwind(e.into_panic());
                    }
                    Err(e) => panic!("task failed: {e}"),
                }
            }
        }
        eprintln!("fuzz seed {seed0:#x}: {n_cases} cases: {hist:#?}");
        let ok: usize = hist
            .iter()
            .filter(|(k, _)| k.starts_with("200"))
            .map(|(_, n)| n)
            .sum();
        assert!(
            ok >= 50,
            "too few accepted requests ({ok}): the generator is off"
        );
        assert!(hist.len() >= 15, "too few distinct outcomes: {hist:?}");
        // Nothing leaked: the engine is idle and only the prefix cache holds KV blocks.
        let engine = state.engine().expect("engine");
        for _ in 0..200 {
            if engine.stats().await.expect("stats").in_flight == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let m = engine.metrics();
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(engine.stats().await.expect("stats").in_flight, 0);
        assert_eq!(
            m.kv_blocks_used.load(Relaxed),
            m.prefix_cache_blocks.load(Relaxed)
        );
    });
}

#[test]
fn corpus_images_through_the_api() {
    let rt = runtime();
    rt.block_on(async {
        let app = router(state());
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/corpus");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("tests/corpus")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("ok_") || n.starts_with("bad_") || n.starts_with("toolarge_"))
            .collect();
        names.sort();
        for name in names {
            let bytes = std::fs::read(dir.join(&name)).expect("corpus file");
            let body = json!({
                "image_url": data_uri("image/png", &bytes),
                "settings": {"max_tokens": 1},
            });
            let case = Case {
                method: "POST",
                path: "/v1/caption",
                body: body.to_string().into_bytes(),
                json: Some(body),
            };
            let (status, ct, resp) = send(app.clone(), &case).await;
            let label = check_response(&case, status, &ct, &resp);
            let want = match name.split('_').next() {
                Some("ok") => "200",
                Some("toolarge") => "413 image_too_large",
                _ if name == "bad_empty.bin" => "400 invalid_base64",
                _ => "400 invalid_image",
            };
            assert_eq!(label, want, "{name}");
        }
    });
}

#[test]
fn huge_budgets_do_not_kill_the_engine() {
    // `max_tokens` / `max_objects` up to u64::MAX used to overflow `prompt_len + max_new_tokens`
    // on the engine thread, killing it (every later request: 503).
    let rt = runtime();
    rt.block_on(async {
        let app = router(state());
        let img = data_uri("image/png", &image_bytes("tiny_40x30.png"));
        let bodies = [
            (
                "/v1/query",
                json!({"question": "hi", "settings": {"max_tokens": u64::MAX, "temperature": 0}}),
            ),
            (
                "/v1/point",
                json!({"image_url": img, "object": "car", "settings": {"max_tokens": u64::MAX}}),
            ),
            (
                "/v1/detect",
                json!({"image_url": img, "object": "car", "max_objects": u64::MAX}),
            ),
            (
                "/v1/point",
                json!({"image_url": img, "object": "car", "settings": {"max_objects": u64::MAX}}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": u64::MAX, "temperature": 0}),
            ),
            (
                "/v1/caption",
                json!({"image_url": img, "settings": {"max_tokens": 2}}),
            ),
        ];
        for (path, body) in bodies {
            let case = Case {
                method: "POST",
                path,
                body: body.to_string().into_bytes(),
                json: Some(body),
            };
            let (status, ct, resp) = send(app.clone(), &case).await;
            let label = check_response(&case, status, &ct, &resp);
            assert_eq!(label, "200", "{path}");
        }
    });
}
