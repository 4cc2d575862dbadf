//! Text decoder (spec §6): embeddings, prefix-LM attention with tau scaling and partial
//! split-half RoPE, parallel residual blocks with dense or mixture-of-experts MLPs, final
//! LayerNorm and LM head, and a per-sequence KV cache.

use candle_core::{DType, Device, Tensor};

use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use crate::layers::{
    gelu_erf, gelu_tanh, softmax_last, store, upcast, LayerNorm, Linear, WeightStorage,
};
use crate::weights::Checkpoint;

/// Key/value cache of one sequence: per layer `[heads, capacity, head_dim]`, keys after RoPE,
/// values after tau scaling (spec §6.9).
#[derive(Clone, Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
    heads: usize,
    head_dim: usize,
}

impl KvCache {
    /// An empty cache with room for `capacity` positions (it grows on demand).
    pub fn new(cfg: &TextConfig, capacity: usize) -> Result<Self> {
        let capacity = capacity.max(1);
        let heads = cfg.n_kv_heads;
        let head_dim = cfg.head_dim();
        let mut k = Vec::with_capacity(cfg.n_layers);
        let mut v = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            k.push(Tensor::zeros(
                (heads, capacity, head_dim),
                DType::F32,
                &Device::Cpu,
            )?);
            v.push(Tensor::zeros(
                (heads, capacity, head_dim),
                DType::F32,
                &Device::Cpu,
            )?);
        }
        Ok(Self {
            k,
            v,
            len: 0,
            capacity,
            heads,
            head_dim,
        })
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the filled part with room for `extra` more positions (used to branch several
    /// prompts off one cached image prefix).
    pub fn fork(&self, extra: usize) -> Result<Self> {
        let cap = (self.len + extra).max(1);
        let mut out = Self {
            k: Vec::with_capacity(self.k.len()),
            v: Vec::with_capacity(self.v.len()),
            len: self.len,
            capacity: cap,
            heads: self.heads,
            head_dim: self.head_dim,
        };
        for (k, v) in self.k.iter().zip(&self.v) {
            let nk = Tensor::zeros((self.heads, cap, self.head_dim), DType::F32, &Device::Cpu)?;
            let nv = Tensor::zeros((self.heads, cap, self.head_dim), DType::F32, &Device::Cpu)?;
            if self.len > 0 {
                nk.slice_set(&k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                nv.slice_set(&v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            out.k.push(nk);
            out.v.push(nv);
        }
        Ok(out)
    }

    fn ensure(&mut self, n: usize) -> Result<()> {
        if n <= self.capacity {
            return Ok(());
        }
        let cap = n.max(2 * self.capacity);
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let extra = Tensor::zeros(
                (self.heads, cap - self.capacity, self.head_dim),
                DType::F32,
                &Device::Cpu,
            )?;
            *t = Tensor::cat(&[&*t, &extra], 1)?;
        }
        self.capacity = cap;
        Ok(())
    }
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
        fc1: Tensor,
        fc2: Tensor,
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
    wte: Tensor,
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
    /// Load from the checkpoint (HF key names, spec §3.1).
    pub fn load(
        ck: &Checkpoint,
        cfg: &TextConfig,
        tau_gelu_tanh: bool,
        ws: WeightStorage,
    ) -> Result<Self> {
        let d = cfg.dim;
        let h = cfg.n_heads;
        let qkv_dim = cfg.qkv_dim();
        let wte = store(ck.get("model.text.wte", &[cfg.vocab_size, d])?, ws)?;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.text.blocks.{i}");
            let (tau_w, tau_alpha) = if cfg.tau_attn {
                let wq = ck.get(&format!("{p}.attn.tau.wq"), &[h, qkv_dim])?;
                let wv = ck.get(&format!("{p}.attn.tau.wv"), &[h, qkv_dim])?;
                let w = store(Tensor::cat(&[&wq, &wv], 0)?, ws)?;
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
                    fc1: store(
                        ck.get(
                            &format!("{p}.mlp.fc1.weight"),
                            &[m.num_experts, 2 * m.expert_inner_dim, d],
                        )?,
                        ws,
                    )?,
                    fc2: store(
                        ck.get(
                            &format!("{p}.mlp.fc2.weight"),
                            &[m.num_experts, d, m.expert_inner_dim],
                        )?,
                        ws,
                    )?,
                    top_k: m.experts_per_token,
                    inner: m.expert_inner_dim,
                },
                _ => Mlp::Dense {
                    fc1: Linear::load(ck, &format!("{p}.mlp.fc1"), d, cfg.ff_dim, true, ws)?,
                    fc2: Linear::load(ck, &format!("{p}.mlp.fc2"), cfg.ff_dim, d, true, ws)?,
                },
            };
            blocks.push(TextBlock {
                ln: LayerNorm::load(ck, &format!("{p}.ln"), d)?,
                qkv: Linear::load(ck, &format!("{p}.attn.qkv"), d, qkv_dim, true, ws)?,
                proj: Linear::load(ck, &format!("{p}.attn.proj"), d, d, true, ws)?,
                tau_w,
                tau_alpha,
                mlp,
            });
        }
        let post_ln = LayerNorm::load(ck, "model.text.post_ln", d)?;
        let lm_head = Linear::load(ck, "model.text.lm_head", d, cfg.vocab_size, true, ws)?;
        Ok(Self {
            cfg: cfg.clone(),
            tau_gelu_tanh,
            wte,
            blocks,
            post_ln,
            lm_head,
        })
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
        let idx = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu)?;
        Ok(self.wte.index_select(&idx, 0)?.to_dtype(DType::F32)?)
    }

