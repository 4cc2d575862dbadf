//! Fault isolation: a skill state that panics or fails (in `consume`, `constraint`, `finish`, or
//! by forcing a token outside the vocabulary) fails its own request only. The other rows of the
//! same batch finish with exactly the outputs they have alone, every KV block returns to the
//! pool, and the engine keeps serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use crescent_engine::{
    CustomJob, Engine, EngineConfig, EngineError, Generation, ImageInput, Job, Submission,
};
use crescent_model::{load_tokenizer, LoadOptions, Moondream, Token};
use crescent_skills::{
    CaptionLength, Constraint, FinishReason, SettingsOverrides, SkillError, SkillOutput,
    SkillRequest, SkillState,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/md3-tiny")
}

fn engine() -> Engine {
    let model = Moondream::load(&fixture(), &LoadOptions::default()).expect("model");
    let tok = load_tokenizer(&fixture().join("tokenizer.json")).expect("tokenizer");
    Engine::with_config(
        Arc::new(model),
        Arc::new(tok),
        EngineConfig {
            kv_cache_mb: 64,
            ..EngineConfig::default()
        },
    )
}

fn image(engine: &Engine, name: &str) -> ImageInput {
    let bytes = std::fs::read(fixture().join("images").join(name)).expect("fixture image");
    engine.prepare_image(&bytes).expect("preprocess")
}

fn greedy(max_tokens: usize) -> SettingsOverrides {
    SettingsOverrides {
        temperature: Some(0.0),
        top_p: Some(1.0),
        max_tokens: Some(max_tokens),
        ..SettingsOverrides::default()
    }
}

/// The well-behaved jobs: a greedy caption, a sampled text-only query, a detect and a point.
fn normal_jobs(engine: &Engine) -> Vec<Job> {
    let landscape = image(engine, "landscape_800x600.png");
    let square = image(engine, "square_378x378.png");
    vec![
        Job {
            request: SkillRequest::Caption {
                length: CaptionLength::Normal,
            },
            overrides: greedy(24),
            image: Some(landscape.clone()),
            trace: false,
        },
        Job {
            request: SkillRequest::Query {
                question: "What is in the picture?".into(),
                reasoning: false,
                spatial_refs: Vec::new(),
            },
            overrides: SettingsOverrides {
                seed: Some(7),
                max_tokens: Some(20),
                ..SettingsOverrides::default()
            },
            image: None,
            trace: false,
        },
        Job {
            request: SkillRequest::Detect {
                object: "car".into(),
                max_objects: Some(3),
            },
            overrides: SettingsOverrides::default(),
            image: Some(square),
            trace: false,
        },
        Job {
            request: SkillRequest::Point {
                object: "tree".into(),
                max_objects: Some(3),
                spatial_refs: Vec::new(),
            },
            overrides: SettingsOverrides::default(),
            image: Some(landscape),
            trace: false,
        },
    ]
}

/// How an injected state misbehaves.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    PanicInConsume,
    ErrorInConsume,
    PanicInConstraint,
    PanicInFinish,
    ForceBadTokenId,
}

const INJECTED: &str = "injected fault";

/// A real caption state that misbehaves after `after` tokens.
struct Faulty {
    inner: Box<dyn SkillState>,
    fault: Fault,
    after: usize,
    seen: usize,
}

impl SkillState for Faulty {
    fn constraint(&self) -> Constraint {
        if self.seen >= self.after {
            match self.fault {
                Fault::PanicInConstraint => panic!("{INJECTED}: constraint"),
                Fault::ForceBadTokenId => return Constraint::Allow(vec![u32::MAX - 1]),
                _ => {}
            }
        }
        self.inner.constraint()
    }

    fn consume(&mut self, token: &Token) -> Result<(), SkillError> {
        self.seen += 1;
        if self.seen > self.after {
            match self.fault {
                Fault::PanicInConsume => panic!("{INJECTED}: consume"),
                Fault::ErrorInConsume => {
                    return Err(SkillError::UnexpectedToken(format!("{INJECTED}: consume")))
                }
                _ => {}
            }
        }
        self.inner.consume(token)
    }

    fn take_delta(&mut self) -> Option<String> {
        self.inner.take_delta()
    }

    fn finish(&mut self, reason: FinishReason) -> Result<SkillOutput, SkillError> {
        if self.fault == Fault::PanicInFinish {
            panic!("{INJECTED}: finish");
        }
        self.inner.finish(reason)
    }
}

fn faulty_job(engine: &Engine, fault: Fault, img: &ImageInput) -> CustomJob {
    // A greedy caption long enough for the fault to strike mid-generation.
    let (prompt, inner, settings) = engine
        .skills()
        .start(
            &SkillRequest::Caption {
                length: CaptionLength::Normal,
            },
            &greedy(16),
            true,
        )
        .expect("caption starts");
    CustomJob {
        skill: "faulty",
        prompt,
        state: Box::new(Faulty {
            inner,
            fault,
            after: 3,
            seen: 0,
        }),
        settings,
        image: Some(img.clone()),
        trace: false,
    }
}

