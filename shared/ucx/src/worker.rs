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

/// A non-blocking eventfd: how command senders wake the progress thread.
struct WakeFd(OwnedFd);

impl WakeFd {
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; a non-negative return is a new descriptor that we then own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(WakeFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A full counter (EAGAIN)
        // already means "wake up", so the result needs no handling.
        unsafe { libc::write(self.0.as_raw_fd(), &one as *const u64 as *const c_void, 8) };
    }

    fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; non-blocking, so an empty counter returns EAGAIN.
        unsafe { libc::read(self.0.as_raw_fd(), &mut value as *mut u64 as *mut c_void, 8) };
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

/// Page-aligned, zeroed host memory, owned through a raw pointer so that UCX (and the peer, via
/// RMA) may write into it while Rust holds no reference to it.
struct HostMemory {
    ptr: NonNull<u8>,
    len: usize,
    /// Allocated by UCX along with its mapping, and freed by the unmap: nothing to free here.
    by_ucx: bool,
}

// SAFETY: HostMemory is an owning pointer to a plain byte buffer; it has no thread affinity.
unsafe impl Send for HostMemory {}

impl HostMemory {
    fn layout(len: usize) -> Result<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(len, 4096).map_err(|e| Error::Invalid(format!("region of {len} bytes: {e}")))
    }

    fn alloc(len: usize) -> Result<Self> {
        let layout = Self::layout(len)?;
        // SAFETY: `layout` has a non-zero size (callers reject empty regions).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::Invalid(format!("out of memory for a region of {len} bytes")))?;
        Ok(HostMemory { ptr, len, by_ucx: false })
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        if self.by_ucx {
            return;
        }
        if let Ok(layout) = Self::layout(self.len) {
            // SAFETY: allocated in `alloc` with this very layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

struct RegionInner {
    ptr: NonNull<u8>,
    len: usize,
    memh: usize,
    rkey: Vec<u8>,
    memory: Option<HostMemory>,
    shared: Arc<Shared>,
}

// SAFETY: the pointer refers to memory this struct owns (through `memory`) until drop. Rust code
// only touches it through `MemRegion::read`/`write`, which copy through raw pointers, so sharing
// the region between threads creates no Rust references to memory that UCX or a peer may write.
unsafe impl Send for RegionInner {}
// SAFETY: as above.
unsafe impl Sync for RegionInner {}

impl Drop for RegionInner {
    fn drop(&mut self) {
        if let Some(memory) = self.memory.take() {
            // Unmapping is a UCX call, so the thread does it, then frees the memory. Should the
            // thread be gone, `memory` comes back inside the failed command and is freed here.
            let _ = self.shared.submit(Cmd::Unregister { memh: self.memh, memory });
        }
    }
}

/// Host memory registered with UCX (`ucp_mem_map`), which peers can access one-sidedly given its
/// [`address`](Self::address) and packed [`rkey`](Self::rkey).
///
/// Dropping it unregisters it once no local operation uses it any more, and frees the memory once
/// no endpoint being closed can still deliver a write into it. While an endpoint stays open, its
/// peer must not write into a dropped region: over TCP and shared memory nothing would stop it
/// (RDMA hardware would reject it). Keep the region, or [`Endpoint::retain`] it, for as long as a
/// peer may still write.
pub struct MemRegion {
    inner: Arc<RegionInner>,
}

impl std::fmt::Debug for MemRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemRegion").field("address", &self.address()).field("len", &self.len()).finish_non_exhaustive()
    }
}

impl MemRegion {
    pub fn len(&self) -> usize {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// The region's address, as the peer names it in RMA operations.
    pub fn address(&self) -> u64 {
        self.inner.ptr.as_ptr() as u64
    }

    /// The packed remote key (`ucp_rkey_pack`) to send to peers.
    pub fn rkey(&self) -> &[u8] {
        &self.inner.rkey
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::Invalid(format!("{len} bytes at {offset} do not fit a region of {}", self.len()))),
        }
    }

