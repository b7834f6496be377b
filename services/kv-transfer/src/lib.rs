//! The cluster's KV block store: blocks addressed by chained block hash, in memory under a byte
//! budget and optionally on disk below it, least recently used first out. Prefill workers put
//! finished prompt blocks here; any prefill worker can get the longest stored prefix of a hash
//! chain back instead of recomputing it. With a state store, the service registers itself, and
//! withdraws what it evicts from the prefix index.
#![forbid(unsafe_code)]

mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_protocol::pb::block_store_server::{BlockStore as BlockStoreApi, BlockStoreServer};
use tandem_protocol::pb::{GetBlocksRequest, GetBlocksResponse, InfoRequest, PutBlocksRequest, PutBlocksResponse, WorkerInfo};
use tandem_runtime::{Membership, Shutdown};
use tandem_state::{now_ms, InFlight, StateStore, WorkerRecord};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

pub use store::{layout_id, BlockStore};

pub struct KvTransferConfig {
    pub worker_id: String,
    /// The address other services reach this one at.
    pub addr: String,
    pub memory_bytes: usize,
    /// A disk tier: directory and byte budget.
    pub disk: Option<(PathBuf, usize)>,
    pub state: Option<Arc<dyn StateStore>>,
    pub heartbeat: Duration,
    /// How long a prefix-index entry lives without being renewed.
    pub index_ttl: Duration,
    /// Where to serve Prometheus metrics (`/metrics`), and that address as advertised in the
    /// registry; `None`: nowhere.
    pub metrics: Option<(TcpListener, String)>,
}

/// What the store did, for its metrics.
#[derive(Debug, Default)]
struct Counters {
    put_blocks: AtomicU64,
    stored_blocks: AtomicU64,
    requested_blocks: AtomicU64,
    served_blocks: AtomicU64,
    evicted_blocks: AtomicU64,
}

