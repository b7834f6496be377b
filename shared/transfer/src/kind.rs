//! The transports by name, and the receiving side of each behind one trait, so that a decode
//! worker builds and owns its receivers from its configuration alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    CudaIpcReceiver, CudaIpcTransport, HandoffRegistry, KvTransport, QuicIdentity, QuicReceiver, QuicTransport, QuicTrust, TcpReceiver,
    TcpTransport, TransferError, UcxReceiver, UcxTransport,
};

/// A KV transport, as configuration and advertised addresses name it. The order of the variants
/// is the order of preference when both sides offer several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum TransportKind {
    /// Device to device on one host: the blocks stay on the GPU ([`crate::CudaIpcTransport`]).
    #[value(name = "cudaipc")]
    CudaIpc,
    Ucx,
    Quic,
    Tcp,
}

impl TransportKind {
    /// The scheme of its advertised addresses (`ucx://…`), and its name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::CudaIpc => crate::cudaipc::SCHEME,
            Self::Ucx => "ucx",
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `host` as it stands before `:port`: an IPv6 address in brackets.
fn bracketed(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// The receiving side of one transport: bound, and ready to serve.
#[async_trait::async_trait]
pub trait KvReceiver: Send {
    fn kind(&self) -> TransportKind;

    /// The entry senders reach it at (`scheme://host:port`, plus whatever a sender needs to
    /// trust it).
    fn advertised(&self) -> std::io::Result<String>;

    /// The same entry naming `host` (a name or address that leads here), for a receiver bound to
    /// a wildcard address, as in a container: the port stays the bound one.
    fn advertised_at(&self, host: &str) -> std::io::Result<String>;

    /// Delivers arriving blocks into its registry until `shutdown` fires.
    async fn run(self: Box<Self>, shutdown: CancellationToken);
}

#[async_trait::async_trait]
impl KvReceiver for TcpReceiver {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn advertised(&self) -> std::io::Result<String> {
        Ok(format!("tcp://{}", self.local_addr()?))
    }

    fn advertised_at(&self, host: &str) -> std::io::Result<String> {
        Ok(format!("tcp://{}:{}", bracketed(host), self.local_addr()?.port()))
    }

    async fn run(self: Box<Self>, shutdown: CancellationToken) {
        TcpReceiver::run(*self, shutdown).await
    }
}

#[async_trait::async_trait]
impl KvReceiver for QuicReceiver {
    fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }

    fn advertised(&self) -> std::io::Result<String> {
        self.advertised_addr().map(|a| if a.starts_with("quic://") { a } else { format!("quic://{a}") })
    }

    fn advertised_at(&self, host: &str) -> std::io::Result<String> {
        self.advertised_addr_for(host).map(|a| if a.starts_with("quic://") { a } else { format!("quic://{a}") })
    }

    async fn run(self: Box<Self>, shutdown: CancellationToken) {
        QuicReceiver::run(*self, shutdown).await
    }
}

#[async_trait::async_trait]
impl KvReceiver for CudaIpcReceiver {
    fn kind(&self) -> TransportKind {
        TransportKind::CudaIpc
    }

    fn advertised(&self) -> std::io::Result<String> {
        Ok(format!("cudaipc://{}#node={}", self.local_addr()?, self.node()))
    }

    fn advertised_at(&self, host: &str) -> std::io::Result<String> {
        Ok(format!("cudaipc://{}:{}#node={}", bracketed(host), self.local_addr()?.port(), self.node()))
    }

    async fn run(self: Box<Self>, shutdown: CancellationToken) {
        CudaIpcReceiver::run(*self, shutdown).await
    }
}

#[async_trait::async_trait]
impl KvReceiver for UcxReceiver {
    fn kind(&self) -> TransportKind {
        TransportKind::Ucx
    }

    fn advertised(&self) -> std::io::Result<String> {
        Ok(format!("ucx://{}", self.local_addr()?))
    }

    fn advertised_at(&self, host: &str) -> std::io::Result<String> {
        Ok(format!("ucx://{}:{}", bracketed(host), self.local_addr()?.port()))
    }

    async fn run(self: Box<Self>, shutdown: CancellationToken) {
        UcxReceiver::run(*self, shutdown).await
    }
}

/// Binds a receiver of `kind` on `listen`, delivering into `registry`; `lease` bounds each
/// incoming transfer. QUIC presents `quic_identity` (or a certificate it generates).
pub async fn bind_receiver(
    kind: TransportKind,
    listen: SocketAddr,
    registry: &HandoffRegistry,
    lease: Duration,
    quic_identity: Option<&QuicIdentity>,
) -> Result<Box<dyn KvReceiver>, TransferError> {
    let io = |e: std::io::Error| TransferError::Io(format!("cannot listen on {listen}: {e}"));
    Ok(match kind {
        TransportKind::Tcp => Box::new(TcpReceiver::new(TcpListener::bind(listen).await.map_err(io)?, registry.clone(), lease)),
        TransportKind::Quic => {
            let generated;
            let identity = match quic_identity {
                Some(i) => i,
                None => {
                    generated = QuicIdentity::generate(&["localhost"]).map_err(io)?;
                    &generated
                }
            };
            Box::new(QuicReceiver::bind(listen, identity, registry.clone(), lease).map_err(io)?)
        }
        TransportKind::Ucx => Box::new(UcxReceiver::new(listen, registry.clone(), lease).await?),
        TransportKind::CudaIpc => Box::new(CudaIpcReceiver::new(TcpListener::bind(listen).await.map_err(io)?, registry.clone(), lease)),
    })
}

/// A sender for `kind`. QUIC trusts receivers by `quic_trust` (pinned certificates only, unless a
/// CA is given).
pub fn sender(kind: TransportKind, quic_trust: Option<QuicTrust>) -> Result<Arc<dyn KvTransport>, TransferError> {
    Ok(match kind {
        TransportKind::Tcp => Arc::new(TcpTransport),
        TransportKind::Quic => Arc::new(QuicTransport::new(quic_trust.unwrap_or_else(QuicTrust::pinned_only))),
        TransportKind::Ucx => Arc::new(UcxTransport::new()?),
        TransportKind::CudaIpc => Arc::new(CudaIpcTransport),
    })
}
