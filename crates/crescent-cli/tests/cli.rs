//! End-to-end tests of the `crescent` binary: outputs against the md3-tiny reference cases,
//! usage errors, bad images and broken model folders (missing/mis-shaped/mis-typed tensors,
//! inconsistent config, no tokenizer, truncated checkpoint) and a sharded checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/md3-tiny");

fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURE).join(rel)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A finished run of the binary.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn crescent_in(args: &[&str], env: &[(&str, &str)], dir: Option<&Path>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crescent"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().expect("run crescent");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn crescent(args: &[&str]) -> Run {
    crescent_in(args, &[], None)
}

/// A scratch folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "crescent-cli-test-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Same keys and strings, numbers within `tol`.
fn same_output(got: &Value, want: &Value, tol: f64, path: &str) {
    match (got, want) {
        (Value::Object(a), Value::Object(b)) => {
            let mut ka: Vec<_> = a.keys().collect();
            let mut kb: Vec<_> = b.keys().collect();
            ka.sort();
            kb.sort();
            assert_eq!(ka, kb, "{path}: keys");
            for k in kb {
                same_output(&a[k], &b[k], tol, &format!("{path}.{k}"));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}: length");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                same_output(x, y, tol, &format!("{path}[{i}]"));
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= tol, "{path}: {a} vs {b}");
        }
        _ => assert_eq!(got, want, "{path}"),
    }
}

/// The expected "output" of a reference case.
fn expected_output(case: &str) -> Value {
    let text = std::fs::read_to_string(fixture(&format!("expected/{case}.json"))).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["output"].clone()
}

/// A successful run printed exactly one line on stdout: the expected output.
fn assert_output(run: &Run, case: &str) -> Value {
    assert_eq!(
        run.code,
        Some(0),
        "{case}: exit status; stderr: {}",
        run.stderr
    );
    assert!(
        run.stdout.ends_with('\n') && run.stdout.matches('\n').count() == 1,
        "{case}: stdout must be one line: {:?}",
        run.stdout
    );
    let got: Value = serde_json::from_str(run.stdout.trim_end()).unwrap_or_else(|e| {
        panic!("{case}: stdout is not JSON ({e}): {:?}", run.stdout);
    });
    assert!(got.is_object(), "{case}: not an object");
    same_output(&got, &expected_output(case), 1e-6, case);
    assert!(
        !run.stderr.contains("error"),
        "{case}: stderr {}",
        run.stderr
    );
    got
}

/// A failed run: non-zero `code`, nothing on stdout, one `error:` line (the last line of
/// stderr) that contains every needle, no panic report.
fn assert_error(run: &Run, code: i32, needles: &[&str], what: &str) {
    assert_eq!(
        run.code,
        Some(code),
        "{what}: exit status; stderr: {}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{what}: stdout {:?}", run.stdout);
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{what}: stderr {:?}", run.stderr);
    assert_eq!(
        run.stderr.lines().last(),
        Some(errors[0]),
        "{what}: the error must be the last line: {:?}",
        run.stderr
    );
    for n in needles {
        assert!(errors[0].contains(n), "{what}: {:?} lacks {n:?}", errors[0]);
    }
    for bad in ["panicked", "internal error", "RUST_BACKTRACE"] {
        assert!(!run.stderr.contains(bad), "{what}: stderr {:?}", run.stderr);
    }
}