    /// Copies `src` into the region at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: bounds checked above; the region is live while `self` is, and `src` cannot
        // overlap it because Rust never hands out references into region memory.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.inner.ptr.as_ptr().add(offset), src.len()) };
        Ok(())
    }

    /// The region's first `len` bytes as shared, immutable [`Bytes`], without copying. When the
    /// last clone is dropped, `release` gets the region back (to reuse it, or drop it).
    ///
    /// The caller promises what makes this sound: from now until `release` runs, nothing writes
    /// into the region, neither a local operation nor a peer (which only writes where it was told
    /// to, and was told of this region before and is done with it).
    pub fn into_bytes(self, len: usize, release: impl FnOnce(MemRegion) + Send + 'static) -> Result<Bytes> {
        self.check(0, len)?;
        Ok(Bytes::from_owner(RegionBytes { region: Some(self), len, release: Some(Box::new(release)) }))
    }

    /// Copies the region's bytes at `offset` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: as in `write`, in the other direction.
        unsafe { ptr::copy_nonoverlapping(self.inner.ptr.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

/// A region lent out as [`Bytes`] (see [`MemRegion::into_bytes`]).
struct RegionBytes {
    region: Option<MemRegion>,
    len: usize,
    release: Option<Box<dyn FnOnce(MemRegion) + Send>>,
}

impl AsRef<[u8]> for RegionBytes {
    fn as_ref(&self) -> &[u8] {
        match &self.region {
            // SAFETY: `len` was checked against the region, which is live while `self` is; by
            // `into_bytes`'s contract nothing writes into it while it is lent out.
            Some(region) => unsafe { std::slice::from_raw_parts(region.inner.ptr.as_ptr(), self.len) },
            None => &[],
        }
    }
}

impl Drop for RegionBytes {
    fn drop(&mut self) {
        if let (Some(region), Some(release)) = (self.region.take(), self.release.take()) {
            release(region);
        }
    }
}

struct RkeyInner {
    rkey: usize,
    ep: u64,
    shared: Arc<Shared>,
}

impl Drop for RkeyInner {
    fn drop(&mut self) {
        let _ = self.shared.submit(Cmd::DestroyRkey { rkey: self.rkey });
    }
}

/// A peer's remote key, unpacked for one endpoint. Dropping it destroys it once no operation
/// uses it any more.
pub struct RemoteKey {
    inner: Arc<RkeyInner>,
}

impl std::fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKey").field("endpoint", &self.inner.ep).finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// The progress thread.

/// Where incoming messages for one endpoint go.
#[derive(Clone)]
struct Route {
    id: u64,
    inbox: mpsc::UnboundedSender<Result<AmMessage>>,
}

/// Work that callbacks hand to the loop, because it needs UCX calls that do not belong inside
/// a callback.
enum Deferred {
    Connection { listener: u64, request: usize },
    Rendezvous { ep: usize, kind: u16, desc: usize, len: usize },
}

/// The state callbacks may touch (see the module docs).
#[derive(Default)]
struct Inbound {
    routes: HashMap<usize, Route>,
    /// Endpoints whose error UCX reported, by id. No operation may be started on them: besides
    /// being pointless, UCX 1.22 can spin forever inside `ucp_am_send_nbx` on an endpoint that
    /// failed before it ever connected. Recorded by the error callback itself, so that no command
    /// can slip in between the failure and its record.
    failed: HashMap<u64, Error>,
    deferred: Vec<Deferred>,
}

struct ListenerArg {
    inbound: *const RefCell<Inbound>,
    id: u64,
}

struct ListenerEntry {
    handle: sys::ucp_listener_h,
    _arg: Box<ListenerArg>,
    accepted: mpsc::UnboundedSender<Endpoint>,
}

struct EndpointEntry {
    ep: sys::ucp_ep_h,
    retained: Vec<MemRegion>,
}

/// An endpoint close in flight: leaves the set of closes in flight when it completes, then
/// releases the regions the endpoint retained.
struct Closing {
    id: u64,
    in_flight: Rc<RefCell<BTreeSet<u64>>>,
    _retained: Vec<MemRegion>,
}

impl Drop for Closing {
    fn drop(&mut self) {
        self.in_flight.borrow_mut().remove(&self.id);
    }
}

/// Unregistered memory waiting to be freed (see [`Progress::reap`]), with the last endpoint close
/// started when it was unregistered.
struct Unmapped {
    after_close: u64,
    memory: HostMemory,
}

/// Memory being freed by a worker flush; clears the "flush in flight" flag once done.
struct Freeing {
    busy: Rc<Cell<bool>>,
    _memory: Vec<HostMemory>,
}

impl Drop for Freeing {
    fn drop(&mut self) {
        self.busy.set(false);
    }
}

/// What an operation keeps alive until UCX is done with it.
enum Keep {
    Nothing,
    Bytes(#[allow(dead_code)] Vec<u8>),
    Rma(#[allow(dead_code)] Arc<RegionInner>, #[allow(dead_code)] Arc<RkeyInner>),
    Put(#[allow(dead_code)] Bytes, #[allow(dead_code)] Arc<RkeyInner>),
    Close(#[allow(dead_code)] Closing),
    Free(#[allow(dead_code)] Freeing),
}

/// One operation in flight, passed to UCX as the callback's user data.
struct Op {
    name: &'static str,
    reply: Option<Reply<()>>,
    _keep: Keep,
}

impl Op {
    fn complete(self, status: sys::ucs_status_t) {
        if let Some(reply) = self.reply {
            let _ = reply.send(check(self.name, status));
        }
    }
}

unsafe extern "C" fn op_done(request: *mut c_void, status: sys::ucs_status_t, user_data: *mut c_void) {
    // SAFETY: `user_data` is the `Box<Op>` leaked when the operation returned a request, and UCX
    // invokes this callback exactly once for it.
    let op = unsafe { Box::from_raw(user_data as *mut Op) };
    op.complete(status);
    // SAFETY: the request was returned by a *_nbx call and is released exactly once, here.
    unsafe { sys::ucp_request_free(request) };
}

/// A rendezvous receive in flight.
struct RecvOp {
    kind: u16,
    buf: Vec<u8>,
    inbox: mpsc::UnboundedSender<Result<AmMessage>>,
}

impl RecvOp {
    fn complete(self, status: sys::ucs_status_t, length: usize) {
        let RecvOp { kind, mut buf, inbox } = self;
        let message = check("ucp_am_recv_data_nbx", status).map(|()| {
            buf.truncate(length);
            AmMessage { kind, data: buf }
        });
        let _ = inbox.send(message);
    }
}

unsafe extern "C" fn recv_done(request: *mut c_void, status: sys::ucs_status_t, length: usize, user_data: *mut c_void) {
    // SAFETY: as in `op_done`, for the leaked `Box<RecvOp>`.
    let op = unsafe { Box::from_raw(user_data as *mut RecvOp) };
    op.complete(status, length);
    // SAFETY: as in `op_done`.
    unsafe { sys::ucp_request_free(request) };
}

unsafe extern "C" fn on_am(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: `arg` is the worker's `Inbound`, which outlives the worker; `param` is valid for
    // the duration of the callback.
    let (inbound, param) = unsafe { (&*(arg as *const RefCell<Inbound>), &*param) };
    let has_reply_ep = param.recv_attr & sys::ucp_am_recv_attr_t_UCP_AM_RECV_ATTR_FIELD_REPLY_EP as u64 != 0;
    if !has_reply_ep || header_length < 2 {
        return sys::ucs_status_t_UCS_OK; // not ours: every message of this crate names its sender
    }
    let mut kind = [0u8; 2];
    // SAFETY: the header holds at least two readable bytes.
    unsafe { ptr::copy_nonoverlapping(header as *const u8, kind.as_mut_ptr(), 2) };
    let kind = u16::from_le_bytes(kind);
    let Ok(mut inbound) = inbound.try_borrow_mut() else {
        return sys::ucs_status_t_UCS_OK;
    };
    let ep = param.reply_ep as usize;
    let Some(route) = inbound.routes.get(&ep) else {
        return sys::ucs_status_t_UCS_OK; // the endpoint is being closed
    };
    if param.recv_attr & sys::ucp_am_recv_attr_t_UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0 {
        // The payload is still at the sender: keep the descriptor and fetch it from the loop.
        inbound.deferred.push(Deferred::Rendezvous { ep, kind, desc: data as usize, len: length });
        return sys::ucs_status_t_UCS_INPROGRESS;
    }
    let payload = if length == 0 {
        Vec::new()
    } else {
        // SAFETY: for a non-rendezvous message `data` points to `length` readable bytes for the
        // duration of the callback.
        unsafe { std::slice::from_raw_parts(data as *const u8, length) }.to_vec()
    };
    let _ = route.inbox.send(Ok(AmMessage { kind, data: payload }));
    sys::ucs_status_t_UCS_OK
}

unsafe extern "C" fn on_ep_error(arg: *mut c_void, ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    // SAFETY: `arg` is the worker's `Inbound`, which outlives every endpoint.
    let inbound = unsafe { &*(arg as *const RefCell<Inbound>) };
    if let Ok(mut inbound) = inbound.try_borrow_mut() {
        if let Some(route) = inbound.routes.remove(&(ep as usize)) {
            let error = Error::ucx("endpoint", status);
            let _ = route.inbox.send(Err(error.clone()));
            inbound.failed.insert(route.id, error);
        }
    }
}

unsafe extern "C" fn on_connection(request: sys::ucp_conn_request_h, arg: *mut c_void) {
    // SAFETY: `arg` is the listener's boxed `ListenerArg`, alive until the listener is destroyed,
    // and its `inbound` outlives the worker.
    let (id, inbound) = unsafe {
        let arg = &*(arg as *const ListenerArg);
        (arg.id, &*arg.inbound)
    };
    if let Ok(mut inbound) = inbound.try_borrow_mut() {
        inbound.deferred.push(Deferred::Connection { listener: id, request: request as usize });
    }
}

fn decode(status: sys::ucs_status_ptr_t) -> std::result::Result<bool, sys::ucs_status_t> {
    ucx_rs::decode_status_ptr(status).map(|request| request.is_some())
}

struct Progress {
    worker: sys::ucp_worker_h,
    efd: Option<RawFd>,
    wake: Arc<WakeFd>,
    shared: Weak<Shared>,
    registered: Arc<AtomicUsize>,
    inbound: Box<RefCell<Inbound>>,
    endpoints: HashMap<u64, EndpointEntry>,
    listeners: HashMap<u64, ListenerEntry>,
    /// Endpoint closes in flight, by sequence number.
    closing: Rc<RefCell<BTreeSet<u64>>>,
    close_seq: u64,
    unmapped: VecDeque<Unmapped>,
    freeing: Rc<Cell<bool>>,
    next_id: u64,
    // Dropped last (declared last): the context outlives the worker.
    context: Context,
}

impl Progress {
    fn start(context: Context, shared: Weak<Shared>, wake: Arc<WakeFd>, registered: Arc<AtomicUsize>) -> Result<Self> {
        let params = sys::ucp_worker_params_t {
            field_mask: sys::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64,
            // Only this thread ever touches the worker.
            thread_mode: sys::ucs_thread_mode_t_UCS_THREAD_MODE_SINGLE,
            ..Default::default()
        };
        let mut worker = ptr::null_mut();
        // SAFETY: the context is live; `params` is valid for the call; `worker` receives the handle.
        check("ucp_worker_create", unsafe { sys::ucp_worker_create(context.raw(), &params, &mut worker) })?;
        let mut progress = Progress {
            worker,
            efd: None,
            wake,
            shared,
            registered,
            inbound: Box::default(),
            endpoints: HashMap::new(),
            listeners: HashMap::new(),
            closing: Rc::default(),
            close_seq: 0,
            unmapped: VecDeque::new(),
            freeing: Rc::default(),
            next_id: 1,
            context,
        };
        let handler = sys::ucp_am_handler_param_t {
            field_mask: (sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ID
                | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_FLAGS
                | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_CB
                | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ARG) as u64,
            id: AM_ID,
            flags: sys::ucp_am_cb_flags_UCP_AM_FLAG_WHOLE_MSG,
            cb: Some(on_am),
            arg: progress.inbound_ptr() as *mut c_void,
        };
        // SAFETY: the worker is live and `arg` (the boxed Inbound) outlives it.
        check("ucp_worker_set_am_recv_handler", unsafe { sys::ucp_worker_set_am_recv_handler(worker, &handler) })?;
        let mut efd: libc::c_int = -1;
        // SAFETY: the worker is live; the fd stays owned by the worker.
        if unsafe { sys::ucp_worker_get_efd(worker, &mut efd) } == sys::ucs_status_t_UCS_OK && efd >= 0 {
            progress.efd = Some(efd);
        } else {
            tracing::warn!("UCX worker has no event fd; the progress thread will poll");
        }
        Ok(progress)
    }

    fn inbound_ptr(&self) -> *const RefCell<Inbound> {
        &*self.inbound as *const RefCell<Inbound>
    }

    fn run(&mut self, mut commands: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            let mut busy = false;
            loop {
                match commands.try_recv() {
                    Ok(cmd) => {
                        self.handle(cmd);
                        busy = true;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return self.stop(),
                }
            }
            for _ in 0..64 {
                // SAFETY: the worker is live and this is its only thread.
                if unsafe { sys::ucp_worker_progress(self.worker) } == 0 {
                    break;
                }
                busy = true;
            }
            busy |= self.run_deferred();
            busy |= self.reap();
            if !busy {
                self.wait();
            }
        }
    }

    /// Sleeps until UCX or a command sender has something for us.
    fn wait(&self) {
        let mut fds = [
            libc::pollfd { fd: self.wake.0.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.efd.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
        ];
        let (count, timeout) = match self.efd {
            Some(_) => {
                // SAFETY: the worker is live and this is its only thread.
                match unsafe { sys::ucp_worker_arm(self.worker) } {
                    sys::ucs_status_t_UCS_OK => (2, IDLE_WAIT_MS),
                    sys::ucs_status_t_UCS_ERR_BUSY => return, // events are pending: progress again
                    _ => (1, 1),
                }
            }
            None => (1, 1),
        };
        // SAFETY: `fds` is a live array of at least `count` pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), count, timeout) };
        self.wake.drain();
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Listen { addr, reply } => {
                let _ = reply.send(self.listen(addr));
            }
            Cmd::CloseListener { id } => {
                if let Some(entry) = self.listeners.remove(&id) {
                    // SAFETY: the listener is live and destroyed once; its callback argument is
                    // freed only afterwards, when `entry` drops.
                    unsafe { sys::ucp_listener_destroy(entry.handle) };
                }
            }
            Cmd::Connect { addr, reply } => {
                let _ = reply.send(self.connect(addr));
            }
            Cmd::CloseEndpoint { id } => self.close_endpoint(id, false),
            Cmd::Send { ep, kind, data, reply } => self.send(ep, kind, data, reply),
            Cmd::Rma { ep, write, local, offset, len, remote, rkey, reply } => self.rma(ep, write, local, offset, len, remote, rkey, reply),
            Cmd::PutBytes { ep, data, remote, rkey, reply } => self.put_bytes(ep, data, remote, rkey, reply),
            Cmd::Flush { ep, reply } => self.flush(ep, reply),
            Cmd::Register { len, shared_memory, reply } => {
                let _ = reply.send(self.register(len, shared_memory));
            }
            Cmd::Unregister { memh, memory } => {
                // SAFETY: `memh` maps `memory`, which is still allocated; unmapped once. The
                // memory itself is freed later, by `reap`.
                let status = unsafe { sys::ucp_mem_unmap(self.context.raw(), memh as sys::ucp_mem_h) };
                if status != sys::ucs_status_t_UCS_OK {
                    tracing::warn!(status = ucx_rs::status_string(status), "ucp_mem_unmap failed");
                }
                self.registered.fetch_sub(1, Ordering::AcqRel);
                self.unmapped.push_back(Unmapped { after_close: self.close_seq, memory });
            }
            Cmd::Unpack { ep, packed, reply } => {
                let _ = reply.send(self.unpack(ep, &packed));
            }
            Cmd::DestroyRkey { rkey } => {
                // SAFETY: the key came from ucp_ep_rkey_unpack on this worker and no operation
                // uses it any more (operations hold the key's Arc); destroyed once.
                unsafe { sys::ucp_rkey_destroy(rkey as sys::ucp_rkey_h) };
            }
            Cmd::Retain { ep, region } => match self.endpoints.get_mut(&ep) {
                Some(entry) => entry.retained.push(region),
                None => drop(region), // already closed: nothing can write into it any more
            },
        }
    }

    fn handle_for<T>(&self, make: impl FnOnce(Arc<Shared>) -> T) -> Result<T> {
        self.shared.upgrade().map(make).ok_or(Error::WorkerGone)
    }

    fn listen(&mut self, addr: SocketAddr) -> Result<Listener> {
        let id = self.next_id();
        let arg = Box::new(ListenerArg { inbound: self.inbound_ptr(), id });
        let raw = RawSockAddr::new(addr);
        let params = sys::ucp_listener_params_t {
            field_mask: (sys::ucp_listener_params_field_UCP_LISTENER_PARAM_FIELD_SOCK_ADDR
                | sys::ucp_listener_params_field_UCP_LISTENER_PARAM_FIELD_CONN_HANDLER) as u64,
            sockaddr: raw.as_ucs(),
            conn_handler: sys::ucp_listener_conn_handler_t {
                cb: Some(on_connection),
                arg: &*arg as *const ListenerArg as *mut c_void,
            },
            ..Default::default()
        };
        let mut handle = ptr::null_mut();
        // SAFETY: the worker is live; the socket address is valid for the call (UCX copies it);
        // the handler argument is boxed and kept until the listener is destroyed.
        check("ucp_listener_create", unsafe { sys::ucp_listener_create(self.worker, &params, &mut handle) })?;
        let mut attr = sys::ucp_listener_attr_t {
            field_mask: sys::ucp_listener_attr_field_UCP_LISTENER_ATTR_FIELD_SOCKADDR as u64,
            ..Default::default()
        };
        // SAFETY: the listener was just created; `attr` is a valid out-parameter.
        let bound = match check("ucp_listener_query", unsafe { sys::ucp_listener_query(handle, &mut attr) }) {
            Ok(()) => from_storage(&attr.sockaddr).unwrap_or(addr),
            Err(e) => {
                // SAFETY: destroying the listener we just created, once.
                unsafe { sys::ucp_listener_destroy(handle) };
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.listeners.insert(id, ListenerEntry { handle, _arg: arg, accepted: tx });
        self.handle_for(|shared| Listener { id, addr: bound, shared, incoming: tokio::sync::Mutex::new(rx) })
    }

    fn err_handler(&self) -> sys::ucp_err_handler_t {
        sys::ucp_err_handler_t { cb: Some(on_ep_error), arg: self.inbound_ptr() as *mut c_void }
    }

    fn connect(&mut self, addr: SocketAddr) -> Result<Endpoint> {
        let raw = RawSockAddr::new(addr);
        let params = sys::ucp_ep_params_t {
            field_mask: (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_FLAGS
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_SOCK_ADDR
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64,
            flags: sys::ucp_ep_params_flags_field_UCP_EP_PARAMS_FLAGS_CLIENT_SERVER,
            sockaddr: raw.as_ucs(),
            err_mode: sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER,
            err_handler: self.err_handler(),
            ..Default::default()
        };
        let mut ep = ptr::null_mut();
        // SAFETY: the worker is live; the address is valid for the call; the error handler's
        // argument (the boxed Inbound) outlives the endpoint.
        check("ucp_ep_create", unsafe { sys::ucp_ep_create(self.worker, &params, &mut ep) })?;
        self.adopt(ep)
    }

    fn accept(&mut self, listener: u64, request: sys::ucp_conn_request_h) {
        let Some(entry) = self.listeners.get(&listener) else {
            return;
        };
        let accepted = entry.accepted.clone();
        let params = sys::ucp_ep_params_t {
            field_mask: (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_CONN_REQUEST
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64,
            conn_request: request,
            err_mode: sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER,
            err_handler: self.err_handler(),
            ..Default::default()
        };
        let mut ep = ptr::null_mut();
        // SAFETY: the connection request came from this worker's listener callback and is
        // consumed exactly once, here.
        let status = unsafe { sys::ucp_ep_create(self.worker, &params, &mut ep) };
        if status != sys::ucs_status_t_UCS_OK {
            tracing::warn!(status = ucx_rs::status_string(status), "cannot accept a UCX connection");
            return;
        }
        match self.adopt(ep) {
            // If nobody accepts any more, dropping the endpoint queues its close.
            Ok(endpoint) => drop(accepted.send(endpoint)),
            Err(e) => tracing::debug!(error = %e, "accepted a UCX connection while stopping"),
        }
    }

    /// Registers a new endpoint's route and wraps it in a handle.
    fn adopt(&mut self, ep: sys::ucp_ep_h) -> Result<Endpoint> {
        let id = self.next_id();
        let (tx, rx) = mpsc::unbounded_channel();
        self.inbound.borrow_mut().routes.insert(ep as usize, Route { id, inbox: tx });
        self.endpoints.insert(id, EndpointEntry { ep, retained: Vec::new() });
        match self.shared.upgrade() {
            Some(shared) => Ok(Endpoint { id, shared, inbox: tokio::sync::Mutex::new(Inbox { rx, error: None }) }),
            None => {
                self.close_endpoint(id, true);
                Err(Error::WorkerGone)
            }
        }
    }

    fn close_endpoint(&mut self, id: u64, force: bool) {
        let Some(entry) = self.endpoints.remove(&id) else {
            return;
        };
        let failed = {
            let mut inbound = self.inbound.borrow_mut();
            inbound.routes.remove(&(entry.ep as usize));
            inbound.failed.remove(&id).is_some()
        };
        // A failed endpoint can only be released forcibly; a healthy one is flushed and
        // disconnected from the peer.
        let force = force || failed;
        self.close_seq += 1;
        self.closing.borrow_mut().insert(self.close_seq);
        let op = Op {
            name: "ucp_ep_close_nbx",
            reply: None,
            _keep: Keep::Close(Closing { id: self.close_seq, in_flight: self.closing.clone(), _retained: entry.retained }),
        };
        let flags = if force { sys::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE } else { 0 };
        let (op, param) = Self::op_param(op, flags);
        // SAFETY: the endpoint is live and closed once; `param` carries the boxed op, reclaimed
        // below or in `op_done`.
        let status = unsafe { sys::ucp_ep_close_nbx(entry.ep, &param) };
        self.finish(status, op);
    }

    /// The request parameters for a boxed op with the completion callback; returns the leaked box.
    fn op_param(op: Op, flags: u32) -> (*mut Op, sys::ucp_request_param_t) {
        let op = Box::into_raw(Box::new(op));
        let mut param = sys::ucp_request_param_t {
            op_attr_mask: sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_CALLBACK | sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_USER_DATA,
            user_data: op as *mut c_void,
            ..Default::default()
        };
        param.cb.send = Some(op_done);
        if flags != 0 {
            param.op_attr_mask |= sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
            param.flags = flags;
        }
        (op, param)
    }

    /// Settles an op after its *_nbx call: done or failed now (the callback will not run, so the
    /// box is reclaimed here), or in progress (the callback owns the box).
    fn finish(&self, status: sys::ucs_status_ptr_t, op: *mut Op) {
        let outcome = decode(status);
        if outcome != Ok(true) {
            // SAFETY: no request was created, so UCX will not call `op_done`: this is the only
            // owner of the box.
            let op = unsafe { Box::from_raw(op) };
            op.complete(outcome.err().unwrap_or(sys::ucs_status_t_UCS_OK));
        }
    }

    /// A live, healthy endpoint to start an operation on.
    fn endpoint(&self, id: u64) -> Result<sys::ucp_ep_h> {
        let entry = self.endpoints.get(&id).ok_or(Error::Closed)?;
        match self.inbound.borrow().failed.get(&id) {
            Some(e) => Err(e.clone()),
            None => Ok(entry.ep),
        }
    }

    fn send(&mut self, ep: u64, kind: u16, data: Vec<u8>, reply: Reply<()>) {
        let ep = match self.endpoint(ep) {
            Ok(ep) => ep,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let (ptr, len) = (data.as_ptr(), data.len());
        let header = kind.to_le_bytes();
        let op = Op { name: "ucp_am_send_nbx", reply: Some(reply), _keep: Keep::Bytes(data) };
        let flags = sys::ucp_send_am_flags_UCP_AM_SEND_FLAG_REPLY | sys::ucp_send_am_flags_UCP_AM_SEND_FLAG_COPY_HEADER;
        let (op, param) = Self::op_param(op, flags);
        // SAFETY: the endpoint is live; the header is copied during the call (COPY_HEADER); the
        // payload is owned by the op, which lives until the send completes.
        let status = unsafe { sys::ucp_am_send_nbx(ep, AM_ID, header.as_ptr() as *const c_void, 2, ptr as *const c_void, len, &param) };
        self.finish(status, op);
    }

    #[allow(clippy::too_many_arguments)]
    fn rma(&mut self, ep: u64, write: bool, local: Arc<RegionInner>, offset: usize, len: usize, remote: u64, rkey: Arc<RkeyInner>, reply: Reply<()>) {
        let ep = match self.endpoint(ep) {
            Ok(ep) => ep,
            Err(e) => return drop(reply.send(Err(e))),
        };
        // SAFETY: `Endpoint::rma` checked that offset + len fits the region.
        let buffer = unsafe { local.ptr.as_ptr().add(offset) } as *mut c_void;
        let (memh, key) = (local.memh as sys::ucp_mem_h, rkey.rkey as sys::ucp_rkey_h);
        let name = if write { "ucp_put_nbx" } else { "ucp_get_nbx" };
        let op = Op { name, reply: Some(reply), _keep: Keep::Rma(local, rkey) };
        let (op, mut param) = Self::op_param(op, 0);
        param.op_attr_mask |= sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_MEMH;
        param.memh = memh;
        // SAFETY: the endpoint and key are live; the local range is inside a registered region
        // that the op keeps alive (with the key) until the operation completes.
        let status = unsafe {
            if write {
                sys::ucp_put_nbx(ep, buffer, len, remote, key, &param)
            } else {
                sys::ucp_get_nbx(ep, buffer, len, remote, key, &param)
            }
        };
        self.finish(status, op);
    }

    fn put_bytes(&mut self, ep: u64, data: Bytes, remote: u64, rkey: Arc<RkeyInner>, reply: Reply<()>) {
        let ep = match self.endpoint(ep) {
            Ok(ep) => ep,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let (buffer, len, key) = (data.as_ptr() as *const c_void, data.len(), rkey.rkey as sys::ucp_rkey_h);
        let op = Op { name: "ucp_put_nbx", reply: Some(reply), _keep: Keep::Put(data, rkey) };
        let (op, param) = Self::op_param(op, 0);
        // SAFETY: the endpoint and key are live; the source bytes are immutable and owned by the
        // op (with the key) until the operation completes.
        let status = unsafe { sys::ucp_put_nbx(ep, buffer, len, remote, key, &param) };
        self.finish(status, op);
    }

    fn flush(&mut self, ep: u64, reply: Reply<()>) {
        let ep = match self.endpoint(ep) {
            Ok(ep) => ep,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let (op, param) = Self::op_param(Op { name: "ucp_ep_flush_nbx", reply: Some(reply), _keep: Keep::Nothing }, 0);
        // SAFETY: the endpoint is live; the op is reclaimed in `finish` or `op_done`.
        let status = unsafe { sys::ucp_ep_flush_nbx(ep, &param) };
        self.finish(status, op);
    }

    fn register(&mut self, len: usize, shared_memory: bool) -> Result<MemRegion> {
        let (memh, memory) = match shared_memory.then(|| self.map_allocated(len)).flatten() {
            Some(mapped) => mapped,
            None => self.map_heap(len)?,
        };
        let mut packed = ptr::null_mut();
        let mut size = 0usize;
        // SAFETY: `memh` was just mapped on this context; on success `packed` holds `size` bytes
        // that we copy and release.
        let status = unsafe { sys::ucp_rkey_pack(self.context.raw(), memh, &mut packed, &mut size) };
        if status != sys::ucs_status_t_UCS_OK {
            // SAFETY: undoing the mapping made above, once.
            unsafe { sys::ucp_mem_unmap(self.context.raw(), memh) };
            return Err(Error::ucx("ucp_rkey_pack", status));
        }
        // SAFETY: see above.
        let rkey = unsafe { std::slice::from_raw_parts(packed as *const u8, size) }.to_vec();
        // SAFETY: the packed buffer came from ucp_rkey_pack and is released once.
        unsafe { sys::ucp_rkey_buffer_release(packed) };
        self.registered.fetch_add(1, Ordering::AcqRel);
        let ptr = memory.ptr;
        let inner = |shared| RegionInner { ptr, len, memh: memh as usize, rkey, memory: Some(memory), shared };
        match self.shared.upgrade() {
            Some(shared) => Ok(MemRegion { inner: Arc::new(inner(shared)) }),
            None => Err(Error::WorkerGone), // unreachable while a command is being served
        }
    }

    /// Heap memory of `len` zeroed bytes, mapped for remote access.
    fn map_heap(&mut self, len: usize) -> Result<(sys::ucp_mem_h, HostMemory)> {
        let memory = HostMemory::alloc(len)?;
        let params = sys::ucp_mem_map_params_t {
            field_mask: (sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH) as u64,
            address: memory.ptr.as_ptr() as *mut c_void,
            length: len,
            ..Default::default()
        };
        let mut memh = ptr::null_mut();
        // SAFETY: the range is allocated and stays so until after the matching unmap.
        check("ucp_mem_map", unsafe { sys::ucp_mem_map(self.context.raw(), &params, &mut memh) })?;
        Ok((memh, memory))
    }

    /// Memory that UCX allocates and maps itself (see [`Worker::allocate`]); `None` when it
    /// cannot, or when what it allocated is not plain host memory of at least `len` bytes.
    fn map_allocated(&mut self, len: usize) -> Option<(sys::ucp_mem_h, HostMemory)> {
        let params = sys::ucp_mem_map_params_t {
            field_mask: (sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH
                | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_FLAGS) as u64,
            length: len,
            flags: sys::UCP_MEM_MAP_ALLOCATE as u32,
            ..Default::default()
        };
        let mut memh = ptr::null_mut();
        // SAFETY: no address is given, so UCX allocates; the handle is unmapped once, by the
        // region's drop (or just below).
        if unsafe { sys::ucp_mem_map(self.context.raw(), &params, &mut memh) } != sys::ucs_status_t_UCS_OK {
            return None;
        }
        let mut attr = sys::ucp_mem_attr_t {
            field_mask: (sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_ADDRESS | sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_LENGTH) as u64,
            ..Default::default()
        };
        // SAFETY: `memh` was just mapped; `attr` is writable.
        let queried = unsafe { sys::ucp_mem_query(memh, &mut attr) } == sys::ucs_status_t_UCS_OK;
        match NonNull::new(attr.address as *mut u8).filter(|_| queried && attr.length >= len) {
            Some(ptr) => Some((memh, HostMemory { ptr, len, by_ucx: true })),
            None => {
                // SAFETY: undoing the mapping made above, once.
                unsafe { sys::ucp_mem_unmap(self.context.raw(), memh) };
                None
            }
        }
    }

    fn unpack(&mut self, id: u64, packed: &[u8]) -> Result<RemoteKey> {
        let ep = self.endpoint(id)?;
        let mut rkey = ptr::null_mut();
        // SAFETY: the endpoint is live; `packed` is readable for the call.
        check("ucp_ep_rkey_unpack", unsafe { sys::ucp_ep_rkey_unpack(ep, packed.as_ptr() as *const c_void, &mut rkey) })?;
        let key = rkey as usize;
        match self.shared.upgrade() {
            Some(shared) => Ok(RemoteKey { inner: Arc::new(RkeyInner { rkey: key, ep: id, shared }) }),
            None => {
                // SAFETY: destroying the key just unpacked, once.
                unsafe { sys::ucp_rkey_destroy(rkey) };
                Err(Error::WorkerGone)
            }
        }
    }

    /// Acts on what callbacks deferred; true if there was anything.
    fn run_deferred(&mut self) -> bool {
        let deferred = std::mem::take(&mut self.inbound.borrow_mut().deferred);
        let any = !deferred.is_empty();
        for item in deferred {
            match item {
                Deferred::Connection { listener, request } => self.accept(listener, request as sys::ucp_conn_request_h),
                Deferred::Rendezvous { ep, kind, desc, len } => self.fetch(ep, kind, desc as *mut c_void, len),
            }
        }
        any
    }

    /// Fetches the payload of a rendezvous active message.
    fn fetch(&mut self, ep: usize, kind: u16, desc: *mut c_void, len: usize) {
        let route = self.inbound.borrow().routes.get(&ep).cloned();
        let Some(route) = route else {
            // SAFETY: the descriptor was kept (UCS_INPROGRESS) and is released once, here.
            unsafe { sys::ucp_am_data_release(self.worker, desc) };
            return;
        };
        let mut op = Box::new(RecvOp { kind, buf: vec![0u8; len], inbox: route.inbox });
        let buf = op.buf.as_mut_ptr() as *mut c_void;
        let op = Box::into_raw(op);
        let mut param = sys::ucp_request_param_t {
            op_attr_mask: sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_CALLBACK | sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_USER_DATA,
            user_data: op as *mut c_void,
            ..Default::default()
        };
        param.cb.recv_am = Some(recv_done);
        // SAFETY: the descriptor is a kept rendezvous descriptor of this worker (UCX takes it
        // over); the buffer holds `len` bytes and is owned by the op until completion.
        let status = unsafe { sys::ucp_am_recv_data_nbx(self.worker, desc, buf, len, &param) };
        match decode(status) {
            Ok(true) => {} // `recv_done` completes it
            outcome => {
                // SAFETY: no request was created, so `recv_done` will not run.
                let op = unsafe { Box::from_raw(op) };
                op.complete(outcome.err().unwrap_or(sys::ucs_status_t_UCS_OK), len);
            }
        }
    }

    /// Frees unregistered memory once nothing can write into it any more.
    ///
    /// Over TCP and shared memory, a remote put is a plain copy into the address the peer names:
    /// nothing checks it against registrations. An endpoint being closed (for instance dropped
    /// together with a region its peer was writing into) can still deliver such data until its
    /// transport endpoints are destroyed, which UCX finishes in the background. So memory
    /// unregistered while a close was in flight waits for that close, then for a worker flush,
    /// which completes only once UCX has destroyed the transport endpoints it was discarding.
    /// (Writes from a peer whose endpoint stays open are the protocol's business: see
    /// [`Endpoint::retain`].)
    fn reap(&mut self) -> bool {
        if self.freeing.get() || self.unmapped.is_empty() {
            return false;
        }
        let oldest_close = self.closing.borrow().first().copied();
        let mut memory = Vec::new();
        while let Some(next) = self.unmapped.front() {
            if oldest_close.is_some_and(|oldest| oldest <= next.after_close) {
                break;
            }
            memory.extend(self.unmapped.pop_front().map(|u| u.memory));
        }
        if memory.is_empty() {
            return false;
        }
        self.freeing.set(true);
        let op = Op { name: "ucp_worker_flush_nbx", reply: None, _keep: Keep::Free(Freeing { busy: self.freeing.clone(), _memory: memory }) };
        let (op, param) = Self::op_param(op, 0);
        // SAFETY: the worker is live; the op (owning the memory to free) is reclaimed in `finish`
        // or `op_done`.
        let status = unsafe { sys::ucp_worker_flush_nbx(self.worker, &param) };
        self.finish(status, op);
        true
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Every handle is gone: release what is left and let UCX finish its closes.
    fn stop(&mut self) {
        for (_, entry) in self.listeners.drain() {
            // SAFETY: live listener, destroyed once.
            unsafe { sys::ucp_listener_destroy(entry.handle) };
        }
        let ids: Vec<u64> = self.endpoints.keys().copied().collect();
        for id in ids {
            self.close_endpoint(id, true);
        }
        let deadline = Instant::now() + CLOSE_GRACE;
        while !self.closing.borrow().is_empty() && Instant::now() < deadline {
            // SAFETY: live worker, its own thread.
            if unsafe { sys::ucp_worker_progress(self.worker) } == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let pending = self.closing.borrow().len();
        if pending > 0 {
            tracing::warn!(pending, "UCX endpoint closes did not finish before the worker stopped");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // SAFETY: the worker is live and destroyed once, on its own thread. The memory still
        // waiting in `unmapped` is freed after this body (nothing can write into it any more),
        // and the context is cleaned up last.
        unsafe { sys::ucp_worker_destroy(self.worker) };
    }
}
