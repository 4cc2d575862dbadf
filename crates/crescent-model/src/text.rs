//! Text decoder (spec §6): embeddings, prefix-LM attention with tau scaling and partial
//! split-half RoPE, parallel residual blocks with dense or mixture-of-experts MLPs, final
//! LayerNorm and LM head, and a per-sequence KV cache.

use candle_core::{Device, Tensor};

use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use crate::kv::{KvDtype, KvPool, KvRun, SeqKv, DEFAULT_BLOCK_SIZE};
use crate::layers::{
    attention, gelu_erf, gelu_tanh, HeadRows, LayerNorm, Linear, Quantize, Weight, WeightStorage,
};
use crate::weights::Checkpoint;

/// A single sequence's KV cache with its own small pool (tests and one-off use; the engine
/// shares one [`KvPool`] between all sequences).
#[derive(Debug)]
pub struct KvCache {
    pool: KvPool,
    seq: SeqKv,
}

impl KvCache {
    /// An empty f32 cache with room for `capacity` positions.
    pub fn new(cfg: &TextConfig, capacity: usize) -> Result<Self> {
        Self::with_dtype(cfg, capacity, KvDtype::F32)
    }

    /// An empty cache storing `dtype`, with room for `capacity` positions.
    pub fn with_dtype(cfg: &TextConfig, capacity: usize, dtype: KvDtype) -> Result<Self> {
        let bs = DEFAULT_BLOCK_SIZE;
        let pool = KvPool::new(cfg, bs, capacity.max(1).div_ceil(bs), dtype);
        Ok(Self {
            pool,
            seq: SeqKv::new(),
        })
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.seq.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }
}

/// One sequence's part of a batched forward pass.
pub struct SeqInput<'a> {
    /// Input embeddings `[t, D]` for positions `kv.len() .. kv.len() + t`.
    pub x: Tensor,
    /// The sequence's KV blocks (room for `t` more positions is reserved on demand).
    pub kv: &'a mut SeqKv,
    /// Positions `< prefix_len` attend bidirectionally among themselves (BOS + image).
    pub prefix_len: usize,
}

/// The MLP of one block.
#[derive(Clone, Debug)]
enum Mlp {
    Dense {
        fc1: Linear,
        fc2: Linear,
    },
    Moe {
        router: Linear,
        fc1: Weight,
        fc2: Weight,
        top_k: usize,
        inner: usize,
    },
}

#[derive(Clone, Debug)]
struct TextBlock {
    ln: LayerNorm,
    qkv: Linear,
    proj: Linear,
    /// `[2H, qkv_dim]`: tau wq rows then wv rows.
    tau_w: Option<Linear>,
    tau_alpha: Vec<f32>,
    mlp: Mlp,
}

/// Per-block intermediates recorded for layer-by-layer comparison.
#[derive(Default, Debug, Clone)]
pub struct BlockTrace {
    /// LayerNorm output `[T, D]`.
    pub ln_out: Option<Tensor>,
    /// qkv projection `[T, qkv_dim]`.
    pub qkv: Option<Tensor>,
    /// Tau factors for q `[T, H]`.
    pub tau_q: Option<Tensor>,
    /// Tau factors for v `[T, H]`.
    pub tau_v: Option<Tensor>,
    /// Rotated queries `[T, H, hd]`.
    pub q_rot: Option<Tensor>,
    /// Rotated keys `[T, Hkv, hd]`.
    pub k_rot: Option<Tensor>,
    /// Attention output after the projection `[T, D]`.
    pub attn_out: Option<Tensor>,
    /// MoE router logits `[T, E]`.
    pub router_logits: Option<Tensor>,
    /// Selected experts `[T, K]`.
    pub topk_ids: Option<Vec<Vec<usize>>>,
    /// Their gate weights `[T, K]`.
    pub topk_weights: Option<Tensor>,
    /// MLP output `[T, D]`.
    pub mlp_out: Option<Tensor>,
}

/// Intermediates of one text forward pass.
#[derive(Default, Debug, Clone)]
pub struct TextTrace {
    /// Residual stream: `[0]` = input embeddings, `[l+1]` = output of block `l`.
    pub hidden_states: Vec<Tensor>,
    /// Per block.
    pub blocks: Vec<BlockTrace>,
}

/// The decoder.
#[derive(Clone, Debug)]
pub struct TextDecoder {
    cfg: TextConfig,
    tau_gelu_tanh: bool,
    wte: Weight,
    blocks: Vec<TextBlock>,
    post_ln: LayerNorm,
    lm_head: Linear,
}

