//! The worker, its progress thread, and the handles that talk to it.
//!
//! Ownership rules that keep the raw UCX objects sound:
//!
//! * Only the progress thread calls UCX. Handles send it [`Cmd`]s; replies come back on tokio
//!   oneshot channels.
//! * Every operation in flight owns (in a boxed [`Op`] passed to UCX as user data) whatever memory
//!   UCX reads or writes for it: the payload of an active message, an `Arc` of the local region and
//!   of the remote key of an RMA. The box is reclaimed exactly once: right away when the call
//!   completes or fails immediately, otherwise in the completion callback.
//! * Handles only hold an `Arc<Shared>` (the command channel); the thread holds a `Weak`, so it
//!   stops once the last handle is gone, after their close / unmap commands have been processed.
//!   Dropping that last handle waits for the thread to destroy the worker and the context, so
//!   that UCX is never torn down by the process's exit handlers while still in use.
//! * Region memory outlives its registration until no endpoint being closed can still deliver a
//!   remote write into it (see [`Progress::reap`]).
//! * Callbacks run inside `ucp_worker_progress` on the thread. They touch only [`Inbound`] (routes
//!   of incoming messages and work deferred to the loop), through a `RefCell` that the loop never
//!   keeps borrowed across a UCX call.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::c_void;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use ucx_rs::sys;

use crate::sockaddr::{from_storage, RawSockAddr};
use crate::{check, Context, Error, Result};

mod callbacks;
mod memory;
mod progress;
mod wake;

use callbacks::*;
use memory::*;
pub use memory::{MemRegion, RemoteKey};
use progress::*;
use wake::*;

/// The one UCX active-message id this crate uses; the message kind travels in its header.
const AM_ID: u32 = 0x7d;
/// How long the idle thread sleeps before looking again, should a wakeup ever be missed.
const IDLE_WAIT_MS: i32 = 100;
/// How long a stopping worker waits for its endpoint closes to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

type Reply<T> = oneshot::Sender<Result<T>>;

/// An active message as received: its kind and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmMessage {
    pub kind: u16,
    pub data: Vec<u8>,
}

enum Cmd {
    Listen { addr: SocketAddr, reply: Reply<Listener> },
    CloseListener { id: u64 },
    Connect { addr: SocketAddr, reply: Reply<Endpoint> },
    CloseEndpoint { id: u64 },
    Send { ep: u64, kind: u16, data: Vec<u8>, reply: Reply<()> },
    Rma { ep: u64, write: bool, local: Arc<RegionInner>, offset: usize, len: usize, remote: u64, rkey: Arc<RkeyInner>, reply: Reply<()> },
    PutBytes { ep: u64, data: Bytes, remote: u64, rkey: Arc<RkeyInner>, reply: Reply<()> },
    Flush { ep: u64, reply: Reply<()> },
    Register { len: usize, shared_memory: bool, reply: Reply<MemRegion> },
    Unregister { memh: usize, memory: HostMemory },
    Unpack { ep: u64, packed: Vec<u8>, reply: Reply<RemoteKey> },
    DestroyRkey { rkey: usize },
    Retain { ep: u64, region: MemRegion },
}

