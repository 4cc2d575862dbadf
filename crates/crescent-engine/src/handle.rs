//! [`EngineHandle`]: the scheduler on its own thread, fed through a channel — what the server
//! uses. Every submitted job gets a [`JobStream`] of text deltas and a final result; dropping
//! the stream cancels the job at the next engine step and frees its KV blocks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crescent_model::{Moondream, TextTokenizer};
use crescent_skills::SkillContext;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::generate::EngineError;
use crate::metrics::Metrics;
use crate::scheduler::{EngineConfig, Event, Scheduler, Submission};

enum Cmd {
    Submit(
        Box<Submission>,
        tmpsc::UnboundedSender<Event>,
        oneshot::Sender<Result<Arc<AtomicBool>, EngineError>>,
    ),
    ClearPrefixCache,
    Stats(oneshot::Sender<EngineStats>),
}

/// A snapshot of the scheduler's state.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineStats {
    /// Jobs waiting or running.
    pub in_flight: usize,
    /// KV blocks in use (prefix cache included).
    pub kv_blocks_used: usize,
}

/// Results and deltas of one job. Dropping it cancels the job.
pub struct JobStream {
    rx: tmpsc::UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl JobStream {
    /// Next event; `None` once the engine dropped the job without a result.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Blocking form of [`JobStream::recv`] (not inside an async runtime).
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// Ask the engine to stop this job.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for JobStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
    model: Arc<Moondream>,
    skills: SkillContext,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Start the engine thread.
    pub fn spawn(model: Arc<Moondream>, tokenizer: Arc<TextTokenizer>, cfg: EngineConfig) -> Self {
        let skills = SkillContext::new(&model.config, tokenizer, &model.conventions);
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel::<Cmd>();
        let mut sched = Scheduler::new(
            Arc::clone(&model),
            skills.clone(),
            cfg,
            Arc::clone(&metrics),
        );
        std::thread::Builder::new()
            .name("crescent-engine".into())
            .spawn(move || engine_loop(&mut sched, rx))
            .expect("spawning the engine thread");
        Self {
            tx,
            model,
            skills,
            metrics,
        }
    }

    /// The model.
    pub fn model(&self) -> &Arc<Moondream> {
        &self.model
    }

    /// The skill context.
    pub fn skills(&self) -> &SkillContext {
        &self.skills
    }

    /// Metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Submit a job (a [`crate::Job`] or a [`crate::CustomJob`]); validation errors and a full
    /// queue are reported at once.
    pub async fn submit(&self, job: impl Into<Submission>) -> Result<JobStream, EngineError> {
        let (etx, erx) = tmpsc::unbounded_channel();
        let (otx, orx) = oneshot::channel();
        self.tx
            .send(Cmd::Submit(Box::new(job.into()), etx, otx))
            .map_err(|_| EngineError::Unavailable)?;
        let cancel = orx.await.map_err(|_| EngineError::Unavailable)??;
        Ok(JobStream { rx: erx, cancel })
    }

    /// Empty the prefix cache (its blocks return to the pool once no job shares them).
    pub fn clear_prefix_cache(&self) {
        let _ = self.tx.send(Cmd::ClearPrefixCache);
    }

    /// Scheduler state.
    pub async fn stats(&self) -> Result<EngineStats, EngineError> {
        let (otx, orx) = oneshot::channel();
        self.tx
            .send(Cmd::Stats(otx))
            .map_err(|_| EngineError::Unavailable)?;
        orx.await.map_err(|_| EngineError::Unavailable)
    }
}

fn handle(sched: &mut Scheduler, cmd: Cmd) {
    match cmd {
        Cmd::Submit(job, etx, otx) => {
            // A panic while validating one submission fails that submission, not the engine.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                sched.submit(*job, etx).map(|a| a.cancel)
            }))
            .unwrap_or_else(|_| {
                tracing::error!("job submission panicked");
                Err(EngineError::Internal("job submission panicked".into()))
            });
            let _ = otx.send(r);
        }
        Cmd::ClearPrefixCache => sched.clear_prefix_cache(),
        Cmd::Stats(otx) => {
            let _ = otx.send(EngineStats {
                in_flight: sched.in_flight(),
                kv_blocks_used: sched.kv_blocks_used(),
            });
        }
    }
}

fn engine_loop(sched: &mut Scheduler, rx: mpsc::Receiver<Cmd>) {
    loop {
        // Take every pending command; block only when there is no work.
        loop {
            let cmd = if sched.in_flight() == 0 {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(c) => c,
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(sched, cmd)))
                .is_err()
            {
                tracing::error!("engine command panicked; continuing");
            }
        }
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sched.step()));
        if res.is_err() {
            tracing::error!("engine step panicked; continuing");
        }
    }
}
