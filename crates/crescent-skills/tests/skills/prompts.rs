//! Prompt construction against the fixture `prompt_ids`.

use crescent_model::Token;
use crescent_skills::{
    build_prompt, CaptionLength, SettingsOverrides, SkillError, SkillRequest, SpatialRef,
};

use crate::common::*;

#[test]
fn every_fixture_prompt_matches_the_reference_ids() {
    let c = ctx();
    let cases = case_ids();
    assert_eq!(cases.len(), 22);
    for id in cases {
        let case = case(&id);
        let (req, ov) = request_of(&case);
        let has_image = !case["image"].is_null();
        let (prompt, _state, settings) = c.start(&req, &ov, has_image).expect(&id);
        let p = &case["prompt"];
        assert_eq!(
            prompt.placeholder_ids(c.token_config()),
            ids(&p["prompt_ids"]),
            "{id}"
        );
        assert_eq!(
            prompt.image,
            p["image_tokens"].as_u64().unwrap() > 0,
            "{id}"
        );
        assert_eq!(
            prompt.positions(729) as u64,
            p["prefill_len"].as_u64().unwrap(),
            "{id}"
        );
        assert!(
            prompt.tokens.iter().all(|t| matches!(t, Token::Text(_))),
            "{id}"
        );
        // the budget the fixture ran with
        let r = &case["request"];
        match case["skill"].as_str().unwrap() {
            "detect" => {
                let n = r["max_objects"].as_u64().unwrap() as usize;
                assert_eq!(settings.max_new_tokens, 3 * n + 1, "{id}");
            }
            "point" => {
                let n = r["max_objects"].as_u64().unwrap() as usize;
                assert_eq!(settings.max_new_tokens, 2 * n + 1, "{id}");
            }
            _ => {
                assert_eq!(
                    settings.max_new_tokens as u64,
                    r["max_tokens"].as_u64().unwrap(),
                    "{id}"
                );
                assert_eq!(
                    settings.temperature,
                    r["temperature"].as_f64().unwrap() as f32,
                    "{id}"
                );
                assert_eq!(settings.seed, r["seed"].as_u64(), "{id}");
            }
        }
    }
}

#[test]
fn query_prompt_layout_with_and_without_reasoning() {
    let c = ctx();
    let tok = c.tokenizer().clone();
    let q = tok.encode("What is this?").unwrap();
    for (reasoning, opener) in [(false, 3u32), (true, 4u32)] {
        let req = SkillRequest::Query {
            question: "  What is this?\n".into(),
            reasoning,
            spatial_refs: vec![],
        };
        let (p, _, _) = c.start(&req, &SettingsOverrides::default(), true).unwrap();
        let mut want = vec![1, 355, 2];
        want.extend(&q);
        want.push(opener);
        assert_eq!(p.placeholder_ids(c.token_config()), want);
        assert!(p.image);
        // no image: same tokens, no image block
        let (p2, _, _) = c.start(&req, &SettingsOverrides::default(), false).unwrap();
        assert!(!p2.image);
        assert_eq!(p2.tokens, p.tokens);
        assert_eq!(p2.positions(729), 1 + p.tokens.len());
    }
}

#[test]
fn caption_lengths_select_templates() {
    let c = ctx();
    for (len, want) in [
        (CaptionLength::Short, vec![1, 359, 2, 362, 3]),
        (CaptionLength::Normal, vec![1, 359, 2, 360, 3]),
        (CaptionLength::Long, vec![1, 359, 2, 357, 3]),
    ] {
        let (p, _, _) = c
            .start(
                &SkillRequest::Caption { length: len },
                &SettingsOverrides::default(),
                true,
            )
            .unwrap();
        assert_eq!(p.placeholder_ids(c.token_config()), want);
    }
    assert_eq!(
        " Short\t".parse::<CaptionLength>().unwrap(),
        CaptionLength::Short
    );
    assert_eq!(
        "LONG".parse::<CaptionLength>().unwrap(),
        CaptionLength::Long
    );
    assert_eq!(CaptionLength::default(), CaptionLength::Normal);
    let e = "medium".parse::<CaptionLength>().unwrap_err();
    assert!(
        e.is_client_error() && e.to_string().contains("medium"),
        "{e}"
    );
}

fn assert_close(t: &Token, want: &Token) {
    const TOL: f32 = 1e-6;
    match (t, want) {
        (Token::Coord(a), Token::Coord(b)) => assert!((a - b).abs() < TOL, "{t:?} vs {want:?}"),
        (Token::Size(a, b), Token::Size(c, d)) => {
            assert!(
                (a - c).abs() < TOL && (b - d).abs() < TOL,
                "{t:?} vs {want:?}"
            )
        }
        (Token::Text(a), Token::Text(b)) => assert_eq!(a, b),
        _ => panic!("{t:?} vs {want:?}"),
    }
}