#[test]
fn reference_cases_match_the_fixture() {
    let landscape = fixture("images/landscape_800x600.png");
    let square = fixture("images/square_378x378.png");
    let wide = fixture("images/wide_1920x1080.jpg");
    let tall = fixture("images/tall_300x1400.png");
    let m = FIXTURE;
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "query_landscape",
            vec![
                "query",
                "--model",
                m,
                "--image",
                path_str(&landscape),
                "--question",
                "How many objects are there?",
                "--max-tokens",
                "24",
                "--temperature",
                "0",
            ],
        ),
        (
            "query_sampled",
            vec![
                "query",
                "--model",
                m,
                "--image",
                path_str(&square),
                "--question",
                "What is in this image?",
                "--temperature",
                "0.7",
                "--top-p",
                "0.9",
                "--seed",
                "1234",
                "--max-tokens",
                "24",
            ],
        ),
        (
            "query_text_only",
            vec![
                "query",
                "--model",
                m,
                "--question",
                "What does the sign say?",
                "--max-tokens",
                "16",
                "--temperature",
                "0",
            ],
        ),
        (
            "detect_wide",
            vec![
                "detect",
                "--model",
                m,
                "--image",
                path_str(&wide),
                "--object",
                "tree",
            ],
        ),
        (
            "point_tall_max4",
            vec![
                "point",
                "--model",
                m,
                "--image",
                path_str(&tall),
                "--object",
                "cat",
                "--max-objects",
                "4",
            ],
        ),
    ];
    for (case, args) in cases {
        let run = crescent(&args);
        assert_output(&run, case);
        assert!(run.stderr.is_empty(), "{case}: stderr {:?}", run.stderr);
    }
}

#[test]
fn caption_streams_to_stderr_and_reports_stats() {
    let image = fixture("images/landscape_800x600.png");
    let run = crescent(&[
        "caption",
        "--model",
        FIXTURE,
        "--image",
        path_str(&image),
        "--length",
        "long",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
        "--stream",
        "--stats",
    ]);
    let got = assert_output(&run, "caption_long");
    let caption = got["caption"].as_str().unwrap();
    // stderr: the streamed caption, a newline, then the stats line.
    let (streamed, stats) = run
        .stderr
        .trim_end_matches('\n')
        .rsplit_once('\n')
        .expect("streamed text and stats");
    assert_eq!(streamed, caption);
    let stats: Value = serde_json::from_str(stats).expect("stats line is JSON");
    let case: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("expected/caption_long.json")).unwrap(),
    )
    .unwrap();
    let stop = case["stop_reason"].as_str().unwrap();
    let n_ids = case["output_ids"].as_array().unwrap().len();
    assert_eq!(stats["skill"], "caption");
    assert_eq!(stats["finish_reason"], stop);
    // Sampled tokens count the final eos.
    assert_eq!(stats["output_tokens"], n_ids + usize::from(stop == "stop"));
    assert_eq!(stats["input_tokens"], case["prompt"]["prefill_len"]);
    assert_eq!(stats["tiling"], serde_json::json!([2, 4]));
    for k in ["load_ms", "prefill_ms", "decode_ms", "total_ms"] {
        assert!(stats[k].as_f64().is_some_and(|v| v >= 0.0), "{k}: {stats}");
    }
}

/// `--quantize int8|int4` loads and runs (the outputs differ from the bf16 reference on this
/// tiny random model; their quality is checked in crescent-model's `tests/quantized.rs`).
#[test]
fn quantized_runs_produce_api_outputs() {
    let image = fixture("images/wide_1920x1080.jpg");
    for (skill, extra, key) in [
        ("detect", ["--object", "tree"], "objects"),
        ("caption", ["--length", "short"], "caption"),
    ] {
        for quant in ["int8", "int4"] {
            let run = crescent(&[
                skill,
                "--model",
                FIXTURE,
                "--image",
                path_str(&image),
                extra[0],
                extra[1],
                "--max-tokens",
                "8",
                "--quantize",
                quant,
            ]);
            assert_eq!(run.code, Some(0), "{skill} {quant}: {}", run.stderr);
            let v: Value = serde_json::from_str(run.stdout.trim()).expect("one JSON object");
            assert!(v.get(key).is_some(), "{skill} {quant}: {v}");
        }
    }
    // The KV-cache element type can be chosen either way (auto: f16 with --quantize).
    for extra in [
        &["--kv-dtype", "f16"][..],
        &["--kv-dtype", "f32"],
        &["--quantize", "int8", "--kv-dtype", "f32"],
        &["--quantize", "int4", "--kv-dtype", "f16"],
    ] {
        let mut args = vec![
            "caption",
            "--model",
            FIXTURE,
            "--image",
            path_str(&image),
            "--max-tokens",
            "4",
        ];
        args.extend(extra);
        let run = crescent(&args);
        assert_eq!(run.code, Some(0), "{args:?}: {}", run.stderr);
        let v: Value = serde_json::from_str(run.stdout.trim()).expect("one JSON object");
        assert!(v["caption"].is_string(), "{args:?}: {v}");
    }
}

