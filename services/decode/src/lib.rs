//! The decode worker: receives a request's KV blocks and first token from a prefill worker,
//! joins the sequence to its continuous batch, and streams every later token to the gateway.
//! Asked to (`compute_prompt`), it computes the prompt itself, in chunks mixed into its decode
//! batches, and streams every token: run so, it is the aggregated worker.
//! With a state store it heartbeats into the registry; stopping drains: no new requests, the
//! streams in flight run to their end, then it leaves.
#![forbid(unsafe_code)]

mod offload;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_engine::grpc::{finished_message, new_request, token_message, worker_info};
use tandem_engine::{EngineHandle, Event, Mode};
use tandem_protocol::pb::decode_server::{Decode, DecodeServer};
use tandem_protocol::pb::{token_event, GenerateRequest, InfoRequest, PromptScores, TokenEvent, WorkerInfo};
use tandem_protocol::{trace, ApiError, ErrorCode};
use tandem_runtime::telemetry::{self, KeyValue};
use tandem_runtime::{Membership, Shutdown};
use tandem_state::{InFlight, StateStore, WorkerRecord};
use tandem_transfer::{HandoffRegistry, KvReceiver, QuicIdentity, TransportKind};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub struct DecodeConfig {
    pub worker_id: String,
    /// The gRPC address other services reach this worker at.
    pub addr: String,
    pub state: Option<Arc<dyn StateStore>>,
    pub heartbeat: Duration,
    /// Bound of one incoming transfer, from first byte to verdict.
    pub handoff_lease: Duration,
    /// Longest wait for a request's KV blocks when the gateway does not say.
    pub default_kv_wait: Duration,
    /// Where this worker serves its metrics (advertised in the registry); empty: nowhere.
    pub metrics_addr: String,
    /// The bound on streams (and their context tokens) this worker has opened and not yet
    /// produced a token for: waiting for their KV, or for a place in the batch. Past it a
    /// stream is refused as `overloaded`.
    pub queue: Arc<tandem_runtime::WorkQueue>,
    /// An aggregated worker: it advertises that it computes prompts, and the gateway sends it
    /// whole requests. (Any decode worker honours `compute_prompt`.)
    pub aggregated: bool,
}

struct Service {
    engine: EngineHandle,
    registry: HandoffRegistry,
    kv_addr: String,
    cfg: DecodeConfig,
    shutdown: Shutdown,
    inflight: InFlight,
    completed: Arc<AtomicU64>,
    cancelled: Arc<AtomicU64>,
    offload: Arc<offload::Offloader>,
}

/// The KV receivers a decode worker serves, one per transport: bound before the worker
/// announces itself (so their addresses can be advertised), then run, and stopped last, by
/// [`run`].
pub struct KvReceivers {
    registry: HandoffRegistry,
    receivers: Vec<Box<dyn KvReceiver>>,
    /// Each receiver's advertised entry, in the receivers' order.
    entries: Vec<String>,
}

