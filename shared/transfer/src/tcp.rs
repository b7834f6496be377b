//! KV over plain TCP: the simplest transport and the baseline the others are measured against.
//!
//! One connection per transfer: `TKV1`, a length-prefixed JSON header (request, layout, tokens,
//! checksums), the blocks back to back, then the receiver's length-prefixed JSON verdict.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::wire::{check_header, deliver, Header, Verdict, MAX_HEADER};
use crate::{Handoff, HandoffRegistry, KvTransport, TransferError, TransferReport};

const MAGIC: &[u8; 4] = b"TKV1";

fn io(e: std::io::Error) -> TransferError {
    TransferError::Io(e.to_string())
}

pub(crate) async fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u32).to_le_bytes()).await?;
    s.write_all(bytes).await
}

pub(crate) async fn read_frame(s: &mut TcpStream, max: usize) -> Result<Vec<u8>, TransferError> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.map_err(io)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(TransferError::Protocol(format!("frame of {len} bytes exceeds {max}")));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.map_err(io)?;
    Ok(buf)
}

/// Sends KV blocks over TCP.
#[derive(Debug, Clone, Default)]
pub struct TcpTransport;

impl TcpTransport {
    async fn send_inner(peer: &str, h: &Handoff) -> Result<TransferReport, TransferError> {
        let started = Instant::now();
        let mut s = TcpStream::connect(peer).await.map_err(|e| TransferError::Connect { peer: peer.to_string(), reason: e.to_string() })?;
        s.set_nodelay(true).map_err(io)?;
        let header = serde_json::to_vec(&Header::of(h)).map_err(|e| TransferError::Protocol(e.to_string()))?;
        s.write_all(MAGIC).await.map_err(io)?;
        write_frame(&mut s, &header).await.map_err(io)?;
        for b in &h.kv.blocks {
            s.write_all(b).await.map_err(io)?;
        }
        s.flush().await.map_err(io)?;
        let verdict: Verdict =
            serde_json::from_slice(&read_frame(&mut s, 1 << 20).await?).map_err(|e| TransferError::Protocol(e.to_string()))?;
        verdict.into_result()?;
        Ok(TransferReport {
            transport: "tcp".into(),
            bytes: h.kv.total_bytes() as u64,
            blocks: h.kv.blocks.len() as u32,
            millis: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

#[async_trait::async_trait]
impl KvTransport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    async fn send(&self, peer: &str, handoff: &Handoff, lease: Duration) -> Result<TransferReport, TransferError> {
        tokio::time::timeout(lease, Self::send_inner(peer, handoff)).await.unwrap_or(Err(TransferError::LeaseExpired(lease)))
    }
}

/// Accepts KV blocks over TCP and hands them to the [`HandoffRegistry`].
#[derive(Debug)]
pub struct TcpReceiver {
    listener: TcpListener,
    registry: HandoffRegistry,
    lease: Duration,
}

impl TcpReceiver {
    /// `lease` bounds how long one incoming transfer may take, verdict included.
    pub fn new(listener: TcpListener, registry: HandoffRegistry, lease: Duration) -> Self {
        Self { listener, registry, lease }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` fires, then waits for the transfers in flight (each bounded by
    /// the lease) to deliver their verdicts.
    pub async fn run(self, shutdown: CancellationToken) {
        serve(self.listener, self.registry, self.lease, shutdown, "kv", |s, r| Box::pin(receive(s, r))).await
    }
}

/// One transfer read off its connection (its verdict is written by [`serve`]).
pub(crate) type Receive = for<'a> fn(
    &'a mut TcpStream,
    &'a HandoffRegistry,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), TransferError>> + Send + 'a>>;

/// Accepts connections until `shutdown` fires, runs `receive` on each within `lease` and writes
/// its verdict back, then waits for the transfers in flight. `what` names the receiver in logs.
pub(crate) async fn serve(
    listener: TcpListener,
    registry: HandoffRegistry,
    lease: Duration,
    shutdown: CancellationToken,
    what: &'static str,
    receive: Receive,
) {
    let transfers = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, receiver = what, "kv receiver accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        transfers.spawn(async move {
            let outcome = tokio::time::timeout(lease, receive(&mut stream, &registry)).await;
            let verdict = Verdict::of(&outcome.unwrap_or(Err(TransferError::LeaseExpired(lease))));
            if let Some(e) = &verdict.error {
                tracing::warn!(%peer, error = %e, receiver = what, "kv transfer refused");
            }
            if let Ok(bytes) = serde_json::to_vec(&verdict) {
                let _ = write_frame(&mut stream, &bytes).await;
            }
        });
    }
    transfers.close();
    transfers.wait().await;
}

async fn receive(s: &mut TcpStream, registry: &HandoffRegistry) -> Result<(), TransferError> {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic).await.map_err(io)?;
    if &magic != MAGIC {
        return Err(TransferError::Protocol("not a tandem kv transfer".into()));
    }
    let h: Header = serde_json::from_slice(&read_frame(s, MAX_HEADER).await?).map_err(|e| TransferError::Protocol(e.to_string()))?;
    let (n, block) = check_header(&h, false)?;
    let mut blocks = Vec::with_capacity(n);
    for _ in 0..n {
        // Straight into the importing engine's memory where it has room.
        let mut b = registry.block_buffer(block);
        s.read_exact(b.as_mut_slice()).await.map_err(io)?;
        blocks.push(b.freeze());
    }
    deliver(registry, h, blocks).await
}