#[test]
fn usage_errors_are_one_line() {
    let image = fixture("images/landscape_800x600.png");
    let img = path_str(&image);
    let m = FIXTURE;
    let q = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = ["query", "--model", m, "--question", "What is this?"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            ["detect", "--model", m, "--image", img]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            vec!["--object"],
        ),
        (vec!["describe".into()], vec!["describe"]),
        (q(&["--temperature", "-1"]), vec!["--temperature", "-1"]),
        (q(&["--top-p", "0"]), vec!["--top-p"]),
        (q(&["--top-p", "1.5"]), vec!["--top-p", "1.5"]),
        (q(&["--max-tokens", "0"]), vec!["--max-tokens"]),
        (
            q(&["--spatial-ref", "2,3"]),
            vec!["--spatial-ref", "outside [0, 1]"],
        ),
        (
            q(&["--spatial-ref", "0.1,0.2,0.3"]),
            vec!["--spatial-ref", "got 3"],
        ),
        (q(&["--quantize", "int3"]), vec!["--quantize", "int3"]),
        (q(&["--kv-dtype", "f8"]), vec!["--kv-dtype", "f8"]),
    ];
    for (args, needles) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = crescent(&args);
        assert_error(&run, 2, &needles, &args.join(" "));
    }
}

#[test]
fn bad_images_are_one_line_errors() {
    let tmp = TempDir::new("images");
    let text = tmp.join("notes.png");
    std::fs::write(&text, "this is not an image\n").unwrap();
    let png = std::fs::read(fixture("images/landscape_800x600.png")).unwrap();
    let truncated = tmp.join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    let missing = tmp.join("missing.png");
    for (path, needle) in [
        (&missing, "cannot read image"),
        (&text, "unknown image format"),
        (&truncated, "truncated.png"),
    ] {
        let run = crescent(&["caption", "--model", FIXTURE, "--image", path_str(path)]);
        assert_error(&run, 1, &[needle, path_str(path)], path_str(path));
    }
}

#[test]
fn missing_model_and_offline_hub_id_fail_cleanly() {
    let tmp = TempDir::new("hub");
    let nowhere = tmp.join("no-such-model");
    let run = crescent(&["query", "--model", path_str(&nowhere), "--question", "hi"]);
    assert_error(
        &run,
        1,
        &["does not exist", path_str(&nowhere)],
        "missing folder",
    );

    // The default model is a Hub id; offline with an empty cache it must fail at once.
    let hf_home = tmp.join("hf-home");
    let run = crescent_in(
        &["query", "--question", "hi"],
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HOME", path_str(&hf_home)),
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ],
        Some(tmp.path()),
    );
    assert_error(
        &run,
        1,
        &["moondream/moondream3-preview", "--model DIR"],
        "offline hub id",
    );
}

/// The fixture checkpoint's tensors.
fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("model.safetensors"), &Device::Cpu).unwrap()
}