/// Keep the injected panics out of the test output (other panics still print).
fn quiet_injected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !msg.starts_with(INJECTED) {
                prev(info);
            }
        }));
    });
}

fn same(got: &Generation, want: &Generation, what: &str) {
    assert_eq!(got.ids, want.ids, "{what}: ids");
    assert_eq!(got.output, want.output, "{what}: output");
    assert_eq!(got.finish, want.finish, "{what}: finish");
}

#[test]
fn a_faulty_skill_state_fails_only_its_own_request() {
    quiet_injected_panics();
    let engine = engine();
    // Alone (one batch of only the normal jobs): the reference outputs.
    let reference: Vec<Generation> = engine
        .run_many(normal_jobs(&engine))
        .into_iter()
        .map(|r| r.expect("normal job"))
        .collect();

    // The same jobs interleaved with every kind of faulty state, in one batch.
    let tall = image(&engine, "tall_300x1400.png");
    let faults = [
        Fault::PanicInConsume,
        Fault::ErrorInConsume,
        Fault::PanicInConstraint,
        Fault::PanicInFinish,
        Fault::ForceBadTokenId,
    ];
    let mut subs: Vec<Submission> = Vec::new();
    let mut kinds: Vec<Option<Fault>> = Vec::new();
    let mut normal = normal_jobs(&engine).into_iter();
    for f in faults {
        if let Some(j) = normal.next() {
            subs.push(j.into());
            kinds.push(None);
        }
        subs.push(faulty_job(&engine, f, &tall).into());
        kinds.push(Some(f));
    }
    let results = engine.run_many(subs);
    assert_eq!(results.len(), kinds.len());
    let mut n_normal = 0;
    for (r, kind) in results.into_iter().zip(kinds) {
        match kind {
            None => {
                let g = r.expect("a normal job next to faulty ones succeeds");
                same(&g, &reference[n_normal], &format!("normal job {n_normal}"));
                n_normal += 1;
            }
            Some(Fault::ErrorInConsume) => match r {
                Err(EngineError::Skill(SkillError::UnexpectedToken(m))) => {
                    assert!(m.contains(INJECTED), "{m}")
                }
                other => panic!("ErrorInConsume: {other:?}"),
            },
            Some(f) => match r {
                Err(EngineError::Internal(m)) => {
                    if f == Fault::ForceBadTokenId {
                        assert!(m.contains("outside the vocabulary"), "{m}");
                    } else {
                        assert!(m.contains("panicked"), "{f:?}: {m}");
                    }
                }
                other => panic!("{f:?}: expected an internal error, got {other:?}"),
            },
        }
    }
    assert_eq!(n_normal, reference.len());

    // Every row's KV blocks came back: only the prefix cache holds blocks.
    let m = engine.metrics();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        engine.kv_blocks_used() as u64,
        m.prefix_cache_blocks.load(Relaxed)
    );
    assert_eq!(m.running.load(Relaxed), 0);
    assert_eq!(m.request_count("faulty", "error"), faults.len() as u64);
    engine.clear_prefix_cache();
    assert_eq!(engine.kv_blocks_used(), 0);

    // The engine still serves, with the same outputs.
    let again = engine.run_many(normal_jobs(&engine));
    for (i, (r, want)) in again.into_iter().zip(&reference).enumerate() {
        same(
            &r.expect("normal job after faults"),
            want,
            &format!("rerun {i}"),
        );
    }
}

#[test]
fn a_custom_job_runs_like_the_built_in_skill() {
    let engine = engine();
    let img = image(&engine, "square_378x378.png");
    let req = SkillRequest::Caption {
        length: CaptionLength::Short,
    };
    let builtin = engine
        .run(
            Job {
                request: req.clone(),
                overrides: greedy(12),
                image: Some(img.clone()),
                trace: false,
            },
            |_| {},
        )
        .expect("built-in caption");
    let (prompt, state, settings) = engine
        .skills()
        .start(&req, &greedy(12), true)
        .expect("start");
    let mut streamed = String::new();
    let custom = engine
        .run(
            CustomJob {
                skill: "caption",
                prompt: prompt.clone(),
                state,
                settings,
                image: Some(img),
                trace: false,
            },
            |d| streamed.push_str(d),
        )
        .expect("custom caption");
    same(&custom, &builtin, "custom job");
    match &custom.output {
        SkillOutput::Caption(c) => assert_eq!(c.caption, streamed),
        other => panic!("{other:?}"),
    }
    // A prompt with an image block needs an image.
    let (_, state, settings) = engine.skills().start(&req, &greedy(4), true).unwrap();
    let e = engine
        .run(
            CustomJob {
                skill: "caption",
                prompt,
                state,
                settings,
                image: None,
                trace: false,
            },
            |_| {},
        )
        .unwrap_err();
    assert!(e.is_client_error(), "{e}");
}
