//! A small, safe, async wrapper over the parts of UCX (UCP) that Tandem's KV transport needs.
//!
//! * [`Context`]: `ucp_init` with the active-message, RMA and wakeup features.
//! * [`Worker`]: one UCP worker per context, owned by a dedicated progress thread. Every UCX call
//!   for the worker (and for its context) happens on that thread: the async handles below send it
//!   commands over a channel and wait on tokio oneshot channels that the thread completes from
//!   UCX callbacks. The worker therefore runs in `UCS_THREAD_MODE_SINGLE`, without UCX locks, and
//!   the handles are `Send + Sync`. When idle the thread sleeps on the worker's event fd
//!   (`ucp_worker_arm` + `poll`) together with an eventfd that command senders signal.
//! * [`Listener`] / [`Endpoint`]: connection establishment over socket addresses
//!   (`ucp_listener_create`, `ucp_ep_create`), with peer error handling so that a dead peer or a
//!   cut connection shows up as an error on the endpoint instead of a hang. Dropping an endpoint
//!   closes it.
//! * Active messages ([`Endpoint::send`], [`Endpoint::recv`]): a 16-bit kind plus a byte payload.
//!   Large payloads arrive through UCX's rendezvous protocol and are fetched with
//!   `ucp_am_recv_data_nbx`.
//! * [`MemRegion`]: host memory registered with `ucp_mem_map`, whose packed rkey lets a peer
//!   [`Endpoint::put`] into it or [`Endpoint::get`] from it one-sidedly; [`Endpoint::flush`]
//!   waits until those operations are complete at the target.
//!
//! Transports are chosen by UCX from the environment (`UCX_TLS`, `UCX_NET_DEVICES`, ...) or from
//! [`Context::with_options`]: shared memory and TCP everywhere, InfiniBand/RoCE verbs where
//! present.
#![deny(unsafe_op_in_unsafe_fn)]

mod context;
mod sockaddr;
mod worker;

pub use context::Context;
pub use worker::{AmMessage, Endpoint, Listener, MemRegion, RemoteKey, Worker};

use ucx_rs::sys;

/// What can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A UCX call, or an endpoint, failed with this status.
    #[error("{op}: {message}")]
    Ucx { op: &'static str, status: i8, message: &'static str },
    /// The endpoint was closed, or the peer went away after reporting its error.
    #[error("endpoint closed")]
    Closed,
    /// The progress thread is gone.
    #[error("UCX worker has stopped")]
    WorkerGone,
    /// The call itself was wrong (out-of-range offsets, a key used on another endpoint, ...).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn ucx(op: &'static str, status: sys::ucs_status_t) -> Self {
        Error::Ucx { op, status, message: ucx_rs::status_string(status) }
    }

    /// The UCX status code behind this error, if there is one.
    pub fn status(&self) -> Option<i8> {
        match self {
            Error::Ucx { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn check(op: &'static str, status: sys::ucs_status_t) -> Result<()> {
    if status == sys::ucs_status_t_UCS_OK {
        Ok(())
    } else {
        Err(Error::ucx(op, status))
    }
}
