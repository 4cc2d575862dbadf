//! Continuous batching (issue: many requests in one decode loop).
//!
//! Every [`Scheduler::step`] admits waiting jobs while KV blocks allow, encodes new images (one
//! vision batch for all of them; a prefix-cache hit skips the encoder and the image prefill), and
//! runs **one** batched forward pass holding, side by side: image prefills (BOS + image block),
//! prompt prefill chunks and one token for every decoding row — whatever each row's skill asked
//! for (text, coordinate or size). It then samples every row that needs a token under its skill's
//! constraint and hands the typed token to the skill. Finished or cancelled rows return their KV
//! blocks at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use crescent_image::Crops;
use crescent_model::{KvPool, ModelError, Moondream, SeqInput, SeqKv, Token};
use crescent_skills::{
    Constraint, FinishReason, GenerationSettings, Prompt, SkillContext, SkillError, SkillRequest,
    SkillState,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::generate::{EngineError, Generation, GenerationTrace, Timings};
use crate::metrics::Metrics;
use crate::prefix::PrefixCache;
use crate::sampler::{pick, SplitMix64};

/// Engine sizing.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch_size: usize,
    /// KV pool size in MiB.
    pub kv_cache_mb: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Most prompt tokens prefilled per step across rows (image blocks excepted: they are one unit).
    pub prefill_chunk: usize,
    /// Most jobs waiting for admission; beyond it `submit` refuses.
    pub max_queue: usize,
    /// Most images kept in the prefix cache.
    pub prefix_cache_images: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            kv_cache_mb: 2048,
            block_size: crescent_model::kv::DEFAULT_BLOCK_SIZE,
            prefill_chunk: 512,
            max_queue: 256,
            prefix_cache_images: 64,
        }
    }
}

/// A preprocessed image with its identity (hash of the decoded pixels).
#[derive(Clone, Debug)]
pub struct ImageInput {
    /// The crops.
    pub crops: Crops,
    /// SHA-256 of the decoded RGB pixels and their size.
    pub hash: [u8; 32],
}

impl ImageInput {
    /// Crops plus the hash of the decoded image they came from.
    pub fn new(rgb: &crescent_image::RgbImage, crops: Crops) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update((rgb.width as u64).to_le_bytes());
        h.update((rgb.height as u64).to_le_bytes());
        h.update(&rgb.data);
        Self {
            crops,
            hash: h.finalize().into(),
        }
    }
}

/// What a client asks for.
#[derive(Debug)]
pub struct Job {
    /// The skill request.
    pub request: SkillRequest,
    /// Sampling overrides.
    pub overrides: crescent_skills::SettingsOverrides,
    /// The image, if any.
    pub image: Option<ImageInput>,
    /// Record logits and bins (tests, debugging).
    pub trace: bool,
}

/// A job whose skill the caller has already started: the engine runs `state` over `prompt`
/// exactly as it runs a built-in skill (it is skill-agnostic). This is the extension point for
/// skills defined outside `crescent-skills`, and what the fault-isolation tests use to inject a
/// misbehaving skill state.
pub struct CustomJob {
    /// Skill name used in metrics (`crescent_requests_total{skill=...}`).
    pub skill: &'static str,
    /// The prompt (BOS is added by the engine; `prompt.image` requires `image`).
    pub prompt: Prompt,
    /// The started skill state.
    pub state: Box<dyn SkillState>,
    /// Resolved sampling settings.
    pub settings: GenerationSettings,
    /// The image, if the prompt has one.
    pub image: Option<ImageInput>,
    /// Record logits and bins (tests, debugging).
    pub trace: bool,
}

impl std::fmt::Debug for CustomJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomJob")
            .field("skill", &self.skill)
            .field("prompt", &self.prompt)
            .field("settings", &self.settings)
            .field("image", &self.image.as_ref().map(|i| i.crops.tiling))
            .field("trace", &self.trace)
            .finish_non_exhaustive()
    }
}