/// A model folder in `dir` with the fixture's config and tokenizer and the given tensors.
fn write_model(dir: &Path, tensors: Option<&HashMap<String, Tensor>>, tokenizer: bool) {
    std::fs::copy(fixture("config.json"), dir.join("config.json")).unwrap();
    if tokenizer {
        std::fs::copy(fixture("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    }
    match tensors {
        Some(t) => candle_core::safetensors::save(t, dir.join("model.safetensors")).unwrap(),
        None => {
            std::fs::copy(fixture("model.safetensors"), dir.join("model.safetensors")).unwrap();
        }
    }
}

#[test]
fn broken_model_folders_are_one_line_errors() {
    let image = fixture("images/tiny_40x30.png");
    let run_on = |dir: &Path| {
        crescent(&[
            "point",
            "--model",
            path_str(dir),
            "--image",
            path_str(&image),
            "--object",
            "cat",
        ])
    };
    let base = fixture_tensors();

    // A tensor the model needs is absent.
    let tmp = TempDir::new("missing-tensor");
    let name = "model.text.blocks.1.mlp.router.weight";
    let mut t = base.clone();
    t.remove(name).unwrap();
    write_model(tmp.path(), Some(&t), true);
    assert_error(
        &run_on(tmp.path()),
        1,
        &["missing tensor", name],
        "missing tensor",
    );

    // A tensor of the wrong shape.
    let tmp = TempDir::new("wrong-shape");
    let name = "model.vision.blocks.0.mlp.fc1.weight";
    let mut t = base.clone();
    t.insert(
        name.into(),
        Tensor::zeros((64, 31), DType::BF16, &Device::Cpu).unwrap(),
    );
    write_model(tmp.path(), Some(&t), true);
    assert_error(
        &run_on(tmp.path()),
        1,
        &[name, "[64, 31]", "[64, 32]"],
        "wrong shape",
    );

    // A tensor of an integer dtype.
    let tmp = TempDir::new("wrong-dtype");
    let name = "model.region.coord_encoder.weight";
    let mut t = base.clone();
    let bad = t[name].to_dtype(DType::U8).unwrap();
    t.insert(name.into(), bad);
    write_model(tmp.path(), Some(&t), true);
    assert_error(&run_on(tmp.path()), 1, &[name, "dtype u8"], "wrong dtype");

    // An inconsistent config.json.
    let tmp = TempDir::new("bad-config");
    write_model(tmp.path(), None, true);
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("config.json")).unwrap()).unwrap();
    cfg["config"]["text"]["n_heads"] = 3.into();
    std::fs::write(tmp.join("config.json"), cfg.to_string()).unwrap();
    assert_error(
        &run_on(tmp.path()),
        1,
        &["text.dim (64) must be divisible by text.n_heads (3)"],
        "bad config",
    );

    // No tokenizer.json.
    let tmp = TempDir::new("no-tokenizer");
    write_model(tmp.path(), None, false);
    assert_error(&run_on(tmp.path()), 1, &["tokenizer.json"], "no tokenizer");

    // A truncated model.safetensors.
    let tmp = TempDir::new("truncated");
    write_model(tmp.path(), None, true);
    let bytes = std::fs::read(fixture("model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_error(
        &run_on(tmp.path()),
        1,
        &["model.safetensors", "truncated"],
        "truncated checkpoint",
    );
}

#[test]
fn sharded_checkpoint_gives_the_same_output() {
    let tmp = TempDir::new("sharded");
    std::fs::copy(fixture("config.json"), tmp.join("config.json")).unwrap();
    std::fs::copy(fixture("tokenizer.json"), tmp.join("tokenizer.json")).unwrap();
    let mut names: Vec<String> = fixture_tensors().into_keys().collect();
    names.sort();
    let all = fixture_tensors();
    let shard_names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut shards: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        let s = i % 2;
        shards[s].insert(n.clone(), all[n].clone());
        weight_map.insert(n.clone(), shard_names[s].into());
    }
    for (s, file) in shards.iter().zip(shard_names) {
        candle_core::safetensors::save(s, tmp.join(file)).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(tmp.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert!(!tmp.join("model.safetensors").exists());
    let image = fixture("images/wide_1920x1080.jpg");
    let run = crescent(&[
        "detect",
        "--model",
        path_str(tmp.path()),
        "--image",
        path_str(&image),
        "--object",
        "tree",
    ]);
    assert_output(&run, "detect_wide");
}
