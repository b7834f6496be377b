//! The receiving side: requests register before their blocks can arrive; the transport hands
//! each arrival to the request that waits for it and relays the verdict to the sender.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tandem_protocol::{ApiError, BlockMemory, Bytes, DevicePeer, ErrorCode, ReceiveBuffer};
use tokio::sync::oneshot;

use crate::Handoff;

/// Blocks that arrived, with the channel on which the receiver reports whether it took them.
#[derive(Debug)]
pub struct Incoming {
    pub handoff: Handoff,
    pub verdict: oneshot::Sender<Result<(), ApiError>>,
}

/// Requests waiting for their KV blocks, by request id, and the memory their blocks arrive in.
#[derive(Debug, Clone, Default)]
pub struct HandoffRegistry {
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Incoming>>>>,
    /// Set once, by whichever clone: the receivers hold clones from before the engine loads.
    memory: Arc<OnceLock<Arc<dyn BlockMemory>>>,
    /// How the importing engine maps pools of other processes (device handoffs), once known.
    device: Arc<OnceLock<Arc<dyn DevicePeer>>>,
}

/// Where one arriving block is read into: the importing engine's memory, or the heap.
pub(crate) enum BlockBuf {
    Engine(Box<dyn ReceiveBuffer>),
    Heap(Vec<u8>),
}

impl BlockBuf {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            BlockBuf::Engine(b) => b.as_mut_slice(),
            BlockBuf::Heap(v) => v,
        }
    }

    pub fn freeze(self) -> Bytes {
        match self {
            BlockBuf::Engine(b) => b.freeze(),
            BlockBuf::Heap(v) => Bytes::from(v),
        }
    }
}

/// A registration; dropping it withdraws the request, so late blocks are refused.
#[derive(Debug)]
pub struct PendingHandoff {
    id: String,
    registry: HandoffRegistry,
    rx: Option<oneshot::Receiver<Incoming>>,
}

impl PendingHandoff {
    /// Waits for the blocks.
    pub async fn arrived(&mut self) -> Option<Incoming> {
        self.rx.as_mut()?.await.ok()
    }
}

impl Drop for PendingHandoff {
    fn drop(&mut self) {
        self.registry.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl HandoffRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, receives blocks into `memory` where it has room (the receivers that read
    /// blocks off a stream: TCP and QUIC). Only the first call counts.
    pub fn use_memory(&self, memory: Arc<dyn BlockMemory>) {
        let _ = self.memory.set(memory);
    }

    /// From now on, accepts blocks left in the device memory of a sender of this host, mapped
    /// through `peer`. Only the first call counts.
    pub fn use_device(&self, peer: Arc<dyn DevicePeer>) {
        let _ = self.device.set(peer);
    }

    /// The importing engine's [`DevicePeer`], if it takes device handoffs.
    pub fn device_peer(&self) -> Option<&Arc<dyn DevicePeer>> {
        self.device.get()
    }

    /// A buffer for one arriving block of `len` bytes.
    pub(crate) fn block_buffer(&self, len: usize) -> BlockBuf {
        match self.memory.get().and_then(|m| m.buffer(len)) {
            Some(b) => BlockBuf::Engine(b),
            None => BlockBuf::Heap(vec![0u8; len]),
        }
    }

    /// Registers `request_id`; `None` if that id is already waiting.
    pub fn register(&self, request_id: &str) -> Option<PendingHandoff> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.contains_key(request_id) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        pending.insert(request_id.to_string(), tx);
        Some(PendingHandoff { id: request_id.to_string(), registry: self.clone(), rx: Some(rx) })
    }

    pub fn waiting(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Hands arrived blocks to their request; on failure the sender learns why.
    pub fn deliver(&self, incoming: Incoming) {
        let tx = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&incoming.handoff.request_id);
        match tx {
            Some(tx) => {
                if let Err(incoming) = tx.send(incoming) {
                    let _ = incoming.verdict.send(Err(ApiError::new(ErrorCode::Cancelled, "request was cancelled")));
                }
            }
            None => {
                let msg = format!("no request {} is waiting for blocks", incoming.handoff.request_id);
                let _ = incoming.verdict.send(Err(ApiError::new(ErrorCode::NotFound, msg)));
            }
        }
    }
}