/// The store's metrics page: its size by tier and what it did, as `tandem_kv_store_*`.
fn render(store: &Mutex<BlockStore>, c: &Counters) -> String {
    use prometheus::{Encoder, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
    let (blocks, memory, disk) = {
        let s = lock(store);
        (s.len(), s.memory_bytes(), s.disk_bytes())
    };
    let registry = Registry::new();
    let opts = |name: &str, help: &str| Opts::new(name, help).const_label("role", "kv-transfer");
    if let Ok(g) = IntGauge::with_opts(opts("tandem_kv_store_blocks", "Blocks the store holds, both tiers")) {
        g.set(blocks as i64);
        let _ = registry.register(Box::new(g));
    }
    if let Ok(g) = IntGaugeVec::new(opts("tandem_kv_store_bytes", "Bytes the store holds, by tier"), &["tier"]) {
        g.with_label_values(&["memory"]).set(memory as i64);
        g.with_label_values(&["disk"]).set(disk as i64);
        let _ = registry.register(Box::new(g));
    }
    for (name, help, v) in [
        ("tandem_kv_store_put_blocks_total", "Blocks offered to the store", &c.put_blocks),
        ("tandem_kv_store_stored_blocks_total", "Blocks the store took (new to it)", &c.stored_blocks),
        ("tandem_kv_store_requested_blocks_total", "Blocks prefill workers asked the store for", &c.requested_blocks),
        ("tandem_kv_store_served_blocks_total", "Blocks the store had and sent", &c.served_blocks),
        ("tandem_kv_store_evicted_blocks_total", "Blocks dropped from the store for room", &c.evicted_blocks),
    ] {
        if let Ok(counter) = IntCounter::with_opts(opts(name, help)) {
            counter.inc_by(v.load(Ordering::Relaxed));
            let _ = registry.register(Box::new(counter));
        }
    }
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

struct Service {
    store: Arc<Mutex<BlockStore>>,
    counters: Arc<Counters>,
    worker_id: String,
    state: Option<Arc<dyn StateStore>>,
    index_ttl: Duration,
    shutdown: Shutdown,
    inflight: InFlight,
}

/// Serves the block store on `listener` until `shutdown` is requested, then runs its phases: not
/// ready (the registry says draining), drain (puts and gets in flight end), stop (the server and
/// the index updates end and are joined).
pub async fn run(cfg: KvTransferConfig, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut store = BlockStore::new(cfg.memory_bytes);
    if let Some((dir, budget)) = &cfg.disk {
        store = store.with_disk(dir.clone(), *budget)?;
    }
    tracing::info!(addr = %listener.local_addr()?, memory_bytes = cfg.memory_bytes, disk = ?cfg.disk, "kv-transfer store serving");
    let store = Arc::new(Mutex::new(store));
    let inflight = InFlight::default();
    let counters = Arc::new(Counters::default());
    let mut metrics_addr = String::new();
    if let Some((listener, advertised)) = cfg.metrics {
        let (store, counters) = (store.clone(), counters.clone());
        tandem_runtime::serve_metrics(listener, move || render(&store, &counters), &shutdown);
        metrics_addr = advertised;
    }
    let svc = Service {
        store: store.clone(),
        counters,
        worker_id: cfg.worker_id.clone(),
        state: cfg.state.clone(),
        index_ttl: cfg.index_ttl,
        shutdown: shutdown.clone(),
        inflight: inflight.clone(),
    };
    let (id, addr, ttl, draining) = (cfg.worker_id.clone(), cfg.addr.clone(), cfg.index_ttl, shutdown.clone());
    let record_store = store.clone();
    let record = move || {
        let n = lock(&record_store).len() as u32;
        let draining = draining.is_draining();
        WorkerRecord {
            id: id.clone(),
            role: "kv-transfer".into(),
            addr: addr.clone(),
            total_blocks: n,
            draining,
            metrics_addr: metrics_addr.clone(),
            updated_ms: now_ms(),
            ..Default::default()
        }
    };
    let (republish_state, republish_store, holder) = (cfg.state.clone(), store.clone(), cfg.worker_id.clone());
    let on_new = move || {
        let (state, store, holder) = (republish_state.clone(), republish_store.clone(), holder.clone());
        async move {
            let Some(state) = state else { return };
            let hashes = lock(&store).hashes();
            if let Err(e) = state.publish_blocks(&holder, &hashes, ttl).await {
                tracing::warn!(error = %e, "could not republish the store's blocks");
            }
        }
    };
    let membership = Membership::start(&shutdown, cfg.state.clone(), cfg.heartbeat, record, on_new);
    let server = tandem_runtime::grpc::server()?
        .add_service(BlockStoreServer::new(svc).max_decoding_message_size(1 << 30).max_encoding_message_size(1 << 30))
        .serve_with_incoming_shutdown(tandem_runtime::no_delay(listener), shutdown.stopping().cancelled_owned());
    let server = shutdown.spawn(server);
    shutdown.run(|| membership.announce(), || inflight.count() == 0).await;
    server.await??;
    Ok(())
}

fn lock(store: &Mutex<BlockStore>) -> std::sync::MutexGuard<'_, BlockStore> {
    store.lock().unwrap_or_else(|e| e.into_inner())
}

impl Service {
    /// Keeps the prefix index in step with the store, off the request path.
    fn index(&self, stored: Vec<u64>, gone: Vec<u64>) {
        let Some(state) = self.state.clone() else { return };
        let (holder, ttl) = (self.worker_id.clone(), self.index_ttl);
        self.shutdown.spawn(async move {
            let r = async {
                state.publish_blocks(&holder, &stored, ttl).await?;
                state.withdraw_blocks(&holder, &gone).await
            };
            if let Err(e) = r.await {
                tracing::debug!(error = %e, "prefix index not updated");
            }
        });
    }
}

/// The server span of a block-store call, in the trace of the request that made it. The calls
/// do not await while it is entered.
fn server_span<T>(method: &'static str, request: &Request<T>) -> tracing::Span {
    let span = tracing::info_span!(
        "block_store",
        otel.name = format!("tandem.v1.BlockStore/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "tandem.v1.BlockStore",
        rpc.method = method,
        trace_id = tracing::field::Empty,
        tandem.store.blocks = tracing::field::Empty,
    );
    tandem_runtime::telemetry::continue_trace(&span, |k| tandem_protocol::trace::metadata_str(request.metadata(), k));
    span
}

#[tonic::async_trait]
impl BlockStoreApi for Service {
    async fn put(&self, request: Request<PutBlocksRequest>) -> Result<Response<PutBlocksResponse>, Status> {
        let _inflight = self.inflight.enter();
        let span = server_span("Put", &request);
        let _entered = span.enter();
        let r = request.into_inner();
        if r.hashes.len() != r.blocks.len() {
            return Err(Status::invalid_argument("one hash per block"));
        }
        let layout = layout_id(&r.layout_json);
        let offered = r.hashes.len();
        let (mut stored, mut gone) = (Vec::new(), Vec::new());
        {
            let mut store = lock(&self.store);
            for (h, b) in r.hashes.into_iter().zip(r.blocks) {
                let (ok, evicted) = store.put(layout, h, b);
                if ok {
                    stored.push(h);
                }
                gone.extend(evicted);
            }
        }
        let n = stored.len() as u32;
        gone.retain(|h| !stored.contains(h));
        let c = &self.counters;
        c.put_blocks.fetch_add(offered as u64, Ordering::Relaxed);
        c.stored_blocks.fetch_add(n as u64, Ordering::Relaxed);
        c.evicted_blocks.fetch_add(gone.len() as u64, Ordering::Relaxed);
        self.index(stored, gone);
        span.record("tandem.store.blocks", n as i64);
        Ok(Response::new(PutBlocksResponse { stored: n }))
    }

    async fn get(&self, request: Request<GetBlocksRequest>) -> Result<Response<GetBlocksResponse>, Status> {
        let _inflight = self.inflight.enter();
        let span = server_span("Get", &request);
        let _entered = span.enter();
        let r = request.into_inner();
        let (blocks, gone) = lock(&self.store).get_prefix(layout_id(&r.layout_json), &r.hashes);
        span.record("tandem.store.blocks", blocks.len() as i64);
        self.counters.requested_blocks.fetch_add(r.hashes.len() as u64, Ordering::Relaxed);
        self.counters.served_blocks.fetch_add(blocks.len() as u64, Ordering::Relaxed);
        self.index(Vec::new(), gone);
        Ok(Response::new(GetBlocksResponse { blocks }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        let store = lock(&self.store);
        Ok(Response::new(WorkerInfo {
            worker_id: self.worker_id.clone(),
            role: "kv-transfer".into(),
            total_blocks: store.len() as u32,
            draining: self.shutdown.is_draining(),
            ..WorkerInfo::default()
        }))
    }
}
