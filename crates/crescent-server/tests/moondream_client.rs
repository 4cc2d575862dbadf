//! The official `moondream` Python client against a real server on a loopback port: every
//! skill, streaming caption and query, and chat; each result must equal the engine's own result
//! for the same bytes and settings.

mod common;

use common::*;
use crescent_server::ServerConfig;
use crescent_skills::{CaptionLength, SettingsOverrides, SkillRequest, SpatialRef};
use serde_json::{json, Value};

fn query(question: &str, reasoning: bool) -> SkillRequest {
    SkillRequest::Query {
        question: question.into(),
        reasoning,
        spatial_refs: vec![],
    }
}

fn max_objects(n: usize) -> SettingsOverrides {
    SettingsOverrides {
        max_objects: Some(n),
        ..SettingsOverrides::default()
    }
}

#[test]
fn official_moondream_client_matches_engine() {
    require_python_clients();
    let rt = runtime();
    let config = ServerConfig {
        api_key: Some("md-test-key".into()),
        ..ServerConfig::default()
    };
    let server = rt.block_on(TestServer::start(config, true));
    let image = image_path("gray_500x375.png");
    let out = run_python(
        "moondream_client.py",
        &[
            &server.v1(),
            image.to_str().expect("utf-8 path"),
            "md-test-key",
        ],
    );

    // The engine on the exact bytes the client sent (its JPEG re-encoding of the image).
    let uri = out["image_url"].as_str().expect("image_url");
    assert!(uri.starts_with("data:image/jpeg;base64,"));
    let bytes = data_uri_bytes(uri);
    let engine = reference_engine();
    let img = Some(bytes.as_slice());

    let (g, _) = reference(
        &engine,
        SkillRequest::Caption {
            length: CaptionLength::Short,
        },
        greedy(24),
        img,
    );
    assert_json_eq(&out["caption"], &g.output.to_json(), "caption");

    let (g, deltas) = reference(
        &engine,
        SkillRequest::Caption {
            length: CaptionLength::Normal,
        },
        greedy(24),
        img,
    );
    let chunks: Vec<String> =
        serde_json::from_value(out["caption_stream"].clone()).expect("chunks");
    assert_eq!(chunks, deltas, "streamed caption chunks");
    assert!(chunks.len() > 1, "the caption was streamed in pieces");
    assert_eq!(
        json!({"caption": chunks.concat()}),
        g.output.to_json(),
        "streamed caption text"
    );

    let (g, _) = reference(
        &engine,
        query("What is in the image?", false),
        greedy(24),
        img,
    );
    assert_json_eq(&out["query"], &g.output.to_json(), "query");

    let (g, deltas) = reference(
        &engine,
        query("Describe the scene.", false),
        greedy(24),
        img,
    );
    let chunks: Vec<String> = serde_json::from_value(out["query_stream"].clone()).expect("chunks");
    assert_eq!(chunks, deltas, "streamed answer chunks");
    assert_eq!(json!({"answer": chunks.concat()}), g.output.to_json());

    let (g, _) = reference(&engine, query("Where is the ball?", true), greedy(24), img);
    let want = g.output.to_json();
    assert!(want.get("reasoning").is_some());
    assert_json_eq(&out["query_reasoning"], &want, "query_reasoning");

    let (g, _) = reference(&engine, query("Say hello.", false), greedy(24), None);
    assert_json_eq(
        &out["query_text_only"],
        &g.output.to_json(),
        "query_text_only",
    );

    let (g, _) = reference(
        &engine,
        SkillRequest::Detect {
            object: "ball".into(),
            max_objects: None,
        },
        max_objects(3),
        img,
    );
    assert_json_eq(&out["detect"], &g.output.to_json(), "detect");

    let (g, _) = reference(
        &engine,
        SkillRequest::Point {
            object: "cat".into(),
            max_objects: None,
            spatial_refs: vec![],
        },
        max_objects(3),
        img,
    );
    assert_json_eq(&out["point"], &g.output.to_json(), "point");

    let refs = vec![
        SpatialRef::from_values(&[0.25, 0.5]).expect("point ref"),
        SpatialRef::from_values(&[0.1, 0.1, 0.6, 0.7]).expect("box ref"),
    ];
    let (g, _) = reference(
        &engine,
        SkillRequest::Point {
            object: "cat".into(),
            max_objects: None,
            spatial_refs: refs,
        },
        max_objects(2),
        img,
    );
    assert_json_eq(&out["point_refs"], &g.output.to_json(), "point_refs");

    // Chat: the system text is prepended to the (only) user message.
    let (g, _) = reference(
        &engine,
        query("Be brief.\n\nWhat is this?", false),
        greedy(24),
        img,
    );
    let answer = g.output.to_json()["answer"].clone();
    assert_eq!(out["chat"]["message"]["content"], answer, "chat content");
    assert_eq!(out["chat"]["message"]["role"], "assistant");
    assert_eq!(out["chat"]["finish_reason"], json!(g.finish.as_str()));

    let (g, _) = reference(&engine, query("What is this?", false), greedy(24), img);
    let chunks: Vec<String> = serde_json::from_value(out["chat_stream"].clone()).expect("chunks");
    assert_eq!(Value::String(chunks.concat()), g.output.to_json()["answer"]);

    rt.block_on(async {
        // Every request was authenticated with X-Moondream-Auth / Bearer and finished.
        let m = server.state.http_metrics();
        assert_eq!(m.responses_with_status(401), 0);
        assert_eq!(m.client_disconnects(), 0);
        server.wait_idle().await;
        server.stop().await;
    });
}