/// Stable top-k of one row: values descending, ties to the lower index.
pub fn stable_topk(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| {
        row[b]
            .partial_cmp(&row[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

impl TextDecoder {
    /// Load from the checkpoint (HF key names, spec §3.1). `quant` applies to the attention
    /// qkv / proj, the dense MLPs, the MoE experts and the LM head; the token embeddings (a
    /// row lookup, not streamed per token), the tau gates and the routers (tiny, and where a
    /// small error flips a gate or an expert choice) stay in `ws`.
    pub fn load(
        ck: &Checkpoint,
        cfg: &TextConfig,
        tau_gelu_tanh: bool,
        ws: WeightStorage,
        quant: Quantize,
    ) -> Result<Self> {
        let d = cfg.dim;
        let h = cfg.n_heads;
        let qkv_dim = cfg.qkv_dim();
        let wte = Weight::load(ck, "model.text.wte", &[cfg.vocab_size, d], ws)?;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.text.blocks.{i}");
            let (tau_w, tau_alpha) = if cfg.tau_attn {
                let wq = ck.get(&format!("{p}.attn.tau.wq"), &[h, qkv_dim])?;
                let wv = ck.get(&format!("{p}.attn.tau.wv"), &[h, qkv_dim])?;
                let w = Weight::from_tensor(&Tensor::cat(&[&wq, &wv], 0)?, ws)?;
                let alpha = ck
                    .get_f32(&format!("{p}.attn.tau.alpha"), &[h])?
                    .to_vec1::<f32>()?;
                (Some(Linear::from_parts(w, None)), alpha)
            } else {
                (None, Vec::new())
            };
            let mlp = match &cfg.moe {
                Some(m) if i >= m.start_layer => Mlp::Moe {
                    router: Linear::load(
                        ck,
                        &format!("{p}.mlp.router"),
                        d,
                        m.num_experts,
                        true,
                        ws,
                    )?,
                    fc1: Weight::load_quantized(
                        ck,
                        &format!("{p}.mlp.fc1.weight"),
                        &[m.num_experts, 2 * m.expert_inner_dim, d],
                        quant,
                        ws,
                    )?,
                    fc2: Weight::load_quantized(
                        ck,
                        &format!("{p}.mlp.fc2.weight"),
                        &[m.num_experts, d, m.expert_inner_dim],
                        quant,
                        ws,
                    )?,
                    top_k: m.experts_per_token,
                    inner: m.expert_inner_dim,
                },
                _ => Mlp::Dense {
                    fc1: Linear::load_quantized(
                        ck,
                        &format!("{p}.mlp.fc1"),
                        d,
                        cfg.ff_dim,
                        true,
                        quant,
                        ws,
                    )?,
                    fc2: Linear::load_quantized(
                        ck,
                        &format!("{p}.mlp.fc2"),
                        cfg.ff_dim,
                        d,
                        true,
                        quant,
                        ws,
                    )?,
                },
            };
            blocks.push(TextBlock {
                ln: LayerNorm::load(ck, &format!("{p}.ln"), d)?,
                qkv: Linear::load_quantized(
                    ck,
                    &format!("{p}.attn.qkv"),
                    d,
                    qkv_dim,
                    true,
                    quant.for_attention(),
                    ws,
                )?,
                proj: Linear::load_quantized(
                    ck,
                    &format!("{p}.attn.proj"),
                    d,
                    d,
                    true,
                    quant.for_attention(),
                    ws,
                )?,
                tau_w,
                tau_alpha,
                mlp,
            });
        }
        let post_ln = LayerNorm::load(ck, "model.text.post_ln", d)?;
        let lm_head =
            Linear::load_quantized(ck, "model.text.lm_head", d, cfg.vocab_size, true, quant, ws)?;
        Ok(Self {
            cfg: cfg.clone(),
            tau_gelu_tanh,
            wte,
            blocks,
            post_ln,
            lm_head,
        })
    }

    /// (bytes, elements) of the decoder's weight matrices.
    pub fn weight_footprint(&self) -> (usize, usize) {
        let mut ws: Vec<(usize, usize)> = vec![self.lm_head.footprint()];
        for b in &self.blocks {
            ws.push(b.qkv.footprint());
            ws.push(b.proj.footprint());
            match &b.mlp {
                Mlp::Dense { fc1, fc2 } => {
                    ws.push(fc1.footprint());
                    ws.push(fc2.footprint());
                }
                Mlp::Moe {
                    router, fc1, fc2, ..
                } => {
                    ws.push(router.footprint());
                    ws.push((fc1.bytes(), fc1.rows() * fc1.cols()));
                    ws.push((fc2.bytes(), fc2.rows() * fc2.cols()));
                }
            }
        }
        ws.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Weight bytes one decode token reads: every block's qkv, proj and tau gate, its dense
    /// MLP or its router plus `top_k` experts' fc1/fc2, and the LM head — counted as stored
    /// (int8 / int4 bytes with their scales when quantized). The decode roofline's numerator.
    pub fn decode_weight_bytes_per_token(&self) -> usize {
        let mut bytes = self.lm_head.footprint().0;
        for b in &self.blocks {
            bytes += b.qkv.footprint().0 + b.proj.footprint().0;
            bytes += b.tau_w.as_ref().map_or(0, |t| t.footprint().0);
            bytes += match &b.mlp {
                Mlp::Dense { fc1, fc2 } => fc1.footprint().0 + fc2.footprint().0,
                Mlp::Moe {
                    router,
                    fc1,
                    fc2,
                    top_k,
                    inner,
                } => {
                    router.footprint().0
                        + top_k * (fc1.bytes_of_rows(2 * inner) + fc2.bytes_of_rows(self.cfg.dim))
                }
            };
        }
        bytes
    }

    /// Storage kind (`bf16`, `int8`, ...) of each kind of matrix, for reports: `(what, kind)`.
    pub fn weight_kinds(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![
            ("wte", self.wte.kind()),
            ("lm_head", self.lm_head.weight().kind()),
        ];
        for b in &self.blocks {
            v.push(("attn", b.qkv.weight().kind()));
            match &b.mlp {
                Mlp::Dense { fc1, .. } => v.push(("dense_mlp", fc1.weight().kind())),
                Mlp::Moe { router, fc1, .. } => {
                    v.push(("router", router.weight().kind()));
                    v.push(("experts", fc1.kind()));
                }
            }
        }
        let mut out = Vec::with_capacity(v.len());
        for e in v {
            if !out.contains(&e) {
                out.push(e);
            }
        }
        out
    }

    /// The configuration.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Token embeddings `[n, D]` of text ids.
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.cfg.vocab_size
            )));
        }
        let d = self.cfg.dim;
        let mut out = vec![0f32; ids.len() * d];
        for (i, &id) in ids.iter().enumerate() {
            self.wte.row_f32(id as usize, &mut out[i * d..(i + 1) * d]);
        }
        Ok(Tensor::from_vec(out, (ids.len(), d), &Device::Cpu)?)
    }

    /// Logits `[..., V]` of pre-`post_ln` hidden states `[..., D]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        crescent_kernels::on_pool(|| self.lm_head.forward(&self.post_ln.forward(hidden)?))
    }

    /// Run input embeddings `x` `[T, D]` at positions `cache.len() .. cache.len() + T`.
    /// Positions `< prefix_len` attend bidirectionally among themselves (the BOS + image block),
    /// everything else causally (spec §6.2). Returns hidden states `[T, D]` before `post_ln`.
    pub fn forward(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        prefix_len: usize,
        trace: Option<&mut TextTrace>,
    ) -> Result<Tensor> {
        let t = x.dims()[0];
        let need = cache.seq.blocks_needed(&cache.pool, t);
        if need > cache.pool.free_blocks() {
            let grow = KvPool::new(
                &self.cfg,
                cache.pool.block_size(),
                cache.pool.total_blocks() + need,
                cache.pool.dtype(),
            );
            let mut old = std::mem::replace(&mut cache.pool, grow);
            let mut seq = SeqKv::new();
            seq.reserve(&mut cache.pool, cache.seq.len())?;
            seq.advance(cache.seq.len());
            copy_seq(&old, &cache.seq, &mut cache.pool, &seq);
            cache.seq.release(&mut old);
            cache.seq = seq;
        }
        let mut seqs = [SeqInput {
            x: x.clone(),
            kv: &mut cache.seq,
            prefix_len,
        }];
        let mut out = self.forward_batch(&mut cache.pool, &mut seqs, trace)?;
        Ok(out.remove(0))
    }

    /// One batched forward pass over several sequences, each with its own positions, KV blocks
    /// and prefix block; linear layers run over all rows at once, attention per sequence.
    /// Returns each sequence's hidden states `[t_i, D]` (before `post_ln`).
    pub fn forward_batch(
        &self,
        pool: &mut KvPool,
        seqs: &mut [SeqInput<'_>],
        trace: Option<&mut TextTrace>,
    ) -> Result<Vec<Tensor>> {
        crescent_kernels::on_pool(|| self.forward_batch_inner(pool, seqs, trace))
    }

    fn forward_batch_inner(
        &self,
        pool: &mut KvPool,
        seqs: &mut [SeqInput<'_>],
        mut trace: Option<&mut TextTrace>,
    ) -> Result<Vec<Tensor>> {
        let cfg = &self.cfg;
        let mut rows = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let (t, d) = s.x.dims2()?;
            if d != cfg.dim {
                return Err(ModelError::Input(format!(
                    "embeddings have width {d}, expected {}",
                    cfg.dim
                )));
            }
            let p0 = s.kv.len();
            if p0 + t > cfg.max_context {
                return Err(ModelError::Input(format!(
                    "sequence length {} exceeds max_context {}",
                    p0 + t,
                    cfg.max_context
                )));
            }
            s.kv.reserve(pool, t)?;
            rows.push(RowSpan {
                p0,
                t,
                prefix_len: s.prefix_len,
            });
        }
        let positions: Vec<usize> = rows.iter().flat_map(|r| r.p0..r.p0 + r.t).collect();
        let rope = RopeTable::new(cfg, &positions);
        let xs: Vec<&Tensor> = seqs.iter().map(|s| &s.x).collect();
        let mut x = Tensor::cat(&xs, 0)?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.hidden_states.push(x.clone());
        }
        for (li, blk) in self.blocks.iter().enumerate() {
            let mut bt = trace.as_ref().map(|_| BlockTrace::default());
            let h = blk.ln.forward(&x)?;
            // Parallel residual (spec §6.3): attention and the MLP both read `h` and nothing of
            // each other, so they run side by side. In decode both are streams through memory
            // (the KV cache, the selected weights) separated by short serial steps; interleaved,
            // each one's serial steps and fork/join gaps are covered by the other's work.
            let mut mt = bt.as_ref().map(|_| BlockTrace::default());
            let kvs: Vec<&SeqKv> = seqs.iter().map(|s| &*s.kv).collect();
            let (a, m) = rayon::join(
                || {
                    self.attention(
                        &h,
                        blk,
                        li,
                        pool,
                        &kvs,
                        &rows,
                        &positions,
                        &rope,
                        bt.as_mut(),
                    )
                },
                || Self::mlp(&blk.mlp, &h, mt.as_mut()),
            );
            let (a, m) = (a?, m?);
            x = ((x + a)? + &m)?;
            if let (Some(b), Some(t)) = (bt.as_mut(), mt) {
                b.router_logits = t.router_logits;
                b.topk_ids = t.topk_ids;
                b.topk_weights = t.topk_weights;
            }
            if let (Some(tr), Some(mut b)) = (trace.as_deref_mut(), bt) {
                b.ln_out = Some(h);
                b.mlp_out = Some(m);
                tr.blocks.push(b);
                tr.hidden_states.push(x.clone());
            }
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut off = 0;
        for (s, r) in seqs.iter_mut().zip(&rows) {
            s.kv.advance(r.t);
            out.push(x.narrow(0, off, r.t)?);
            off += r.t;
        }
        Ok(out)
    }

    /// The block's MLP (dense GELU or mixture of experts) of `h` `[N, D]`.
    fn mlp(mlp: &Mlp, h: &Tensor, trace: Option<&mut BlockTrace>) -> Result<Tensor> {
        Ok(match mlp {
            Mlp::Dense { fc1, fc2 } => fc2.forward(&gelu_tanh(&fc1.forward(h)?)?)?,
            Mlp::Moe {
                router,
                fc1,
                fc2,
                top_k,
                inner,
            } => moe(h, router, fc1, fc2, *top_k, *inner, trace)?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        h: &Tensor,
        blk: &TextBlock,
        li: usize,
        pool: &mut KvPool,
        kvs: &[&SeqKv],
        rows: &[RowSpan],
        positions: &[usize],
        rope: &RopeTable,
        trace: Option<&mut BlockTrace>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let n = h.dims()[0];
        let nh = cfg.n_heads;
        let nkv = cfg.n_kv_heads;
        let hd = cfg.head_dim();
        let qkv_t = blk.qkv.forward(h)?;
        let qkv = qkv_t.flatten_all()?.to_vec1::<f32>()?;
        let qkv_dim = cfg.qkv_dim();
        // Tau (spec §6.5): token part tanh(act(qkv) · [wq; wv]ᵀ), position part σ(α·ln(p+1)) + 0.5.
        let (tau_q, tau_v) = if let Some(tw) = &blk.tau_w {
            let act = if self.tau_gelu_tanh {
                gelu_tanh(&qkv_t)?
            } else {
                gelu_erf(&qkv_t)?
            };
            let tok = tw.forward(&act)?.tanh()?.flatten_all()?.to_vec1::<f32>()?; // [N, 2H]
            let mut tq = vec![0f32; n * nh];
            let mut tv = vec![0f32; n * nh];
            for (i, &p) in positions.iter().enumerate() {
                let lp = (p as f32 + 1.0).ln();
                for hh in 0..nh {
                    let pos = sigmoid(blk.tau_alpha[hh] * lp) + 0.5;
                    tq[i * nh + hh] = tok[i * 2 * nh + hh] + pos;
                    tv[i * nh + hh] = tok[i * 2 * nh + nh + hh] + pos;
                }
            }
            (Some(tq), Some(tv))
        } else {
            (None, None)
        };
        // Queries [N, H, hd] after tau and RoPE; keys after RoPE and values after tau go to the cache.
        let mut q = vec![0f32; n * nh * hd];
        let mut k_all = vec![0f32; n * nkv * hd];
        let mut kbuf = vec![0f32; hd];
        let mut vbuf = vec![0f32; hd];
        let mut i = 0;
        for (r, kv) in rows.iter().zip(kvs) {
            for j in 0..r.t {
                let row = &qkv[i * qkv_dim..(i + 1) * qkv_dim];
                for hh in 0..nh {
                    let dst = &mut q[(i * nh + hh) * hd..(i * nh + hh + 1) * hd];
                    let f = tau_q.as_ref().map_or(1.0, |tq| tq[i * nh + hh]);
                    for (dv, sv) in dst.iter_mut().zip(&row[hh * hd..(hh + 1) * hd]) {
                        *dv = sv * f;
                    }
                    rope.apply(dst, i);
                }
                for hh in 0..nkv {
                    kbuf.copy_from_slice(&row[(nh + hh) * hd..(nh + hh + 1) * hd]);
                    rope.apply(&mut kbuf, i);
                    k_all[(i * nkv + hh) * hd..(i * nkv + hh + 1) * hd].copy_from_slice(&kbuf);
                    let f = tau_v.as_ref().map_or(1.0, |tv| tv[i * nh + hh]);
                    for (dv, sv) in vbuf
                        .iter_mut()
                        .zip(&row[(nh + nkv + hh) * hd..(nh + nkv + hh + 1) * hd])
                    {
                        *dv = sv * f;
                    }
                    pool.write(kv, li, 0, hh, r.p0 + j, &kbuf);
                    pool.write(kv, li, 1, hh, r.p0 + j, &vbuf);
                }
                i += 1;
            }
        }
        let o = attend_all(pool, kvs, rows, li, &q, nh, nkv, hd);
        let o = Tensor::from_vec(o, (n, nh * hd), &Device::Cpu)?;
        let out = blk.proj.forward(&o)?;
        if let Some(tr) = trace {
            tr.qkv = Some(qkv_t.clone());
            if let (Some(tq), Some(tv)) = (tau_q, tau_v) {
                tr.tau_q = Some(Tensor::from_vec(tq, (n, nh), &Device::Cpu)?);
                tr.tau_v = Some(Tensor::from_vec(tv, (n, nh), &Device::Cpu)?);
            }
            tr.q_rot = Some(Tensor::from_vec(q, (n, nh, hd), &Device::Cpu)?);
            tr.k_rot = Some(Tensor::from_vec(k_all, (n, nkv, hd), &Device::Cpu)?);
            tr.attn_out = Some(out.clone());
        }
        Ok(out)
    }
}

/// Positions of one sequence inside a batched pass.
#[derive(Clone, Copy, Debug)]
struct RowSpan {
    p0: usize,
    t: usize,
    prefix_len: usize,
}

/// Copy the cached positions of `from` (in `src`) into `to` (in `dst`).
fn copy_seq(src: &KvPool, from: &SeqKv, dst: &mut KvPool, to: &SeqKv) {
    for l in 0..src.n_layers() {
        for kv in 0..2 {
            for h in 0..src.heads() {
                let mut v = vec![0f32; src.head_dim()];
                for p in 0..from.len() {
                    src.read(from, l, kv, h, p, &mut v);
                    dst.write(to, l, kv, h, p, &v);
                }
            }
        }
    }
}

/// Sequences with at least this many new rows use the gathered GEMM attention path.
const GATHER_MIN_ROWS: usize = 8;

/// Attention of every query row against its own sequence's cached keys/values, in parallel over
/// (row, head). Query at position p sees keys `0..=p`, or the whole prefix block when `p` lies in it.
#[allow(clippy::too_many_arguments)]
fn attend_all(
    pool: &KvPool,
    kvs: &[&SeqKv],
    rows: &[RowSpan],
    layer: usize,
    q: &[f32],
    nh: usize,
    nkv: usize,
    hd: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; q.len()];
    let group = nh / nkv;
    // Long runs (prompt prefill): gather the sequence's keys/values once and use the GEMM path.
    let mut tasks = Vec::new();
    let mut i = 0;
    for (si, r) in rows.iter().enumerate() {
        let kmax_of = |p: usize| {
            if p < r.prefix_len {
                r.prefix_len.max(p + 1)
            } else {
                p + 1
            }
        };
        if r.t >= GATHER_MIN_ROWS {
            let s = (r.p0..r.p0 + r.t).map(kmax_of).max().unwrap_or(0);
            let wkv = nkv * hd;
            let mut k = vec![0f32; s * wkv];
            let mut v = vec![0f32; s * wkv];
            for p in 0..s {
                for h in 0..nkv {
                    let dst = p * wkv + h * hd..p * wkv + (h + 1) * hd;
                    pool.read(kvs[si], layer, 0, h, p, &mut k[dst.clone()]);
                    pool.read(kvs[si], layer, 1, h, p, &mut v[dst]);
                }
            }
            let w = nh * hd;
            attention(
                HeadRows {
                    data: &q[i * w..(i + r.t) * w],
                    ld: w,
                },
                HeadRows { data: &k, ld: wkv },
                HeadRows { data: &v, ld: wkv },
                r.t,
                s,
                nh,
                nkv,
                hd,
                |j| kmax_of(r.p0 + j),
                &mut out[i * w..(i + r.t) * w],
            );
        } else {
            for j in 0..r.t {
                tasks.push((si, i + j, kmax_of(r.p0 + j)));
            }
        }
        i += r.t;
    }
    let scale = 1.0 / (hd as f32).sqrt();
    // Short runs (decode): read keys/values in place from the paged blocks.
    type Slot<'a> = (&'a mut [f32], (usize, usize, usize));
    let mut slots: Vec<Slot<'_>> = Vec::with_capacity(tasks.len());
    let mut rest: &mut [f32] = &mut out;
    let mut consumed = 0;
    for &(si, ri, km) in &tasks {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((ri - consumed) * nh * hd);
        let (row, tail) = tail.split_at_mut(nh * hd);
        slots.push((row, (si, ri, km)));
        rest = tail;
        consumed = ri + 1;
    }
    // Split-K decode attention (as in flash-decoding): each row's keys are cut into ranges of
    // whole blocks and one task covers every head of one range. A block stores a layer's heads
    // side by side, so a task reads each block's keys (then values) as one contiguous run
    // (128 KiB on md3) that the hardware prefetcher follows, and a single decode row still
    // keeps every core busy. Each task returns per-head partial softmax states (max, sum,
    // unnormalised output), merged afterwards.
    let bs = pool.block_size();
    let threads = rayon::current_num_threads().max(1);
    let mut jobs = Vec::new();
    for (slot, &(_, (_, _, kmax))) in slots.iter().enumerate() {
        let nb = kmax.div_ceil(bs);
        let want = (2 * threads).div_ceil(slots.len()).max(1);
        let splits = want.min(nb.div_ceil(DECODE_MIN_BLOCKS_PER_TASK)).max(1);
        let per = nb.div_ceil(splits);
        let mut b0 = 0;
        while b0 < nb {
            jobs.push((slot, b0, (b0 + per).min(nb)));
            b0 += per;
        }
    }
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = jobs
        .par_iter()
        .map(|&(slot, b0, b1)| {
            let (_, (si, ri, kmax)) = slots[slot];
            let p0 = b0 * bs;
            let n = kmax.min(b1 * bs) - p0;
            let mut scores = vec![0f32; nh * n];
            let kvpf = (KV_PREFETCH_BYTES / (bs * hd * pool.dtype().bytes()).max(1)).max(1);
            // Prefetch the (block, kv head) run `KV_PREFETCH_BYTES` ahead of the one being read:
            // a task's blocks need not be adjacent, and each run is too short for the
            // hardware prefetcher to get ahead of.
            let prefetch = |kv: usize, b: usize, h: usize| {
                let j = (b - b0) * nkv + h + kvpf;
                let (pb, ph) = (b0 + j / nkv, j % nkv);
                if pb < b1 {
                    let plen = bs.min(kmax - pb * bs);
                    match pool.block_run(kvs[si], layer, kv, ph, pb, plen) {
                        KvRun::F32(r) => crescent_kernels::prefetch_slice(r),
                        KvRun::F16(r) => crescent_kernels::prefetch_slice(r),
                    }
                }
            };
            for b in b0..b1 {
                let len = bs.min(kmax - b * bs);
                let off = (b - b0) * bs;
                for (hh, sc) in scores.chunks_exact_mut(n).enumerate() {
                    if hh % group == 0 {
                        prefetch(0, b, hh / group);
                    }
                    let qv = &q[(ri * nh + hh) * hd..(ri * nh + hh + 1) * hd];
                    let out = &mut sc[off..off + len];
                    match pool.block_run(kvs[si], layer, 0, hh / group, b, len) {
                        KvRun::F32(keys) => crescent_kernels::dot_rows(qv, keys, scale, out),
                        KvRun::F16(keys) => crescent_kernels::dot_rows_f16(qv, keys, scale, out),
                    }
                }
            }
            let mut mx = vec![0f32; nh];
            let mut sum = vec![0f32; nh];
            for (hh, sc) in scores.chunks_exact_mut(n).enumerate() {
                (mx[hh], sum[hh]) = crescent_kernels::softmax_partial(sc);
            }
            let mut o = vec![0f32; nh * hd];
            for b in b0..b1 {
                let len = bs.min(kmax - b * bs);
                let off = (b - b0) * bs;
                for (hh, (sc, oh)) in scores
                    .chunks_exact(n)
                    .zip(o.chunks_exact_mut(hd))
                    .enumerate()
                {
                    if hh % group == 0 {
                        prefetch(1, b, hh / group);
                    }
                    let w = &sc[off..off + len];
                    match pool.block_run(kvs[si], layer, 1, hh / group, b, len) {
                        KvRun::F32(vals) => crescent_kernels::axpy_rows(w, vals, oh),
                        KvRun::F16(vals) => crescent_kernels::axpy_rows_f16(w, vals, oh),
                    }
                }
            }
            (mx, sum, o)
        })
        .collect();
    // Merge the ranges of each row: o = Σ o_i·e^(m_i − M) / Σ l_i·e^(m_i − M).
    let mut j = 0;
    for (slot, (orow, _)) in slots.iter_mut().enumerate() {
        let first = j;
        while j < jobs.len() && jobs[j].0 == slot {
            j += 1;
        }
        let ps = &parts[first..j];
        for hh in 0..nh {
            let m = ps.iter().map(|p| p.0[hh]).fold(f32::NEG_INFINITY, f32::max);
            let oh = &mut orow[hh * hd..(hh + 1) * hd];
            oh.fill(0.0);
            let mut l = 0f32;
            for p in ps {
                let f = (p.0[hh] - m).exp();
                l += p.1[hh] * f;
                for (a, b) in oh.iter_mut().zip(&p.2[hh * hd..(hh + 1) * hd]) {
                    *a += f * b;
                }
            }
            let inv = 1.0 / l;
            oh.iter_mut().for_each(|v| *v *= inv);
        }
    }
    out
}

