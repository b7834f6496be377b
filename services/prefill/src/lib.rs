//! The prefill worker: computes prompts, samples each request's first token, and pushes the KV
//! blocks to the decode worker the gateway chose. Every handoff ends, within its lease, in an
//! explicit success or failure; the engine frees the blocks either way.
//!
//! Around that: prompt prefixes the cluster's block store holds (and this cache does not) are
//! fetched instead of recomputed; finished prompt blocks go to the store in the background; with
//! a state store the worker heartbeats into the registry, withdraws evicted blocks from the
//! prefix index, and republishes its cache if the store lost it. Stopping drains: no new
//! requests, in-flight ones finish, then it leaves.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tandem_engine::grpc::{finished_message, new_request, token_message, worker_info};
use tandem_engine::{EngineHandle, Event, Mode};
use tandem_protocol::pb::block_store_client::BlockStoreClient;
use tandem_protocol::pb::prefill_server::{Prefill, PrefillServer};
use tandem_protocol::pb::{self, GetBlocksRequest, InfoRequest, PrefillRequest, PrefillResponse, PutBlocksRequest, WorkerInfo};
use tandem_protocol::{block_hashes, trace, ApiError, BlockHash, ErrorCode, KvExport, ROOT_HASH};
use tandem_runtime::telemetry::{self, KeyValue};
use tandem_runtime::{Membership, Shutdown};
use tandem_state::{InFlight, StateStore, WorkerRecord};
use tandem_transfer::{Handoff, KvTransport, TransferError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub struct PrefillConfig {
    pub worker_id: String,
    /// The gRPC address other services reach this worker at.
    pub addr: String,
    pub transport: Arc<dyn KvTransport>,
    /// Whether `transport` can hand blocks over device to device (it includes `cudaipc`): then a
    /// decode worker of this host that offers it gets them that way, when the engine can.
    pub device_handoff: bool,
    /// Upper bound of one KV handoff, verdict included.
    pub handoff_lease: Duration,
    /// Bound of one fetch from, or offload to, the block store; past it a fetch computes the
    /// prompt instead, and an offload is given up (and counted as failed).
    pub store_timeout: Duration,
    /// Most block bytes this worker's offloads to the block store may have in flight at once.
    /// Offloads are best effort: past this budget a prompt's blocks are shed (and counted), not
    /// queued, so a store that falls behind costs neither memory here nor time-outs there.
    pub offload_budget_bytes: usize,
    pub state: Option<Arc<dyn StateStore>>,
    pub heartbeat: Duration,
    /// How long a republished prefix-index entry lives (as long as the gateway's).
    pub index_ttl: Duration,
    /// Where this worker serves its metrics (advertised in the registry); empty: nowhere.
    pub metrics_addr: String,
    /// Fault injection for reliability tests: flip a byte in every Nth handoff's KV after its
    /// checksums are taken, so the decode worker must catch it (0: never).
    pub corrupt_kv_every: u64,
    /// Fault injection for reliability tests: abort the process while its Nth handoff is being
    /// sent, as a crash mid-transfer would (0: never).
    pub exit_during_handoff: u64,
    /// The bound on requests (and their prompt tokens) this worker has accepted and not yet
    /// answered; past it a request is refused as `overloaded`.
    pub queue: Arc<tandem_runtime::WorkQueue>,
}

#[derive(Debug, Default)]
struct Counters {
    completed: AtomicU64,
    cancelled: AtomicU64,
    pulled: AtomicU64,
    offloaded: AtomicU64,
    offload_shed: AtomicU64,
    offload_failed: AtomicU64,
    handoffs: AtomicU64,
    /// Device handoffs the receiver could not take, sent through host memory instead.
    device_fallbacks: AtomicU64,
}

/// `kv` with one byte of its first block flipped (its checksums left as they were); for blocks
/// left in device memory, the first block's checksum flipped instead.
fn corrupted(mut kv: KvExport) -> KvExport {
    if let Some(sum) = kv.device.as_mut().and_then(|d| d.sums.first_mut()) {
        *sum ^= 0xff;
    }
    if let Some(first) = kv.blocks.first_mut() {
        let mut bytes = first.to_vec();
        if let Some(b) = bytes.first_mut() {
            *b ^= 0xff;
        }
        *first = bytes.into();
    }
    kv
}

/// Fault injection: lets `send` run for a moment, then aborts the process, as a crash in the
/// middle of a transfer would. Returns only if the send failed first.
async fn die_during<T, E>(send: impl std::future::Future<Output = Result<T, E>>) -> Result<T, E> {
    tokio::pin!(send);
    tokio::select! {
        out @ Err(_) = &mut send => out,
        _ = tokio::time::sleep(Duration::from_millis(2)) => {
            tracing::error!("fault injection: aborting the process during a kv handoff");
            std::process::abort()
        }
    }
}

/// Connections a prefill worker opens to each block store, used in turn.
pub const STORE_CONNECTIONS: usize = 4;

/// Clients of one block store, one per connection, and the one to use next.
struct StorePool {
    clients: Vec<BlockStoreClient<Channel>>,
    next: usize,
}

/// Offload bytes in flight, in KiB (a semaphore's permits), bounded by the configured budget.
const KIB: usize = 1024;

/// Hashes recently sent to the block store, so a popular prefix is not sent with every request.
#[derive(Debug, Default)]
struct Recent {
    set: HashSet<BlockHash>,
    order: VecDeque<BlockHash>,
}

impl Recent {
    const CAP: usize = 1 << 16;

    fn insert(&mut self, h: BlockHash) -> bool {
        if !self.set.insert(h) {
            return false;
        }
        self.order.push_back(h);
        if self.order.len() > Self::CAP {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

struct Service {
    engine: EngineHandle,
    cfg: PrefillConfig,
    layout_json: String,
    /// Bytes of one KV block.
    block_bytes: usize,
    shutdown: Shutdown,
    inflight: InFlight,
    counters: Arc<Counters>,
    stores: Mutex<HashMap<String, StorePool>>,
    offloaded: Mutex<Recent>,
    offload_budget: Arc<tokio::sync::Semaphore>,
}

/// Serves the prefill gRPC API on `listener` until `shutdown` is requested, then runs its phases:
/// not ready (the registry and `Info` say draining), drain (in-flight prefills and handoffs
/// finish), stop (the server and background tasks end and are joined).
pub async fn run(engine: EngineHandle, cfg: PrefillConfig, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, worker = %cfg.worker_id, "prefill worker serving");
    let layout_json = serde_json::to_string(&engine.info().layout)?;
    let offload_budget = Arc::new(tokio::sync::Semaphore::new(budget_kib(cfg.offload_budget_bytes)));
    let block_bytes = engine.info().layout.block_bytes();
    let svc = Arc::new(Service {
        engine,
        cfg,
        layout_json,
        block_bytes,
        shutdown: shutdown.clone(),
        inflight: InFlight::default(),
        counters: Arc::default(),
        stores: Mutex::new(HashMap::new()),
        offloaded: Mutex::new(Recent::default()),
        offload_budget,
    });
    let server = tandem_runtime::grpc::server()?
        .add_service(PrefillServer::from_arc(svc.clone()))
        .serve_with_incoming_shutdown(tandem_runtime::no_delay(listener), shutdown.stopping().cancelled_owned());
    let server = shutdown.spawn(server);
    if let Some(state) = svc.cfg.state.clone() {
        shutdown.spawn(withdraw_evicted(svc.clone(), state, shutdown.stopping()));
    }
    let (r, n) = (svc.clone(), svc.clone());
    let membership = Membership::start(
        &shutdown,
        svc.cfg.state.clone(),
        svc.cfg.heartbeat,
        move || r.record(),
        move || {
            let svc = n.clone();
            async move { svc.republish().await }
        },
    );
    let idle = || {
        let load = svc.engine.load();
        svc.inflight.count() == 0 && load.running + load.waiting == 0
    };
    shutdown.run(|| membership.announce(), idle).await;
    server.await??;
    Ok(())
}

/// The in-flight offload budget in KiB, a semaphore's permits (at least one, at most `u32::MAX`
/// so that one offload can always take all of it).
fn budget_kib(bytes: usize) -> usize {
    bytes.div_ceil(KIB).clamp(1, u32::MAX as usize)
}

/// Keeps the prefix index from pointing here for blocks this cache evicted.
async fn withdraw_evicted(svc: Arc<Service>, state: Arc<dyn StateStore>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let evicted = svc.engine.take_evicted();
        if !evicted.is_empty() {
            if let Err(e) = state.withdraw_blocks(&svc.cfg.worker_id, &evicted).await {
                tracing::debug!(error = %e, blocks = evicted.len(), "evictions not withdrawn from the index; they lapse with their TTL");
            }
        }
    }
}

impl Service {
    fn record(&self) -> WorkerRecord {
        WorkerRecord::from_info(&self.info(), &self.cfg.addr)
    }

    fn info(&self) -> WorkerInfo {
        WorkerInfo {
            draining: self.shutdown.is_draining(),
            completed: self.counters.completed.load(Ordering::Relaxed),
            cancelled: self.counters.cancelled.load(Ordering::Relaxed),
            pulled_blocks: self.counters.pulled.load(Ordering::Relaxed),
            offloaded_blocks: self.counters.offloaded.load(Ordering::Relaxed),
            offload_shed_blocks: self.counters.offload_shed.load(Ordering::Relaxed),
            offload_failed_blocks: self.counters.offload_failed.load(Ordering::Relaxed),
            metrics_addr: self.cfg.metrics_addr.clone(),
            ..worker_info(&self.engine, &self.cfg.worker_id, "prefill", "")
        }
    }

    /// After the state store lost its contents: tell the index again what this cache holds.
    async fn republish(&self) {
        let Some(state) = &self.cfg.state else { return };
        let hashes = self.engine.cached_hashes().await;
        if hashes.is_empty() {
            return;
        }
        match state.publish_blocks(&self.cfg.worker_id, &hashes, self.cfg.index_ttl).await {
            Ok(()) => tracing::info!(blocks = hashes.len(), "prefix index republished"),
            Err(e) => tracing::warn!(error = %e, "could not republish the prefix index"),
        }
    }

    /// A client of the block store at `addr`, round robin over [`STORE_CONNECTIONS`] connections:
    /// one HTTP/2 connection carries about a gigabyte a second of puts, less than a busy prefill
    /// worker offloads (see `tandem bench store`).
    fn store(&self, addr: &str) -> Result<BlockStoreClient<Channel>, Status> {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = stores.get_mut(addr) {
            pool.next = (pool.next + 1) % pool.clients.len();
            return Ok(pool.clients[pool.next].clone());
        }
        let endpoint = tandem_runtime::grpc::endpoint(addr)
            .map_err(|e| Status::invalid_argument(format!("store address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        let clients: Vec<_> = (0..STORE_CONNECTIONS)
            .map(|_| BlockStoreClient::new(endpoint.connect_lazy()).max_decoding_message_size(1 << 30).max_encoding_message_size(1 << 30))
            .collect();
        let first = clients[0].clone();
        stores.insert(addr.to_string(), StorePool { clients, next: 0 });
        Ok(first)
    }

    /// Fetches the prompt's leading blocks the store holds beyond what this cache has. Returns how
    /// many blocks joined the cache; any failure just means computing them.
    async fn pull(&self, addr: &str, prompt: &[u32], store_blocks: usize) -> usize {
        let bs = self.engine.info().block_size;
        // The same blocks the engine may reuse: the last prompt token is always computed.
        let reusable = block_hashes(&prompt[..prompt.len() - 1], bs);
        let n = store_blocks.min(reusable.len());
        let local = self.engine.cached_prefix(reusable[..n].to_vec()).await;
        if local >= n {
            return 0;
        }
        let fetch = async {
            let mut client = self.store(addr)?;
            let req = GetBlocksRequest { layout_json: self.layout_json.clone(), hashes: reusable[local..n].to_vec() };
            Ok::<_, Status>(client.get(telemetry::grpc_request(req, &tracing::Span::current())).await?.into_inner().blocks)
        };
        let blocks = match tokio::time::timeout(self.cfg.store_timeout, fetch).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(store = %addr, error = %e, "block store fetch failed; computing the prefix");
                return 0;
            }
            Err(_) => {
                tracing::warn!(store = %addr, "block store fetch timed out; computing the prefix");
                return 0;
            }
        };
        let parent = if local == 0 { ROOT_HASH } else { reusable[local - 1] };
        let tokens = prompt[local * bs..(local + blocks.len()) * bs].to_vec();
        let blocks = blocks.into_iter().map(Vec::from).collect();
        match self.engine.insert_cached(parent, tokens, blocks).await {
            Ok(added) => {
                self.counters.pulled.fetch_add(added as u64, Ordering::Relaxed);
                added
            }
            Err(e) => {
                tracing::warn!(store = %addr, error = %e, "fetched blocks refused; computing the prefix");
                0
            }
        }
    }

    /// Sends the prompt's full blocks the store lacks to it, in the background, within the
    /// in-flight budget. Returns how many leading prompt blocks the store will then hold (as far
    /// as this worker knows) and how many were shed because the budget was spent.
    ///
    /// The blocks go as they are (shared, not copied): the export is this worker's own memory,
    /// which nothing writes into again, so the handoff that read them and the offload that reads
    /// them now cannot disturb each other, whichever finishes or times out first.
    fn offload(&self, addr: &str, kv: &KvExport, skip: usize) -> (usize, usize) {
        let hashes = block_hashes(&kv.tokens, kv.layout.block_size);
        let candidates = self.offload_candidates(kv, skip);
        if candidates.is_empty() {
            return (hashes.len(), 0);
        }
        let bytes: usize = candidates.iter().map(|&i| kv.blocks[i].len()).sum();
        // An offload larger than the whole budget may still go alone.
        let permits = u32::try_from(bytes.div_ceil(KIB).min(budget_kib(self.cfg.offload_budget_bytes))).unwrap_or(u32::MAX);
        let client = self.store(addr).ok();
        let (Some(mut client), Ok(permit)) = (client, self.offload_budget.clone().try_acquire_many_owned(permits)) else {
            self.counters.offload_shed.fetch_add(candidates.len() as u64, Ordering::Relaxed);
            tracing::debug!(store = %addr, blocks = candidates.len(), bytes, "offload shed: the in-flight budget is spent");
            return (skip, candidates.len());
        };
        {
            let mut recent = self.offloaded.lock().unwrap_or_else(|e| e.into_inner());
            for &i in &candidates {
                recent.insert(hashes[i]);
            }
        }
        let n = candidates.len();
        let req = PutBlocksRequest {
            layout_json: self.layout_json.clone(),
            hashes: candidates.iter().map(|&i| hashes[i]).collect(),
            blocks: candidates.iter().map(|&i| kv.blocks[i].clone()).collect(),
        };
        self.counters.offloaded.fetch_add(n as u64, Ordering::Relaxed);
        let timeout = self.cfg.store_timeout;
        let store = addr.to_string();
        let counters = self.counters.clone();
        let span = tracing::info_span!(
            "kv_store_offload",
            otel.name = "block store offload",
            tandem.store.blocks = n as i64,
            tandem.store.bytes = bytes as i64,
            error.type = tracing::field::Empty,
        );
        let traced = span.clone();
        self.shutdown.spawn(
            async move {
                let outcome = tokio::time::timeout(timeout, client.put(telemetry::grpc_request(req, &tracing::Span::current()))).await;
                drop(permit);
                match outcome {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => tracing::warn!(%store, error = %e, blocks = n, "offload to the block store failed"),
                    Err(_) => tracing::warn!(%store, blocks = n, "offload to the block store timed out"),
                }
                telemetry::fail(&traced, "offload_failed", "the block store did not take the blocks");
                counters.offload_failed.fetch_add(n as u64, Ordering::Relaxed);
            }
            .instrument(span),
        );
        (hashes.len(), 0)
    }
}

/// Counts the request as cancelled if it is dropped before it answers: the caller hung up.
struct Abandoned<'a> {
    cancelled: &'a AtomicU64,
    armed: bool,
    span: tracing::Span,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.cancelled.fetch_add(1, Ordering::Relaxed);
            tracing::info!(parent: &self.span, "prefill cancelled by the caller");
            telemetry::fail(&self.span, ErrorCode::Cancelled.name(), "cancelled by the caller");
        }
    }
}

