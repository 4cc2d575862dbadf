//! Checkpoint errors name the tensor and the expected / found shape or dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use crescent_model::{LoadOptions, ModelError, Moondream};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/md3-tiny")
}

/// A copy of the fixture model whose tensors went through `edit`.
fn broken(tag: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("crescent-weights-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> ModelError {
    let e = Moondream::load(dir, &LoadOptions::default()).unwrap_err();
    std::fs::remove_dir_all(dir).ok();
    e
}

#[test]
fn missing_tensor_is_named() {
    let dir = broken("missing", |t| {
        t.remove("model.text.blocks.1.mlp.router.bias");
    });
    match load_err(&dir) {
        ModelError::MissingTensor { name, expected } => {
            assert_eq!(name, "model.text.blocks.1.mlp.router.bias");
            assert_eq!(expected, vec![8]);
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let dir = broken("shape", |t| {
        t.insert(
            "model.vision.blocks.0.attn.qkv.weight".into(),
            Tensor::zeros((96, 31), DType::BF16, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&dir);
    let msg = e.to_string();
    assert!(matches!(e, ModelError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("model.vision.blocks.0.attn.qkv.weight")
            && msg.contains("[96, 31]")
            && msg.contains("[96, 32]"),
        "{msg}"
    );
}

#[test]
fn wrong_dtype_is_rejected() {
    let dir = broken("dtype", |t| {
        let x = t["model.text.post_ln.weight"].to_dtype(DType::U8).unwrap();
        t.insert("model.text.post_ln.weight".into(), x);
    });
    let e = load_err(&dir);
    assert!(
        matches!(&e, ModelError::BadDtype { name, .. } if name == "model.text.post_ln.weight"),
        "{e}"
    );
}

#[test]
fn f32_and_f16_checkpoints_load_too() {
    for (tag, dt) in [("f32", DType::F32), ("f16", DType::F16)] {
        let dir = broken(tag, |t| {
            for v in t.values_mut() {
                *v = v.to_dtype(dt).unwrap();
            }
        });
        std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
        let r = Moondream::load(&dir, &LoadOptions::default());
        std::fs::remove_dir_all(&dir).ok();
        assert!(r.is_ok(), "{tag}: {:?}", r.err());
    }
}

#[test]
fn truncated_or_garbage_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("crescent-weights-trunc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let msg = Moondream::load(&dir, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("truncated"), "{msg}");
    std::fs::write(dir.join("model.safetensors"), b"not a checkpoint at all").unwrap();
    let msg = Moondream::load(&dir, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let msg = Moondream::load(&dir, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no model.safetensors"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sharded_index_with_a_missing_shard_is_named() {
    let dir = std::env::temp_dir().join(format!("crescent-weights-shard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.text.wte": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let msg = Moondream::load(&dir, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing checkpoint shard") && msg.contains("model-00001-of-00002"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
