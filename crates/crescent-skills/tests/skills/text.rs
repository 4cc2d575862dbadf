//! Query and caption states: reasoning parse, answers, streaming.

use crescent_model::{Conventions, Token};
use crescent_skills::{
    CaptionLength, Constraint, FinishReason, GroundingSpan, QueryOutput, Reasoning,
    SettingsOverrides, SkillContext, SkillOutput, SkillRequest, SkillState,
};

use crate::common::*;

fn query_state(c: &SkillContext, reasoning: bool) -> Box<dyn SkillState> {
    let req = SkillRequest::Query {
        question: "Is there a cat?".into(),
        reasoning,
        spatial_refs: vec![],
    };
    c.start(&req, &SettingsOverrides::default(), true)
        .unwrap()
        .1
}

/// Feed `tokens`, collecting every delta; asserts the constraint is `Any` throughout.
fn drive(state: &mut dyn SkillState, tokens: &[Token]) -> Vec<String> {
    let mut deltas = Vec::new();
    for t in tokens {
        assert_eq!(state.constraint(), Constraint::Any);
        state.consume(t).unwrap();
        deltas.extend(state.take_delta());
    }
    deltas
}

fn query(out: SkillOutput) -> QueryOutput {
    match out {
        SkillOutput::Query(q) => q,
        other => panic!("not a query output: {other:?}"),
    }
}

#[test]
fn grounded_reasoning_then_answer() {
    let c = ctx();
    let tok = c.tokenizer().clone();
    let mut s = query_state(&c, true);
    let mut script = enc(&tok, "The");
    script.push(Token::Text(7));
    script.extend(enc(&tok, " café"));
    script.extend([Token::Coord(0.25), Token::Coord(0.5)]);
    script.push(Token::Text(9));
    script.extend(enc(&tok, " sits"));
    script.push(Token::Text(3));
    let answer = enc(&tok, "yes");

    // no delta while reasoning
    let d = drive(s.as_mut(), &script);
    assert!(d.is_empty(), "{d:?}");
    let d = drive(s.as_mut(), &answer);
    let out = query(s.finish(FinishReason::Stop).unwrap());
    assert_eq!(out.answer, "yes");
    assert_eq!(d.concat(), "yes");
    assert_eq!(s.take_delta(), None);
    // "The" = 3 chars; " café" = 5 code points (6 bytes)
    assert_eq!(
        out.reasoning,
        Some(Reasoning {
            text: "The café sits".into(),
            grounding: vec![GroundingSpan {
                start_idx: 3,
                end_idx: 8,
                points: vec![[0.25, 0.5]]
            }],
        })
    );
}

#[test]
fn emoji_spans_count_code_points() {
    let c = ctx();
    let tok = c.tokenizer().clone();
    let mut s = query_state(&c, true);
    let mut script = enc(&tok, "🐱 and");
    script.push(Token::Text(7));
    script.extend(enc(&tok, " 🐶 dog"));
    script.extend([
        Token::Coord(0.1),
        Token::Coord(0.2),
        Token::Coord(0.3),
        Token::Coord(0.4),
    ]);
    script.push(Token::Text(9));
    script.push(Token::Text(3));
    drive(s.as_mut(), &script);
    let out = query(s.finish(FinishReason::Stop).unwrap());
    let r = out.reasoning.unwrap();
    assert_eq!(r.text, "🐱 and 🐶 dog");
    // "🐱 and" is 5 code points (8 bytes); " 🐶 dog" is 6 code points
    assert_eq!(r.grounding.len(), 1);
    let g = &r.grounding[0];
    assert_eq!((g.start_idx, g.end_idx), (5, 11));
    assert_eq!(
        g.points,
        vec![
            [0.1f32 as f64, 0.2f32 as f64],
            [0.3f32 as f64, 0.4f32 as f64]
        ]
    );
    assert_eq!(out.answer, "");
}