#[test]
fn spatial_refs_expand_like_kestrel_appendix_b5() {
    let c = ctx();
    let tok = c.tokenizer().clone();
    let refs = vec![
        SpatialRef::from_values(&[0.2, 0.3]).unwrap(),
        SpatialRef::from_values(&[0.1, 0.2, 0.5, 0.6]).unwrap(),
    ];
    let req = SkillRequest::Point {
        object: " cat ".into(),
        max_objects: None,
        spatial_refs: refs.clone(),
    };
    let (p, _, _) = c.start(&req, &SettingsOverrides::default(), true).unwrap();
    let obj = tok.encode(" cat").unwrap();
    let mut want_ids = vec![1, 361, 2, 5, 5, 5, 5, 6];
    want_ids.extend(&obj);
    want_ids.push(3);
    assert_eq!(p.placeholder_ids(c.token_config()), want_ids);
    let want = [
        Token::Coord(0.2),
        Token::Coord(0.3),
        Token::Coord(0.3),
        Token::Coord(0.4),
        Token::Size(0.4, 0.4),
    ];
    for (t, w) in p.tokens[3..8].iter().zip(want.iter()) {
        assert_close(t, w);
    }
    assert_eq!(p.positions(729), 1 + 729 + 3 + 5 + obj.len() + 1);

    // the same refs in a query go between the prefix and the question
    let req = SkillRequest::Query {
        question: "Which?".into(),
        reasoning: false,
        spatial_refs: refs,
    };
    let (p, _, _) = c.start(&req, &SettingsOverrides::default(), true).unwrap();
    for (t, w) in p.tokens[3..8].iter().zip(want.iter()) {
        assert_close(t, w);
    }
    assert_eq!(p.tokens[8..p.tokens.len() - 1], enc(&tok, "Which?")[..]);
}

#[test]
fn spatial_ref_validation() {
    let msg = |v: &[f64]| SpatialRef::from_values(v).unwrap_err().to_string();
    assert!(msg(&[0.1]).contains("got 1"), "{}", msg(&[0.1]));
    assert!(msg(&[0.1, 0.2, 0.3]).contains("got 3"));
    assert!(msg(&[f64::NAN, 0.2]).contains("not finite"));
    assert!(msg(&[0.1, f64::INFINITY]).contains("not finite"));
    assert!(msg(&[1.5, 0.2]).contains("outside [0, 1]"));
    assert!(msg(&[0.1, -0.01]).contains("outside [0, 1]"));
    assert!(msg(&[0.6, 0.2, 0.5, 0.6]).contains("x_min"));
    assert!(msg(&[0.1, 0.7, 0.5, 0.6]).contains("y_min"));
    assert_eq!(
        SpatialRef::from_values(&[0.0, 1.0]).unwrap(),
        SpatialRef::Point { x: 0.0, y: 1.0 }
    );
    // a degenerate box (min == max) is allowed
    assert_eq!(
        SpatialRef::from_values(&[0.5, 0.5, 0.5, 0.5]).unwrap(),
        SpatialRef::Box {
            x_min: 0.5,
            y_min: 0.5,
            x_max: 0.5,
            y_max: 0.5
        }
    );
}

#[test]
fn request_errors() {
    let c = ctx();
    let ov = SettingsOverrides::default();
    let err = |req: SkillRequest, img: bool| -> SkillError {
        c.start(&req, &ov, img).err().expect("an error")
    };
    let refs = vec![SpatialRef::Point { x: 0.5, y: 0.5 }];

    let e = err(
        SkillRequest::Query {
            question: " \n ".into(),
            reasoning: false,
            spatial_refs: vec![],
        },
        true,
    );
    assert!(
        e.is_client_error() && e.to_string().contains("question must not be empty"),
        "{e}"
    );
    let e = err(
        SkillRequest::Query {
            question: "q".into(),
            reasoning: true,
            spatial_refs: refs.clone(),
        },
        false,
    );
    assert!(
        e.to_string()
            .contains("spatial references require an image"),
        "{e}"
    );
    let e = err(
        SkillRequest::Caption {
            length: CaptionLength::Normal,
        },
        false,
    );
    assert!(e.to_string().contains("caption requires an image"), "{e}");
    let e = err(
        SkillRequest::Detect {
            object: "cat".into(),
            max_objects: None,
        },
        false,
    );
    assert!(e.to_string().contains("detect requires an image"), "{e}");
    let e = err(
        SkillRequest::Detect {
            object: "  ".into(),
            max_objects: None,
        },
        true,
    );
    assert!(e.to_string().contains("object must not be empty"), "{e}");
    let e = err(
        SkillRequest::Point {
            object: "".into(),
            max_objects: None,
            spatial_refs: vec![],
        },
        true,
    );
    assert!(e.to_string().contains("object must not be empty"), "{e}");
    let e = err(
        SkillRequest::Point {
            object: "cat".into(),
            max_objects: None,
            spatial_refs: refs,
        },
        false,
    );
    assert!(e.to_string().contains("point requires an image"), "{e}");
}

#[test]
fn build_prompt_detect_strips_object_and_adds_one_space() {
    let c = ctx();
    let tok = c.tokenizer().clone();
    let req = SkillRequest::Detect {
        object: "\t red ball  ".into(),
        max_objects: None,
    };
    let p = build_prompt(&req, true, c.token_config(), &[3], &tok).unwrap();
    let mut want = vec![1, 313, 312, 2];
    want.extend(tok.encode(" red ball").unwrap());
    want.push(3);
    assert_eq!(p.placeholder_ids(c.token_config()), want);
    assert_eq!(req.skill_name(), "detect");
    assert!(!req.streams_text());
}
