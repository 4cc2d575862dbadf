//! Plain HTTP against a real server: response shapes, every error status, auth, readiness,
//! timeouts, `/health`, `/v1/models` and `/metrics`.

mod common;

use std::time::Duration;

use common::*;
use crescent_engine::EngineConfig;
use crescent_server::ServerConfig;
use serde_json::{json, Value};

const LIMIT: usize = 2 << 20;

fn config() -> ServerConfig {
    ServerConfig {
        max_body_bytes: LIMIT,
        ..ServerConfig::default()
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc_in = kind.to_vec();
    crc_in.extend_from_slice(data);
    out.extend_from_slice(&crc32(&crc_in).to_be_bytes());
    out
}

/// A PNG whose header claims `w`×`h` pixels (and carries no real pixel data).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// Check an error response: status, JSON body shape, code, and that the message names `field`.
fn expect_error(r: &HttpResponse, status: u16, code: &str, field: Option<&str>) -> Value {
    assert_eq!(r.status, status, "status; body: {}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "JSON content type: {:?}",
        r.headers
    );
    let v = r.json();
    let e = &v["error"];
    assert_eq!(e["code"], code, "code; body: {v}");
    assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
    if let Some(f) = field {
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains(f)),
            "message names `{f}`: {v}"
        );
        assert_eq!(e["param"], f, "param: {v}");
    }
    v
}

