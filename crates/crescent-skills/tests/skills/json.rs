//! API output shapes.

use crescent_skills::{
    BoundingBox, CaptionOutput, DetectOutput, FinishReason, GroundingSpan, Point, PointOutput,
    QueryOutput, Reasoning, SkillOutput,
};
use serde_json::json;

use crate::common::case;

#[test]
fn detect_output_serialises_like_the_fixture() {
    let expected = case("detect_wide")["output"].clone();
    // the fixture's numbers, as f32 values from the engine
    let objects = expected["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let v = |k: &str| f64::from(o[k].as_f64().unwrap() as f32);
            BoundingBox {
                x_min: v("x_min"),
                y_min: v("y_min"),
                x_max: v("x_max"),
                y_max: v("y_max"),
            }
        })
        .collect();
    let out = SkillOutput::Detect(DetectOutput { objects });
    let text = serde_json::to_string(&out).unwrap();
    assert!(text.contains("0.33184814453125"), "{text}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        expected
    );
    assert_eq!(out.to_json(), expected);
    // and back
    assert_eq!(serde_json::from_str::<SkillOutput>(&text).unwrap(), out);
}

#[test]
fn point_caption_and_query_shapes() {
    let p = SkillOutput::Point(PointOutput {
        points: vec![Point {
            x: f64::from(0.890625f32),
            y: 0.419921875,
        }],
    });
    assert_eq!(
        p.to_json(),
        json!({"points": [{"x": 0.890625, "y": 0.419921875}]})
    );
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&case("point_tall")["output"]["points"][0]),
        keys(&p.to_json()["points"][0])
    );

    let c = SkillOutput::Caption(CaptionOutput {
        caption: "a cat".into(),
    });
    assert_eq!(c.to_json(), json!({"caption": "a cat"}));
    assert_eq!(keys(&case("caption_short")["output"]), keys(&c.to_json()));

    let q = SkillOutput::Query(QueryOutput {
        answer: "yes".into(),
        reasoning: None,
    });
    assert_eq!(q.to_json(), json!({"answer": "yes"}));
    assert_eq!(keys(&case("query_landscape")["output"]), keys(&q.to_json()));

    let q = SkillOutput::Query(QueryOutput {
        answer: "yes".into(),
        reasoning: Some(Reasoning {
            text: "The cat".into(),
            grounding: vec![GroundingSpan {
                start_idx: 3,
                end_idx: 7,
                points: vec![[0.25, f64::from(0.1f32)]],
            }],
        }),
    });
    assert_eq!(
        q.to_json(),
        json!({"answer": "yes", "reasoning": {"text": "The cat", "grounding": [
            {"start_idx": 3, "end_idx": 7, "points": [[0.25, 0.10000000149011612]]}
        ]}})
    );
}

#[test]
fn finish_reason_spelling() {
    assert_eq!(
        serde_json::to_value(FinishReason::Stop).unwrap(),
        json!("stop")
    );
    assert_eq!(
        serde_json::to_value(FinishReason::Length).unwrap(),
        json!("length")
    );
    assert_eq!(FinishReason::Length.as_str(), "length");
}