#[test]
fn length_during_reasoning_flushes_the_open_chunk() {
    let c = ctx();
    let tok = c.tokenizer().clone();
    let mut s = query_state(&c, true);
    let mut script = enc(&tok, "The");
    script.push(Token::Text(7));
    script.extend(enc(&tok, " cat"));
    script.extend([Token::Coord(0.5), Token::Coord(0.75)]);
    let d = drive(s.as_mut(), &script);
    assert!(d.is_empty());
    let out = query(s.finish(FinishReason::Length).unwrap());
    assert_eq!(s.take_delta(), None);
    assert_eq!(out.answer, "");
    let r = out.reasoning.unwrap();
    assert_eq!(r.text, "The cat");
    assert_eq!(
        r.grounding,
        vec![GroundingSpan {
            start_idx: 3,
            end_idx: 7,
            points: vec![[0.5, 0.75]]
        }]
    );
}

#[test]
fn dangling_coordinates_are_dropped_and_sizes_ignored() {
    let c = ctx();
    let tok = c.tokenizer().clone();
    let mut s = query_state(&c, true);
    let mut script = vec![Token::Text(7)];
    script.extend(enc(&tok, "a"));
    // size between x and y is ignored; the 0.875 dangles and is dropped at the marker
    script.extend([
        Token::Coord(0.5),
        Token::Size(0.1, 0.1),
        Token::Coord(0.25),
        Token::Coord(0.875),
    ]);
    script.push(Token::Text(7));
    // pending was reset by the marker: 0.125, 0.375 pair up
    script.extend([
        Token::Coord(0.125),
        Token::Coord(0.375),
        Token::Coord(0.625),
    ]);
    script.push(Token::Text(9));
    script.extend(enc(&tok, "b"));
    script.push(Token::Text(3));
    // coordinates in the answer are not text and not grounding
    script.extend([Token::Coord(0.5), Token::Coord(0.5)]);
    script.extend(enc(&tok, "c"));
    drive(s.as_mut(), &script);
    let out = query(s.finish(FinishReason::Stop).unwrap());
    assert_eq!(out.answer, "c");
    let r = out.reasoning.unwrap();
    assert_eq!(r.text, "ab");
    assert_eq!(
        r.grounding,
        vec![
            GroundingSpan {
                start_idx: 0,
                end_idx: 1,
                points: vec![[0.5, 0.25]]
            },
            // a chunk with points but no text is an empty span at the cursor
            GroundingSpan {
                start_idx: 1,
                end_idx: 1,
                points: vec![[0.125, 0.375]]
            },
        ]
    );
}

#[test]
fn non_reasoning_answer_takes_every_text_token() {
    let c = ctx();
    let tok = c.tokenizer().clone();
    let mut s = query_state(&c, false);
    let mut script = enc(&tok, "two");
    // specials go to the answer ids but decode skips them; coords/sizes are not text
    script.extend([
        Token::Text(7),
        Token::Coord(0.5),
        Token::Size(0.5, 0.5),
        Token::Text(3),
    ]);
    script.extend(enc(&tok, " cats"));
    let d = drive(s.as_mut(), &script);
    let out = query(s.finish(FinishReason::Stop).unwrap());
    assert_eq!(
        out,
        QueryOutput {
            answer: "two cats".into(),
            reasoning: None
        }
    );
    assert_eq!(d.concat(), "two cats");
    assert_eq!(
        out.answer,
        tok.decode(&tok.encode("two cats").unwrap()).unwrap()
    );
}

