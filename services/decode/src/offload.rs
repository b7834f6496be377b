//! Generated tokens' KV to the block store, block by block as each fills, so that a stream
//! resumed on another worker after this one is lost finds them there and computes again only its
//! last, partial block. Best effort and off the step loop: a block is read out between two steps
//! and sent on a task of its own; one send per sequence at a time, a failure only costs the
//! resume some recompute.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_engine::{EngineHandle, SeqId};
use tandem_protocol::block_hashes;
use tandem_protocol::pb::block_store_client::BlockStoreClient;
use tandem_protocol::pb::PutBlocksRequest;
use tonic::transport::Channel;

/// Bound of one send to the block store.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct Offloader {
    engine: EngineHandle,
    layout_json: String,
    block_size: usize,
    clients: Mutex<HashMap<String, BlockStoreClient<Channel>>>,
    pub offloaded: AtomicU64,
    pub failed: AtomicU64,
}

/// One sequence's offloads: where they go, how many of its blocks are dealt with, and whether a
/// send is under way.
pub(crate) struct SeqOffload {
    store: String,
    seq: SeqId,
    done: usize,
    busy: Arc<AtomicBool>,
}

impl Offloader {
    pub fn new(engine: EngineHandle) -> anyhow::Result<Self> {
        let layout = &engine.info().layout;
        Ok(Self {
            layout_json: serde_json::to_string(layout)?,
            block_size: layout.block_size,
            engine,
            clients: Mutex::new(HashMap::new()),
            offloaded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// Starts following `seq`, whose first `cached` tokens arrived with its KV (their blocks are
    /// the prefill worker's to store). `None` without a block store.
    pub fn follow(&self, store: &str, seq: SeqId, cached: usize) -> Option<SeqOffload> {
        (!store.is_empty()).then(|| SeqOffload {
            store: store.to_string(),
            seq,
            done: cached / self.block_size,
            busy: Arc::new(AtomicBool::new(false)),
        })
    }

    fn client(&self, addr: &str) -> Option<BlockStoreClient<Channel>> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(addr) {
            return Some(c.clone());
        }
        let endpoint = tandem_runtime::grpc::endpoint(addr).ok()?.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true);
        let c = BlockStoreClient::new(endpoint.connect_lazy()).max_encoding_message_size(1 << 30);
        clients.insert(addr.to_string(), c.clone());
        Some(c)
    }

    /// `fed` tokens of the sequence are in the cache now: sends the blocks that filled since the
    /// last send, unless a send is still under way (the next call picks them up).
    pub fn progress(self: &Arc<Self>, s: &mut SeqOffload, fed: usize) {
        let full = fed / self.block_size;
        if full <= s.done || s.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let (from, seq, store, busy) = (s.done, s.seq, s.store.clone(), s.busy.clone());
        s.done = full;
        let this = self.clone();
        tokio::spawn(async move {
            this.send(&store, seq, from).await;
            busy.store(false, Ordering::Release);
        });
    }

    async fn send(&self, store: &str, seq: SeqId, from: usize) {
        // The sequence may have ended meanwhile; then there is nothing left to keep.
        let Ok((tokens, blocks)) = self.engine.read_full_blocks(seq, from).await else { return };
        if blocks.is_empty() {
            return;
        }
        let hashes = block_hashes(&tokens, self.block_size)[from..from + blocks.len()].to_vec();
        let n = blocks.len() as u64;
        let Some(mut client) = self.client(store) else { return };
        let req = PutBlocksRequest { layout_json: self.layout_json.clone(), hashes, blocks };
        match tokio::time::timeout(SEND_TIMEOUT, client.put(req)).await {
            Ok(Ok(_)) => {
                self.offloaded.fetch_add(n, Ordering::Relaxed);
            }
            outcome => {
                tracing::debug!(%store, blocks = n, timed_out = outcome.is_err(), "generated blocks not offloaded");
                self.failed.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}