impl Service {
    /// The full blocks of `kv` from `skip` on that this worker has not offloaded lately.
    fn offload_candidates(&self, kv: &KvExport, skip: usize) -> Vec<usize> {
        let hashes = block_hashes(&kv.tokens, kv.layout.block_size);
        let recent = self.offloaded.lock().unwrap_or_else(|e| e.into_inner());
        (skip..hashes.len()).filter(|&i| !recent.set.contains(&hashes[i])).collect()
    }

    /// A held device export read out into host memory and sealed, for the host path.
    async fn host_copy(&self, id: tandem_engine::SeqId, span: &tracing::Span) -> Result<KvExport, tandem_engine::EngineError> {
        let kv = self.engine.read_held(id).instrument(span.clone()).await?;
        tokio::task::spawn_blocking(move || {
            let mut kv = kv;
            kv.seal();
            kv
        })
        .await
        .map_err(|e| tandem_engine::EngineError::Device(e.to_string()))
    }

    async fn compute(&self, r: PrefillRequest) -> Result<Response<PrefillResponse>, Status> {
        if self.shutdown.is_draining() {
            return Err(ApiError::new(ErrorCode::WorkerDraining, format!("prefill worker {} is draining", self.cfg.worker_id)).to_status());
        }
        let _inflight = self.inflight.enter();
        let started = Instant::now();
        let g = r.request.ok_or_else(|| Status::invalid_argument("missing request"))?;
        // Held until this request is answered: a prefill worker's queue is every prompt it has
        // accepted, computed or waiting.
        let _queued = self.cfg.queue.enter(g.prompt.len() + g.resumed.len()).map_err(|full| {
            ApiError::new(ErrorCode::Overloaded, format!("prefill worker {} is at its queue bound: {full}", self.cfg.worker_id)).to_status()
        })?;
        tracing::info!(prompt_tokens = g.prompt.len(), decode = %r.decode_kv_addr, "prefill started");
        // Blocks stay on the device when the decode worker is a process of this host that maps
        // this engine's pool.
        let on_device = self.cfg.device_handoff
            && self.engine.device_peer().is_some_and(|p| tandem_transfer::offers_device(&r.decode_kv_addr, p.node()));
        let mode = if on_device { Mode::PrefillToDevice } else { Mode::PrefillOnly };
        let req = new_request(&self.engine, &g, mode).map_err(|e| e.to_status())?;
        let store_blocks = r.store_prefix_blocks as usize;
        let pulled = if !r.store_addr.is_empty() && store_blocks > 0 {
            let fetch = tracing::info_span!(
                "kv_store_fetch",
                otel.name = "block store fetch",
                tandem.store.offered_blocks = store_blocks as i64,
                tandem.store.blocks = tracing::field::Empty,
                tandem.store.bytes = tracing::field::Empty,
            );
            let pulled = self.pull(&r.store_addr, &req.context(), store_blocks).instrument(fetch.clone()).await;
            fetch.record("tandem.store.blocks", pulled as i64);
            fetch.record("tandem.store.bytes", (pulled * self.block_bytes) as i64);
            pulled
        } else {
            0
        };
        // Dropping `events` (client gone, or this future dropped) cancels the request.
        let submitted = SystemTime::now();
        let mut events = self.engine.submit(req);
        let (mut first, mut prompt_logprobs) = (None, Vec::new());
        while let Some(event) = events.next().await {
            match event {
                Event::PromptLogprobs { logprobs, .. } => {
                    prompt_logprobs = logprobs.into_iter().map(|l| token_message(l.token, Some(l))).collect();
                }
                Event::Token { token, logprobs, .. } => first = Some(token_message(token, logprobs)),
                Event::Finished { reason, usage, .. } => {
                    self.counters.completed.fetch_add(1, Ordering::Relaxed);
                    return Ok(Response::new(PrefillResponse {
                        first_token: first,
                        finished: Some(finished_message(reason, usage)),
                        cached_tokens: usage.cached_tokens as u32,
                        prefill_millis: started.elapsed().as_secs_f64() * 1e3,
                        transfer: None,
                        pulled_blocks: pulled as u32,
                        offloaded_blocks: 0,
                        offload_shed_blocks: 0,
                        prompt_logprobs,
                        ..PrefillResponse::default()
                    }));
                }
                Event::Prefilled { id, kv, usage, timing } => {
                    let prefill_millis = started.elapsed().as_secs_f64() * 1e3;
                    let first_token = first.ok_or_else(|| Status::internal("prefill produced no token"))?;
                    // Checksums off the engine's thread, on a thread that may block.
                    engine_spans(&tracing::Span::current(), submitted, &timing, &usage);
                    let transfer = tracing::info_span!(
                        "kv_transfer",
                        otel.name = "kv transfer",
                        tandem.kv.peer = r.decode_kv_addr.as_str(),
                        tandem.kv.transport = tracing::field::Empty,
                        tandem.kv.blocks = kv.block_count() as i64,
                        tandem.kv.bytes = tracing::field::Empty,
                        tandem.kv.checksum_ms = tracing::field::Empty,
                        tandem.kv.transfer_ms = tracing::field::Empty,
                        tandem.kv.gbps = tracing::field::Empty,
                        tandem.kv.verdict = tracing::field::Empty,
                        error.type = tracing::field::Empty,
                    );
                    let sealing = Instant::now();
                    let kv = tokio::task::spawn_blocking(move || {
                        let mut kv = *kv;
                        kv.seal();
                        kv
                    })
                    .instrument(transfer.clone())
                    .await
                    .map_err(|e| Status::internal(format!("sealing the kv export: {e}")))?;
                    transfer.record("tandem.kv.checksum_ms", sealing.elapsed().as_secs_f64() * 1e3);
                    let n = self.counters.handoffs.fetch_add(1, Ordering::Relaxed) + 1;
                    let kv = if self.cfg.corrupt_kv_every > 0 && n.is_multiple_of(self.cfg.corrupt_kv_every) {
                        tracing::warn!("fault injection: corrupting this handoff's first block");
                        corrupted(kv)
                    } else {
                        kv
                    };
                    let mut handoff = Handoff { request_id: g.request_id.clone(), first_token: first_token.id, kv };
                    let handing = Instant::now();
                    let send = self.cfg.transport.send(&r.decode_kv_addr, &handoff, self.cfg.handoff_lease).instrument(transfer.clone());
                    let sent = if n == self.cfg.exit_during_handoff { die_during(send).await } else { send.await };
                    // Refused before anything was copied (the receiver cannot map this pool):
                    // the blocks are still held, so they go through host memory instead.
                    let sent = match sent {
                        Err(e @ TransferError::Connect { .. }) if handoff.kv.device.is_some() => {
                            tracing::warn!(parent: &transfer, error = %e, "device handoff not possible; sending through host memory");
                            self.counters.device_fallbacks.fetch_add(1, Ordering::Relaxed);
                            match self.host_copy(id, &transfer).await {
                                Ok(kv) => {
                                    handoff.kv = kv;
                                    let left = self.cfg.handoff_lease.saturating_sub(handing.elapsed());
                                    self.cfg.transport.send(&r.decode_kv_addr, &handoff, left).instrument(transfer.clone()).await
                                }
                                Err(e) => Err(TransferError::Io(format!("reading the blocks out of the device: {e}"))),
                            }
                        }
                        other => other,
                    };
                    let report = sent.map_err(|e| {
                        tracing::warn!(parent: &transfer, error = %e, "kv handoff failed");
                        transfer.record("tandem.kv.verdict", "failed");
                        telemetry::fail(&transfer, ErrorCode::KvHandoffFailed.name(), e.to_string());
                        ApiError::new(ErrorCode::KvHandoffFailed, format!("kv handoff failed: {e}")).to_status()
                    })?;
                    transfer.record("tandem.kv.transport", report.transport.as_str());
                    transfer.record("tandem.kv.bytes", report.bytes as i64);
                    transfer.record("tandem.kv.transfer_ms", report.millis);
                    if report.millis > 0.0 {
                        transfer.record("tandem.kv.gbps", report.bytes as f64 / (report.millis * 1e6));
                    }
                    // The sender returns once the receiver has checked every block and took them.
                    transfer.record("tandem.kv.verdict", "accepted");
                    drop(transfer);
                    tracing::info!(
                        transport = %report.transport, bytes = report.bytes,
                        transfer_ms = report.millis, prefill_ms = prefill_millis, pulled, "kv handed off"
                    );
                    let (offloaded, shed) = if r.store_addr.is_empty() {
                        (0, 0)
                    } else if handoff.kv.device.is_some() {
                        // The store takes host bytes: read out only what it lacks (the blocks
                        // are held until this request's events drop).
                        if self.offload_candidates(&handoff.kv, store_blocks).is_empty() {
                            (handoff.kv.block_count(), 0)
                        } else {
                            match self.engine.read_held(id).await {
                                Ok(kv) => self.offload(&r.store_addr, &kv, store_blocks),
                                Err(e) => {
                                    tracing::warn!(error = %e, "reading device blocks for the block store failed");
                                    (store_blocks, 0)
                                }
                            }
                        }
                    } else {
                        self.offload(&r.store_addr, &handoff.kv, store_blocks)
                    };
                    tracing::Span::current().record("gen_ai.usage.input_tokens", usage.prompt_tokens as i64);
                    tracing::Span::current().record("tandem.cached_tokens", usage.cached_tokens as i64);
                    self.counters.completed.fetch_add(1, Ordering::Relaxed);
                    return Ok(Response::new(PrefillResponse {
                        first_token: Some(first_token),
                        finished: None,
                        cached_tokens: usage.cached_tokens as u32,
                        prefill_millis,
                        transfer: Some(pb::TransferReport {
                            transport: report.transport,
                            bytes: report.bytes,
                            blocks: report.blocks,
                            millis: report.millis,
                        }),
                        pulled_blocks: pulled as u32,
                        offloaded_blocks: offloaded as u32,
                        offload_shed_blocks: shed as u32,
                        queue_millis: timing.queue.as_secs_f64() * 1e3,
                        compute_millis: timing.compute.as_secs_f64() * 1e3,
                        export_millis: timing.export.as_secs_f64() * 1e3,
                        prompt_logprobs,
                    }));
                }
                Event::Failed { error, .. } => return Err(error.to_status()),
            }
        }
        Err(Status::internal("engine stopped"))
    }
}

