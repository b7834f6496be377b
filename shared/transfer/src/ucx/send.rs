//! The sending side: one endpoint per receiver, shared by all transfers to it, each transfer a
//! subscription to its messages on that endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_ucx::{AmMessage, Endpoint, RemoteKey, Worker};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::pool::BufferPool;
use super::{context, frame, io, protocol, split, BufferId, Ready, UcxStats, ABORT, DONE, OFFER, READY, RKEY_CACHE, VERDICT};
use crate::wire::{Header, Verdict};
use crate::{Handoff, KvTransport, TransferError, TransferReport};

struct ConnState {
    waiters: HashMap<u64, mpsc::UnboundedSender<AmMessage>>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
    /// Whether the peer ever answered: failures before that are connection failures.
    heard_back: bool,
}

/// One endpoint to a receiver, shared by all transfers to it.
struct Conn {
    peer: String,
    ep: Endpoint,
    state: Mutex<ConnState>,
    /// The receiver's keys unpacked so far, by the buffer they open, most recent last. Its buffers
    /// are pooled, so the same buffer comes back transfer after transfer, and unpacking its key
    /// again would map its memory again (on one host, attaching a shared-memory segment and
    /// faulting its pages in). Looked up by [`BufferId`], never by the key's bytes.
    rkeys: Mutex<Vec<(BufferId, Arc<RemoteKey>)>>,
}

impl Conn {
    fn state(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_dead(&self) -> bool {
        self.state().dead.is_some()
    }

    async fn rkey(&self, buffer: BufferId, packed: &[u8]) -> Result<Arc<RemoteKey>, TransferError> {
        {
            let mut keys = self.rkeys.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = keys.iter().position(|(id, _)| *id == buffer) {
                let entry = keys.remove(i);
                let key = entry.1.clone();
                keys.push(entry);
                return Ok(key);
            }
        }
        let key = Arc::new(self.ep.unpack_rkey(packed).await.map_err(|e| self.failure(e.to_string()))?);
        let mut keys = self.rkeys.lock().unwrap_or_else(|e| e.into_inner());
        keys.push((buffer, key.clone()));
        if keys.len() > RKEY_CACHE {
            keys.remove(0);
        }
        Ok(key)
    }

    fn failure(&self, reason: String) -> TransferError {
        if self.state().heard_back {
            TransferError::Io(reason)
        } else {
            TransferError::Connect { peer: self.peer.clone(), reason }
        }
    }

    fn lost(&self) -> TransferError {
        let reason = self.state().dead.clone().unwrap_or_else(|| "connection closed".into());
        self.failure(reason)
    }

    fn wait_for(self: &Arc<Self>, xfer: u64) -> Result<Waiter, TransferError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.state();
        if state.dead.is_some() {
            drop(state);
            return Err(self.lost());
        }
        state.waiters.insert(xfer, tx);
        Ok(Waiter { conn: self.clone(), xfer, rx })
    }

    async fn send(&self, kind: u16, xfer: u64, body: &[u8]) -> Result<(), TransferError> {
        self.ep.send(kind, frame(xfer, body)).await.map_err(|e| self.failure(e.to_string()))
    }

    /// Dispatches the receiver's answers to their transfers until the endpoint fails or the
    /// transport goes away.
    async fn route(self: Arc<Self>, stop: CancellationToken) {
        let reason = loop {
            let received = tokio::select! {
                _ = stop.cancelled() => break "transport shut down".to_string(),
                r = self.ep.recv() => r,
            };
            match received {
                Ok(message) => {
                    let Some((xfer, _)) = split(&message) else { continue };
                    let mut state = self.state();
                    state.heard_back = true;
                    if let Some(waiter) = state.waiters.get(&xfer) {
                        let _ = waiter.send(message);
                    }
                }
                Err(e) => break e.to_string(),
            }
        };
        tracing::debug!(peer = %self.peer, %reason, "ucx kv connection closed");
        let mut state = self.state();
        state.dead = Some(reason);
        // Dropping the senders wakes every transfer still waiting on this connection.
        state.waiters.clear();
    }
}

/// Until disarmed, tells the receiver on drop that the transfer was given up: once every operation
/// this side issued on the endpoint is complete at the receiver (flush), `ABORT` lets it release
/// the buffer it exposed.
struct Abandon {
    conn: Arc<Conn>,
    xfer: u64,
    armed: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.armed || self.conn.is_dead() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (conn, xfer) = (self.conn.clone(), self.xfer);
        runtime.spawn(async move {
            if conn.ep.flush().await.is_ok() {
                let _ = conn.ep.send(ABORT, frame(xfer, &[])).await;
            }
        });
    }
}

/// A transfer's subscription to its messages on a connection.
struct Waiter {
    conn: Arc<Conn>,
    xfer: u64,
    rx: mpsc::UnboundedReceiver<AmMessage>,
}

