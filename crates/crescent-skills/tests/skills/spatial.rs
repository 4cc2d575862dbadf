//! Detect and point states.

use crescent_model::{Conventions, Token};
use crescent_skills::{
    BoundingBox, Constraint, DetectOutput, FinishReason, Point, PointOutput, SettingsOverrides,
    SkillContext, SkillOutput, SkillRequest, SkillState,
};

use crate::common::*;

const COORD: u32 = 5;
const SIZE: u32 = 6;
const EOS: u32 = 0;

fn detect_state(c: &SkillContext) -> Box<dyn SkillState> {
    let req = SkillRequest::Detect {
        object: "tree".into(),
        max_objects: None,
    };
    c.start(&req, &SettingsOverrides::default(), true)
        .unwrap()
        .1
}

fn point_state(c: &SkillContext) -> Box<dyn SkillState> {
    let req = SkillRequest::Point {
        object: "cat".into(),
        max_objects: None,
        spatial_refs: vec![],
    };
    c.start(&req, &SettingsOverrides::default(), true)
        .unwrap()
        .1
}

fn objects(out: SkillOutput) -> Vec<BoundingBox> {
    match out {
        SkillOutput::Detect(DetectOutput { objects }) => objects,
        other => panic!("not a detect output: {other:?}"),
    }
}

fn points(out: SkillOutput) -> Vec<Point> {
    match out {
        SkillOutput::Point(PointOutput { points }) => points,
        other => panic!("not a point output: {other:?}"),
    }
}

#[test]
fn detect_cycles_through_constraints_and_builds_clamped_boxes() {
    let c = ctx();
    let mut s = detect_state(&c);
    let x_stage = Constraint::Allow(vec![COORD, EOS]);
    let script = [
        // inside the image
        (
            Token::Coord(0.5),
            Token::Coord(0.25),
            Token::Size(0.25, 0.125),
        ),
        // crosses the left and bottom edges
        (
            Token::Coord(0.0625),
            Token::Coord(0.9375),
            Token::Size(0.25, 0.5),
        ),
        // crosses the right and top edges
        (Token::Coord(1.0), Token::Coord(0.0), Token::Size(1.0, 1.0)),
    ];
    for (x, y, wh) in script {
        assert_eq!(s.constraint(), x_stage);
        s.consume(&x).unwrap();
        assert_eq!(s.constraint(), Constraint::Allow(vec![COORD]));
        s.consume(&y).unwrap();
        assert_eq!(s.constraint(), Constraint::Allow(vec![SIZE]));
        s.consume(&wh).unwrap();
        assert_eq!(s.take_delta(), None);
    }
    assert_eq!(s.constraint(), x_stage);
    // a trailing x and y without size: dropped
    s.consume(&Token::Coord(0.3)).unwrap();
    s.consume(&Token::Coord(0.3)).unwrap();
    let got = objects(s.finish(FinishReason::Length).unwrap());
    let b = |x_min, y_min, x_max, y_max| BoundingBox {
        x_min,
        y_min,
        x_max,
        y_max,
    };
    assert_eq!(
        got,
        vec![
            b(0.375, 0.1875, 0.625, 0.3125),
            b(0.0, 0.6875, 0.1875, 1.0),
            b(0.5, 0.0, 1.0, 0.5)
        ]
    );
}

#[test]
fn detect_without_clamping_keeps_edges_outside_the_image() {
    let c = ctx_with(&Conventions::hf());
    let mut s = detect_state(&c);
    for t in [
        Token::Coord(0.0625),
        Token::Coord(0.9375),
        Token::Size(0.25, 0.5),
    ] {
        s.consume(&t).unwrap();
    }
    // only x seen: dropped
    s.consume(&Token::Coord(0.5)).unwrap();
    let got = objects(s.finish(FinishReason::Stop).unwrap());
    assert_eq!(
        got,
        vec![BoundingBox {
            x_min: -0.0625,
            y_min: 0.6875,
            x_max: 0.1875,
            y_max: 1.1875
        }]
    );
}

