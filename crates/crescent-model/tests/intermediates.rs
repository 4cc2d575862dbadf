//! Layer-by-layer comparison with the reference intermediates of case `query_landscape`
//! (fixture README: per-tensor `max |a - b| <= recommended_atol`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use crescent_model::text::TextTrace;
use crescent_model::vision::VisionTrace;
use crescent_model::{LoadOptions, Moondream, Token, WeightStorage};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/md3-tiny")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Kestrel's bf16 stepwise pixel table (spec §4.5), written out independently of crescent-image.
fn lut() -> Vec<f32> {
    let b = |x: f32| half::bf16::from_f32(x).to_f32();
    (0..256)
        .map(|u| 2.0 * b(b(b(u as f32) / 255.0) - 0.5))
        .collect()
}

/// Normalised `[n, 3, S, S]` pixels from the exact fixture crop PNGs.
fn crops_chw(name: &str, n: usize) -> Vec<f32> {
    let lut = lut();
    let mut out = Vec::new();
    for i in 0..n {
        let p = fixture().join(format!("expected/crops/{name}/crop_{i:02}.png"));
        let img = image::open(&p).unwrap().to_rgb8();
        let (w, h) = img.dimensions();
        let raw = img.into_raw();
        for c in 0..3 {
            for y in 0..h as usize {
                for x in 0..w as usize {
                    out.push(lut[raw[(y * w as usize + x) * 3 + c] as usize]);
                }
            }
        }
    }
    out
}

struct Refs {
    t: HashMap<String, Tensor>,
    atol: HashMap<String, f64>,
}