#[test]
fn responses_and_client_errors() {
    let rt = runtime();
    rt.block_on(async {
        let s = TestServer::start(config(), true).await;
        let a = s.addr;
        let img = data_uri("image/png", &image_bytes("tiny_40x30.png"));

        // Health and models.
        let r = get(a, "/health").await;
        assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
        let r = get(a, "/v1/models").await;
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "moondream3");
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(get(a, "/v1/models/moondream3").await.status, 200);
        expect_error(&get(a, "/v1/models/gpt-4").await, 404, "model_not_found", None);

        // A successful query carries request_id, finish_reason and metrics.
        let body = json!({"image_url": img, "question": "What is it?", "model": "x",
                          "settings": {"temperature": 0, "max_tokens": 8}});
        let r = post_json(a, "/v1/query", &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert!(v["answer"].is_string());
        assert!(v.get("reasoning").is_none(), "reasoning absent means off");
        let rid = v["request_id"].as_str().expect("request_id");
        assert_eq!(rid.len(), 36);
        assert!(matches!(v["finish_reason"].as_str(), Some("stop" | "length")));
        for k in [
            "input_tokens",
            "output_tokens",
            "cached_tokens",
            "queue_ms",
            "prefill_ms",
            "decode_ms",
            "total_ms",
        ] {
            assert!(v["metrics"][k].is_number(), "metrics.{k}: {v}");
        }
        assert_eq!(v["metrics"]["cached_tokens"], 0);
        // Same image again: prefix-cache hit, unique request id.
        let r = post_json(a, "/v1/query", &body).await;
        let v2 = r.json();
        assert_eq!(v2["answer"], v["answer"]);
        assert_eq!(v2["metrics"]["cached_tokens"], 730);
        assert_ne!(v2["request_id"], v["request_id"]);
        // Bare base64 works too.
        let bare = img.split_once(',').map(|(_, b)| b.to_string()).unwrap_or_default();
        let r = post_json(
            a,
            "/v1/detect",
            &json!({"image_url": bare, "object": "car", "settings": {"max_objects": 2}}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.json()["objects"].is_array());

        // 400: malformed JSON, wrong body type, missing / wrong-typed fields.
        let r = http(a, "POST", "/v1/query", &[("Content-Type", "application/json")], b"{\"question\": ").await;
        expect_error(&r, 400, "invalid_json", None);
        let r = http(a, "POST", "/v1/query", &[], b"[1, 2]").await;
        expect_error(&r, 400, "invalid_json", None);
        let r = http(a, "POST", "/v1/query", &[], b"").await;
        expect_error(&r, 400, "invalid_json", None);
        expect_error(&post_json(a, "/v1/query", &json!({})).await, 400, "missing_field", Some("question"));
        expect_error(&post_json(a, "/v1/query", &json!({"question": 5})).await, 400, "invalid_type", Some("question"));
        expect_error(&post_json(a, "/v1/caption", &json!({})).await, 400, "missing_field", Some("image_url"));
        expect_error(&post_json(a, "/v1/detect", &json!({"image_url": img})).await, 400, "missing_field", Some("object"));
        expect_error(&post_json(a, "/v1/query", &json!({"question": "q", "stream": "yes"})).await, 400, "invalid_type", Some("stream"));
        expect_error(&post_json(a, "/v1/query", &json!({"question": "q", "settings": 3})).await, 400, "invalid_type", Some("settings"));
        expect_error(
            &post_json(a, "/v1/query", &json!({"question": "q", "settings": {"temperature": "hot"}})).await,
            400, "invalid_type", Some("settings.temperature"),
        );
        expect_error(
            &post_json(a, "/v1/point", &json!({"image_url": img, "object": "x", "spatial_refs": [["a", "b"]]})).await,
            400, "invalid_type", Some("spatial_refs[0]"),
        );
        // 400: bad base64, not an image.
        expect_error(
            &post_json(a, "/v1/caption", &json!({"image_url": "data:image/png;base64,@@@not-base64@@@"})).await,
            400, "invalid_base64", Some("image_url"),
        );
        expect_error(
            &post_json(a, "/v1/caption", &json!({"image_url": data_uri("image/png", b"definitely not an image")})).await,
            400, "invalid_image", Some("image_url"),
        );
        expect_error(
            &post_json(a, "/v1/caption", &json!({"image_url": "https://example.com/cat.png"})).await,
            400, "invalid_image_url", Some("image_url"),
        );

        // 413: body over the limit; image header announcing 100000×100000.
        let big = json!({"question": "q", "pad": "x".repeat(LIMIT + 1024)});
        expect_error(&post_json(a, "/v1/query", &big).await, 413, "body_too_large", None);
        expect_error(
            &post_json(a, "/v1/caption", &json!({"image_url": data_uri("image/png", &png_claiming(100_000, 100_000))})).await,
            413, "image_too_large", Some("image_url"),
        );

        // 422: settings, spatial refs, caption length, and their OpenAI counterparts.
        let q = |settings: Value| json!({"image_url": img, "question": "q", "settings": settings});
        expect_error(&post_json(a, "/v1/query", &q(json!({"temperature": -1}))).await, 422, "invalid_setting", Some("settings.temperature"));
        expect_error(&post_json(a, "/v1/query", &q(json!({"top_p": 0}))).await, 422, "invalid_setting", Some("settings.top_p"));
        expect_error(&post_json(a, "/v1/query", &q(json!({"top_p": 1.5}))).await, 422, "invalid_setting", Some("settings.top_p"));
        expect_error(&post_json(a, "/v1/query", &q(json!({"max_tokens": 0}))).await, 422, "invalid_setting", Some("settings.max_tokens"));
        expect_error(&post_json(a, "/v1/query", &q(json!({"max_tokens": -3}))).await, 422, "invalid_setting", Some("settings.max_tokens"));
        expect_error(&post_json(a, "/v1/query", &q(json!({"seed": 1.5}))).await, 422, "invalid_setting", Some("settings.seed"));
        expect_error(
            &post_json(a, "/v1/detect", &json!({"image_url": img, "object": "x", "settings": {"max_objects": 0}})).await,
            422, "invalid_setting", Some("settings.max_objects"),
        );
        expect_error(
            &post_json(a, "/v1/point", &json!({"image_url": img, "object": "x", "spatial_refs": [[0.5]]})).await,
            422, "invalid_spatial_ref", Some("spatial_refs[0]"),
        );
        expect_error(
            &post_json(a, "/v1/query", &json!({"image_url": img, "question": "q", "spatial_refs": [[0.1, 0.1], [0.9, 0.2, 0.1, 0.3]]})).await,
            422, "invalid_spatial_ref", Some("spatial_refs[1]"),
        );
        expect_error(
            &post_json(a, "/v1/query", &json!({"image_url": img, "question": "q", "spatial_refs": [[1.5, 0.2]]})).await,
            422, "invalid_spatial_ref", Some("spatial_refs[0]"),
        );
        expect_error(
            &post_json(a, "/v1/caption", &json!({"image_url": img, "length": "epic"})).await,
            422, "invalid_value", Some("length"),
        );
        expect_error(&post_json(a, "/v1/query", &json!({"question": "   "})).await, 422, "invalid_request", None);
        let chat = |extra: Value| {
            let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
                m.extend(e);
            }
            v
        };
        expect_error(&post_json(a, "/v1/chat/completions", &chat(json!({"temperature": -1}))).await, 422, "invalid_setting", Some("temperature"));
        expect_error(&post_json(a, "/v1/chat/completions", &chat(json!({"top_p": 2}))).await, 422, "invalid_setting", Some("top_p"));
        expect_error(&post_json(a, "/v1/chat/completions", &chat(json!({"max_tokens": 0}))).await, 422, "invalid_setting", Some("max_tokens"));
        expect_error(&post_json(a, "/v1/chat/completions", &chat(json!({"max_completion_tokens": 0}))).await, 422, "invalid_setting", Some("max_completion_tokens"));
        expect_error(
            &post_json(a, "/v1/chat/completions", &chat(json!({"vllm_xargs": {"moondream3_task": "detect", "moondream3_max_objects": 0}}))).await,
            422, "invalid_setting", Some("vllm_xargs.moondream3_max_objects"),
        );
        expect_error(
            &post_json(a, "/v1/chat/completions", &chat(json!({"vllm_xargs": {"moondream3_task": "segment"}}))).await,
            422, "invalid_value", Some("vllm_xargs.moondream3_task"),
        );
        expect_error(
            &post_json(a, "/v1/chat/completions", &json!({"messages": [{"role": "system", "content": "x"}]})).await,
            422, "invalid_value", Some("messages"),
        );
        expect_error(&post_json(a, "/v1/chat/completions", &json!({})).await, 400, "missing_field", Some("messages"));
        expect_error(
            &post_json(a, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": [{"type": "audio"}]}]})).await,
            400, "unsupported_content", Some("messages[0].content[0].type"),
        );

        // 404 / 405 with JSON bodies.
        expect_error(&get(a, "/nope").await, 404, "not_found", None);
        expect_error(&post_json(a, "/v1/segment", &json!({})).await, 404, "not_found", None);
        expect_error(&get(a, "/v1/query").await, 405, "method_not_allowed", None);
        expect_error(&http(a, "POST", "/health", &[], b"").await, 405, "method_not_allowed", None);
        expect_error(&http(a, "DELETE", "/v1/models", &[], b"").await, 405, "method_not_allowed", None);

        // Chat: non-streaming shape, streaming shape with usage and [DONE].
        let r = post_json(
            a,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": img}}]}],
                "temperature": 0, "max_tokens": 6, "seed": 7}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert!(v["choices"][0]["message"]["content"].is_string());
        assert!(v["usage"]["total_tokens"].is_number());
        let r = post_json(
            a,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": img}}]}],
                "temperature": 0, "max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")));
        let data = r.sse_data();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let evs: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).expect("chunk JSON"))
            .collect();
        assert!(evs.iter().all(|e| e["object"] == "chat.completion.chunk"));
        assert_eq!(evs[0]["choices"][0]["delta"]["role"], "assistant");
        let usage = evs.last().expect("usage chunk");
        assert_eq!(usage["choices"], json!([]));
        assert!(usage["usage"]["prompt_tokens"].is_number());
        let fin = &evs[evs.len() - 2];
        assert!(fin["choices"][0]["finish_reason"].is_string());

        // Streamed detect through chat: the JSON result arrives as one content delta.
        let r = post_json(
            a,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "car"}]}],
                "stream": true, "vllm_xargs": {"moondream3_task": "detect", "moondream3_max_objects": 2}}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let content: String = r
            .sse_data()
            .iter()
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| {
                let v: Value = serde_json::from_str(d).expect("chunk JSON");
                v["choices"][0]["delta"]["content"].as_str().map(String::from)
            })
            .collect();
        let objects: Value = serde_json::from_str(&content).expect("detect JSON");
        assert!(objects["objects"].is_array(), "{objects}");

        // Moondream streaming format: chunks, then one completed event with the full result.
        let r = post_json(
            a,
            "/v1/caption",
            &json!({"image_url": img, "stream": true, "settings": {"temperature": 0, "max_tokens": 12}}),
        )
        .await;
        assert_eq!(r.status, 200);
        let evs: Vec<Value> = r
            .sse_data()
            .iter()
            .map(|d| serde_json::from_str(d).expect("event JSON"))
            .collect();
        let (last, chunks) = evs.split_last().expect("events");
        assert_eq!(last["completed"], true);
        assert!(last.get("chunk").is_none());
        let text: String = chunks
            .iter()
            .map(|c| c["chunk"].as_str().expect("chunk"))
            .collect();
        assert_eq!(last["caption"], text);
        assert!(last["request_id"].is_string());
        assert!(last["metrics"]["output_tokens"].is_number());

        // /metrics: engine and HTTP series.
        let r = get(a, "/metrics").await;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/plain")));
        let m = r.text();
        for name in [
            "crescent_requests_total",
            "crescent_queue_depth",
            "crescent_running_batch_size",
            "crescent_tokens_in_total",
            "crescent_tokens_out_total",
            "crescent_ttft_seconds_bucket",
            "crescent_request_latency_seconds_count",
            "crescent_kv_blocks_used",
            "crescent_kv_blocks_free",
            "crescent_prefix_cache_hits_total",
            "crescent_http_responses_total",
            "crescent_http_client_disconnects_total",
        ] {
            assert!(m.contains(name), "metric {name} missing:\n{m}");
        }
        assert!(metric(&m, "crescent_prefix_cache_hits_total").unwrap_or(0.0) >= 1.0, "{m}");
        assert!(metric(&m, "crescent_requests_total{skill=\"query\",status=\"ok\"}").unwrap_or(0.0) >= 2.0);
        assert!(metric(&m, "crescent_http_responses_total{endpoint=\"/v1/query\",status=\"400\"}").unwrap_or(0.0) >= 1.0);
        assert!(metric(&m, "crescent_http_responses_total{endpoint=\"/v1/query\",status=\"422\"}").unwrap_or(0.0) >= 1.0);
        assert_eq!(metric(&m, "crescent_http_client_disconnects_total"), Some(0.0));
        s.stop().await;
    });
}

