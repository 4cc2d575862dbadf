//! `crescent bench`: vision, prefill and decode speed of a model on this machine, each as a
//! ratio to the machine's measured roofline (streaming bandwidth, f32 GEMM peak), plus TTFT and
//! peak RSS. `--json` prints one JSON object on stdout.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use crescent_engine::{Engine, EngineConfig, Job};
use crescent_model::{Config, KvPool, LoadOptions, Moondream, Quantize, SeqInput, SeqKv, Token};
use crescent_skills::{CaptionLength, SettingsOverrides, SkillRequest};
use serde_json::json;

use crate::cli::BenchArgs;
use crate::offline::resolve_model;
use crate::run::Failure;

/// Peak resident set size of this process in MiB (`VmHWM`).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Weight elements touched by one decode token (text decoder; MoE: only the selected experts).
pub fn active_text_params(cfg: &Config) -> f64 {
    let t = &cfg.text;
    let d = t.dim as f64;
    let qkv = t.qkv_dim() as f64;
    let mut p = 0.0;
    for l in 0..t.n_layers {
        p += d * qkv + d * d; // qkv, proj
        if t.tau_attn {
            p += 2.0 * t.n_heads as f64 * qkv;
        }
        match &t.moe {
            Some(m) if l >= m.start_layer => {
                p += d * m.num_experts as f64;
                p += m.experts_per_token as f64 * 3.0 * d * m.expert_inner_dim as f64;
            }
            _ => p += 2.0 * d * t.ff_dim as f64,
        }
    }
    p + d * t.vocab_size as f64 // lm_head
}

/// FLOPs of the vision encoder for one crop (matmuls and attention).
pub fn vision_flops_per_crop(cfg: &Config) -> f64 {
    let v = &cfg.vision;
    let n = v.n_image_tokens() as f64;
    let c = v.enc_dim as f64;
    let per_layer =
        2.0 * n * (c * 3.0 * c + c * c + 2.0 * c * v.enc_ff_dim as f64) + 4.0 * n * n * c;
    2.0 * n * v.patch_dim() as f64 * c + v.enc_n_layers as f64 * per_layer
}