impl KvReceivers {
    /// Binds a receiver per transport in `kinds`: TCP on `listen`, the others on the same host
    /// with a port of their own. `lease` bounds each incoming transfer; QUIC presents
    /// `quic_identity` (or a certificate it generates). A transport that cannot start here (UCX
    /// with no usable device, say) is left out with a warning, so the others still receive.
    /// Senders are told the bound address, or `advertise_host` with the bound ports when given
    /// (a receiver listening on a wildcard address, in a container or a pod).
    pub async fn bind(
        kinds: &[TransportKind],
        listen: SocketAddr,
        advertise_host: Option<&str>,
        lease: Duration,
        quic_identity: Option<&QuicIdentity>,
    ) -> anyhow::Result<Self> {
        let registry = HandoffRegistry::new();
        let (mut receivers, mut entries) = (Vec::new(), Vec::new());
        for &kind in kinds {
            let at = if kind == TransportKind::Tcp { listen } else { SocketAddr::new(listen.ip(), 0) };
            let bound = match tandem_transfer::bind_receiver(kind, at, &registry, lease, quic_identity).await {
                Ok(r) => match advertise_host {
                    Some(host) => r.advertised_at(host),
                    None => r.advertised(),
                }
                .map(|a| (r, a))
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match bound {
                Ok((r, entry)) => {
                    receivers.push(r);
                    entries.push(entry);
                }
                Err(e) => tracing::warn!(transport = %kind, error = %e, "KV receiver unavailable; not advertised"),
            }
        }
        anyhow::ensure!(!receivers.is_empty(), "none of the KV transports {kinds:?} can receive");
        Ok(Self { registry, receivers, entries })
    }

    /// The address list senders pick a transport from (`ucx://…,tcp://…`).
    pub fn advertised(&self) -> String {
        self.entries.join(",")
    }

    /// Fits the receivers to the engine that imports what they receive: blocks arrive in the
    /// memory it imports from best, if it has any, and device handoffs are taken only by an
    /// engine that maps other processes' pools (otherwise that receiver is dropped unadvertised).
    pub fn use_engine(&mut self, engine: &EngineHandle) -> anyhow::Result<()> {
        if let Some(memory) = engine.block_memory() {
            self.registry.use_memory(memory);
        }
        match engine.device_peer() {
            Some(peer) => self.registry.use_device(peer),
            None => {
                let keep: Vec<bool> = self.receivers.iter().map(|r| r.kind() != TransportKind::CudaIpc).collect();
                if keep.contains(&false) {
                    tracing::info!("this engine's blocks live in host memory; device handoffs (cudaipc) are not offered");
                }
                let mut flags = keep.iter();
                self.receivers.retain(|_| *flags.next().expect("one flag per receiver"));
                let mut flags = keep.iter();
                self.entries.retain(|_| *flags.next().expect("one flag per entry"));
                anyhow::ensure!(
                    !self.receivers.is_empty(),
                    "no KV transport but cudaipc was asked for, and this engine cannot receive over it"
                );
            }
        }
        Ok(())
    }
}

/// Serves the decode gRPC API on `listener` (KV blocks arrive through `kv`) until `shutdown` is
/// requested, then runs its phases: not ready (the registry and `Info` say draining), drain (the
/// streams in flight run to their end), stop (the server, then the receivers, end and are
/// joined). The receivers outlive the drain, so requests still waiting for their blocks get them.
pub async fn run(
    engine: EngineHandle,
    cfg: DecodeConfig,
    listener: TcpListener,
    kv: KvReceivers,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let kv_addr = kv.advertised();
    let KvReceivers { registry, receivers, .. } = kv;
    tracing::info!(addr = %listener.local_addr()?, %kv_addr, worker = %cfg.worker_id, "decode worker serving");
    for r in receivers {
        shutdown.spawn(r.run(shutdown.stopping()));
    }
    let offload = Arc::new(offload::Offloader::new(engine.clone())?);
    let svc = Arc::new(Service {
        offload,
        engine,
        registry,
        kv_addr,
        cfg,
        shutdown: shutdown.clone(),
        inflight: InFlight::default(),
        completed: Arc::new(AtomicU64::new(0)),
        cancelled: Arc::new(AtomicU64::new(0)),
    });
    let server = tandem_runtime::grpc::server()?
        .add_service(DecodeServer::from_arc(svc.clone()))
        .serve_with_incoming_shutdown(tandem_runtime::no_delay(listener), shutdown.stopping().cancelled_owned());
    let server = shutdown.spawn(server);
    let r = svc.clone();
    let membership = Membership::start(&shutdown, svc.cfg.state.clone(), svc.cfg.heartbeat, move || r.record(), || async {});
    let idle = || {
        let load = svc.engine.load();
        svc.inflight.count() == 0 && load.running + load.waiting == 0
    };
    shutdown.run(|| membership.announce(), idle).await;
    server.await??;
    Ok(())
}

impl Service {
    fn info(&self) -> WorkerInfo {
        WorkerInfo {
            draining: self.shutdown.is_draining(),
            completed: self.completed.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            metrics_addr: self.cfg.metrics_addr.clone(),
            offloaded_blocks: self.offload.offloaded.load(Ordering::Relaxed),
            offload_failed_blocks: self.offload.failed.load(Ordering::Relaxed),
            aggregated: self.cfg.aggregated,
            ..worker_info(&self.engine, &self.cfg.worker_id, "decode", &self.kv_addr)
        }
    }

