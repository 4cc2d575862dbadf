//! Settings defaults, budgets and validation.

use crescent_skills::{
    resolve_settings, CaptionLength, GenerationSettings, SettingsOverrides, SkillError,
    SkillRequest,
};

fn query() -> SkillRequest {
    SkillRequest::Query {
        question: "q".into(),
        reasoning: true,
        spatial_refs: vec![],
    }
}
fn caption() -> SkillRequest {
    SkillRequest::Caption {
        length: CaptionLength::Normal,
    }
}
fn detect(max_objects: Option<usize>) -> SkillRequest {
    SkillRequest::Detect {
        object: "o".into(),
        max_objects,
    }
}
fn point(max_objects: Option<usize>) -> SkillRequest {
    SkillRequest::Point {
        object: "o".into(),
        max_objects,
        spatial_refs: vec![],
    }
}

fn none() -> SettingsOverrides {
    SettingsOverrides::default()
}

#[test]
fn defaults_per_skill() {
    let text = GenerationSettings {
        temperature: 0.2,
        top_p: 0.9,
        max_new_tokens: 768,
        seed: None,
    };
    assert_eq!(resolve_settings(&query(), &none()).unwrap(), text);
    assert_eq!(resolve_settings(&caption(), &none()).unwrap(), text);
    let greedy = |n| GenerationSettings {
        temperature: 0.0,
        top_p: 1.0,
        max_new_tokens: n,
        seed: None,
    };
    assert_eq!(
        resolve_settings(&detect(None), &none()).unwrap(),
        greedy(151)
    );
    assert_eq!(
        resolve_settings(&point(None), &none()).unwrap(),
        greedy(768)
    );
}

#[test]
fn object_budgets() {
    let budget = |req: SkillRequest, ov: SettingsOverrides| {
        resolve_settings(&req, &ov).unwrap().max_new_tokens
    };
    assert_eq!(budget(detect(Some(1)), none()), 4);
    assert_eq!(budget(detect(Some(10)), none()), 31);
    // max_tokens is ignored by detect
    assert_eq!(
        budget(
            detect(Some(10)),
            SettingsOverrides {
                max_tokens: Some(5),
                ..none()
            }
        ),
        31
    );
    assert_eq!(
        budget(
            detect(None),
            SettingsOverrides {
                max_objects: Some(2),
                ..none()
            }
        ),
        7
    );
    assert_eq!(budget(point(Some(1)), none()), 3);
    assert_eq!(budget(point(Some(4)), none()), 9);
    assert_eq!(
        budget(
            point(None),
            SettingsOverrides {
                max_objects: Some(4),
                ..none()
            }
        ),
        9
    );
    // without max_objects point follows max_tokens
    assert_eq!(
        budget(
            point(None),
            SettingsOverrides {
                max_tokens: Some(100),
                ..none()
            }
        ),
        100
    );
    assert_eq!(
        budget(
            point(Some(4)),
            SettingsOverrides {
                max_tokens: Some(100),
                ..none()
            }
        ),
        9
    );
    // same value twice is fine
    assert_eq!(
        budget(
            point(Some(4)),
            SettingsOverrides {
                max_objects: Some(4),
                ..none()
            }
        ),
        9
    );
    // huge values saturate instead of overflowing
    assert_eq!(budget(detect(Some(usize::MAX)), none()), usize::MAX);
    // text skills ignore max_objects
    assert_eq!(
        budget(
            query(),
            SettingsOverrides {
                max_objects: Some(3),
                ..none()
            }
        ),
        768
    );
}

#[test]
fn overrides_apply() {
    let ov = SettingsOverrides {
        temperature: Some(0.0),
        top_p: Some(1.0),
        max_tokens: Some(24),
        max_objects: None,
        seed: Some(7),
    };
    assert_eq!(
        resolve_settings(&query(), &ov).unwrap(),
        GenerationSettings {
            temperature: 0.0,
            top_p: 1.0,
            max_new_tokens: 24,
            seed: Some(7)
        }
    );
    let ov = SettingsOverrides {
        temperature: Some(0.7),
        top_p: Some(0.5),
        ..none()
    };
    let s = resolve_settings(&detect(None), &ov).unwrap();
    assert_eq!((s.temperature, s.top_p, s.max_new_tokens), (0.7, 0.5, 151));
}

fn field_of(req: SkillRequest, ov: SettingsOverrides) -> (&'static str, String) {
    match resolve_settings(&req, &ov).unwrap_err() {
        e @ SkillError::InvalidSetting { field, .. } => {
            assert!(e.is_client_error());
            (field, e.to_string())
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn validation_errors_name_the_field() {
    for t in [-0.1f32, f32::NAN, f32::INFINITY] {
        let (f, msg) = field_of(
            query(),
            SettingsOverrides {
                temperature: Some(t),
                ..none()
            },
        );
        assert_eq!(f, "temperature");
        assert!(msg.contains("`temperature`"), "{msg}");
    }
    for p in [0.0f32, -0.5, 1.01, f32::NAN] {
        let (f, _) = field_of(
            caption(),
            SettingsOverrides {
                top_p: Some(p),
                ..none()
            },
        );
        assert_eq!(f, "top_p");
    }
    let (f, _) = field_of(
        query(),
        SettingsOverrides {
            max_tokens: Some(0),
            ..none()
        },
    );
    assert_eq!(f, "max_tokens");
    // max_tokens is validated even where it is ignored
    let (f, _) = field_of(
        detect(None),
        SettingsOverrides {
            max_tokens: Some(0),
            ..none()
        },
    );
    assert_eq!(f, "max_tokens");
    let (f, _) = field_of(
        detect(None),
        SettingsOverrides {
            max_objects: Some(0),
            ..none()
        },
    );
    assert_eq!(f, "max_objects");
    let (f, _) = field_of(point(Some(0)), none());
    assert_eq!(f, "max_objects");
    let (f, msg) = field_of(
        point(Some(3)),
        SettingsOverrides {
            max_objects: Some(4),
            ..none()
        },
    );
    assert_eq!(f, "max_objects");
    assert!(msg.contains("different values"), "{msg}");
    // boundary values are accepted
    let ov = SettingsOverrides {
        temperature: Some(0.0),
        top_p: Some(1.0),
        max_tokens: Some(1),
        ..none()
    };
    assert!(resolve_settings(&query(), &ov).is_ok());
}
