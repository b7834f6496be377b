//! The cluster's KV block store: blocks addressed by chained block hash, held in memory under a
//! byte budget with least-recently-used eviction. Prefill workers put finished prompt blocks
//! here; any worker can get the longest stored prefix of a hash chain back.
#![forbid(unsafe_code)]

mod store;

use std::sync::{Arc, Mutex};

use tandem_protocol::pb::kv_store_server::{KvStore, KvStoreServer};
use tandem_protocol::pb::{GetBlocksRequest, GetBlocksResponse, InfoRequest, PutBlocksRequest, PutBlocksResponse, WorkerInfo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub use store::BlockStore;

pub struct KvTransferConfig {
    pub worker_id: String,
    pub memory_bytes: usize,
}

struct Service {
    store: Arc<Mutex<BlockStore>>,
    worker_id: String,
}

/// Serves the block store on `listener` until `shutdown` fires.
pub async fn run(cfg: KvTransferConfig, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, budget_bytes = cfg.memory_bytes, "kv-transfer store serving");
    let svc = Service { store: Arc::new(Mutex::new(BlockStore::new(cfg.memory_bytes))), worker_id: cfg.worker_id };
    tonic::transport::Server::builder()
        .add_service(KvStoreServer::new(svc).max_decoding_message_size(1 << 30).max_encoding_message_size(1 << 30))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

impl Service {
    fn store(&self) -> std::sync::MutexGuard<'_, BlockStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[tonic::async_trait]
impl KvStore for Service {
    async fn put(&self, request: Request<PutBlocksRequest>) -> Result<Response<PutBlocksResponse>, Status> {
        let r = request.into_inner();
        if r.hashes.len() != r.blocks.len() {
            return Err(Status::invalid_argument("one hash per block"));
        }
        let mut store = self.store();
        let stored = r.hashes.into_iter().zip(r.blocks).filter(|(h, b)| store.put(&r.layout_json, *h, b.clone())).count();
        Ok(Response::new(PutBlocksResponse { stored: stored as u32 }))
    }

    async fn get(&self, request: Request<GetBlocksRequest>) -> Result<Response<GetBlocksResponse>, Status> {
        let r = request.into_inner();
        let blocks = self.store().get_prefix(&r.layout_json, &r.hashes);
        Ok(Response::new(GetBlocksResponse { blocks }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        let store = self.store();
        Ok(Response::new(WorkerInfo {
            worker_id: self.worker_id.clone(),
            role: "kv-transfer".into(),
            total_blocks: store.len() as u32,
            ..WorkerInfo::default()
        }))
    }
}
