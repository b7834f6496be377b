//! KV over UCX: the blocks are written one-sidedly (RMA put) into a buffer the receiver
//! registered for them, so on RDMA hardware they move without either CPU copying them over the
//! wire.
//!
//! # Environment
//!
//! UCX picks its transports at run time; this code is the same for all of them.
//!
//! * Without RDMA hardware, UCX uses TCP between hosts and shared memory within one (`UCX_TLS`
//!   unset, or `UCX_TLS=tcp,sm,self`; `UCX_TLS=tcp` for sockets only). A put then travels over
//!   the socket (or through shared memory) and the receiving side's UCX copies it into place.
//!   Connections are established through the listener's socket address, which needs a network
//!   transport on that address's interface: `UCX_TLS` must keep `tcp` (or the verbs transports
//!   below); shared memory alone cannot connect.
//! * With InfiniBand or RoCE, the same code uses verbs, with zero-copy RDMA writes into the
//!   receiver's registered buffer: `UCX_TLS=rc,sm,self` (plus `UCX_NET_DEVICES=mlx5_0:1` to pick
//!   the port). Listen on, and connect to, an address of that port's network interface (IPoIB or
//!   the RoCE netdev), so that UCX's connection manager (`rdmacm`) ties the connection to it.
//!
//! # Protocol
//!
//! Each peer pair shares one UCX endpoint, reused across transfers; every message is an active
//! message carrying a transfer id (`u64`, little endian) before its body.
//!
//! 1. sender → `OFFER`: the JSON [`Header`] (request, layout, tokens, checksums).
//! 2. receiver checks it, takes a registered buffer of the payload's size from its pool and
//!    answers `READY`: the buffer's id, address, length and packed rkey. (Or a `VERDICT`
//!    refusing it.)
//! 3. sender puts each block straight from its memory into its place in that buffer, flushes
//!    the endpoint so that they are complete at the receiver, and sends `DONE`.
//! 4. receiver verifies the checksums, hands the waiting request the blocks as views into the
//!    buffer (which returns to the pool when the last view is dropped) and answers `VERDICT`
//!    (JSON [`Verdict`]).
//!
//! Receive buffers come from UCX's own allocator, POSIX shared memory first: on one host the
//! sender maps such a buffer once (its unpacked key is cached per connection, under the buffer's
//! id, which no later buffer reuses) and every put is a single copy into it. See `UCX_DEFAULTS` for the settings that make UCX use it.
//!
//! A sender that gives up on a transfer (its lease expired, the receiver answered nonsense)
//! flushes the endpoint and sends `ABORT`, so that the receiver stops waiting and knows that no
//! more of that transfer's puts are coming.
//!
//! Both sides bound the whole exchange by the lease. A peer that dies, or a connection that is
//! cut, fails the endpoint and so every transfer on it at once; a lost message costs the lease.
//! Buffers go back to their pool only when nothing can write into them any more: a receive
//! buffer whose transfer ended before its `DONE` is held back until that transfer's `DONE` or
//! `ABORT` arrives after all (the sender flushed before either), or else until the connection
//! closes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_ucx::{AmMessage, Context, Endpoint, Listener, MemRegion, RemoteKey, Worker};
use tandem_protocol::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::wire::{check_header, deliver, Header, Verdict, MAX_HEADER};
use crate::{Handoff, HandoffRegistry, KvTransport, TransferError, TransferReport};

const OFFER: u16 = 1;
const READY: u16 = 2;
const DONE: u16 = 3;
const VERDICT: u16 = 4;
const ABORT: u16 = 5;

/// Idle registered buffers a pool keeps for reuse, at most.
const POOL_MAX_IDLE: usize = 16;
const POOL_MAX_IDLE_BYTES: usize = 2 << 30;
const MIN_BUFFER: usize = 64 << 10;
/// Unpacked remote keys a connection keeps (at least the receiver's idle pool).
const RKEY_CACHE: usize = 2 * POOL_MAX_IDLE;