#[test]
fn auth() {
    let rt = runtime();
    rt.block_on(async {
        let cfg = ServerConfig {
            api_key: Some("s3cret-key".into()),
            ..config()
        };
        let s = TestServer::start(cfg, true).await;
        let a = s.addr;
        let body = json!({"question": "hi", "settings": {"max_tokens": 2}}).to_string();
        let post = |headers: Vec<(&'static str, &'static str)>| {
            let body = body.clone();
            async move { http(a, "POST", "/v1/query", &headers, body.as_bytes()).await }
        };
        assert_eq!(get(a, "/health").await.status, 200, "/health needs no key");
        expect_error(&post(vec![]).await, 401, "invalid_api_key", None);
        expect_error(
            &post(vec![("X-Moondream-Auth", "wrong")]).await,
            401,
            "invalid_api_key",
            None,
        );
        expect_error(
            &post(vec![("Authorization", "Bearer s3cret-ke")]).await,
            401,
            "invalid_api_key",
            None,
        );
        expect_error(
            &post(vec![("Authorization", "Basic s3cret-key")]).await,
            401,
            "invalid_api_key",
            None,
        );
        expect_error(&get(a, "/metrics").await, 401, "invalid_api_key", None);
        expect_error(&get(a, "/v1/models").await, 401, "invalid_api_key", None);
        assert_eq!(
            post(vec![("X-Moondream-Auth", "s3cret-key")]).await.status,
            200
        );
        assert_eq!(
            post(vec![("Authorization", "Bearer s3cret-key")])
                .await
                .status,
            200
        );
        let r = http(
            a,
            "GET",
            "/v1/models",
            &[("Authorization", "Bearer s3cret-key")],
            b"",
        )
        .await;
        assert_eq!(r.status, 200);
        s.stop().await;
    });
}

