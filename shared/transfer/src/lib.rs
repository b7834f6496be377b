//! Moving KV blocks between workers: the [`KvTransport`] trait, its transports (tcp, quic), and the
//! [`HandoffRegistry`] through which a receiving decode worker matches arriving blocks to the
//! requests waiting for them. Every transfer ends in success or failure within its lease.
#![forbid(unsafe_code)]

mod cudaipc;
mod kind;
mod quic;
mod registry;
mod reshard;
mod select;
mod tcp;
mod ucx;
mod wire;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_protocol::{ErrorCode, KvExport};

pub use cudaipc::{offers_device, CudaIpcReceiver, CudaIpcTransport};
pub use kind::{bind_receiver, sender, KvReceiver, TransportKind};
pub use quic::{QuicIdentity, QuicPeer, QuicReceiver, QuicTlsConfig, QuicTransport, QuicTrust};
pub use registry::{HandoffRegistry, Incoming, PendingHandoff};
pub use reshard::{reshard, ReshardError};
pub use select::{format_peer, parse_peer, PeerAddr, TransportSet};
pub use tcp::{TcpReceiver, TcpTransport};
pub use ucx::{UcxReceiver, UcxStats, UcxTransport};

/// What travels from a prefill worker to a decode worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    pub request_id: String,
    /// The token the prefill sampled; decode feeds it first.
    pub first_token: u32,
    pub kv: KvExport,
}

/// How a finished transfer went, for metrics and traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferReport {
    pub transport: String,
    pub bytes: u64,
    pub blocks: u32,
    pub millis: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransferError {
    #[error("cannot reach {peer}: {reason}")]
    Connect { peer: String, reason: String },
    #[error("transfer lease of {0:?} expired")]
    LeaseExpired(Duration),
    #[error("connection lost: {0}")]
    Io(String),
    /// The receiver checked the blocks and would not take them; `code` says why, as the
    /// receiver classified it (a full cache, a bad block, a request no longer waiting).
    #[error("peer refused the blocks ({}): {message}", code.name())]
    Refused { code: ErrorCode, message: String },
    #[error("malformed transfer: {0}")]
    Protocol(String),
}

/// A way to push a request's KV blocks to a peer.
#[async_trait::async_trait]
pub trait KvTransport: Send + Sync {
    /// Name used in metrics and logs (`tcp`, `ucx`, `quic`, `cudaipc`).
    fn name(&self) -> &'static str;

    /// Whether it carries handoffs whose blocks stayed in device memory ([`KvExport::device`])
    /// rather than blocks in host memory; a transport carries one kind or the other.
    fn carries_device(&self) -> bool {
        false
    }

    /// Sends `handoff` to the receiver at `peer` and waits for its verdict (blocks imported, or
    /// refused). Returns within `lease`, whatever happens to the peer or the connection.
    async fn send(&self, peer: &str, handoff: &Handoff, lease: Duration) -> Result<TransferReport, TransferError>;
}