#[test]
fn fixture_outputs_decode_and_stream_exactly() {
    let c = ctx();
    for id in case_ids() {
        let case = case(&id);
        let skill = case["skill"].as_str().unwrap();
        if skill != "query" && skill != "caption" {
            continue;
        }
        let (req, ov) = request_of(&case);
        let (_, mut s, settings) = c.start(&req, &ov, !case["image"].is_null()).unwrap();
        let out_ids = ids(&case["output_ids"]);
        let script: Vec<Token> = out_ids.iter().map(|&i| Token::Text(i)).collect();
        let mut deltas = drive(s.as_mut(), &script);
        let reason = if case["stop_reason"] == "stop" {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        if reason == FinishReason::Length {
            assert_eq!(out_ids.len(), settings.max_new_tokens, "{id}");
        }
        let out = s.finish(reason).unwrap();
        deltas.extend(s.take_delta());
        assert_eq!(out.to_json(), case["output"], "{id}");
        let text = case["output"]
            .get("answer")
            .or(case["output"].get("caption"))
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(deltas.concat(), text, "{id}");
    }
}

#[test]
fn streaming_holds_back_split_multibyte_characters() {
    let c = ctx();
    let tok = c.tokenizer().clone();
    let text = "café ☕ 🐱 ok";
    let toks = enc(&tok, text);
    // the byte-level tokenizer really splits some characters across tokens
    let ids: Vec<u32> = toks.iter().map(|t| t.text_id().unwrap()).collect();
    let split = (1..ids.len())
        .filter(|&n| tok.decode(&ids[..n]).unwrap().ends_with('\u{FFFD}'))
        .count();
    assert!(split >= 2, "expected split characters, ids {ids:?}");

    let req = SkillRequest::Caption {
        length: CaptionLength::Long,
    };
    let (_, mut s, _) = c.start(&req, &SettingsOverrides::default(), true).unwrap();
    let deltas = drive(s.as_mut(), &toks);
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    assert_eq!(deltas.concat(), text);
    let out = s.finish(FinishReason::Stop).unwrap();
    assert_eq!(out.to_json(), serde_json::json!({ "caption": text }));
    assert_eq!(s.take_delta(), None);

    // generation cut inside the emoji: the U+FFFD is held back until finish, then flushed
    let cut = (1..ids.len())
        .rev()
        .find(|&n| tok.decode(&ids[..n]).unwrap().ends_with('\u{FFFD}'))
        .unwrap();
    let (_, mut s, _) = c.start(&req, &SettingsOverrides::default(), true).unwrap();
    let mut deltas = drive(s.as_mut(), &toks[..cut]);
    let before = deltas.concat();
    assert!(!before.contains('\u{FFFD}'), "{before:?}");
    let out = s.finish(FinishReason::Length).unwrap();
    let tail = s.take_delta().expect("held-back tail");
    assert!(tail.ends_with('\u{FFFD}'), "{tail:?}");
    deltas.push(tail);
    let SkillOutput::Caption(cap) = out else {
        panic!("caption expected")
    };
    assert!(cap.caption.ends_with('\u{FFFD}'));
    assert_eq!(deltas.concat(), cap.caption);
    assert_eq!(s.take_delta(), None);
}

#[test]
fn post_reasoning_prefix_is_forced_and_not_part_of_the_answer() {
    let mut cfg = config();
    cfg.tokenizer.templates.query.post_reasoning_prefix = vec![3, 11];
    let c = SkillContext::new(&cfg, tokenizer(), &Conventions::default());
    let tok = c.tokenizer().clone();
    let mut s = query_state(&c, true);
    drive(s.as_mut(), &enc(&tok, "hm"));
    s.consume(&Token::Text(3)).unwrap();
    assert_eq!(s.constraint(), Constraint::Allow(vec![3]));
    s.consume(&Token::Text(3)).unwrap();
    assert_eq!(s.constraint(), Constraint::Allow(vec![11]));
    let e = s.consume(&Token::Text(12)).unwrap_err();
    assert!(
        !e.is_client_error() && e.to_string().contains("forced text id 11"),
        "{e}"
    );
    s.consume(&Token::Text(11)).unwrap();
    assert_eq!(s.take_delta(), None);
    let d = drive(s.as_mut(), &enc(&tok, "yes"));
    assert_eq!(d.concat(), "yes");
    let out = query(s.finish(FinishReason::Stop).unwrap());
    assert_eq!(out.answer, "yes");
    assert_eq!(out.reasoning.unwrap().text, "hm");
}

#[test]
fn states_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let s = query_state(&ctx(), true);
    is_send(&s);
    is_send(&ctx());
}