/// UCX settings this transport wants unless the environment says otherwise (`UCX_<NAME>`).
///
/// * `POSIX_ERROR_HANDLING=y`: every endpoint asks to be told when its peer fails, and UCX only
///   offers its POSIX shared-memory transport to such endpoints when told that it may (the
///   transport checks the peer's segment file to notice a dead peer). Without it, two processes
///   on one host talk over loopback TCP.
/// * `ALLOC_PRIO=md:posix,...`: receive buffers are allocated by UCX (see
///   [`Worker::allocate`]); taking them from POSIX shared memory first lets a sender on the same
///   host map them and put blocks with one plain copy. (UCX's default tries SysV segments first,
///   and those cannot report a dead peer, so endpoints that ask for that could not use them.)
const UCX_DEFAULTS: [(&str, &str); 2] =
    [("POSIX_ERROR_HANDLING", "y"), ("ALLOC_PRIO", "md:posix,md:sysv,huge,thp,md:*,mmap,heap")];

fn context() -> Result<Context, TransferError> {
    let options: Vec<(&str, &str)> =
        UCX_DEFAULTS.into_iter().filter(|(name, _)| std::env::var_os(format!("UCX_{name}")).is_none()).collect();
    Context::with_options(&options).map_err(io)
}

fn io(e: tandem_ucx::Error) -> TransferError {
    TransferError::Io(e.to_string())
}

fn protocol(e: impl std::fmt::Display) -> TransferError {
    TransferError::Protocol(e.to_string())
}

fn frame(xfer: u64, body: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(8 + body.len());
    data.extend_from_slice(&xfer.to_le_bytes());
    data.extend_from_slice(body);
    data
}

fn split(message: &AmMessage) -> Option<(u64, &[u8])> {
    let (id, body) = message.data.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*id), body))
}

/// Where the receiver wants the payload.
struct Ready {
    /// The receive buffer's identity: never given to another buffer while the receiver lives
    /// (see [`BufferId`]).
    buffer: BufferId,
    addr: u64,
    len: u64,
    rkey: Vec<u8>,
}

impl Ready {
    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(24 + self.rkey.len());
        body.extend_from_slice(&self.buffer.0.to_le_bytes());
        body.extend_from_slice(&self.addr.to_le_bytes());
        body.extend_from_slice(&self.len.to_le_bytes());
        body.extend_from_slice(&self.rkey);
        body
    }

    fn decode(body: &[u8]) -> Result<Self, TransferError> {
        let short = || protocol("short READY");
        let (buffer, rest) = body.split_first_chunk::<8>().ok_or_else(short)?;
        let (addr, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
        let (len, rkey) = rest.split_first_chunk::<8>().ok_or_else(short)?;
        Ok(Ready {
            buffer: BufferId(u64::from_le_bytes(*buffer)),
            addr: u64::from_le_bytes(*addr),
            len: u64::from_le_bytes(*len),
            rkey: rkey.to_vec(),
        })
    }
}

/// Names one receive buffer from its allocation to its release, and no other buffer after it.
///
/// A packed remote key cannot serve as that name. UCX's shared-memory key is the segment's
/// file descriptor number, address and length; once the pool frees a buffer, the next one of
/// the same size class often gets the same descriptor at the same address, so its key is the
/// same bytes. A sender that looked its mapping up by key would then reuse the mapping of the
/// freed segment and put the blocks into memory nobody reads any more, while the receiver checked
/// its new, untouched buffer: a checksum failure on block 0 under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct BufferId(u64);

/// Registered buffers are expensive to make (pinned for RDMA), so they are pooled by size class:
/// multiples of an eighth of the power of two at or below the length, so at most 12.5% (or
/// `MIN_BUFFER`) is wasted.
fn size_class(len: usize) -> usize {
    if len <= MIN_BUFFER {
        return MIN_BUFFER;
    }
    let floor = 1usize << (usize::BITS - 1 - len.leading_zeros());
    let step = (floor / 8).max(MIN_BUFFER);
    len.div_ceil(step) * step
}

/// Receive buffers, which UCX allocates (see [`Worker::allocate`]: shared memory on one host).
struct PoolInner {
    worker: Worker,
    idle: Mutex<Vec<(BufferId, MemRegion)>>,
    next_id: AtomicU64,
}

#[derive(Clone)]
struct BufferPool {
    inner: Arc<PoolInner>,
}

impl BufferPool {
    fn new(worker: Worker) -> Self {
        BufferPool { inner: Arc::new(PoolInner { worker, idle: Mutex::new(Vec::new()), next_id: AtomicU64::new(1) }) }
    }