/// What every handle shares: the way to the progress thread.
struct Shared {
    commands: Option<mpsc::UnboundedSender<Cmd>>,
    wake: Arc<WakeFd>,
    registered: Arc<AtomicUsize>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Shared {
    fn submit(&self, cmd: Cmd) -> Result<()> {
        self.commands.as_ref().ok_or(Error::WorkerGone)?.send(cmd).map_err(|_| Error::WorkerGone)?;
        self.wake.signal();
        Ok(())
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.submit(make(tx))?;
        rx.await.unwrap_or(Err(Error::WorkerGone))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Close the channel first, then wake the thread so that it notices and stops.
        self.commands.take();
        self.wake.signal();
        // Wait for it to destroy the worker and clean up the context: UCX must not be torn down
        // by the process's exit handlers while the thread still uses it. (When the last handle
        // goes away on the progress thread itself, it simply finishes on its own.)
        let thread = self.thread.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// A UCP worker driven by its own progress thread. Cheap to clone; the thread stops when the
/// worker and every handle made from it (listeners, endpoints, regions, keys) are gone, and the
/// last of them to be dropped waits (briefly) for it to release UCX.
#[derive(Clone)]
pub struct Worker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("registered_regions", &self.registered_regions()).finish_non_exhaustive()
    }
}

impl Worker {
    /// Creates the worker on a new progress thread, which takes over `context`.
    pub fn new(context: Context) -> Result<Self> {
        let wake = Arc::new(WakeFd::new().map_err(|e| Error::Invalid(format!("eventfd: {e}")))?);
        let (tx, rx) = mpsc::unbounded_channel();
        let registered = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            commands: Some(tx),
            wake: wake.clone(),
            registered: registered.clone(),
            thread: std::sync::Mutex::new(None),
        });
        let weak = Arc::downgrade(&shared);
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("ucx-progress".into())
            .spawn(move || match Progress::start(context, weak, wake, registered) {
                Ok(mut progress) => {
                    let _ = started_tx.send(Ok(()));
                    progress.run(rx);
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::Invalid(format!("cannot start the UCX progress thread: {e}")))?;
        *shared.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        started_rx.recv().map_err(|_| Error::WorkerGone)??;
        Ok(Worker { shared })
    }

    /// Listens for connections on `addr` (port 0 picks a free port; see [`Listener::local_addr`]).
    pub async fn listen(&self, addr: SocketAddr) -> Result<Listener> {
        self.shared.call(|reply| Cmd::Listen { addr, reply }).await
    }

    /// Connects to a listener at `addr`. UCX connects in the background: a peer that cannot be
    /// reached shows up as an error from the first operation or [`Endpoint::recv`].
    pub async fn connect(&self, addr: SocketAddr) -> Result<Endpoint> {
        self.shared.call(|reply| Cmd::Connect { addr, reply }).await
    }

    /// Allocates `len` bytes of zeroed host memory and registers it for remote access.
    pub async fn register(&self, len: usize) -> Result<MemRegion> {
        if len == 0 {
            return Err(Error::Invalid("cannot register an empty region".into()));
        }
        self.shared.call(|reply| Cmd::Register { len, shared_memory: false, reply }).await
    }

    /// Like [`Worker::register`], but UCX allocates the memory, from the first allocator in
    /// `UCX_ALLOC_PRIO` that can serve it. On one host that is a shared-memory segment (`posix` or
    /// `sysv`) which a peer process maps once it unpacks the key, so that its puts are plain
    /// copies into this memory rather than messages this side must receive and copy. Falls back
    /// to [`Worker::register`]'s heap memory when UCX cannot allocate.
    pub async fn allocate(&self, len: usize) -> Result<MemRegion> {
        if len == 0 {
            return Err(Error::Invalid("cannot register an empty region".into()));
        }
        self.shared.call(|reply| Cmd::Register { len, shared_memory: true, reply }).await
    }

    /// How many regions are registered right now (released ones are unregistered asynchronously,
    /// and a region an endpoint retains stays registered until that endpoint is closed).
    pub fn registered_regions(&self) -> usize {
        self.shared.registered.load(Ordering::Acquire)
    }
}

/// Accepts connections on a socket address. Dropping it stops listening.
pub struct Listener {
    id: u64,
    addr: SocketAddr,
    shared: Arc<Shared>,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<Endpoint>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Listener {
    /// The address actually bound (with the chosen port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next connected endpoint.
    pub async fn accept(&self) -> Result<Endpoint> {
        self.incoming.lock().await.recv().await.ok_or(Error::WorkerGone)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.shared.submit(Cmd::CloseListener { id: self.id });
    }
}

struct Inbox {
    rx: mpsc::UnboundedReceiver<Result<AmMessage>>,
    error: Option<Error>,
}

/// A connection to one peer, with peer error handling. Dropping it closes the connection
/// (gracefully when healthy, forcibly after an error); operations still in flight then end with
/// an error.
pub struct Endpoint {
    id: u64,
    shared: Arc<Shared>,
    inbox: tokio::sync::Mutex<Inbox>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Sends an active message and waits until UCX is done with it locally (the payload has been
    /// sent or handed to the rendezvous protocol and fetched by the peer).
    pub async fn send(&self, kind: u16, data: Vec<u8>) -> Result<()> {
        self.shared.call(|reply| Cmd::Send { ep: self.id, kind, data, reply }).await
    }

    /// The next active message from the peer. After an endpoint error this returns that error
    /// (the peer died, the connection was cut, ...) and keeps returning it.
    pub async fn recv(&self) -> Result<AmMessage> {
        let mut inbox = self.inbox.lock().await;
        if let Some(e) = &inbox.error {
            return Err(e.clone());
        }
        let outcome = inbox.rx.recv().await.unwrap_or(Err(Error::Closed));
        if let Err(e) = &outcome {
            inbox.error = Some(e.clone());
        }
        outcome
    }

    /// Unpacks a remote key that the peer packed with [`MemRegion::rkey`], for use on this
    /// endpoint.
    pub async fn unpack_rkey(&self, packed: &[u8]) -> Result<RemoteKey> {
        let packed = packed.to_vec();
        self.shared.call(|reply| Cmd::Unpack { ep: self.id, packed, reply }).await
    }

    /// Writes `data` to the peer's memory at `remote_addr`, one-sidedly, straight from where it
    /// lies: the operation holds a reference to it until UCX is done reading, and UCX registers
    /// the memory itself where the transport needs that. Completion is local: call
    /// [`Endpoint::flush`] before telling the peer.
    pub async fn put_bytes(&self, data: Bytes, remote_addr: u64, rkey: &RemoteKey) -> Result<()> {
        if rkey.inner.ep != self.id {
            return Err(Error::Invalid("remote key was unpacked on another endpoint".into()));
        }
        if data.is_empty() {
            return Ok(());
        }
        let rkey = rkey.inner.clone();
        self.shared.call(|reply| Cmd::PutBytes { ep: self.id, data, remote: remote_addr, rkey, reply }).await
    }

    /// Writes `len` bytes of `local` from `offset` to the peer's memory at `remote_addr`,
    /// one-sidedly. Completion is local: call [`Endpoint::flush`] before telling the peer.
    pub async fn put(&self, local: &MemRegion, offset: usize, len: usize, remote_addr: u64, rkey: &RemoteKey) -> Result<()> {
        self.rma(true, local, offset, len, remote_addr, rkey).await
    }

    /// Reads `len` bytes of the peer's memory at `remote_addr` into `local` at `offset`.
    pub async fn get(&self, local: &MemRegion, offset: usize, len: usize, remote_addr: u64, rkey: &RemoteKey) -> Result<()> {
        self.rma(false, local, offset, len, remote_addr, rkey).await
    }

    async fn rma(&self, write: bool, local: &MemRegion, offset: usize, len: usize, remote: u64, rkey: &RemoteKey) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > local.len()) {
            return Err(Error::Invalid(format!("{len} bytes at {offset} do not fit a region of {}", local.len())));
        }
        if rkey.inner.ep != self.id {
            return Err(Error::Invalid("remote key was unpacked on another endpoint".into()));
        }
        let (local, rkey) = (local.inner.clone(), rkey.inner.clone());
        self.shared.call(|reply| Cmd::Rma { ep: self.id, write, local, offset, len, remote, rkey, reply }).await
    }

    /// Waits until every operation issued on this endpoint so far is complete at the peer.
    pub async fn flush(&self) -> Result<()> {
        self.shared.call(|reply| Cmd::Flush { ep: self.id, reply }).await
    }

    /// Keeps `region` registered until this endpoint is closed: for memory that the peer may
    /// still write into (a transfer that was abandoned half-way), which must not be reused or
    /// freed while the connection could deliver more.
    pub fn retain(&self, region: MemRegion) {
        let _ = self.shared.submit(Cmd::Retain { ep: self.id, region });
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.shared.submit(Cmd::CloseEndpoint { id: self.id });
    }
}
