//! Receive buffers, pooled by size class: registered memory is expensive to make (pinned for RDMA,
//! a shared-memory segment on one host), so it is reused, and every buffer has an id no other
//! buffer is given.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_protocol::Bytes;
use tandem_ucx::{MemRegion, Worker};

use super::{io, BufferId, MIN_BUFFER, POOL_MAX_IDLE, POOL_MAX_IDLE_BYTES};
use crate::TransferError;

/// Registered buffers are expensive to make (pinned for RDMA), so they are pooled by size class:
/// multiples of an eighth of the power of two at or below the length, so at most 12.5% (or
/// `MIN_BUFFER`) is wasted.
pub(super) fn size_class(len: usize) -> usize {
    if len <= MIN_BUFFER {
        return MIN_BUFFER;
    }
    let floor = 1usize << (usize::BITS - 1 - len.leading_zeros());
    let step = (floor / 8).max(MIN_BUFFER);
    len.div_ceil(step) * step
}

/// Receive buffers, which UCX allocates (see [`Worker::allocate`]: shared memory on one host).
pub(super) struct PoolInner {
    pub(super) worker: Worker,
    pub(super) idle: Mutex<Vec<(BufferId, MemRegion)>>,
    next_id: AtomicU64,
}

#[derive(Clone)]
pub(super) struct BufferPool {
    pub(super) inner: Arc<PoolInner>,
}

impl BufferPool {
    pub(super) fn new(worker: Worker) -> Self {
        BufferPool { inner: Arc::new(PoolInner { worker, idle: Mutex::new(Vec::new()), next_id: AtomicU64::new(1) }) }
    }

    pub(super) async fn take(&self, len: usize) -> Result<PooledBuffer, TransferError> {
        let class = size_class(len);
        let reused = {
            let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.iter().position(|(_, r)| r.len() == class).map(|i| idle.remove(i))
        };
        let (id, region) = match reused {
            Some(reused) => reused,
            None => {
                let region = self
                    .inner
                    .worker
                    .allocate(class)
                    .await
                    .map_err(|e| TransferError::Io(format!("cannot register a buffer of {class} bytes: {e}")))?;
                (BufferId(self.inner.next_id.fetch_add(1, Ordering::Relaxed)), region)
            }
        };
        Ok(PooledBuffer { id, region: Some(region), pool: self.inner.clone() })
    }
}

/// A buffer taken from a pool. [`PooledBuffer::recycle`] returns it for reuse; dropping it
/// instead unregisters it (for buffers that UCX may still be using).
pub(super) struct PooledBuffer {
    pub(super) id: BufferId,
    region: Option<MemRegion>,
    pool: Arc<PoolInner>,
}

impl PooledBuffer {
    pub(super) fn region(&self) -> &MemRegion {
        self.region.as_ref().expect("a pooled buffer holds its region until consumed")
    }

    pub(super) fn into_region(mut self) -> MemRegion {
        self.region.take().expect("a pooled buffer holds its region until consumed")
    }

    /// The buffer's first `len` bytes as shared bytes; the buffer returns to its pool when the
    /// last reference is dropped. Nothing may write into it meanwhile.
    pub(super) fn lend(mut self, len: usize) -> Result<Bytes, TransferError> {
        let (id, pool) = (self.id, self.pool.clone());
        let region = self.region.take().expect("a pooled buffer holds its region until consumed");
        region.into_bytes(len, move |region| PooledBuffer { id, region: Some(region), pool }.recycle()).map_err(io)
    }

    pub(super) fn recycle(mut self) {
        let Some(region) = self.region.take() else { return };
        let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push((self.id, region));
        // Keep the most recently used; the evicted are unregistered as they drop, and their ids
        // are never handed out again.
        while idle.len() > POOL_MAX_IDLE || idle.iter().map(|(_, r)| r.len()).sum::<usize>() > POOL_MAX_IDLE_BYTES {
            idle.remove(0);
        }
    }
}
