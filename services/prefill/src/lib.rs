//! The prefill worker: computes prompts, samples each request's first token, and pushes the KV
//! blocks to the decode worker the gateway chose. Every handoff ends, within its lease, in an
//! explicit success or failure; the engine frees the blocks either way.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_engine::wire::{finished_message, new_request, token_message, worker_info};
use tandem_engine::{EngineHandle, Event, Mode};
use tandem_protocol::pb::prefill_server::{Prefill, PrefillServer};
use tandem_protocol::pb::{self, InfoRequest, PrefillRequest, PrefillResponse, WorkerInfo};
use tandem_protocol::ErrorCode;
use tandem_transfer::{Handoff, KvTransport};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub struct PrefillConfig {
    pub worker_id: String,
    pub transport: Arc<dyn KvTransport>,
    /// Upper bound of one KV handoff, verdict included.
    pub handoff_lease: Duration,
}

struct Service {
    engine: EngineHandle,
    cfg: PrefillConfig,
}

/// Serves the prefill gRPC API on `listener` until `shutdown` fires.
pub async fn run(engine: EngineHandle, cfg: PrefillConfig, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, worker = %cfg.worker_id, "prefill worker serving");
    tonic::transport::Server::builder()
        .add_service(PrefillServer::new(Service { engine, cfg }))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

#[tonic::async_trait]
impl Prefill for Service {
    async fn prefill(&self, request: Request<PrefillRequest>) -> Result<Response<PrefillResponse>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let g = r.request.ok_or_else(|| Status::invalid_argument("missing request"))?;
        let req = new_request(&self.engine, &g, Mode::PrefillOnly).map_err(|e| e.to_status())?;
        // Dropping `events` (client gone, or this future dropped) cancels the request.
        let mut events = self.engine.submit(req);
        let mut first = None;
        while let Some(event) = events.next().await {
            match event {
                Event::Token { token, logprobs, .. } => first = Some(token_message(token, logprobs)),
                Event::Finished { reason, usage, .. } => {
                    return Ok(Response::new(PrefillResponse {
                        first_token: first,
                        finished: Some(finished_message(reason, usage)),
                        cached_tokens: usage.cached_tokens as u32,
                        prefill_millis: started.elapsed().as_secs_f64() * 1e3,
                        transfer: None,
                    }));
                }
                Event::Prefilled { kv, usage, .. } => {
                    let prefill_millis = started.elapsed().as_secs_f64() * 1e3;
                    let first_token = first.ok_or_else(|| Status::internal("prefill produced no token"))?;
                    let handoff = Handoff { request_id: g.request_id.clone(), first_token: first_token.id, kv: *kv };
                    let report = self
                        .cfg
                        .transport
                        .send(&r.decode_kv_addr, &handoff, self.cfg.handoff_lease)
                        .await
                        .map_err(|e| {
                            tracing::warn!(request_id = %g.request_id, error = %e, "kv handoff failed");
                            Status::new(ErrorCode::Unavailable.grpc(), format!("kv handoff failed: {e}"))
                        })?;
                    tracing::info!(
                        request_id = %g.request_id, transport = %report.transport, bytes = report.bytes,
                        transfer_ms = report.millis, prefill_ms = prefill_millis, "kv handed off"
                    );
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
                    }));
                }
                Event::Failed { error, .. } => {
                    let code = if error.contains("out of KV cache blocks") { ErrorCode::Unavailable } else { ErrorCode::Internal };
                    return Err(Status::new(code.grpc(), error));
                }
            }
        }
        Err(Status::internal("engine stopped"))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(worker_info(&self.engine, &self.cfg.worker_id, "prefill", "")))
    }
}
