//! The receiving side: a listener, and per sender connection the transfers in progress and the
//! buffers that sender may still write into.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tandem_ucx::{Endpoint, Listener, Worker};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pool::{BufferPool, PooledBuffer};
use super::{context, frame, io, protocol, split, BufferId, Ready, UcxStats, ABORT, DONE, OFFER, READY, VERDICT};
use crate::wire::{check_header, deliver, Header, Verdict, MAX_HEADER};
use crate::{HandoffRegistry, TransferError};

/// Accepts KV blocks over UCX and hands them to the [`HandoffRegistry`].
pub struct UcxReceiver {
    listener: Listener,
    registry: HandoffRegistry,
    lease: Duration,
    pool: BufferPool,
    stats: UcxStats,
}

impl std::fmt::Debug for UcxReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxReceiver").field("addr", &self.listener.local_addr()).field("lease", &self.lease).finish_non_exhaustive()
    }
}

impl UcxReceiver {
    /// Listens on `addr` (port 0 picks one; see [`UcxReceiver::local_addr`]). `lease` bounds how
    /// long one incoming transfer may take, verdict included.
    pub async fn new(addr: SocketAddr, registry: HandoffRegistry, lease: Duration) -> Result<Self, TransferError> {
        let worker = Worker::new(context()?).map_err(io)?;
        let listener = worker.listen(addr).await.map_err(|e| TransferError::Io(format!("cannot listen on {addr}: {e}")))?;
        let pool = BufferPool::new(worker);
        Ok(UcxReceiver { listener, registry, lease, stats: UcxStats::new(pool.clone()), pool })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.listener.local_addr())
    }

    /// This side's counters (receive buffers, connections accepted); they outlive `run`.
    pub fn stats(&self) -> UcxStats {
        self.stats.clone()
    }

    /// Serves until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        // Connections, and through them their transfers: joined before this returns.
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let ep = match accepted {
                Ok(ep) => ep,
                Err(e) => {
                    tracing::warn!(error = %e, "ucx kv receiver stopped accepting");
                    break;
                }
            };
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let conn = Connection { ep: Arc::new(ep), registry: self.registry.clone(), lease: self.lease, pool: self.pool.clone() };
            connections.spawn(conn.serve(shutdown.child_token()));
        }
        connections.close();
        connections.wait().await;
    }
}

/// How the sender ended its part of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SenderEnd {
    Done,
    Aborted,
}

/// A transfer in progress on a connection.
struct Slot {
    /// Tells the transfer task about the sender's DONE or ABORT.
    end: Option<oneshot::Sender<SenderEnd>>,
    /// The sender sent DONE or ABORT (possibly after the transfer task gave up).
    sender_done: bool,
}

/// One sender's connection, on the receiving side.
#[derive(Clone)]
struct Connection {
    ep: Arc<Endpoint>,
    registry: HandoffRegistry,
    lease: Duration,
    pool: BufferPool,
}