#[test]
fn not_ready_until_engine_installed() {
    let rt = runtime();
    rt.block_on(async {
        let s = TestServer::start(config(), false).await;
        let a = s.addr;
        let r = get(a, "/health").await;
        assert_eq!((r.status, r.json()), (503, json!({"status": "loading"})));
        let q = json!({"question": "hi", "settings": {"max_tokens": 2}});
        let r = post_json(a, "/v1/query", &q).await;
        expect_error(&r, 503, "not_ready", None);
        assert_eq!(r.header("retry-after"), Some("1"));
        expect_error(
            &post_json(a, "/v1/chat/completions", &json!({})).await,
            503,
            "not_ready",
            None,
        );
        expect_error(&get(a, "/v1/models").await, 503, "not_ready", None);
        expect_error(&get(a, "/metrics").await, 503, "not_ready", None);
        expect_error(&get(a, "/nope").await, 404, "not_found", None);
        s.make_ready();
        let r = get(a, "/health").await;
        assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
        assert_eq!(post_json(a, "/v1/query", &q).await.status, 200);
        s.stop().await;
    });
}

#[test]
fn queue_full_is_429() {
    let rt = runtime();
    rt.block_on(async {
        let ecfg = EngineConfig {
            max_batch_size: 1,
            max_queue: 1,
            ..engine_config()
        };
        let s = TestServer::start_with(config(), ecfg, true).await;
        let img = data_uri("image/png", &image_bytes("rgba_640x480.png"));
        let body = json!({"image_url": img, "settings": {"temperature": 0, "max_tokens": 300}});
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let body = body.clone();
                let a = s.addr;
                tokio::spawn(async move { post_json(a, "/v1/caption", &body).await })
            })
            .collect();
        let mut n429 = 0;
        for t in tasks {
            let r = t.await.expect("task");
            match r.status {
                200 => {}
                429 => {
                    n429 += 1;
                    expect_error(&r, 429, "queue_full", None);
                    assert_eq!(r.header("retry-after"), Some("1"));
                }
                other => panic!("unexpected status {other}: {}", r.text()),
            }
        }
        assert!(n429 >= 1, "a full queue answers 429");
        s.wait_idle().await;
        s.stop().await;
    });
}