impl Waiter {
    async fn next(&mut self) -> Result<AmMessage, TransferError> {
        match self.rx.recv().await {
            Some(message) => Ok(message),
            None => Err(self.conn.lost()),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.conn.state().waiters.remove(&self.xfer);
    }
}

fn verdict_of(message: &AmMessage) -> Result<Verdict, TransferError> {
    let (_, body) = split(message).ok_or_else(|| protocol("short message"))?;
    serde_json::from_slice(body).map_err(protocol)
}

struct TransportInner {
    worker: Worker,
    stats: UcxStats,
    conns: Mutex<HashMap<String, Arc<Conn>>>,
    next_xfer: AtomicU64,
    stop: CancellationToken,
}

impl Drop for TransportInner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TransportInner {
    async fn conn(&self, peer: &str) -> Result<Arc<Conn>, TransferError> {
        let cached = self.conns.lock().unwrap_or_else(|e| e.into_inner()).get(peer).cloned();
        if let Some(conn) = cached.filter(|c| !c.is_dead()) {
            return Ok(conn);
        }
        let unreachable = |reason: String| TransferError::Connect { peer: peer.to_string(), reason };
        let addr: SocketAddr = tokio::net::lookup_host(peer)
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("no address".into()))?;
        let ep = self.worker.connect(addr).await.map_err(|e| unreachable(e.to_string()))?;
        let fresh = Arc::new(Conn {
            peer: peer.to_string(),
            ep,
            state: Mutex::new(ConnState { waiters: HashMap::new(), dead: None, heard_back: false }),
            rkeys: Mutex::new(Vec::new()),
        });
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        // Another transfer may have connected meanwhile: share its connection.
        if let Some(existing) = conns.get(peer).filter(|c| !c.is_dead()) {
            return Ok(existing.clone());
        }
        conns.insert(peer.to_string(), fresh.clone());
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(fresh.clone().route(self.stop.clone()));
        Ok(fresh)
    }

    async fn send(&self, peer: &str, h: &Handoff) -> Result<TransferReport, TransferError> {
        let started = Instant::now();
        let header = serde_json::to_vec(&Header::of(h)).map_err(protocol)?;
        let total = h.kv.total_bytes();
        let conn = self.conn(peer).await?;
        let xfer = self.next_xfer.fetch_add(1, Ordering::Relaxed);
        let mut waiter = conn.wait_for(xfer)?;
        let mut abandon = Abandon { conn: conn.clone(), xfer, armed: true };
        conn.send(OFFER, xfer, &header).await?;

        let answer = waiter.next().await?;
        let ready = match answer.kind {
            READY => Ready::decode(split(&answer).ok_or_else(|| protocol("short READY"))?.1)?,
            VERDICT => {
                // Refused before any payload moved: the receiver exposed no buffer.
                abandon.armed = false;
                verdict_of(&answer)?.into_result()?;
                return Err(protocol("receiver accepted before the payload arrived"));
            }
            other => return Err(protocol(format!("unexpected message {other} instead of READY"))),
        };
        ready.check(total)?;
        if total > 0 {
            // Every block goes straight from where it lies into its place in the receiver's
            // buffer; the puts run concurrently and each holds its block until it is read.
            let rkey = conn.rkey(ready.buffer, &ready.rkey).await?;
            let mut offset = 0u64;
            let puts = h.kv.blocks.iter().map(|block| {
                let at = ready.addr + offset;
                offset += block.len() as u64;
                conn.ep.put_bytes(block.clone(), at, &rkey)
            });
            futures::future::try_join_all(puts).await.map_err(|e| conn.failure(e.to_string()))?;
            // The payload must be complete at the receiver before it hears DONE.
            conn.ep.flush().await.map_err(|e| conn.failure(e.to_string()))?;
        }
        conn.send(DONE, xfer, &[]).await?;
        let answer = waiter.next().await?;
        abandon.armed = false;
        if answer.kind != VERDICT {
            return Err(protocol(format!("unexpected message {} instead of VERDICT", answer.kind)));
        }
        verdict_of(&answer)?.into_result()?;
        Ok(TransferReport {
            transport: "ucx".into(),
            bytes: total as u64,
            blocks: h.kv.blocks.len() as u32,
            millis: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// Sends KV blocks over UCX. One worker (and progress thread) per transport; one endpoint per
/// receiver, reused across transfers and replaced once it fails.
#[derive(Clone)]
pub struct UcxTransport {
    inner: Arc<TransportInner>,
}

impl std::fmt::Debug for UcxTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxTransport").field("stats", &self.inner.stats).finish_non_exhaustive()
    }
}

impl UcxTransport {
    /// A transport configured from the UCX environment (see the module docs).
    pub fn new() -> Result<Self, TransferError> {
        let worker = Worker::new(context()?).map_err(io)?;
        let pool = BufferPool::new(worker.clone());
        Ok(UcxTransport {
            inner: Arc::new(TransportInner {
                stats: UcxStats::new(pool),
                worker,
                conns: Mutex::new(HashMap::new()),
                next_xfer: AtomicU64::new(1),
                stop: CancellationToken::new(),
            }),
        })
    }

    /// This side's counters (registered buffers: none, as blocks are put from where they lie;
    /// connections opened).
    pub fn stats(&self) -> UcxStats {
        self.inner.stats.clone()
    }
}

#[async_trait::async_trait]
impl KvTransport for UcxTransport {
    fn name(&self) -> &'static str {
        "ucx"
    }

    async fn send(&self, peer: &str, handoff: &Handoff, lease: Duration) -> Result<TransferReport, TransferError> {
        tokio::time::timeout(lease, self.inner.send(peer, handoff)).await.unwrap_or(Err(TransferError::LeaseExpired(lease)))
    }
}
