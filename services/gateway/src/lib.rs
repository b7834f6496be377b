//! The gateway: an OpenAI-compatible HTTP API in front of the prefill and decode pools. It
//! validates and tokenizes, picks a prefill and a decode worker, starts the decode stream, asks
//! the prefill to compute the prompt and hand the KV over, and turns tokens into text (SSE or one
//! JSON response).
#![forbid(unsafe_code)]

mod api;
mod choice;
mod error;
mod metrics;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use tandem_tokenizer::Tokenizer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
pub use workers::{WorkerPool, WorkerSpec};

pub struct GatewayConfig {
    /// The name clients send as `model`.
    pub model_name: String,
    pub prefill: Vec<String>,
    pub decode: Vec<String>,
    /// Longest a request may take, queueing and prefill included; also how long a decode worker
    /// waits for a request's KV blocks.
    pub request_timeout: Duration,
    /// How often workers are asked for their load and health.
    pub poll_interval: Duration,
}

pub(crate) struct AppState {
    pub cfg: GatewayConfig,
    pub tokenizer: Tokenizer,
    pub workers: WorkerPool,
    pub metrics: Metrics,
}

/// Serves the HTTP API on `listener` until `shutdown` fires, then lets in-flight responses finish.
pub async fn run(cfg: GatewayConfig, tokenizer: Tokenizer, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Metrics::new()?;
    let workers = WorkerPool::new(&cfg.prefill, &cfg.decode)?;
    tokio::spawn(workers.clone().poll(cfg.poll_interval, metrics.clone(), shutdown.clone()));
    let state = Arc::new(AppState { cfg, tokenizer, workers, metrics });
    tracing::info!(addr = %listener.local_addr()?, model = %state.cfg.model_name, "gateway serving");
    axum::serve(listener, api::router(state)).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}
