//! KV blocks that never leave the GPU: the `cudaipc` transport, for a prefill and a decode
//! worker on the same host. The sender's blocks stay in its engine's device pool; the control
//! channel (one TCP connection, as [`crate::TcpTransport`] frames it) carries the header with the
//! pool's inter-process handle, each block's offset and device checksum, and brings back the
//! verdict. The receiver maps the pool ([`tandem_protocol::DevicePeer`]) before it delivers the
//! handoff; the decode engine then copies the blocks device to device into its own cache,
//! checksums its copies where they landed and answers. The sender keeps its blocks until the
//! verdict.
//!
//! A receiver that cannot map the pool (another host after all, no shared IPC namespace, a
//! driver that refuses) says so before anything is copied ([`ErrorCode::Unavailable`]), and the
//! sender reports it as a failure to connect: the handoff is then still whole, and the caller
//! sends it over a host transport.
//!
//! Advertised as `cudaipc://host:port#node=ID`, where ID is the receiver's
//! [`tandem_protocol::host_node_id`]: a sender on another host does not try it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_protocol::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::tcp::{read_frame, serve, write_frame};
use crate::wire::{check_header, deliver, refused, Header, Verdict, MAX_HEADER};
use crate::{Handoff, HandoffRegistry, KvTransport, TransferError, TransferReport};

const MAGIC: &[u8; 4] = b"TKD1";

/// The scheme of the transport's advertised addresses and its name in metrics.
pub const SCHEME: &str = "cudaipc";

fn io(e: std::io::Error) -> TransferError {
    TransferError::Io(e.to_string())
}

/// The control address and host of an advertised entry (`host:port#node=ID`).
pub fn split_node(addr: &str) -> (&str, Option<&str>) {
    match addr.split_once('#') {
        Some((at, frag)) => (at, frag.split('&').find_map(|kv| kv.strip_prefix("node="))),
        None => (addr, None),
    }
}

/// Whether an advertised address list offers a device handoff on the host `node`.
pub fn offers_device(list: &str, node: &str) -> bool {
    crate::parse_peer(list).iter().any(|e| e.scheme == SCHEME && split_node(&e.addr).1 == Some(node))
}

/// Sends device handoffs.
#[derive(Debug, Clone, Default)]
pub struct CudaIpcTransport;

impl CudaIpcTransport {
    async fn send_inner(peer: &str, h: &Handoff) -> Result<TransferReport, TransferError> {
        let started = Instant::now();
        let Some(device) = &h.kv.device else {
            return Err(TransferError::Connect { peer: peer.to_string(), reason: "the blocks are not in device memory".into() });
        };
        let (at, node) = split_node(peer);
        if node != Some(device.node.as_str()) {
            return Err(TransferError::Connect {
                peer: peer.to_string(),
                reason: format!("the receiver is on host {}, the blocks on {}", node.unwrap_or("(unnamed)"), device.node),
            });
        }
        let connect = |reason: String| TransferError::Connect { peer: peer.to_string(), reason };
        let mut s = TcpStream::connect(at).await.map_err(|e| connect(e.to_string()))?;
        s.set_nodelay(true).map_err(io)?;
        let header = serde_json::to_vec(&Header::of(h)).map_err(|e| TransferError::Protocol(e.to_string()))?;
        s.write_all(MAGIC).await.map_err(io)?;
        write_frame(&mut s, &header).await.map_err(io)?;
        s.flush().await.map_err(io)?;
        let verdict: Verdict =
            serde_json::from_slice(&read_frame(&mut s, 1 << 20).await?).map_err(|e| TransferError::Protocol(e.to_string()))?;
        match verdict.into_result() {
            // Refused before any copy: the handoff is whole, another transport may carry it.
            Err(TransferError::Refused { code: ErrorCode::Unavailable, message }) => return Err(connect(message)),
            other => other?,
        }
        Ok(TransferReport {
            transport: SCHEME.into(),
            bytes: h.kv.total_bytes() as u64,
            blocks: h.kv.block_count() as u32,
            millis: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

#[async_trait::async_trait]
impl KvTransport for CudaIpcTransport {
    fn name(&self) -> &'static str {
        SCHEME
    }

    fn carries_device(&self) -> bool {
        true
    }

    async fn send(&self, peer: &str, handoff: &Handoff, lease: Duration) -> Result<TransferReport, TransferError> {
        tokio::time::timeout(lease, Self::send_inner(peer, handoff)).await.unwrap_or(Err(TransferError::LeaseExpired(lease)))
    }
}

/// Accepts device handoffs and hands them to the [`HandoffRegistry`], whose
/// [`tandem_protocol::DevicePeer`] maps the senders' pools.
#[derive(Debug)]
pub struct CudaIpcReceiver {
    listener: TcpListener,
    registry: HandoffRegistry,
    lease: Duration,
    node: String,
}

impl CudaIpcReceiver {
    /// `lease` bounds one incoming handoff, the decode engine's copy and verdict included.
    pub fn new(listener: TcpListener, registry: HandoffRegistry, lease: Duration) -> Self {
        Self { listener, registry, lease, node: tandem_protocol::host_node_id() }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The host id senders compare with theirs.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Serves until `shutdown` fires, then waits for the handoffs in flight.
    pub async fn run(self, shutdown: CancellationToken) {
        serve(self.listener, self.registry, self.lease, shutdown, SCHEME, |s, r| Box::pin(receive(s, r))).await
    }
}

async fn receive(s: &mut TcpStream, registry: &HandoffRegistry) -> Result<(), TransferError> {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic).await.map_err(io)?;
    if &magic != MAGIC {
        return Err(TransferError::Protocol("not a tandem device kv handoff".into()));
    }
    let h: Header = serde_json::from_slice(&read_frame(s, MAX_HEADER).await?).map_err(|e| TransferError::Protocol(e.to_string()))?;
    let (_, block_bytes) = check_header(&h, true)?;
    let device = h.device.as_ref().expect("checked: a device header");
    let Some(peer) = registry.device_peer() else {
        return Err(refused(ErrorCode::Unavailable, "this worker's engine takes no device handoffs"));
    };
    if device.node != peer.node() {
        return Err(refused(ErrorCode::Unavailable, format!("the blocks are on host {}, this worker on {}", device.node, peer.node())));
    }
    // Mapping a pool may block on the driver for a moment, once per sender.
    let (peer, d) = (peer.clone(), device.clone());
    let opened = tokio::task::spawn_blocking(move || peer.open(&d, block_bytes)).await.map_err(|e| TransferError::Io(e.to_string()))?;
    opened.map_err(|e| refused(ErrorCode::Unavailable, format!("cannot take blocks from the sender's device pool: {e}")))?;
    deliver(registry, h, Vec::new()).await
}