impl Connection {
    async fn serve(self, shutdown: CancellationToken) {
        // Transfers in progress, by id.
        let mut transfers: HashMap<u64, Slot> = HashMap::new();
        // Buffers of transfers that ended before the sender was done writing into them.
        let mut held: HashMap<u64, PooledBuffer> = HashMap::new();
        let (finished_tx, mut finished) = mpsc::unbounded_channel::<(u64, Option<PooledBuffer>)>();
        // Each transfer ends within its lease; the connection waits for them before it closes.
        let running = TaskTracker::new();
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some((xfer, buffer)) = finished.recv() => {
                    let slot = transfers.remove(&xfer);
                    if let Some(buffer) = buffer {
                        if slot.is_some_and(|s| s.sender_done) {
                            buffer.recycle();
                        } else {
                            held.insert(xfer, buffer);
                        }
                    }
                    continue;
                }
                r = self.ep.recv() => r,
            };
            let message = match received {
                Ok(message) => message,
                Err(e) => {
                    tracing::debug!(error = %e, "ucx kv sender went away");
                    break;
                }
            };
            let Some((xfer, body)) = split(&message) else { continue };
            match message.kind {
                OFFER if !transfers.contains_key(&xfer) && !held.contains_key(&xfer) => {
                    let (end_tx, end) = oneshot::channel();
                    transfers.insert(xfer, Slot { end: Some(end_tx), sender_done: false });
                    running.spawn(self.clone().transfer(xfer, body.to_vec(), end, finished_tx.clone()));
                }
                // The sender flushed before either: none of this transfer's puts are in flight.
                DONE | ABORT => {
                    let end = if message.kind == DONE { SenderEnd::Done } else { SenderEnd::Aborted };
                    if let Some(slot) = transfers.get_mut(&xfer) {
                        slot.sender_done = true;
                        if let Some(tx) = slot.end.take() {
                            let _ = tx.send(end);
                        }
                    } else if let Some(buffer) = held.remove(&xfer) {
                        buffer.recycle();
                    }
                }
                _ => tracing::debug!(kind = message.kind, xfer, "ignoring unexpected ucx kv message"),
            }
        }
        // Dropping `transfers` tells the transfers still waiting for their payload that it will
        // not come. What the sender may still write into stays registered until the endpoint is
        // closed: the buffers held back, those on their way back from finished transfers, and
        // (through `transfer`) those of transfers that finish from now on.
        drop(transfers);
        finished.close();
        let mut keep: Vec<PooledBuffer> = held.into_values().collect();
        while let Ok((_, buffer)) = finished.try_recv() {
            keep.extend(buffer);
        }
        for buffer in keep {
            self.ep.retain(buffer.into_region());
        }
        running.close();
        running.wait().await;
    }

    async fn transfer(
        self,
        xfer: u64,
        offer: Vec<u8>,
        end: oneshot::Receiver<SenderEnd>,
        finished: mpsc::UnboundedSender<(u64, Option<PooledBuffer>)>,
    ) {
        let mut exposed = None;
        let outcome = tokio::time::timeout(self.lease, self.receive(xfer, &offer, end, &mut exposed))
            .await
            .unwrap_or(Err(TransferError::LeaseExpired(self.lease)));
        // A buffer still exposed here was given to the sender, which never finished writing into
        // it: the connection holds it back (see `serve`).
        if let Some(buffer) = exposed.take() {
            if let Err(mpsc::error::SendError((_, Some(buffer)))) = finished.send((xfer, Some(buffer))) {
                self.ep.retain(buffer.into_region());
            }
        } else {
            let _ = finished.send((xfer, None));
        }
        let verdict = Verdict::of(&outcome);
        if let Some(e) = &verdict.error {
            tracing::warn!(xfer, error = %e, "ucx kv transfer refused");
        }
        if let Ok(bytes) = serde_json::to_vec(&verdict) {
            let _ = tokio::time::timeout(self.lease, self.ep.send(VERDICT, frame(xfer, &bytes))).await;
        }
    }

    async fn receive(
        &self,
        xfer: u64,
        offer: &[u8],
        end: oneshot::Receiver<SenderEnd>,
        exposed: &mut Option<PooledBuffer>,
    ) -> Result<(), TransferError> {
        if offer.len() > MAX_HEADER {
            return Err(protocol(format!("header of {} bytes exceeds {MAX_HEADER}", offer.len())));
        }
        let h: Header = serde_json::from_slice(offer).map_err(protocol)?;
        let (n, block) = check_header(&h, false)?;
        let total = n * block;
        let ready = match total {
            0 => Ready { buffer: BufferId(0), addr: 0, len: 0, rkey: Vec::new() },
            _ => {
                let buffer = self.pool.take(total).await?;
                let region = buffer.region();
                let ready = Ready { buffer: buffer.id, addr: region.address(), len: total as u64, rkey: region.rkey().to_vec() };
                *exposed = Some(buffer);
                ready
            }
        };
        self.ep.send(READY, frame(xfer, &ready.encode())).await.map_err(io)?;
        let end = end.await.map_err(|_| TransferError::Io("connection lost before the payload was complete".into()))?;
        // The sender flushed before DONE or ABORT: nothing writes into the buffer any more.
        if end == SenderEnd::Aborted {
            if let Some(buffer) = exposed.take() {
                buffer.recycle();
            }
            return Err(TransferError::Io("the sender gave up on the transfer".into()));
        }
        // The blocks are handed over where they landed: views into the receive buffer, which
        // goes back to the pool once the last of them is dropped (the sender is done with it).
        let blocks = match exposed.take() {
            None => Vec::new(),
            Some(buffer) => {
                let payload = buffer.lend(total)?;
                (0..n).map(|i| payload.slice(i * block..(i + 1) * block)).collect()
            }
        };
        deliver(&self.registry, h, blocks).await
    }
}
