//! The text decoder's two attention paths agree: a prompt run (≥ 8 new rows: keys gathered
//! once, strided-GEMM attention) and decode rows (paged blocks read in place, split-K over
//! block ranges with merged partial softmax states) — here with grouped-query heads (the
//! fixture model has `n_kv_heads == n_heads`, so its cases do not cover GQA) and a context long
//! enough for several split-K ranges — for both KV-cache element types; and an f16 cache stays
//! close to the exact f32 one.

use std::path::Path;

use crescent_model::text::TextDecoder;
use crescent_model::weights::Checkpoint;
use crescent_model::{synth, Config, KvCache, KvDtype, Quantize, WeightStorage};

#[test]
fn prompt_and_decode_attention_paths_agree_with_gqa() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/md3-tiny");
    let mut cfg = Config::from_file(&fixture.join("config.json")).expect("fixture config");
    assert!(cfg.text.n_heads >= 2 && cfg.text.n_heads.is_multiple_of(2));
    cfg.text.n_kv_heads = cfg.text.n_heads / 2;
    cfg.text.tau_attn = false; // tau gates are per query head and need n_kv_heads == n_heads
    cfg.validate().expect("GQA config is valid");
    let dir = std::env::temp_dir().join(format!("crescent-gqa-{}", std::process::id()));
    synth::write_checkpoint(&cfg, &dir, 1 << 30, 11, |_, _| {}).expect("write checkpoint");
    let ck = Checkpoint::open(&dir).expect("open checkpoint");
    let text = TextDecoder::load(
        &ck,
        &cfg.text,
        false,
        WeightStorage::Checkpoint,
        Quantize::None,
    )
    .expect("load decoder");
    let vocab = cfg.text.vocab_size as u32;
    let (n, first) = (150usize, 140usize); // 140 positions = 9 KV blocks: 3 split-K ranges
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % vocab).collect();
    let x = text.embed_ids(&ids).expect("embed");
    let rel = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        a.iter()
            .zip(b)
            .fold(0f32, |w, (p, q)| w.max((p - q).abs() / scale))
    };
    let mut exact: Option<Vec<Vec<f32>>> = None;
    for dtype in [KvDtype::F32, KvDtype::F16] {
        // One pass over every position (prompt path; a 20-position bidirectional prefix).
        let mut c1 = KvCache::with_dtype(&cfg.text, n, dtype).expect("cache");
        let all = text.forward(&x, &mut c1, 20, None).expect("forward");
        // The same positions: a prompt run, then one row at a time (decode path).
        let mut c2 = KvCache::with_dtype(&cfg.text, n, dtype).expect("cache");
        text.forward(&x.narrow(0, 0, first).unwrap(), &mut c2, 20, None)
            .expect("prefill");
        let mut worst = 0f32;
        let mut rows = Vec::new();
        for i in first..n {
            let h = text
                .forward(&x.narrow(0, i, 1).unwrap(), &mut c2, 20, None)
                .expect("decode step");
            let a = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = all.get(i).unwrap().to_vec1::<f32>().unwrap();
            worst = worst.max(rel(&a, &b));
            rows.push(a);
        }
        assert!(
            worst < 1e-4,
            "{dtype:?}: decode and prompt paths differ by {worst} (relative)"
        );
        match &exact {
            None => exact = Some(rows),
            Some(e) => {
                // f16 keys/values round by ≤ 2⁻¹¹ relative; through 2 layers that stays small.
                let d = e.iter().zip(&rows).fold(0f32, |w, (a, b)| w.max(rel(b, a)));
                eprintln!("f16 vs f32 KV cache: max relative difference {d:.2e}");
                assert!(d > 0.0, "the f16 cache changed nothing: was it used?");
                assert!(d < 5e-3, "f16 KV cache differs from f32 by {d} (relative)");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
