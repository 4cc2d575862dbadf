//! The official `openai` Python client against a real server: chat with an image (data URI),
//! streaming with `include_usage`, detect / point through `vllm_xargs`, reasoning, a 422; each
//! result equals the engine's own.

mod common;

use common::*;
use crescent_server::ServerConfig;
use crescent_skills::{SettingsOverrides, SkillRequest};
use serde_json::{json, Value};

fn query(question: &str, reasoning: bool) -> SkillRequest {
    SkillRequest::Query {
        question: question.into(),
        reasoning,
        spatial_refs: vec![],
    }
}

#[test]
fn official_openai_client_matches_engine() {
    require_python_clients();
    let rt = runtime();
    let config = ServerConfig {
        api_key: Some("oa-test-key".into()),
        ..ServerConfig::default()
    };
    let server = rt.block_on(TestServer::start(config, true));
    let bytes = image_bytes("square_378x378.png");
    let uri = data_uri("image/png", &bytes);
    let dir = std::env::temp_dir().join(format!("crescent-openai-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let uri_file = dir.join("image.uri");
    std::fs::write(&uri_file, &uri).expect("writing the data URI");
    let out = run_python(
        "openai_client.py",
        &[
            &server.v1(),
            uri_file.to_str().expect("utf-8 path"),
            "oa-test-key",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(out["models"], json!(["moondream3"]));

    let engine = reference_engine();
    let img = Some(bytes.as_slice());

    let (g, _) = reference(
        &engine,
        query("Answer briefly.\n\nWhat is in the image?", false),
        greedy(20),
        img,
    );
    assert_eq!(out["chat"]["content"], g.output.to_json()["answer"]);
    assert_eq!(out["chat"]["finish_reason"], json!(g.finish.as_str()));
    assert_eq!(out["chat"]["object"], "chat.completion");
    let usage = &out["chat"]["usage"];
    assert_eq!(usage["prompt_tokens"], json!(g.input_tokens));
    assert_eq!(usage["completion_tokens"], json!(g.output_tokens));
    assert_eq!(
        usage["total_tokens"],
        json!(g.input_tokens + g.output_tokens)
    );

    let (g, deltas) = reference(
        &engine,
        query("Describe the scene.", false),
        greedy(20),
        img,
    );
    let s = &out["chat_stream"];
    let chunks: Vec<String> = serde_json::from_value(s["chunks"].clone()).expect("chunks");
    assert_eq!(chunks, deltas, "streamed content deltas");
    assert_eq!(s["roles"], json!(["assistant"]));
    assert_eq!(s["finish_reason"], json!(g.finish.as_str()));
    assert_eq!(s["usage"]["prompt_tokens"], json!(g.input_tokens));
    assert_eq!(s["usage"]["completion_tokens"], json!(g.output_tokens));
    // Same image as before: its prefix came from the cache.
    assert_eq!(
        s["usage"]["prompt_tokens_details"]["cached_tokens"],
        json!(730)
    );

    let (g, _) = reference(
        &engine,
        SkillRequest::Detect {
            object: "ball".into(),
            max_objects: None,
        },
        SettingsOverrides {
            max_objects: Some(3),
            ..SettingsOverrides::default()
        },
        img,
    );
    let detect: Value =
        serde_json::from_str(out["detect"].as_str().expect("content string")).expect("JSON");
    assert_json_eq(&detect, &g.output.to_json(), "detect");

    let (g, _) = reference(
        &engine,
        SkillRequest::Point {
            object: "cat".into(),
            max_objects: None,
            spatial_refs: vec![],
        },
        SettingsOverrides {
            max_objects: Some(2),
            ..SettingsOverrides::default()
        },
        img,
    );
    let point: Value =
        serde_json::from_str(out["point"].as_str().expect("content string")).expect("JSON");
    assert_json_eq(&point, &g.output.to_json(), "point");

    let (g, _) = reference(&engine, query("Where is the ball?", true), greedy(20), img);
    let want = g.output.to_json();
    assert_eq!(out["reasoning"]["content"], want["answer"]);
    assert_eq!(out["reasoning"]["reasoning"], want["reasoning"]["text"]);

    assert_eq!(
        out["bad_temperature"],
        json!({"type": "UnprocessableEntityError", "status": 422})
    );

    rt.block_on(async {
        server.wait_idle().await;
        server.stop().await;
    });
}