/// The engine's part of a prefill, as spans reported after the fact (it ran on the engine's
/// thread): the wait in the batcher's queue, the forward passes up to the first token, and the
/// read-out of the KV blocks.
fn engine_spans(parent: &tracing::Span, submitted: SystemTime, t: &tandem_engine::PrefillTiming, usage: &tandem_engine::Usage) {
    let queued = submitted + t.queue;
    let computed = queued + t.compute;
    let exported = computed + t.export;
    telemetry::past_span(parent, "engine queue", submitted, queued, Vec::new());
    let computed_tokens = usage.prompt_tokens.saturating_sub(usage.cached_tokens);
    telemetry::past_span(
        parent,
        "engine prefill",
        queued,
        computed,
        vec![
            KeyValue::new("tandem.prefill.computed_tokens", computed_tokens as i64),
            KeyValue::new("tandem.prefill.cached_tokens", usage.cached_tokens as i64),
            KeyValue::new("tandem.prefill.chunks", t.passes as i64),
        ],
    );
    telemetry::past_span(parent, "kv export", computed, exported, Vec::new());
}

#[tonic::async_trait]
impl Prefill for Service {
    async fn prefill(&self, request: Request<PrefillRequest>) -> Result<Response<PrefillResponse>, Status> {
        let id = trace::request_id(request.metadata()).map(str::to_string);
        let span = tracing::info_span!(
            "prefill",
            otel.name = "tandem.v1.Prefill/Prefill",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "tandem.v1.Prefill",
            rpc.method = "Prefill",
            request_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            tandem.worker_id = self.cfg.worker_id.as_str(),
            gen_ai.usage.input_tokens = tracing::field::Empty,
            tandem.cached_tokens = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        telemetry::continue_trace(&span, |k| trace::metadata_str(request.metadata(), k));
        let r = request.into_inner();
        let request_id = id.or_else(|| r.request.as_ref().map(|g| g.request_id.clone())).unwrap_or_default();
        span.record("request_id", tracing::field::display(&request_id));
        let traced = span.clone();
        async move {
            // Dropped before it answers (the gateway hung up): the guard counts it.
            let mut abandoned = Abandoned { cancelled: &self.counters.cancelled, armed: true, span: traced.clone() };
            let out = self.compute(r).await;
            abandoned.armed = false;
            if let Err(status) = &out {
                let e = ApiError::from_status(status);
                telemetry::fail(&traced, e.code.name(), e.message);
            }
            out
        }
        .instrument(span)
        .await
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(self.info()))
    }
}