    /// Logits `[..., V]` of pre-`post_ln` hidden states `[..., D]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.post_ln.forward(hidden)?)
    }

    /// Run input embeddings `x` `[T, D]` at positions `cache.len() .. cache.len() + T`.
    /// Positions `< prefix_len` attend bidirectionally among themselves (the BOS + image block),
    /// everything else causally (spec §6.2). Returns hidden states `[T, D]` before `post_ln`.
    pub fn forward(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        prefix_len: usize,
        mut trace: Option<&mut TextTrace>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (t, d) = x.dims2()?;
        if d != cfg.dim {
            return Err(ModelError::Input(format!(
                "embeddings have width {d}, expected {}",
                cfg.dim
            )));
        }
        let p0 = cache.len;
        let s = p0 + t;
        if s > cfg.max_context {
            return Err(ModelError::Input(format!(
                "sequence length {s} exceeds max_context {}",
                cfg.max_context
            )));
        }
        cache.ensure(s)?;
        let rope = RopeTable::new(cfg, p0, t);
        let mask = if t > 1 {
            Some(build_mask(p0, t, prefix_len)?)
        } else {
            None
        };
        let mut x = x.clone();
        if let Some(tr) = trace.as_deref_mut() {
            tr.hidden_states.push(x.clone());
        }
        for (li, blk) in self.blocks.iter().enumerate() {
            let mut bt = trace.as_ref().map(|_| BlockTrace::default());
            let h = blk.ln.forward(&x)?;
            let a = self.attention(&h, blk, li, cache, p0, &rope, mask.as_ref(), bt.as_mut())?;
            let m = match &blk.mlp {
                Mlp::Dense { fc1, fc2 } => fc2.forward(&gelu_tanh(&fc1.forward(&h)?)?)?,
                Mlp::Moe {
                    router,
                    fc1,
                    fc2,
                    top_k,
                    inner,
                } => moe(&h, router, fc1, fc2, *top_k, *inner, bt.as_mut())?,
            };
            x = ((x + a)? + &m)?;
            if let (Some(tr), Some(mut b)) = (trace.as_deref_mut(), bt) {
                b.ln_out = Some(h);
                b.mlp_out = Some(m);
                tr.blocks.push(b);
                tr.hidden_states.push(x.clone());
            }
        }
        cache.len = s;
        Ok(x)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        h: &Tensor,
        blk: &TextBlock,
        li: usize,
        cache: &mut KvCache,
        p0: usize,
        rope: &RopeTable,
        mask: Option<&Tensor>,
        trace: Option<&mut BlockTrace>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let t = h.dims()[0];
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
            let tok = tw.forward(&act)?.tanh()?.flatten_all()?.to_vec1::<f32>()?; // [T, 2H]
            let mut tq = vec![0f32; t * nh];
            let mut tv = vec![0f32; t * nh];
            for i in 0..t {
                let lp = ((p0 + i) as f32 + 1.0).ln();
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
        // Split heads into head-major layouts, apply tau and RoPE.
        let mut q = vec![0f32; nh * t * hd];
        let mut k = vec![0f32; nkv * t * hd];
        let mut v = vec![0f32; nkv * t * hd];
        for i in 0..t {
            let row = &qkv[i * qkv_dim..(i + 1) * qkv_dim];
            for hh in 0..nh {
                let src = &row[hh * hd..(hh + 1) * hd];
                let dst = &mut q[(hh * t + i) * hd..(hh * t + i + 1) * hd];
                let f = tau_q.as_ref().map_or(1.0, |tq| tq[i * nh + hh]);
                for (dv, sv) in dst.iter_mut().zip(src) {
                    *dv = sv * f;
                }
                rope.apply(dst, i);
            }
            for hh in 0..nkv {
                let ks = &row[(nh + hh) * hd..(nh + hh + 1) * hd];
                let kd = &mut k[(hh * t + i) * hd..(hh * t + i + 1) * hd];
                kd.copy_from_slice(ks);
                rope.apply(kd, i);
                let vs = &row[(nh + nkv + hh) * hd..(nh + nkv + hh + 1) * hd];
                let vd = &mut v[(hh * t + i) * hd..(hh * t + i + 1) * hd];
                let f = tau_v.as_ref().map_or(1.0, |tv| tv[i * nh + hh]);
                for (dv, sv) in vd.iter_mut().zip(vs) {
                    *dv = sv * f;
                }
            }
        }
        let q = Tensor::from_vec(q, (nh, t, hd), &Device::Cpu)?;
        let k = Tensor::from_vec(k, (nkv, t, hd), &Device::Cpu)?;
        let v = Tensor::from_vec(v, (nkv, t, hd), &Device::Cpu)?;
        cache.k[li].slice_set(&k, 1, p0)?;
        cache.v[li].slice_set(&v, 1, p0)?;
        let s = p0 + t;
        let mut kk = cache.k[li].narrow(1, 0, s)?;
        let mut vv = cache.v[li].narrow(1, 0, s)?;
        if nkv != nh {
            let rep = nh / nkv;
            kk = kk
                .unsqueeze(1)?
                .repeat((1, rep, 1, 1))?
                .reshape((nh, s, hd))?;
            vv = vv
                .unsqueeze(1)?
                .repeat((1, rep, 1, 1))?
                .reshape((nh, s, hd))?;
        }
        let kk = kk.contiguous()?;
        let vv = vv.contiguous()?;
        let mut scores = (q.matmul(&kk.t()?)? * (1.0 / (hd as f64).sqrt()))?; // [H, T, S]
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = softmax_last(&scores)?;
        let o = probs
            .matmul(&vv)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, nh * hd))?;
        let out = blk.proj.forward(&o)?;
        if let Some(tr) = trace {
            tr.qkv = Some(qkv_t.clone());
            if let (Some(tq), Some(tv)) = (tau_q, tau_v) {
                tr.tau_q = Some(Tensor::from_vec(tq, (t, nh), &Device::Cpu)?);
                tr.tau_v = Some(Tensor::from_vec(tv, (t, nh), &Device::Cpu)?);
            }
            tr.q_rot = Some(q.transpose(0, 1)?.contiguous()?);
            tr.k_rot = Some(k.transpose(0, 1)?.contiguous()?);
            tr.attn_out = Some(out.clone());
        }
        Ok(out)
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Additive mask `[T, S]` for queries at `p0..p0+T` over keys `0..p0+T`: causal, plus full
/// attention inside the first `prefix_len` positions.
fn build_mask(p0: usize, t: usize, prefix_len: usize) -> Result<Tensor> {
    let s = p0 + t;
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        let qi = p0 + i;
        for j in 0..s {
            let allowed = j <= qi || (qi < prefix_len && j < prefix_len);
            if !allowed {
                m[i * s + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (t, s), &Device::Cpu)?)
}

/// cos/sin of the rotary angles for a run of positions (f32, spec §6.6).
struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn new(cfg: &TextConfig, p0: usize, t: usize) -> Self {
        let rot = cfg.rot_dim();
        let half = rot / 2;
        let theta = cfg.rope_theta as f32;
        let inv: Vec<f32> = (0..half)
            .map(|j| 1.0 / theta.powf((2 * j) as f32 / rot as f32))
            .collect();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for i in 0..t {
            let p = (p0 + i) as f32;
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

/// Mixture of experts (spec §6.8): router with bias, stable top-k, softmax over the selected
/// logits, GeGLU experts `gelu_erf(a) · (g + 1)`, weighted sum.
fn moe(
    h: &Tensor,
    router: &Linear,
    fc1: &Tensor,
    fc2: &Tensor,
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
    let mut out = Tensor::zeros((t, d), DType::F32, &Device::Cpu)?;
    for (e, rows) in groups.iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let idx = Tensor::from_vec(
            rows.iter().map(|r| r.0).collect::<Vec<u32>>(),
            rows.len(),
            &Device::Cpu,
        )?;
        let w = Tensor::from_vec(
            rows.iter().map(|r| r.1).collect::<Vec<f32>>(),
            (rows.len(), 1),
            &Device::Cpu,
        )?;
        let xe = h.index_select(&idx, 0)?;
        let w1 = upcast(&fc1.get(e)?)?;
        let u = xe.matmul(&w1.t()?)?;
        let a = u.narrow(1, 0, inner)?;
        let g = u.narrow(1, inner, inner)?;
        let z = (gelu_erf(&a)? * (g + 1.0)?)?;
        let w2 = upcast(&fc2.get(e)?)?;
        let y = z.matmul(&w2.t()?)?.broadcast_mul(&w)?;
        out = out.index_add(&idx, &y, 0)?;
    }
    if let Some(tr) = trace {
        tr.router_logits = Some(logits_t);
        tr.topk_weights = Some(Tensor::from_vec(weights, (t, top_k), &Device::Cpu)?);
        tr.topk_ids = Some(ids);
    }
    Ok(out)
}
