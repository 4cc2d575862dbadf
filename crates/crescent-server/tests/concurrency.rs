//! 32 mixed requests (all four skills, three images, some streaming) in flight at once over
//! HTTP: all succeed with the outputs of single-request engine runs, KV blocks return to the
//! pool, and the prefix cache is used and counted.

mod common;

use std::collections::HashMap;

use common::*;
use crescent_server::ServerConfig;
use crescent_skills::{CaptionLength, SettingsOverrides, SkillRequest};
use serde_json::{json, Map, Value};

const IMAGES: [&str; 3] = ["tiny_40x30.png", "square_378x378.png", "gray_500x375.png"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Query,
    Caption,
    Detect,
    Point,
}

fn skill(kind: Kind) -> (SkillRequest, SettingsOverrides) {
    let objects = SettingsOverrides {
        max_objects: Some(3),
        ..SettingsOverrides::default()
    };
    match kind {
        Kind::Query => (
            SkillRequest::Query {
                question: "What is in the image?".into(),
                reasoning: false,
                spatial_refs: vec![],
            },
            greedy(24),
        ),
        Kind::Caption => (
            SkillRequest::Caption {
                length: CaptionLength::Normal,
            },
            greedy(24),
        ),
        Kind::Detect => (
            SkillRequest::Detect {
                object: "ball".into(),
                max_objects: None,
            },
            objects,
        ),
        Kind::Point => (
            SkillRequest::Point {
                object: "cat".into(),
                max_objects: None,
                spatial_refs: vec![],
            },
            objects,
        ),
    }
}

fn http_request(kind: Kind, image_url: &str, stream: bool) -> (&'static str, Value) {
    let greedy = json!({"temperature": 0, "top_p": 1, "max_tokens": 24});
    match kind {
        Kind::Query => (
            "/v1/query",
            json!({"image_url": image_url, "question": "What is in the image?", "stream": stream, "settings": greedy}),
        ),
        Kind::Caption => (
            "/v1/caption",
            json!({"image_url": image_url, "length": "normal", "stream": stream, "settings": greedy}),
        ),
        Kind::Detect => (
            "/v1/detect",
            json!({"image_url": image_url, "object": "ball", "settings": {"max_objects": 3}}),
        ),
        Kind::Point => (
            "/v1/point",
            json!({"image_url": image_url, "object": "cat", "settings": {"max_objects": 3}}),
        ),
    }
}

/// The skill output fields of a response (without request_id, finish_reason, metrics...).
fn output_of(v: &Value) -> Value {
    let mut m = Map::new();
    for k in ["answer", "reasoning", "caption", "objects", "points"] {
        if let Some(x) = v.get(k) {
            m.insert(k.into(), x.clone());
        }
    }
    Value::Object(m)
}

#[test]
fn thirty_two_mixed_requests_at_once() {
    let engine = reference_engine();
    let bytes: Vec<Vec<u8>> = IMAGES.iter().map(|n| image_bytes(n)).collect();
    let kinds = [Kind::Query, Kind::Caption, Kind::Detect, Kind::Point];
    // Single-request results, one at a time.
    let mut want: HashMap<(Kind, usize), (Value, &'static str)> = HashMap::new();
    for (i, b) in bytes.iter().enumerate() {
        for k in kinds {
            let (req, ov) = skill(k);
            let (g, _) = reference(&engine, req, ov, Some(b));
            want.insert((k, i), (g.output.to_json(), g.finish.as_str()));
        }
    }

    let rt = runtime();
    rt.block_on(async {
        let s = TestServer::start(ServerConfig::default(), true).await;
        let uris: Vec<String> = bytes.iter().map(|b| data_uri("image/png", b)).collect();
        let mut tasks = Vec::new();
        for n in 0..32usize {
            let kind = kinds[n % 4];
            let img = (n / 4) % 3;
            let stream = matches!(kind, Kind::Query | Kind::Caption) && n % 3 == 0;
            let (path, body) = http_request(kind, &uris[img], stream);
            let a = s.addr;
            tasks.push(tokio::spawn(async move {
                (kind, img, stream, post_json(a, path, &body).await)
            }));
        }
        let mut streamed = 0;
        for t in tasks {
            let (kind, img, stream, r) = t.await.expect("task");
            assert_eq!(r.status, 200, "{kind:?} on image {img}: {}", r.text());
            let (want_out, want_finish) = &want[&(kind, img)];
            let result = if stream {
                streamed += 1;
                let evs: Vec<Value> = r
                    .sse_data()
                    .iter()
                    .map(|d| serde_json::from_str(d).expect("event JSON"))
                    .collect();
                let (last, chunks) = evs.split_last().expect("events");
                assert_eq!(last["completed"], true, "{last}");
                let text: String = chunks
                    .iter()
                    .map(|c| c["chunk"].as_str().expect("chunk"))
                    .collect();
                let key = if kind == Kind::Query {
                    "answer"
                } else {
                    "caption"
                };
                assert_eq!(last[key], text, "streamed text equals the final text");
                last.clone()
            } else {
                r.json()
            };
            assert_json_eq(
                &output_of(&result),
                want_out,
                &format!("{kind:?} on image {img}"),
            );
            assert_eq!(result["finish_reason"], *want_finish);
        }
        assert!(streamed >= 4);

        // Only the prefix cache holds KV blocks now: one BOS + image prefix per image.
        s.wait_idle().await;
        let bs = engine_config().block_size;
        s.wait_kv_blocks(IMAGES.len() * 730usize.div_ceil(bs)).await;
        s.engine.clear_prefix_cache();
        s.wait_kv_blocks(0).await;

        let m = get(s.addr, "/metrics").await.text();
        assert_eq!(
            metric(&m, "crescent_prefix_cache_misses_total"),
            Some(3.0),
            "{m}"
        );
        assert_eq!(
            metric(&m, "crescent_prefix_cache_hits_total"),
            Some(29.0),
            "{m}"
        );
        for skill in ["query", "caption", "detect", "point"] {
            let series = format!("crescent_requests_total{{skill=\"{skill}\",status=\"ok\"}}");
            assert_eq!(metric(&m, &series), Some(8.0), "{series}\n{m}");
        }
        assert_eq!(
            metric(
                &m,
                "crescent_http_responses_total{endpoint=\"/v1/query\",status=\"200\"}"
            ),
            Some(8.0)
        );
        assert_eq!(
            metric(&m, "crescent_http_client_disconnects_total"),
            Some(0.0)
        );
        assert_eq!(metric(&m, "crescent_http_requests_in_flight"), Some(0.0));
        s.stop().await;
    });
}
