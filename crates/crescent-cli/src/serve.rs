//! `crescent serve`: bind the port first (so `/health` answers 503 while loading), load the
//! model, start the engine thread, then serve until SIGTERM / Ctrl-C — stop accepting, let
//! in-flight requests finish (up to a deadline) and exit 0.

use std::sync::Arc;
use std::time::Duration;

use crescent_engine::{EngineConfig, EngineHandle};
use crescent_image::DecodeLimits;
use crescent_model::{load_tokenizer, KvPool, LoadOptions, Moondream};
use crescent_server::{AppState, ServerConfig};

use crate::cli::ServeArgs;
use crate::offline::resolve_model;
use crate::run::Failure;

/// How long in-flight requests may run after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// MemAvailable from /proc/meminfo in MiB.
fn available_mb() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::warn!("shutdown requested: no new connections; finishing in-flight requests");
}

/// Run the server.
pub fn run(a: &ServeArgs) -> Result<(), Failure> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(anyhow::anyhow!("cannot start the async runtime: {e}")))?;
    rt.block_on(serve(a))
}

async fn serve(a: &ServeArgs) -> Result<(), Failure> {
    let mut cfg = ServerConfig {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        max_body_bytes: a.max_body_mb.max(1) << 20,
        ..ServerConfig::default()
    };
    cfg.decode_limits = DecodeLimits {
        max_pixels: a.max_image_mp.max(1) * 1_000_000,
        ..DecodeLimits::default()
    };
    if a.request_timeout > 0 {
        cfg.request_timeout = Some(Duration::from_secs(a.request_timeout));
    }
    let addr = cfg.bind_addr();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Failure::runtime(anyhow::anyhow!("cannot listen on {addr}: {e}")))?;
    let state = AppState::new(cfg);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crescent_server::serve(
        listener,
        state.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    eprintln!("crescent: listening on http://{addr} (loading the model...)");

    // Load while /health answers 503; a signal during loading stops at once.
    let files = resolve_model(&a.model).map_err(Failure::runtime)?;
    let weights = a.weights.into();
    let quantize = a.quantize.into();
    let kv_dtype = a.kv_dtype.option();
    let load = tokio::task::spawn_blocking(move || -> Result<_, crescent_model::ModelError> {
        let model = Moondream::load_files(
            &files,
            &LoadOptions {
                weights,
                quantize,
                kv_dtype,
                ..Default::default()
            },
        )?;
        let tok = load_tokenizer(&files.tokenizer)?;
        Ok((model, tok))
    });
    let (model, tok) = tokio::select! {
        r = load => r
            .map_err(|e| Failure::runtime(anyhow::anyhow!("model loading panicked: {e}")))?
            .map_err(Failure::runtime)?,
        _ = shutdown_signal() => return Ok(()),
    };
    let kv_cache_mb = a.kv_cache_mb.unwrap_or_else(|| {
        let per_block = KvPool::bytes_per_block(&model.config.text, 16, model.kv_dtype());
        // A quarter of what is left, at least room for two full prompts of 1 500 positions.
        let floor = (2 * 1500 / 16 + 2) * per_block / (1 << 20) + 1;
        available_mb().map_or(2048, |m| (m / 4).max(floor))
    });
    let engine = EngineHandle::spawn(
        Arc::new(model),
        Arc::new(tok),
        EngineConfig {
            max_batch_size: a.max_batch_size.max(1),
            kv_cache_mb,
            max_queue: a.max_queue,
            ..Default::default()
        },
    );
    if state.set_engine(engine).is_err() {
        return Err(Failure::runtime(anyhow::anyhow!("engine started twice")));
    }
    eprintln!("crescent: ready on http://{addr} (KV cache {kv_cache_mb} MiB)");

    shutdown_signal().await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(Failure::runtime(anyhow::anyhow!("server error: {e}"))),
        Ok(Err(e)) => Err(Failure::runtime(anyhow::anyhow!("server task failed: {e}"))),
        Err(_) => {
            tracing::warn!("in-flight requests still running after {SHUTDOWN_GRACE:?}; exiting");
            Ok(())
        }
    }
}