/// Anything the engine runs: a [`Job`] (the engine starts the skill) or a [`CustomJob`] (the
/// caller did). Every submitting function takes `impl Into<Submission>`, so a plain [`Job`]
/// works as before.
#[derive(Debug)]
pub enum Submission {
    /// A built-in skill request.
    Skill(Job),
    /// An already-started skill.
    Custom(CustomJob),
}

impl From<Job> for Submission {
    fn from(j: Job) -> Self {
        Submission::Skill(j)
    }
}

impl From<CustomJob> for Submission {
    fn from(j: CustomJob) -> Self {
        Submission::Custom(j)
    }
}

/// Streamed to the submitter.
#[derive(Debug)]
pub enum Event {
    /// Newly produced answer/caption text.
    Delta(String),
    /// The final result.
    Done(Box<Result<Generation, EngineError>>),
}

/// A job inside the scheduler.
pub(crate) struct Active {
    pub id: u64,
    skill: &'static str,
    state: Box<dyn SkillState>,
    settings: GenerationSettings,
    rng: SplitMix64,
    kv: SeqKv,
    image: Option<ImageInput>,
    /// Prompt tokens not yet prefilled (after BOS + image).
    pending: Vec<Token>,
    /// Prompt positions in total (BOS + image + template).
    prompt_len: usize,
    ids: Vec<u32>,
    tokens: Vec<Token>,
    n_sampled: usize,
    tx: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    trace: Option<GenerationTrace>,
    submitted: Instant,
    first_token: Option<Instant>,
    prefill_start: Option<Instant>,
    cached_tokens: usize,
    /// Hidden state of the last position and the row still has to sample from it.
    last_hidden: Option<Tensor>,
}

/// Registration data returned by `submit`.
pub(crate) struct Admission {
    pub cancel: Arc<AtomicBool>,
}

/// The batching core; single-threaded, driven by [`Scheduler::step`].
pub struct Scheduler {
    model: Arc<Moondream>,
    skills: SkillContext,
    cfg: EngineConfig,
    pool: KvPool,
    prefix: PrefixCache,
    waiting: VecDeque<Active>,
    running: Vec<Active>,
    next_id: u64,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    /// A scheduler over `model`.
    pub fn new(
        model: Arc<Moondream>,
        skills: SkillContext,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let pool = KvPool::with_memory_mb(
            &model.config.text,
            cfg.block_size,
            cfg.kv_cache_mb,
            model.kv_dtype(),
        );
        metrics
            .kv_blocks_total
            .store(pool.total_blocks() as u64, Ordering::Relaxed);
        Self {
            prefix: PrefixCache::new(cfg.prefix_cache_images),
            model,
            skills,
            cfg,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 1,
            metrics,
        }
    }

