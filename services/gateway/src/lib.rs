//! The gateway: an OpenAI-compatible HTTP API in front of the prefill and decode pools. It
//! validates and tokenizes, picks a prefill and a decode worker, starts the decode stream, asks
//! the prefill to compute the prompt and hand the KV over, and turns tokens into text (SSE or one
//! JSON response).
#![forbid(unsafe_code)]

mod access;
mod api;
mod cluster;
mod disagg;
mod error;
mod front;
mod metrics;
mod render;
pub mod router;
mod spans;
pub mod tls;
mod workers;

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use tandem_runtime::Shutdown;
use tandem_state::StateStore;
use tandem_tokenizer::Tokenizer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use access::AccessConfig;
pub use metrics::Metrics;
pub use workers::{WorkerPool, WorkerSpec};

pub struct GatewayConfig {
    /// The name clients send as `model`.
    pub model_name: String,
    /// Workers and block stores given on the command line.
    pub prefill: Vec<String>,
    pub decode: Vec<String>,
    pub block_stores: Vec<String>,
    /// The cluster state: Redis, or the embedded store.
    pub state: Arc<dyn StateStore>,
    /// A prefix index of this gateway's own (an embedded store), instead of the one in `state`
    /// that every gateway shares.
    pub local_index: Option<Arc<dyn StateStore>>,
    /// Find workers in the store's registry (as well as those given).
    pub discover: bool,
    /// How long prefix-index entries and finished request state live.
    pub index_ttl: Duration,
    pub request_ttl: Duration,
    /// Routing: prompt tokens one queued request on a prefill worker is worth.
    pub route_load_weight: f64,
    /// Longest a request may take, queueing and prefill included; also how long a decode worker
    /// waits for a request's KV blocks.
    pub request_timeout: Duration,
    /// How often workers are asked for their load and health.
    pub poll_interval: Duration,
    /// API keys, per-key rate limits and admission bounds.
    pub access: AccessConfig,
    /// Serve HTTPS with this configuration instead of plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Models served beside `model_name`, each by its name with its tokenizer. Every model has
    /// pools of its own: the workers given (or found in the registry) serve the model they
    /// report, and a request goes to the pools of the model it names.
    pub other_models: Vec<(String, Tokenizer)>,
    /// The router's own models, external backends and decisions (`--router-config`).
    pub router: Option<router::RouterConfig>,
}

/// One served model: its pools, tokenizer and metrics, under the gateway's common settings.
pub(crate) struct AppState {
    pub cfg: Arc<GatewayConfig>,
    pub model_name: String,
    pub tokenizer: Tokenizer,
    pub workers: WorkerPool,
    pub metrics: Metrics,
    pub cluster: cluster::Cluster,
    pub access: Arc<access::Access>,
    pub shutdown: Shutdown,
}

/// Serves the HTTP API on `listener` until `shutdown` is requested, then runs its phases: not
/// ready (`/ready` answers 503, so load balancers stop sending), drain (the requests in flight,
/// streams included, finish), stop (the server and the worker polls end and are joined).
pub async fn run(mut cfg: GatewayConfig, tokenizer: Tokenizer, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut models = vec![(cfg.model_name.clone(), tokenizer)];
    models.append(&mut cfg.other_models);
    let router_cfg = cfg.router.take();
    let cfg = Arc::new(cfg);
    // With several models, a worker serves the pools of the model it reports; alone, a model's
    // pools take every worker given.
    let filter = models.len() > 1;
    let mut states = Vec::with_capacity(models.len());
    let mut access = None;
    for (name, tokenizer) in models {
        let metrics = Metrics::new(&name)?;
        let workers = WorkerPool::new(&cfg.prefill, &cfg.decode, &cfg.block_stores)?;
        if filter {
            workers.serve_only(&name);
        }
        if cfg.discover {
            shutdown.spawn(discover(
                workers.clone(),
                cfg.state.clone(),
                name.clone(),
                cfg.poll_interval,
                metrics.clone(),
                shutdown.stopping(),
            ));
        }
        shutdown.spawn(workers.clone().poll(cfg.poll_interval, metrics.clone(), shutdown.stopping()));
        let cluster = cluster::Cluster::new(cfg.state.clone(), cfg.local_index.clone(), metrics.clone(), cfg.index_ttl, cfg.request_ttl);
        // One set of keys, rate limits and admission bounds for the whole endpoint.
        let access = access.get_or_insert_with(|| Arc::new(access::Access::new(cfg.access.clone(), metrics.clone()))).clone();
        states.push(Arc::new(AppState {
            cfg: cfg.clone(),
            model_name: name,
            tokenizer,
            workers,
            metrics,
            cluster,
            access,
            shutdown: shutdown.clone(),
        }));
    }
    let access = access.expect("at least one model");
    let router = match router_cfg {
        Some(rc) => Some(Arc::new(router::Router::new(rc, &states)?)),
        None => None,
    };
    let front = Arc::new(front::Front::new(states, router, access, shutdown.clone()));
    let https = cfg.tls.is_some();
    tracing::info!(addr = %listener.local_addr()?, https, models = ?front.names(), state = cfg.state.kind(), "gateway serving");
    let app = front::router(front.clone());
    let stop = shutdown.stopping().cancelled_owned();
    let server = match cfg.tls.clone() {
        None => shutdown.spawn(
            axum::serve(
                // Every SSE event is its own small write: sent at once, never held back for an ACK.
                axum::serve::ListenerExt::tap_io(listener, |s| {
                    let _ = s.set_nodelay(true);
                }),
                app,
            )
            .with_graceful_shutdown(stop)
            .into_future(),
        ),
        Some(tls) => shutdown.spawn(axum::serve(tls::TlsListener::new(listener, tls)?, app).with_graceful_shutdown(stop).into_future()),
    };
    shutdown.run(|| async {}, || front.idle()).await;
    server.await??;
    Ok(())
}

/// Follows the registry: workers that join are polled and routed to, workers that leave are
/// dropped. A store that cannot be read leaves the pool as it is.
async fn discover(
    workers: WorkerPool,
    store: Arc<dyn StateStore>,
    model: String,
    every: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    // Long enough for every worker to heartbeat into a store that restarted empty.
    let grace = Duration::from_secs(5).max(every * 4);
    loop {
        match store.workers().await {
            Ok(records) => {
                let before = workers.snapshot().len();
                workers.sync(&records, &model, grace);
                if workers.snapshot().len() > before {
                    // Newcomers answer their first poll now rather than at the next tick.
                    workers.refresh(&metrics).await;
                }
            }
            Err(e) => {
                metrics.state_errors.inc();
                tracing::debug!(error = %e, "registry unreadable; keeping the workers we know");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