impl Refs {
    fn load() -> Self {
        let t = candle_core::safetensors::load(
            fixture().join("expected/intermediates.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let idx = json(&fixture().join("expected/index.json"));
        let mut atol = HashMap::new();
        for (k, v) in idx["meta"]["intermediates"]["noise"].as_object().unwrap() {
            if let Some(a) = v.get("recommended_atol").and_then(|a| a.as_f64()) {
                atol.insert(k.clone(), a);
            }
        }
        Self { t, atol }
    }

    fn check(&self, name: &str, got: &Tensor) -> f64 {
        let want = self
            .t
            .get(name)
            .unwrap_or_else(|| panic!("no reference tensor {name}"));
        assert_eq!(got.dims(), want.dims(), "{name}: shape");
        let a = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = want
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max);
        let tol = self.atol[name];
        assert!(diff <= tol, "{name}: max |diff| {diff:e} > atol {tol:e}");
        eprintln!("{name:32} max|diff| {diff:.3e}  (atol {tol:.1e})");
        diff
    }
}

fn cat_rows(parts: &[Option<Tensor>]) -> Tensor {
    let ts: Vec<&Tensor> = parts.iter().map(|p| p.as_ref().unwrap()).collect();
    Tensor::cat(&ts, 0).unwrap()
}

fn run(ws: WeightStorage) {
    let refs = Refs::load();
    let opts = LoadOptions {
        weights: ws,
        ..Default::default()
    };
    let model = Moondream::load(&fixture(), &opts).unwrap();
    let case = json(&fixture().join("expected/query_landscape.json"));
    let tiling = (2, 4);
    assert_eq!(case["preprocess"]["tiling"], serde_json::json!([2, 4]));
    let pixels = crops_chw("landscape_800x600", 9);
    let mut vt = VisionTrace::default();
    let emb = model.encode_image(&pixels, tiling, Some(&mut vt)).unwrap();
    refs.check("vision.embed", vt.embed.as_ref().unwrap());
    for (i, b) in vt.blocks.iter().enumerate() {
        refs.check(&format!("vision.block{i}.out"), b);
    }
    refs.check("vision.features", vt.features.as_ref().unwrap());
    refs.check("vision.reconstructed", vt.reconstructed.as_ref().unwrap());
    refs.check("vision.pooled", vt.pooled.as_ref().unwrap());
    refs.check("vision.proj_in", vt.proj_in.as_ref().unwrap());
    refs.check("image_embeds", &emb);

    let prompt: Vec<Token> = case["prompt"]["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| Token::Text(v.as_u64().unwrap() as u32))
        .collect();
    let mut t1 = TextTrace::default();
    let (mut cache, _) = model
        .prefill_image(&emb, prompt.len() + 8, Some(&mut t1))
        .unwrap();
    let mut t2 = TextTrace::default();
    let h = model
        .forward_tokens(&prompt, &mut cache, Some(&mut t2))
        .unwrap();
    assert_eq!(
        cache.len(),
        case["prompt"]["prefill_len"].as_u64().unwrap() as usize
    );
    for li in 0..2 {
        let (a, b) = (&t1.blocks[li], &t2.blocks[li]);
        let p = format!("text.block{li}");
        refs.check(
            &format!("{p}.ln_out"),
            &cat_rows(&[a.ln_out.clone(), b.ln_out.clone()]),
        );
        refs.check(
            &format!("{p}.qkv"),
            &cat_rows(&[a.qkv.clone(), b.qkv.clone()]),
        );
        refs.check(
            &format!("{p}.tau_q"),
            &cat_rows(&[a.tau_q.clone(), b.tau_q.clone()]),
        );
        refs.check(
            &format!("{p}.tau_v"),
            &cat_rows(&[a.tau_v.clone(), b.tau_v.clone()]),
        );
        refs.check(
            &format!("{p}.q_rot"),
            &cat_rows(&[a.q_rot.clone(), b.q_rot.clone()]),
        );
        refs.check(
            &format!("{p}.k_rot"),
            &cat_rows(&[a.k_rot.clone(), b.k_rot.clone()]),
        );
        refs.check(
            &format!("{p}.attn_out"),
            &cat_rows(&[a.attn_out.clone(), b.attn_out.clone()]),
        );
        refs.check(
            &format!("{p}.mlp_out"),
            &cat_rows(&[a.mlp_out.clone(), b.mlp_out.clone()]),
        );
        if a.router_logits.is_some() {
            refs.check(
                &format!("{p}.router_logits"),
                &cat_rows(&[a.router_logits.clone(), b.router_logits.clone()]),
            );
            refs.check(
                &format!("{p}.topk_weights"),
                &cat_rows(&[a.topk_weights.clone(), b.topk_weights.clone()]),
            );
            let want = refs.t[&format!("{p}.topk_ids")]
                .to_dtype(candle_core::DType::I64)
                .unwrap()
                .to_vec2::<i64>()
                .unwrap();
            let got: Vec<Vec<usize>> = a
                .topk_ids
                .clone()
                .unwrap()
                .into_iter()
                .chain(b.topk_ids.clone().unwrap())
                .collect();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                let mut g: Vec<i64> = g.iter().map(|&x| x as i64).collect();
                let mut w = w.clone();
                g.sort();
                w.sort();
                assert_eq!(g, w, "{p}.topk_ids as sets");
            }
        }
    }
    let n_hidden = t1.hidden_states.len();
    let hs: Vec<Tensor> = (0..n_hidden)
        .map(|i| Tensor::cat(&[&t1.hidden_states[i], &t2.hidden_states[i]], 0).unwrap())
        .collect();
    refs.check("text.hidden_states", &Tensor::stack(&hs, 0).unwrap());
    let last = h.get(h.dims()[0] - 1).unwrap();
    let logits = model.logits(&last).unwrap();
    refs.check(
        "text.last_logits",
        &Tensor::new(logits, &Device::Cpu).unwrap(),
    );
}

#[test]
fn intermediates_match_reference_bf16_weights() {
    run(WeightStorage::Checkpoint);
}

#[test]
fn intermediates_match_reference_f32_weights() {
    run(WeightStorage::F32);
}