/// How far ahead decode attention prefetches the KV cache (see `attend_all`): 8 runs of
/// f16 (md3: 16 positions × 64 dims) measured best against 1, 2 and 4 (int4 b1 roofline ratio
/// +0.02); with f32 runs it is neutral.
const KV_PREFETCH_BYTES: usize = 16 << 10;

/// Minimum KV blocks per split-K decode-attention task (see `attend_all`).
const DECODE_MIN_BLOCKS_PER_TASK: usize = 4;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// cos/sin of the rotary angles for a run of positions (f32, spec §6.6).
struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn new(cfg: &TextConfig, positions: &[usize]) -> Self {
        let rot = cfg.rot_dim();
        let half = rot / 2;
        let theta = cfg.rope_theta as f32;
        let inv: Vec<f32> = (0..half)
            .map(|j| 1.0 / theta.powf((2 * j) as f32 / rot as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let p = p as f32;
            for f in &inv {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// Rotate the first `2·half` channels of one head vector in place (NeoX split-half layout).
    fn apply(&self, x: &mut [f32], i: usize) {
        let h = self.half;
        for j in 0..h {
            let c = self.cos[i * h + j];
            let s = self.sin[i * h + j];
            let x1 = x[j];
            let x2 = x[j + h];
            x[j] = x1 * c - x2 * s;
            x[j + h] = x2 * c + x1 * s;
        }
    }
}

/// Up to this many rows, a MoE layer runs its selected experts in parallel.
const MOE_PAR_EXPERTS_MAX_ROWS: usize = 64;

/// Mixture of experts (spec §6.8): router with bias, stable top-k, softmax over the selected
/// logits, GeGLU experts `gelu_erf(a) · (g + 1)`, weighted sum.
fn moe(
    h: &Tensor,
    router: &Linear,
    fc1: &Weight,
    fc2: &Weight,
    top_k: usize,
    inner: usize,
    trace: Option<&mut BlockTrace>,
) -> Result<Tensor> {
    let (t, d) = h.dims2()?;
    let logits_t = router.forward(h)?;
    let e_count = logits_t.dims()[1];
    let logits = logits_t.flatten_all()?.to_vec1::<f32>()?;
    let mut ids = Vec::with_capacity(t);
    let mut weights = Vec::with_capacity(t * top_k);
    for r in 0..t {
        let row = &logits[r * e_count..(r + 1) * e_count];
        let sel = stable_topk(row, top_k);
        let mx = row[sel[0]];
        let ex: Vec<f32> = sel.iter().map(|&e| (row[e] - mx).exp()).collect();
        let sum: f32 = ex.iter().sum();
        weights.extend(ex.iter().map(|v| v / sum));
        ids.push(sel);
    }
    // Group rows by expert.
    let mut groups: Vec<Vec<(u32, f32)>> = vec![Vec::new(); e_count];
    for (r, sel) in ids.iter().enumerate() {
        for (slot, &e) in sel.iter().enumerate() {
            groups[e].push((r as u32, weights[r * top_k + slot]));
        }
    }
    let hs = h.flatten_all()?.to_vec1::<f32>()?;
    // One expert: gather its rows, fc1, GeGLU, fc2 → `[rows, d]`.
    let run_expert = |e: usize, rows: &[(u32, f32)]| -> Vec<f32> {
        let c = rows.len();
        let mut xe = Vec::with_capacity(c * d);
        for &(r, _) in rows {
            xe.extend_from_slice(&hs[r as usize * d..(r as usize + 1) * d]);
        }
        let mut u = vec![0f32; c * 2 * inner];
        fc1.matmul_rows(e * 2 * inner, 2 * inner, &xe, c, None, &mut u);
        let mut z = vec![0f32; c * inner];
        crescent_kernels::geglu(&u, inner, &mut z);
        let mut y = vec![0f32; c * d];
        fc2.matmul_rows(e * d, d, &z, c, None, &mut y);
        y
    };
    let active: Vec<usize> = (0..e_count).filter(|&e| !groups[e].is_empty()).collect();
    // Few rows (decode): each expert is a small weight-streaming GEMV, so run the experts
    // side by side (one pass over the selected weights by all cores, no per-call sync);
    // many rows (prefill): one expert at a time, each matmul parallel inside.
    let ys: Vec<Vec<f32>> = if t <= MOE_PAR_EXPERTS_MAX_ROWS {
        use rayon::prelude::*;
        active
            .par_iter()
            .map(|&e| run_expert(e, &groups[e]))
            .collect()
    } else {
        active.iter().map(|&e| run_expert(e, &groups[e])).collect()
    };
    let mut out = vec![0f32; t * d];
    for (&e, y) in active.iter().zip(&ys) {
        for (k, &(r, w)) in groups[e].iter().enumerate() {
            let o = &mut out[r as usize * d..(r as usize + 1) * d];
            for (ov, yv) in o.iter_mut().zip(&y[k * d..(k + 1) * d]) {
                *ov += w * yv;
            }
        }
    }
    let out = Tensor::from_vec(out, (t, d), &Device::Cpu)?;
    if let Some(tr) = trace {
        tr.router_logits = Some(logits_t);
        tr.topk_weights = Some(Tensor::from_vec(weights, (t, top_k), &Device::Cpu)?);
        tr.topk_ids = Some(ids);
    }
    Ok(out)
}