    async fn take(&self, len: usize) -> Result<PooledBuffer, TransferError> {
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
struct PooledBuffer {
    id: BufferId,
    region: Option<MemRegion>,
    pool: Arc<PoolInner>,
}

impl PooledBuffer {
    fn region(&self) -> &MemRegion {
        self.region.as_ref().expect("a pooled buffer holds its region until consumed")
    }

    fn into_region(mut self) -> MemRegion {
        self.region.take().expect("a pooled buffer holds its region until consumed")
    }

    /// The buffer's first `len` bytes as shared bytes; the buffer returns to its pool when the
    /// last reference is dropped. Nothing may write into it meanwhile.
    fn lend(mut self, len: usize) -> Result<Bytes, TransferError> {
        let (id, pool) = (self.id, self.pool.clone());
        let region = self.region.take().expect("a pooled buffer holds its region until consumed");
        region.into_bytes(len, move |region| PooledBuffer { id, region: Some(region), pool }.recycle()).map_err(io)
    }

    fn recycle(mut self) {
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

/// Live counters of one side (a transport or a receiver), for metrics and leak checks. Cheap to
/// clone, and valid after [`UcxReceiver::run`] has taken the receiver.
#[derive(Clone)]
pub struct UcxStats {
    pool: BufferPool,
    connections: Arc<AtomicUsize>,
}

impl std::fmt::Debug for UcxStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxStats")
            .field("buffers_in_use", &self.buffers_in_use())
            .field("buffers_registered", &self.buffers_registered())
            .field("connections", &self.connections())
            .finish()
    }
}

impl UcxStats {
    fn new(pool: BufferPool) -> Self {
        UcxStats { pool, connections: Arc::default() }
    }

    /// Registered buffers that are not idle in the pool: in use by a transfer, or held until the
    /// connection of an abandoned transfer closes. Zero once every transfer has ended cleanly.
    /// (Releases are asynchronous: poll briefly rather than expect zero the instant a transfer
    /// returns.)
    pub fn buffers_in_use(&self) -> usize {
        let idle = self.pool.inner.idle.lock().unwrap_or_else(|e| e.into_inner()).len();
        self.buffers_registered().saturating_sub(idle)
    }

    /// All registered buffers, idle ones included.
    pub fn buffers_registered(&self) -> usize {
        self.pool.inner.worker.registered_regions()
    }

    /// Connections made so far: opened by a transport, accepted by a receiver.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// Sending.

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
        if ready.len != total as u64 {
            return Err(protocol(format!("receiver expects {} bytes, the blocks hold {total}", ready.len)));
        }
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
        tokio::time::timeout(lease, self.inner.send(peer, handoff))
            .await
            .unwrap_or(Err(TransferError::LeaseExpired(lease)))
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving.

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
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = self.listener.accept() => a,
            };
            let ep = match accepted {
                Ok(ep) => ep,
                Err(e) => {
                    tracing::warn!(error = %e, "ucx kv receiver stopped accepting");
                    return;
                }
            };
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let conn = Connection { ep: Arc::new(ep), registry: self.registry.clone(), lease: self.lease, pool: self.pool.clone() };
            tokio::spawn(conn.serve(shutdown.child_token()));
        }
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
                    tokio::spawn(self.clone().transfer(xfer, body.to_vec(), end, finished_tx.clone()));
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
        let (n, block) = check_header(&h)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_by_at_most_an_eighth() {
        assert_eq!(size_class(1), MIN_BUFFER);
        assert_eq!(size_class(MIN_BUFFER), MIN_BUFFER);
        for len in [MIN_BUFFER + 1, 1 << 20, (1 << 20) + 1, 3 << 20, (5 << 30) + 7] {
            let class = size_class(len);
            assert!(class >= len && class - len <= (len / 8).max(MIN_BUFFER), "{len} -> {class}");
        }
    }

    #[test]
    fn frames_round_trip() {
        let ready = Ready { buffer: BufferId(5), addr: 9, len: 10, rkey: vec![1, 2, 3] };
        let m = AmMessage { kind: READY, data: frame(7, &ready.encode()) };
        let (xfer, body) = split(&m).unwrap();
        let ready = Ready::decode(body).unwrap();
        assert_eq!((xfer, ready.buffer, ready.addr, ready.len, ready.rkey), (7, BufferId(5), 9, 10, vec![1, 2, 3]));
        assert!(split(&AmMessage { kind: DONE, data: vec![1, 2] }).is_none());
        assert!(Ready::decode(&[0; 20]).is_err());
    }
}
