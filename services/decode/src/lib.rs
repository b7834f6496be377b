//! The decode worker: receives a request's KV blocks and first token from a prefill worker,
//! joins the sequence to its continuous batch, and streams every later token to the gateway.
#![forbid(unsafe_code)]

use std::time::Duration;

use tandem_engine::wire::{finished_message, new_request, token_message, worker_info};
use tandem_engine::{EngineHandle, Event, Mode};
use tandem_protocol::pb::decode_server::{Decode, DecodeServer};
use tandem_protocol::pb::{token_event, GenerateRequest, InfoRequest, TokenEvent, WorkerInfo};
use tandem_transfer::{HandoffRegistry, TcpReceiver};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub struct DecodeConfig {
    pub worker_id: String,
    /// Bound of one incoming transfer, from first byte to verdict.
    pub handoff_lease: Duration,
    /// Longest wait for a request's KV blocks when the gateway does not say.
    pub default_kv_wait: Duration,
}

struct Service {
    engine: EngineHandle,
    registry: HandoffRegistry,
    kv_addr: String,
    cfg: DecodeConfig,
}

/// Serves the decode gRPC API on `listener` and receives KV blocks on `kv_listener` until
/// `shutdown` fires.
pub async fn run(
    engine: EngineHandle,
    cfg: DecodeConfig,
    listener: TcpListener,
    kv_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let registry = HandoffRegistry::new();
    let receiver = TcpReceiver::new(kv_listener, registry.clone(), cfg.handoff_lease);
    let kv_addr = receiver.local_addr()?.to_string();
    tracing::info!(addr = %listener.local_addr()?, %kv_addr, worker = %cfg.worker_id, "decode worker serving");
    tokio::spawn(receiver.run(shutdown.clone()));
    tonic::transport::Server::builder()
        .add_service(DecodeServer::new(Service { engine, registry, kv_addr, cfg }))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

type EventResult = Result<TokenEvent, Status>;

fn event(e: token_event::Event) -> EventResult {
    Ok(TokenEvent { event: Some(e) })
}

#[tonic::async_trait]
impl Decode for Service {
    type GenerateStream = ReceiverStream<EventResult>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let g = request.into_inner();
        let req = new_request(&self.engine, &g, Mode::Full).map_err(|e| e.to_status())?;
        let lease = match g.kv_wait_ms {
            0 => self.cfg.default_kv_wait,
            ms => Duration::from_millis(ms as u64),
        };
        // Registered before this call returns, so blocks can never arrive before we listen.
        let mut pending = self
            .registry
            .register(&g.request_id)
            .ok_or_else(|| Status::already_exists(format!("request {} is already waiting for its blocks", g.request_id)))?;
        let (tx, rx) = mpsc::channel::<EventResult>(64);
        let engine = self.engine.clone();
        let request_id = g.request_id.clone();
        tokio::spawn(async move {
            let arrived = tokio::select! {
                _ = tx.closed() => return,
                a = tokio::time::timeout(lease, pending.arrived()) => a,
            };
            let incoming = match arrived {
                Ok(Some(incoming)) => incoming,
                Ok(None) => return,
                Err(_) => {
                    tracing::warn!(%request_id, wait = ?lease, "kv blocks never arrived");
                    let _ = tx.send(Err(Status::deadline_exceeded(format!("kv blocks did not arrive within {lease:?}")))).await;
                    return;
                }
            };
            let h = incoming.handoff;
            let mut events = match engine.import(req, h.kv, h.first_token).await {
                Ok(events) => {
                    let _ = incoming.verdict.send(Ok(()));
                    events
                }
                Err(e) => {
                    let _ = incoming.verdict.send(Err(e.to_string()));
                    let _ = tx.send(Err(Status::internal(format!("kv import failed: {e}")))).await;
                    return;
                }
            };
            loop {
                let next = tokio::select! {
                    // The gateway hung up: dropping `events` cancels the sequence.
                    _ = tx.closed() => return,
                    e = events.next() => e,
                };
                let out = match next {
                    Some(Event::Token { token, logprobs, .. }) => event(token_event::Event::Token(token_message(token, logprobs))),
                    Some(Event::Finished { reason, usage, .. }) => {
                        let _ = tx.send(event(token_event::Event::Finished(finished_message(reason, usage)))).await;
                        return;
                    }
                    Some(Event::Failed { error, .. }) => Err(Status::internal(error)),
                    Some(Event::Prefilled { .. }) | None => Err(Status::internal("decode engine stopped")),
                };
                let last = out.is_err();
                if tx.send(out).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(worker_info(&self.engine, &self.cfg.worker_id, "decode", &self.kv_addr)))
    }
}