    /// Jobs waiting or running.
    pub fn in_flight(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    /// KV blocks in use (including the prefix cache's).
    pub fn kv_blocks_used(&self) -> usize {
        self.pool.used_blocks()
    }

    /// Drop every prefix-cache entry (their blocks return to the pool).
    pub fn clear_prefix_cache(&mut self) {
        self.prefix.clear(&mut self.pool);
        self.update_gauges();
    }

    /// Validate and enqueue a job. Validation errors are returned at once.
    pub(crate) fn submit(
        &mut self,
        job: impl Into<Submission>,
        tx: UnboundedSender<Event>,
    ) -> Result<Admission, EngineError> {
        if self.waiting.len() >= self.cfg.max_queue {
            return Err(EngineError::QueueFull);
        }
        let (skill, prompt, state, settings, image, trace) = match job.into() {
            Submission::Skill(job) => {
                let (prompt, state, settings) =
                    self.skills
                        .start(&job.request, &job.overrides, job.image.is_some())?;
                let skill = job.request.skill_name();
                (skill, prompt, state, settings, job.image, job.trace)
            }
            Submission::Custom(c) => {
                if c.prompt.image && c.image.is_none() {
                    return Err(SkillError::InvalidRequest(
                        "the prompt has an image block but the job has no image".into(),
                    )
                    .into());
                }
                (c.skill, c.prompt, c.state, c.settings, c.image, c.trace)
            }
        };
        let text = &self.model.config.text;
        let n_img = if prompt.image {
            self.model.config.vision.n_image_tokens()
        } else {
            0
        };
        let prompt_len = 1 + n_img + prompt.tokens.len();
        if prompt_len >= text.max_context {
            return Err(ModelError::Input(format!(
                "prompt of {prompt_len} positions does not fit the context of {}",
                text.max_context
            ))
            .into());
        }
        // Every job must fit an empty pool on its own, or it would wait forever.
        // Saturating: a client may ask for `max_tokens` up to `usize::MAX`.
        let total = prompt_len
            .saturating_add(settings.max_new_tokens)
            .min(text.max_context);
        // What admission needs in the worst case: its own blocks plus, for an image not yet
        // cached, the image prefix's blocks.
        let prefix_blocks = if prompt.image {
            self.pool.blocks_for(1 + n_img)
        } else {
            0
        };
        if self.pool.blocks_for(total) + prefix_blocks > self.pool.total_blocks() {
            return Err(EngineError::TooLarge(format!(
                "request needs {total} KV positions; the KV cache holds {}",
                self.pool.total_blocks() * self.pool.block_size()
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let mut pending = Vec::with_capacity(prompt.tokens.len() + 1);
        if !prompt.image {
            pending.push(Token::Text(self.model.config.tokenizer.bos_id));
        }
        pending.extend(prompt.tokens.iter().copied());
        self.metrics.requests_started(skill);
        self.waiting.push_back(Active {
            id,
            skill,
            state,
            rng: SplitMix64::new(settings.seed.unwrap_or(0)),
            settings,
            kv: SeqKv::new(),
            image: image.filter(|_| prompt.image),
            pending,
            prompt_len,
            ids: Vec::new(),
            tokens: Vec::new(),
            n_sampled: 0,
            tx,
            cancel: Arc::clone(&cancel),
            trace: trace.then(GenerationTrace::default),
            submitted: Instant::now(),
            first_token: None,
            prefill_start: None,
            cached_tokens: 0,
            last_hidden: None,
        });
        self.update_gauges();
        tracing::debug!(id, skill, "job queued");
        Ok(Admission { cancel })
    }

    /// Run one engine step. Returns whether there was anything to do.
    ///
    /// Faults are confined: an error or panic of one row's skill state fails that row only; a
    /// failure (error or panic) of the shared batched pass fails the rows of this batch, returns
    /// their KV blocks and leaves the scheduler ready for the next step.
    pub fn step(&mut self) -> bool {
        self.drop_cancelled();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.admit())).is_err() {
            tracing::error!("admission panicked; failing the running rows");
            self.fail_running("admission panicked");
        }
        if self.running.is_empty() {
            self.update_gauges();
            return false;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_batch())) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // A failure of the shared pass: fail every running row, keep serving.
                tracing::error!(error = %e, "batched forward failed");
                self.fail_running(&e.to_string());
            }
            Err(_) => {
                tracing::error!("batched step panicked; failing the running rows");
                self.fail_running("engine step panicked");
            }
        }
        self.update_gauges();
        true
    }

