//! Shared helpers for the integration tests (fixture config, tokenizer, cases).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crescent_model::{Config, Conventions, TextTokenizer, Token};
use crescent_skills::{SettingsOverrides, SkillContext, SkillRequest};
use serde_json::Value;

pub const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/md3-tiny");

pub fn fixture_path(rel: &str) -> PathBuf {
    Path::new(FIXTURE).join(rel)
}

pub fn config() -> Config {
    Config::from_file(&fixture_path("config.json")).expect("fixture config")
}

pub fn tokenizer() -> Arc<TextTokenizer> {
    Arc::new(TextTokenizer::from_file(&fixture_path("tokenizer.json")).expect("fixture tokenizer"))
}

pub fn ctx() -> SkillContext {
    SkillContext::new(&config(), tokenizer(), &Conventions::default())
}

pub fn ctx_with(conventions: &Conventions) -> SkillContext {
    SkillContext::new(&config(), tokenizer(), conventions)
}

pub fn case(id: &str) -> Value {
    let text =
        std::fs::read_to_string(fixture_path(&format!("expected/{id}.json"))).expect("case file");
    serde_json::from_str(&text).expect("case json")
}

pub fn case_ids() -> Vec<String> {
    let text = std::fs::read_to_string(fixture_path("expected/index.json")).expect("index");
    let v: Value = serde_json::from_str(&text).expect("index json");
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_string())
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Text tokens of `s` in the fixture tokenizer.
pub fn enc(tok: &TextTokenizer, s: &str) -> Vec<Token> {
    tok.encode(s)
        .expect("encode")
        .into_iter()
        .map(Token::Text)
        .collect()
}

/// The request and overrides of a fixture case.
pub fn request_of(case: &Value) -> (SkillRequest, SettingsOverrides) {
    let r = &case["request"];
    let max_objects = r["max_objects"].as_u64().map(|n| n as usize);
    let req = match case["skill"].as_str().expect("skill") {
        "query" => SkillRequest::Query {
            question: r["question"].as_str().expect("question").to_string(),
            reasoning: r["reasoning"].as_bool().unwrap_or(false),
            spatial_refs: vec![],
        },
        "caption" => SkillRequest::Caption {
            length: r["length"]
                .as_str()
                .expect("length")
                .parse()
                .expect("length"),
        },
        "detect" => SkillRequest::Detect {
            object: r["object"].as_str().expect("object").to_string(),
            max_objects,
        },
        "point" => SkillRequest::Point {
            object: r["object"].as_str().expect("object").to_string(),
            max_objects,
            spatial_refs: vec![],
        },
        other => panic!("unknown skill {other}"),
    };
    let ov = SettingsOverrides {
        temperature: r["temperature"].as_f64().map(|t| t as f32),
        top_p: r["top_p"].as_f64().map(|t| t as f32),
        max_tokens: r["max_tokens"].as_u64().map(|n| n as usize),
        max_objects: None,
        seed: r["seed"].as_u64(),
    };
    (req, ov)
}