#[test]
fn request_timeout_is_504_and_cancels() {
    let rt = runtime();
    rt.block_on(async {
        let cfg = ServerConfig {
            request_timeout: Some(Duration::from_millis(150)),
            ..config()
        };
        let s = TestServer::start(cfg, true).await;
        let a = s.addr;
        // A big image: decoding + vision encoding outlast 150 ms on a tiny model too.
        let img = data_uri("image/png", &image_bytes("landscape_800x600.png"));
        let mut big = json!({"image_url": img, "stream": true, "settings": {"temperature": 0, "max_tokens": 300}});
        let r = post_json(a, "/v1/caption", &big).await;
        if r.status == 200 {
            // The deadline passed while streaming: the stream ends with an error event.
            let data = r.sse_data();
            let last: Value = serde_json::from_str(data.last().expect("events")).expect("JSON");
            assert_eq!(last["completed"], true);
            assert_eq!(last["error"]["code"], "timeout", "{last}");
        } else {
            expect_error(&r, 504, "timeout", None);
        }
        // A new image again (no prefix-cache hit), not streamed: 504.
        let img = data_uri("image/jpeg", &image_bytes("wide_1920x1080.jpg"));
        big = json!({"image_url": img, "settings": {"temperature": 0, "max_tokens": 300}});
        expect_error(&post_json(a, "/v1/caption", &big).await, 504, "timeout", None);
        s.wait_idle().await;
        s.engine.clear_prefix_cache();
        s.wait_kv_blocks(0).await;
        let m = get(a, "/metrics").await.text();
        assert!(metric(&m, "crescent_http_timeouts_total").unwrap_or(0.0) >= 1.0, "{m}");
        s.stop().await;
    });
}
