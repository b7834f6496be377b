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

mod pool;
mod receive;
mod send;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tandem_ucx::{AmMessage, Context};

use crate::TransferError;
use pool::BufferPool;

pub use receive::UcxReceiver;
pub use send::UcxTransport;

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
const UCX_DEFAULTS: [(&str, &str); 2] = [("POSIX_ERROR_HANDLING", "y"), ("ALLOC_PRIO", "md:posix,md:sysv,huge,thp,md:*,mmap,heap")];

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

    /// Checks a READY against the payload about to be put: the length the sender has, in an
    /// address range that exists (a receiver naming a buffer that ends past `u64::MAX` would make
    /// the put offsets overflow).
    fn check(&self, total: usize) -> Result<(), TransferError> {
        if self.len != total as u64 {
            return Err(protocol(format!("receiver expects {} bytes, the blocks hold {total}", self.len)));
        }
        if self.addr.checked_add(self.len).is_none() {
            return Err(protocol(format!("receiver's buffer at {:#x} of {} bytes ends past the address space", self.addr, self.len)));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::pool::size_class;
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

    #[test]
    fn a_ready_past_the_end_of_the_address_space_is_refused() {
        let ready = |addr, len| Ready { buffer: BufferId(1), addr, len, rkey: vec![] };
        assert!(ready(4096, 100).check(100).is_ok());
        assert!(ready(4096, 100).check(99).is_err());
        let err = ready(u64::MAX - 10, 100).check(100).unwrap_err();
        assert!(err.to_string().contains("past the address space"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 512, failure_persistence: None, ..Default::default() })]

        /// A READY or any other message from a peer, as arbitrary bytes: decoded or refused,
        /// never a panic; what decodes is checked before any put.
        #[test]
        fn arbitrary_ready_messages_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), total in 0usize..1 << 20) {
            let m = AmMessage { kind: READY, data };
            if let Some((_, body)) = split(&m) {
                if let Ok(ready) = Ready::decode(body) {
                    if ready.check(total).is_ok() {
                        proptest::prop_assert!(ready.addr.checked_add(total as u64).is_some());
                    }
                }
            }
        }
    }
}