    /// Fail every running row with [`EngineError::Internal`] and return its KV blocks.
    fn fail_running(&mut self, msg: &str) {
        for mut a in std::mem::take(&mut self.running) {
            a.kv.release(&mut self.pool);
            self.finish_err(a, EngineError::Internal(msg.to_string()));
        }
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.queue_depth
            .store(self.waiting.len() as u64, Ordering::Relaxed);
        m.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        m.kv_blocks_used
            .store(self.pool.used_blocks() as u64, Ordering::Relaxed);
        m.prefix_cache_entries
            .store(self.prefix.len() as u64, Ordering::Relaxed);
        m.prefix_cache_blocks
            .store(self.prefix.blocks() as u64, Ordering::Relaxed);
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].cancel.load(Ordering::Relaxed) || self.running[i].tx.is_closed() {
                let mut a = self.running.swap_remove(i);
                a.kv.release(&mut self.pool);
                self.metrics.requests_finished(a.skill, "cancelled");
            } else {
                i += 1;
            }
        }
        self.waiting.retain(|a| {
            let gone = a.cancel.load(Ordering::Relaxed) || a.tx.is_closed();
            if gone {
                self.metrics.requests_finished(a.skill, "cancelled");
            }
            !gone
        });
    }

    /// Move waiting jobs to running while the batch and the KV pool allow, in arrival order.
    /// A prefix-cache hit shares the image blocks at once; a miss is promised the blocks of its
    /// image prefix plus its own and gets them after the image prefill of this step.
    fn admit(&mut self) {
        let bs = self.pool.block_size();
        let max_context = self.model.config.text.max_context;
        let image_positions = 1 + self.model.config.vision.n_image_tokens();
        let mut promised = 0usize;
        let mut new_hashes: Vec<[u8; 32]> = Vec::new();
        let mut misses: Vec<usize> = Vec::new();
        while self.running.len() < self.cfg.max_batch_size {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let total = front
                .prompt_len
                .saturating_add(front.settings.max_new_tokens)
                .min(max_context);
            let hash = front.image.as_ref().map(|i| i.hash);
            let hit = hash.is_some_and(|h| self.prefix.contains(&h));
            let pending_image = hash.is_some_and(|h| new_hashes.contains(&h));
            let need = match hash {
                // Full prefix blocks are shared; the partial one is copied.
                Some(_) if hit || pending_image => {
                    self.pool.blocks_for(total) - image_positions / bs
                }
                Some(_) => self.pool.blocks_for(total) + self.pool.blocks_for(image_positions),
                None => self.pool.blocks_for(total),
            };
            if need + promised > self.pool.free_blocks() {
                // Evict unused prefix-cache images (LRU) before making the job wait.
                if self.prefix.evict_one(&mut self.pool, hash.as_ref()) {
                    continue;
                }
                break;
            }
            let Some(mut a) = self.waiting.pop_front() else {
                break;
            };
            a.prefill_start = Some(Instant::now());
            if let (Some(h), true) = (hash, hit) {
                let forked = match self.prefix.get(&h) {
                    Some(entry) => entry.fork(&mut self.pool),
                    None => Err(ModelError::Input("prefix cache entry vanished".into())),
                };
                match forked.and_then(|kv| {
                    a.kv = kv;
                    a.kv.reserve(&mut self.pool, total - a.kv.len())
                }) {
                    Ok(()) => {
                        a.cached_tokens = a.kv.len();
                        a.image = None;
                        self.metrics.prefix_hit();
                    }
                    Err(e) => {
                        a.kv.release(&mut self.pool);
                        self.finish_err(a, e.into());
                        continue;
                    }
                }
            } else if let Some(h) = hash {
                if !pending_image {
                    new_hashes.push(h);
                    self.metrics.prefix_miss();
                } else {
                    self.metrics.prefix_hit();
                }
                promised += need;
                misses.push(self.running.len());
            } else if let Err(e) = a.kv.reserve(&mut self.pool, total) {
                a.kv.release(&mut self.pool);
                self.finish_err(a, e.into());
                continue;
            }
            self.running.push(a);
        }
        if !misses.is_empty() {
            self.encode_new_images(&misses);
        }
    }

    /// Vision-encode the distinct new images of `rows` (admitted this step), prefill their
    /// BOS + image blocks in one batched pass, publish them to the prefix cache and fork them
    /// into every row that asked for them.
    fn encode_new_images(&mut self, rows: &[usize]) {
        let t0 = Instant::now();
        let bos = self.model.config.tokenizer.bos_id;
        // The distinct new images, their crops encoded in one vision batch; if that fails (one
        // bad image), each image is encoded alone so only the bad one fails.
        // (image hash, normalised crops, tiling)
        type NewImage = ([u8; 32], Vec<f32>, (usize, usize));
        let mut uniq: Vec<NewImage> = Vec::new();
        for &r in rows {
            let Some(img) = self.running[r].image.as_ref() else {
                continue;
            };
            if !uniq.iter().any(|(h, _, _)| *h == img.hash) {
                uniq.push((img.hash, img.crops.normalized_chw(), img.crops.tiling));
            }
        }
        let batch: Vec<(&[f32], (usize, usize))> =
            uniq.iter().map(|(_, p, t)| (p.as_slice(), *t)).collect();
        let embeds: Vec<crescent_model::Result<Tensor>> = match self.model.encode_images(&batch) {
            Ok(all) => all.into_iter().map(Ok).collect(),
            Err(_) => batch
                .iter()
                .map(|(p, t)| self.model.encode_image(p, *t, None))
                .collect(),
        };
        let mut inputs: Vec<([u8; 32], Tensor)> = Vec::new();
        for ((hash, _, _), e) in uniq.iter().zip(embeds) {
            let x = e.and_then(|e| Ok(Tensor::cat(&[&self.model.text.embed_ids(&[bos])?, &e], 0)?));
            match x {
                Ok(x) => inputs.push((*hash, x)),
                Err(e) => tracing::warn!(error = %e, "vision encoder failed for one image"),
            }
        }
        self.metrics
            .vision_encodes
            .fetch_add(inputs.len() as u64, Ordering::Relaxed);
        self.metrics
            .vision_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        let mut seqs: Vec<SeqKv> = inputs.iter().map(|_| SeqKv::new()).collect();
        let res = {
            let mut batch: Vec<SeqInput<'_>> = inputs
                .iter()
                .zip(seqs.iter_mut())
                .map(|((_, x), kv)| SeqInput {
                    prefix_len: x.dims()[0],
                    x: x.clone(),
                    kv,
                })
                .collect();
            self.model
                .text
                .forward_batch(&mut self.pool, &mut batch, None)
        };
        let mut prefixes: Vec<([u8; 32], SeqKv)> = Vec::new();
        match res {
            Ok(_) => prefixes = inputs.iter().map(|(h, _)| *h).zip(seqs).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "image prefill failed");
                for mut kv in seqs {
                    kv.release(&mut self.pool);
                }
            }
        }
        self.metrics
            .image_prefills
            .fetch_add(prefixes.len() as u64, Ordering::Relaxed);
        let max_context = self.model.config.text.max_context;
        let mut failed: Vec<usize> = Vec::new();
        for &r in rows {
            let Some(hash) = self.running[r].image.as_ref().map(|i| i.hash) else {
                continue;
            };
            let Some((_, prefix_kv)) = prefixes.iter().find(|(h, _)| *h == hash) else {
                failed.push(r);
                continue;
            };
            let a = &mut self.running[r];
            let total = a
                .prompt_len
                .saturating_add(a.settings.max_new_tokens)
                .min(max_context);
            let res = prefix_kv.fork(&mut self.pool).and_then(|kv| {
                a.kv = kv;
                a.kv.reserve(&mut self.pool, total - a.kv.len())
            });
            if let Err(e) = res {
                tracing::warn!(error = %e, "KV reservation after the image prefill failed");
                failed.push(r);
                continue;
            }
            a.image = None;
        }
        for (h, kv) in prefixes {
            self.prefix.insert(h, kv, &mut self.pool);
        }
        failed.sort_unstable();
        for r in failed.into_iter().rev() {
            let mut a = self.running.swap_remove(r);
            a.kv.release(&mut self.pool);
            self.finish_err(a, EngineError::Internal("image encoding failed".into()));
        }
    }

    /// One batched forward over all running rows, then sampling.
    fn run_batch(&mut self) -> Result<(), EngineError> {
        let model = Arc::clone(&self.model);
        // Decide each row's input this step.
        let mut budget = self.cfg.prefill_chunk.max(1);
        let mut plan: Vec<(usize, Vec<Token>, bool)> = Vec::new(); // (row, tokens, completes prompt)
        for (i, a) in self.running.iter_mut().enumerate() {
            if a.last_hidden.is_some() {
                continue; // waits to sample (should not happen across steps)
            }
            if a.pending.is_empty() {
                continue;
            }
            let is_decode = a.n_sampled > 0;
            let take = if is_decode {
                a.pending.len()
            } else {
                a.pending.len().min(budget)
            };
            if take == 0 {
                continue;
            }
            if !is_decode {
                budget -= take;
            }
            let toks: Vec<Token> = a.pending.drain(..take).collect();
            let done = a.pending.is_empty();
            plan.push((i, toks, done));
        }
        if !plan.is_empty() {
            let mut embeds = Vec::with_capacity(plan.len());
            for (_, toks, _) in &plan {
                embeds.push(model.embed_tokens(toks)?);
            }
            // Borrow each planned row's KV mutably, in row order.
            let mut kvs: Vec<Option<&mut SeqKv>> =
                self.running.iter_mut().map(|a| Some(&mut a.kv)).collect();
            let mut batch: Vec<SeqInput<'_>> = Vec::with_capacity(plan.len());
            for ((i, _, _), x) in plan.iter().zip(embeds) {
                let kv = kvs[*i]
                    .take()
                    .ok_or_else(|| EngineError::Internal("row planned twice".into()))?;
                batch.push(SeqInput {
                    x,
                    kv,
                    prefix_len: 0,
                });
            }
            let t0 = Instant::now();
            let hidden = model.text.forward_batch(&mut self.pool, &mut batch, None)?;
            drop(batch);
            self.metrics.forward_passes.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .forward_us
                .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            for ((i, toks, done), h) in plan.iter().zip(hidden) {
                let a = &mut self.running[*i];
                if a.n_sampled == 0 {
                    self.metrics
                        .tokens_in
                        .fetch_add(toks.len() as u64, Ordering::Relaxed);
                }
                if *done {
                    a.last_hidden = Some(h.get(h.dims()[0] - 1)?);
                }
            }
        }
        // Logits for every row that is ready to sample, in one LM-head call.
        let ready: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].last_hidden.is_some())
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let hs: Vec<Tensor> = ready
            .iter()
            .filter_map(|&i| self.running[i].last_hidden.clone())
            .collect();
        let stacked = Tensor::stack(&hs, 0)?;
        let logits = model.text.logits(&stacked)?.to_vec2::<f32>()?;
        let mut finished: Vec<(usize, Result<FinishReason, EngineError>)> = Vec::new();
        for (k, &i) in ready.iter().enumerate() {
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.sample_row(i, &logits[k])
            }));
            match res {
                Ok(Ok(Some(reason))) => finished.push((i, Ok(reason))),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => finished.push((i, Err(e))),
                Err(_) => {
                    finished.push((i, Err(EngineError::Internal("skill state panicked".into()))))
                }
            }
        }
        finished.sort_by_key(|(i, _)| *i);
        for (i, r) in finished.into_iter().rev() {
            let mut a = self.running.swap_remove(i);
            a.kv.release(&mut self.pool);
            match r {
                Ok(reason) => self.finish_ok(a, reason),
                Err(e) => self.finish_err(a, e),
            }
        }
        Ok(())
    }

    /// Sample the next token of row `i` from its logits; returns a finish reason when done.
    fn sample_row(
        &mut self,
        i: usize,
        logits: &[f32],
    ) -> Result<Option<FinishReason>, EngineError> {
        let model = Arc::clone(&self.model);
        let tk = &model.config.tokenizer;
        let max_context = model.config.text.max_context;
        let a = &mut self.running[i];
        let h = a
            .last_hidden
            .take()
            .ok_or_else(|| EngineError::Internal("no hidden state".into()))?;
        if logits.iter().any(|v| v.is_nan()) {
            return Err(EngineError::Internal("NaN in the logits".into()));
        }
        if let Some(t) = a.trace.as_mut() {
            if a.n_sampled == 0 {
                t.first_logits = logits.to_vec();
            }
        }
        let GenerationSettings {
            temperature,
            top_p,
            max_new_tokens,
            ..
        } = a.settings;
        let constraint = a.state.constraint();
        let id = match &constraint {
            Constraint::Allow(allowed) if allowed.len() == 1 => allowed[0],
            Constraint::Allow(allowed) => {
                let mut masked = vec![f32::NEG_INFINITY; logits.len()];
                for &x in allowed {
                    if let Some(v) = logits.get(x as usize) {
                        masked[x as usize] = *v;
                    }
                }
                if let Some(t) = a.trace.as_mut() {
                    t.step_top1
                        .push(masked.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
                }
                pick(&masked, temperature, top_p, &mut a.rng) as u32
            }
            Constraint::Any => {
                if let Some(t) = a.trace.as_mut() {
                    t.step_top1
                        .push(logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
                }
                pick(logits, temperature, top_p, &mut a.rng) as u32
            }
        };
        if id as usize >= logits.len() {
            // Only a (custom) skill's constraint can force an id outside the vocabulary; feeding
            // it back would fail the shared forward pass of every row.
            return Err(EngineError::Internal(format!(
                "the skill's constraint forced token id {id} outside the vocabulary of {}",
                logits.len()
            )));
        }
        a.n_sampled += 1;
        if a.first_token.is_none() {
            a.first_token = Some(Instant::now());
            self.metrics
                .observe_ttft(a.submitted.elapsed().as_secs_f64());
        }
        self.metrics.tokens_out.fetch_add(1, Ordering::Relaxed);
        if id == tk.eos_id {
            return Ok(Some(FinishReason::Stop));
        }
        let tok = if id == tk.coord_id {
            let bins = model.region.coord_logits(&h)?;
            let b = pick(&bins, temperature, top_p, &mut a.rng);
            if let Some(t) = a.trace.as_mut() {
                t.bins.push(vec![b]);
            }
            Token::Coord(model.region.coord_value(b))
        } else if id == tk.size_id {
            let (wl, hl) = model.region.size_logits(&h)?;
            let wb = pick(&wl, temperature, top_p, &mut a.rng);
            let hb = pick(&hl, temperature, top_p, &mut a.rng);
            if let Some(t) = a.trace.as_mut() {
                t.bins.push(vec![wb, hb]);
            }
            Token::Size(model.region.size_value(wb), model.region.size_value(hb))
        } else {
            Token::Text(id)
        };
        a.state.consume(&tok)?;
        a.ids.push(id);
        a.tokens.push(tok);
        if let Some(d) = a.state.take_delta() {
            let _ = a.tx.send(Event::Delta(d));
        }
        if a.ids.len() >= max_new_tokens || a.kv.len() + 1 > max_context {
            return Ok(Some(FinishReason::Length));
        }
        a.pending.push(tok);
        Ok(None)
    }

    fn finish_ok(&mut self, mut a: Active, reason: FinishReason) {
        // A panicking skill state fails its own request only.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let out = a.state.finish(reason);
            (out, a.state.take_delta())
        }));
        let out = match out {
            Ok((out, delta)) => {
                if let Some(d) = delta {
                    let _ = a.tx.send(Event::Delta(d));
                }
                out.map_err(EngineError::from)
            }
            Err(_) => Err(EngineError::Internal("skill state panicked".into())),
        };
        let now = Instant::now();
        let first = a.first_token.unwrap_or(now);
        let timings = Timings {
            queue_ms: ms(a
                .prefill_start
                .unwrap_or(a.submitted)
                .duration_since(a.submitted)),
            prefill_ms: ms(first.duration_since(a.prefill_start.unwrap_or(a.submitted))),
            decode_ms: ms(now.duration_since(first)),
            total_ms: ms(now.duration_since(a.submitted)),
        };
        self.metrics.observe_latency(timings.total_ms / 1e3);
        tracing::debug!(
            id = a.id,
            reason = reason.as_str(),
            total_ms = timings.total_ms,
            "job finished"
        );
        let res = match out {
            Ok(output) => {
                self.metrics.requests_finished(a.skill, "ok");
                Ok(Generation {
                    output,
                    finish: reason,
                    ids: std::mem::take(&mut a.ids),
                    tokens: std::mem::take(&mut a.tokens),
                    input_tokens: a.prompt_len,
                    output_tokens: a.n_sampled,
                    cached_tokens: a.cached_tokens,
                    timings,
                    trace: a.trace.take(),
                })
            }
            Err(e) => {
                self.metrics.requests_finished(a.skill, "error");
                Err(e)
            }
        };
        let _ = a.tx.send(Event::Done(Box::new(res)));
    }

    fn finish_err(&mut self, a: Active, e: EngineError) {
        self.metrics.requests_finished(a.skill, "error");
        let _ = a.tx.send(Event::Done(Box::new(Err(e))));
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