#[test]
fn detect_rejects_tokens_outside_its_constraint() {
    let c = ctx();
    let mut s = detect_state(&c);
    assert!(s.consume(&Token::Size(0.1, 0.1)).is_err());
    assert!(s.consume(&Token::Text(EOS)).is_err());
    s.consume(&Token::Coord(0.5)).unwrap();
    s.consume(&Token::Coord(0.5)).unwrap();
    let e = s.consume(&Token::Coord(0.5)).unwrap_err();
    assert!(!e.is_client_error(), "{e}");
    // the state is unchanged by a rejected token
    assert_eq!(s.constraint(), Constraint::Allow(vec![SIZE]));
}

#[test]
fn detect_immediate_eos_gives_no_objects() {
    let c = ctx();
    let mut s = detect_state(&c);
    assert!(objects(s.finish(FinishReason::Stop).unwrap()).is_empty());
}

/// bf16 rounding (round to nearest even), as the fixtures' value tables.
fn bf16(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

#[test]
fn detect_fixture_boxes_from_recorded_bins() {
    let c = ctx();
    for id in [
        "detect_wide",
        "detect_gray",
        "detect_tiny",
        "detect_wide_max1",
    ] {
        let case = case(id);
        let (req, ov) = request_of(&case);
        let (_, mut s, _) = c.start(&req, &ov, true).unwrap();
        for step in case["steps"].as_array().unwrap() {
            if step["decision"] != "continue" || step.get("w_bin").is_none() {
                continue;
            }
            let bin = |k: &str| step[k].as_u64().unwrap() as f32;
            let coord = |k: &str| bf16(bin(k) / 1023.0);
            let size = |k: &str| bf16((bin(k) / 1023.0 * 10.0 - 10.0).exp2());
            s.consume(&Token::Coord(coord("x_bin"))).unwrap();
            s.consume(&Token::Coord(coord("y_bin"))).unwrap();
            s.consume(&Token::Size(size("w_bin"), size("h_bin")))
                .unwrap();
        }
        let reason = if case["stop_reason"] == "stop" {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        let out = s.finish(reason).unwrap();
        // exact f64 equality of every corner
        assert_eq!(out.to_json(), case["output"], "{id}");
    }
}

#[test]
fn point_pairs_coordinates_and_drops_a_dangling_x() {
    let c = ctx();
    let mut s = point_state(&c);
    for (x, y) in [(0.25f32, 0.75f32), (1.0, 0.0)] {
        assert_eq!(s.constraint(), Constraint::Allow(vec![COORD, EOS]));
        s.consume(&Token::Coord(x)).unwrap();
        assert_eq!(s.constraint(), Constraint::Allow(vec![COORD]));
        s.consume(&Token::Coord(y)).unwrap();
    }
    s.consume(&Token::Coord(0.5)).unwrap();
    assert!(s.consume(&Token::Size(0.5, 0.5)).is_err());
    assert!(s.consume(&Token::Text(1)).is_err());
    assert_eq!(s.take_delta(), None);
    let got = points(s.finish(FinishReason::Length).unwrap());
    assert_eq!(
        got,
        vec![Point { x: 0.25, y: 0.75 }, Point { x: 1.0, y: 0.0 }]
    );
}

#[test]
fn point_fixture_outputs_round_trip() {
    let c = ctx();
    for id in [
        "point_landscape",
        "point_tall",
        "point_tiny",
        "point_tall_max4",
    ] {
        let case = case(id);
        let (req, ov) = request_of(&case);
        let (_, mut s, _) = c.start(&req, &ov, true).unwrap();
        for p in case["output"]["points"].as_array().unwrap() {
            s.consume(&Token::Coord(p["x"].as_f64().unwrap() as f32))
                .unwrap();
            s.consume(&Token::Coord(p["y"].as_f64().unwrap() as f32))
                .unwrap();
        }
        let out = s.finish(FinishReason::Stop).unwrap();
        assert_eq!(out.to_json(), case["output"], "{id}");
    }
}