    fn record(&self) -> WorkerRecord {
        WorkerRecord::from_info(&self.info(), &self.cfg.addr)
    }
}

type EventResult = Result<TokenEvent, Status>;

/// A `tokens` event on the generate span every this many tokens (a span per token would cost
/// more than the token).
const TOKEN_EVENT_EVERY: u64 = 32;

fn event(e: token_event::Event) -> EventResult {
    Ok(TokenEvent { event: Some(e) })
}

#[tonic::async_trait]
impl Decode for Service {
    type GenerateStream = ReceiverStream<EventResult>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        if self.shutdown.is_draining() {
            return Err(ApiError::new(ErrorCode::WorkerDraining, format!("decode worker {} is draining", self.cfg.worker_id)).to_status());
        }
        let inflight = self.inflight.enter();
        let id = trace::request_id(request.metadata()).map(str::to_string);
        let span = tracing::info_span!(
            "decode",
            otel.name = "tandem.v1.Decode/Generate",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "tandem.v1.Decode",
            rpc.method = "Generate",
            request_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            tandem.worker_id = self.cfg.worker_id.as_str(),
            gen_ai.usage.output_tokens = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        telemetry::continue_trace(&span, |k| trace::metadata_str(request.metadata(), k));
        let g = request.into_inner();
        let request_id = id.unwrap_or_else(|| g.request_id.clone());
        span.record("request_id", tracing::field::display(&request_id));
        span.in_scope(|| tracing::info!(prompt_tokens = g.prompt.len(), "decode stream opened"));
        let req = new_request(&self.engine, &g, Mode::Full).map_err(|e| e.to_status())?;
        // Given back with the stream's first token from the engine: it is in the batch then.
        let mut queued = Some(self.cfg.queue.enter(g.prompt.len() + g.resumed.len()).map_err(|full| {
            ApiError::new(ErrorCode::Overloaded, format!("decode worker {} is at its queue bound: {full}", self.cfg.worker_id)).to_status()
        })?);
        let lease = match g.kv_wait_ms {
            0 => self.cfg.default_kv_wait,
            ms => Duration::from_millis(ms as u64),
        };
        // Registered before this call returns, so blocks can never arrive before we listen. A
        // request whose prompt is computed here waits for nothing.
        let pending = match g.compute_prompt {
            true => None,
            false => Some(
                self.registry
                    .register(&g.request_id)
                    .ok_or_else(|| Status::already_exists(format!("request {} is already waiting for its blocks", g.request_id)))?,
            ),
        };
        let compute_prompt = g.compute_prompt;
        let (tx, rx) = mpsc::channel::<EventResult>(64);
        let engine = self.engine.clone();
        let offload = self.offload.clone();
        let store = g.store_addr.clone();
        let completed = self.completed.clone();
        let cancelled = self.cancelled.clone();
        let traced = span.clone();
        let hung_up = move || {
            cancelled.fetch_add(1, Ordering::Relaxed);
            tracing::info!("decode cancelled by the caller");
            telemetry::fail(&traced, ErrorCode::Cancelled.name(), "cancelled by the caller");
        };
        let traced = span.clone();
        let failed = move |e: &Status| {
            let e = ApiError::from_status(e);
            telemetry::fail(&traced, e.code.name(), e.message);
        };
        self.shutdown.spawn(
            async move {
                let _inflight = inflight;
                let seq = req.id;
                let (mut events, cached) = match pending {
                    None => (engine.submit(req), 0),
                    Some(mut pending) => {
                        let waiting = tracing::info_span!("kv_wait", otel.name = "wait for kv blocks");
                        let arrived = tokio::select! {
                            _ = tx.closed() => return hung_up(),
                            a = tokio::time::timeout(lease, pending.arrived()).instrument(waiting.clone()) => a,
                        };
                        drop(waiting);
                        let incoming = match arrived {
                            Ok(Some(incoming)) => incoming,
                            Ok(None) => return,
                            Err(_) => {
                                tracing::warn!(wait = ?lease, "kv blocks never arrived");
                                let error =
                                    ApiError::new(ErrorCode::Timeout, format!("kv blocks did not arrive within {lease:?}")).to_status();
                                failed(&error);
                                let _ = tx.send(Err(error)).await;
                                return;
                            }
                        };
                        let h = incoming.handoff;
                        if incoming.verdict.is_closed() {
                            // The transfer's lease ended while the blocks waited here: the sender
                            // has given up (a device handoff's blocks may be released already).
                            let error = ApiError::new(ErrorCode::Timeout, "the kv handoff's lease ended before its import").to_status();
                            failed(&error);
                            let _ = tx.send(Err(error)).await;
                            return;
                        }
                        let import = tracing::info_span!(
                            "kv_import",
                            otel.name = "kv import",
                            tandem.kv.blocks = h.kv.block_count() as i64,
                            tandem.kv.bytes = h.kv.total_bytes() as i64,
                            error.type = tracing::field::Empty,
                        );
                        let cached = h.kv.tokens.len();
                        let imported = engine.import(req, h.kv, h.first_token).instrument(import.clone()).await;
                        let events = match imported {
                            Ok(events) => {
                                let _ = incoming.verdict.send(Ok(()));
                                events
                            }
                            Err(e) => {
                                let _ = incoming.verdict.send(Err(ApiError::from(&e)));
                                telemetry::fail(&import, e.code().name(), e.to_string());
                                let error = ApiError::new(e.code(), format!("kv import failed: {e}")).to_status();
                                failed(&error);
                                let _ = tx.send(Err(error)).await;
                                return;
                            }
                        };
                        drop(import);
                        (events, cached)
                    }
                };
                let mut offloads = offload.follow(&store, seq, cached);
                let generate = tracing::info_span!(
                    "generate",
                    otel.name = "generate",
                    tandem.decode.first_token_ms = tracing::field::Empty,
                    gen_ai.usage.output_tokens = tracing::field::Empty,
                );
                let imported_at = std::time::Instant::now();
                let mut tokens = 0u64;
                let decoding = async {
                    loop {
                        let next = tokio::select! {
                            // The gateway hung up: dropping `events` cancels the sequence.
                            _ = tx.closed() => return hung_up(),
                            e = events.next() => e,
                        };
                        let out = match next {
                            // Scored where the prompt was computed: here only with compute_prompt.
                            Some(Event::PromptLogprobs { logprobs, .. }) => {
                                if !compute_prompt {
                                    continue;
                                }
                                let tokens = logprobs.into_iter().map(|l| token_message(l.token, Some(l))).collect();
                                event(token_event::Event::Prompt(PromptScores { tokens }))
                            }
                            Some(Event::Token { token, logprobs, .. }) => {
                                tokens += 1;
                                // Each token from the engine means the one before it is in the
                                // cache now.
                                if let Some(o) = offloads.as_mut() {
                                    offload.progress(o, cached + tokens as usize);
                                }
                                if tokens == 1 {
                                    queued.take();
                                    tracing::Span::current()
                                        .record("tandem.decode.first_token_ms", imported_at.elapsed().as_secs_f64() * 1e3);
                                } else if tokens.is_multiple_of(TOKEN_EVENT_EVERY) {
                                    telemetry::event(
                                        &tracing::Span::current(),
                                        "tokens",
                                        vec![KeyValue::new("tandem.decode.tokens", tokens as i64)],
                                    );
                                }
                                event(token_event::Event::Token(token_message(token, logprobs)))
                            }
                            Some(Event::Finished { reason, usage, .. }) => {
                                completed.fetch_add(1, Ordering::Relaxed);
                                tracing::Span::current().record("gen_ai.usage.output_tokens", usage.completion_tokens as i64);
                                let _ = tx.send(event(token_event::Event::Finished(finished_message(reason, usage)))).await;
                                return;
                            }
                            Some(Event::Failed { error, .. }) => Err(error.to_status()),
                            Some(Event::Prefilled { .. }) | None => Err(Status::internal("decode engine stopped")),
                        };
                        if let Err(e) = &out {
                            failed(e);
                        }
                        let last = out.is_err();
                        if tx.send(out).await.is_err() {
                            if !last {
                                hung_up();
                            }
                            return;
                        }
                        if last {
                            return;
                        }
                    }
                };
                decoding.instrument(generate.clone()).await;
                // The server span's own count: the first token came from the prefill worker.
                tracing::Span::current().record("gen_ai.usage.output_tokens", tokens as i64);
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(self.info()))
    }
}