fn random_tensor(shape: (usize, usize), seed: u64) -> candle_core::Result<Tensor> {
    let n = shape.0 * shape.1;
    let mut s = seed;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Run the benchmark.
pub fn run(a: &BenchArgs) -> Result<(), Failure> {
    let rt = |e: crescent_model::ModelError| Failure::runtime(e);
    let files = resolve_model(&a.model).map_err(Failure::runtime)?;
    eprintln!("measuring the machine (bandwidth, GEMM peak)...");
    let bw = crescent_kernels::bandwidth_gb_s();
    let peak = crescent_kernels::gemm_peak_gflops();
    eprintln!("bandwidth {bw:.1} GB/s, f32 GEMM peak {peak:.1} GFLOP/s; loading the model...");
    let t0 = Instant::now();
    let opts = LoadOptions {
        weights: a.weights.into(),
        quantize: a.quantize.into(),
        kv_dtype: a.kv_dtype.option(),
        ..Default::default()
    };
    let model = Arc::new(Moondream::load_files(&files, &opts).map_err(rt)?);
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = model.config.clone();
    let tk = &cfg.tokenizer;
    let v = &cfg.vision;

    // Vision: ms per crop over a batch of crops.
    let crops = a.crops.max(1);
    let px = random_tensor((crops, v.in_channels * v.crop_size * v.crop_size), 1)
        .and_then(|t| t.reshape((crops, v.in_channels, v.crop_size, v.crop_size)))
        .map_err(|e| Failure::runtime(anyhow::anyhow!("{e}")))?;
    let mut vt = Vec::new();
    for _ in 0..a.repeats {
        let t = Instant::now();
        model.vision.encode_crops(&px, None).map_err(rt)?;
        vt.push(t.elapsed().as_secs_f64() * 1e3 / crops as f64);
    }
    let vision_ms = median(vt);
    eprintln!("vision: {vision_ms:.1} ms/crop");

    // Prefill: BOS + image embeddings (bidirectional) + the caption prompt, like a real request.
    let n_img = v.n_image_tokens();
    let caption = tk.templates.caption.normal.clone();
    let prompt_len = 1 + n_img + caption.len();
    let mut pool = KvPool::with_memory_mb(&cfg.text, 16, a.kv_mb, model.kv_dtype());
    let img = random_tensor((n_img, cfg.text.dim), 2)
        .map_err(|e| Failure::runtime(anyhow::anyhow!("{e}")))?;
    let bos = model.text.embed_ids(&[tk.bos_id]).map_err(rt)?;
    let x = Tensor::cat(&[&bos, &img], 0).map_err(|e| Failure::runtime(anyhow::anyhow!("{e}")))?;
    let prompt: Vec<Token> = caption.iter().map(|&i| Token::Text(i)).collect();
    let mut pt = Vec::new();
    let mut base = SeqKv::new();
    for r in 0..a.repeats {
        let mut kv = SeqKv::new();
        let t = Instant::now();
        {
            let mut s = [SeqInput {
                x: x.clone(),
                kv: &mut kv,
                prefix_len: 1 + n_img,
            }];
            model
                .text
                .forward_batch(&mut pool, &mut s, None)
                .map_err(rt)?;
        }
        let px = model.embed_tokens(&prompt).map_err(rt)?;
        let h = {
            let mut s = [SeqInput {
                x: px,
                kv: &mut kv,
                prefix_len: 0,
            }];
            model
                .text
                .forward_batch(&mut pool, &mut s, None)
                .map_err(rt)?
        };
        let last = h[0]
            .get(h[0].dims()[0] - 1)
            .map_err(|e| Failure::runtime(anyhow::anyhow!("{e}")))?;
        model.logits(&last).map_err(rt)?;
        pt.push(t.elapsed().as_secs_f64());
        if r + 1 == a.repeats {
            base = kv;
        } else {
            kv.release(&mut pool);
        }
    }
    let prefill_s = median(pt);
    let prefill_tok_s = prompt_len as f64 / prefill_s;
    eprintln!("prefill: {prompt_len} tokens in {prefill_s:.2} s = {prefill_tok_s:.1} tok/s");

    // Decode at several batch sizes, every row forked from the prefilled prompt.
    let mut decode = serde_json::Map::new();
    let mut b1_rounds: Vec<(f64, f64)> = Vec::new();
    for &b in &a.batch {
        let mut seqs: Vec<SeqKv> = Vec::new();
        for _ in 0..b {
            seqs.push(base.fork(&mut pool).map_err(rt)?);
        }
        // Distinct first tokens, so the rows of a batch take different paths through the MoE
        // layers as real requests do (identical rows would share their 8 experts and make
        // batched decode look cheaper than it is).
        let vocab = cfg.text.vocab_size.max(1);
        let mut tok: Vec<Token> = (0..b)
            .map(|i| Token::Text(((tk.answer_id as usize + 7919 * i) % vocab) as u32))
            .collect();
        // Batch 1 is timed in rounds, each right after its own bandwidth probe, and its
        // roofline ratio is the median of the rounds' ratios: on a shared host the bandwidth
        // shifts between levels within seconds, so a probe taken before vision and prefill
        // would measure another phase than the decode steps it is compared with.
        let rounds = if b == 1 { a.decode_rounds.max(1) } else { 1 };
        let mut round_tps = Vec::new();
        for _ in 0..rounds {
            let round_bw = if b == 1 {
                Some(crescent_kernels::bandwidth_gb_s())
            } else {
                None
            };
            let mut times = Vec::new();
            for _ in 0..a.decode_steps {
                let t = Instant::now();
                let xs: Vec<Tensor> = tok
                    .iter()
                    .map(|t| model.embed_tokens(&[*t]))
                    .collect::<Result<_, _>>()
                    .map_err(rt)?;
                let hs = {
                    let mut batch: Vec<SeqInput<'_>> = xs
                        .into_iter()
                        .zip(seqs.iter_mut())
                        .map(|(x, kv)| SeqInput {
                            x,
                            kv,
                            prefix_len: 0,
                        })
                        .collect();
                    model
                        .text
                        .forward_batch(&mut pool, &mut batch, None)
                        .map_err(rt)?
                };
                let st =
                    Tensor::cat(&hs, 0).map_err(|e| Failure::runtime(anyhow::anyhow!("{e}")))?;
                let logits = model
                    .text
                    .logits(&st)
                    .map_err(rt)?
                    .to_vec2::<f32>()
                    .map_err(|e| Failure::runtime(anyhow::anyhow!("{e}")))?;
                for (k, l) in logits.iter().enumerate() {
                    tok[k] = Token::Text(crescent_engine::sampler::argmax(l) as u32);
                }
                times.push(t.elapsed().as_secs_f64());
            }
            let tps = b as f64 / median(times);
            if let Some(bw) = round_bw {
                b1_rounds.push((bw, tps));
            }
            round_tps.push(tps);
        }
        for mut s in seqs {
            s.release(&mut pool);
        }
        let tps = median(round_tps);
        eprintln!("decode batch {b}: {tps:.2} tok/s");
        decode.insert(b.to_string(), json!(tps));
    }
    base.release(&mut pool);
    drop(pool);

    // Time to first token of a real caption request (vision of every crop + prefill + 1 token).
    let ttft_ms = match &a.image {
        Some(p) => {
            let bytes = std::fs::read(p)
                .map_err(|e| Failure::runtime(anyhow::anyhow!("{}: {e}", p.display())))?;
            let tok = crescent_model::load_tokenizer(&files.tokenizer).map_err(rt)?;
            let engine = Engine::with_config(
                Arc::clone(&model),
                Arc::new(tok),
                EngineConfig {
                    kv_cache_mb: a.kv_mb,
                    ..Default::default()
                },
            );
            let image = engine
                .prepare_image(&bytes)
                .map_err(|e| Failure::runtime(anyhow::anyhow!("{e}")))?;
            let job = Job {
                request: SkillRequest::Caption {
                    length: CaptionLength::Normal,
                },
                overrides: SettingsOverrides {
                    max_tokens: Some(1),
                    temperature: Some(0.0),
                    ..Default::default()
                },
                image: Some(image),
                trace: false,
            };
            let t = Instant::now();
            engine
                .run(job, |_| {})
                .map_err(|e| Failure::runtime(anyhow::anyhow!("{e}")))?;
            Some(t.elapsed().as_secs_f64() * 1e3)
        }
        None => None,
    };

    // Rooflines. Decode: the weight bytes one token reads, as stored (quantized bytes and
    // scales when quantized; MoE: the selected experts only).
    let bytes_per_param = model.text_weight_bytes_per_param();
    let active = active_text_params(&cfg);
    let decode_bytes = model.text_decode_bytes_per_token() as f64;
    // Batch 1 against the bandwidth probed right before each of its rounds (see above).
    let decode_bw = if b1_rounds.is_empty() {
        bw
    } else {
        median(b1_rounds.iter().map(|r| r.0).collect())
    };
    let decode_roofline = decode_bw * 1e9 / decode_bytes;
    let decode_ratio = if b1_rounds.is_empty() {
        None
    } else {
        Some(median(
            b1_rounds
                .iter()
                .map(|&(rbw, tps)| tps * decode_bytes / (rbw * 1e9))
                .collect(),
        ))
    };
    // The LM head runs for the last prompt position only (as in the reference).
    let lm_head = (cfg.text.dim * cfg.text.vocab_size) as f64;
    let prefill_flops = 2.0 * (active - lm_head) * prompt_len as f64
        + 2.0 * lm_head
        + 4.0 * (prompt_len * prompt_len) as f64 * cfg.text.dim as f64 * cfg.text.n_layers as f64;
    let prefill_gflops = prefill_flops / prefill_s / 1e9;
    let vision_gflops = vision_flops_per_crop(&cfg) / (vision_ms / 1e3) / 1e9;
    let out = json!({
        "model": files.dir.display().to_string(),
        "weights": format!("{:?}", a.weights),
        "quantize": Quantize::from(a.quantize).name(),
        "kv_dtype": model.kv_dtype().name(),
        "text_weight_kinds": model
            .text
            .weight_kinds()
            .into_iter()
            .map(|(what, kind)| format!("{what}={kind}"))
            .collect::<Vec<_>>(),
        "text_weight_bytes_per_param": bytes_per_param,
        "load_s": load_s,
        "vision_ms_per_crop": vision_ms,
        "vision_gflop_s": vision_gflops,
        "prefill_tokens": prompt_len,
        "prefill_tok_s": prefill_tok_s,
        "prefill_gflop_s": prefill_gflops,
        "decode_tok_s": decode,
        "ttft_ms": ttft_ms,
        "peak_rss_mb": peak_rss_mb(),
        "bandwidth_gb_s": bw,
        "gemm_gflop_s": peak,
        "active_weight_bytes_per_token": decode_bytes,
        "decode_bandwidth_gb_s": decode_bw,
        "decode_b1_rounds": b1_rounds
            .iter()
            .map(|&(rbw, tps)| json!({"bandwidth_gb_s": rbw, "tok_s": tps}))
            .collect::<Vec<_>>(),
        "decode_roofline_tok_s": decode_roofline,
        "decode_roofline_ratio": decode_ratio,
        "prefill_gemm_ratio": prefill_gflops / peak,
        "vision_gemm_ratio": vision_gflops / peak,
    });
    if a.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    Ok(())
}
