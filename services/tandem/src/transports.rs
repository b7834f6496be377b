//! Building KV transports from the command line: receivers a decode worker serves (and the
//! address list it advertises), and the sender set a prefill worker tries in order.
//!
//! QUIC authenticates receivers. By default each receiver generates a certificate and advertises
//! its fingerprint with its address, which senders pin. With `TANDEM_QUIC_CERT` and
//! `TANDEM_QUIC_KEY` (PEM files) a receiver presents configured certificates instead, and with
//! `TANDEM_QUIC_CA` (a PEM bundle) senders validate receivers against that CA.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use tandem_transfer::{
    HandoffRegistry, KvTransport, QuicIdentity, QuicReceiver, QuicTransport, QuicTrust, TcpReceiver, TcpTransport, TransportSet, UcxReceiver,
    UcxTransport,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Transports in the order they are preferred when both sides offer them.
pub const KNOWN: [&str; 3] = ["ucx", "quic", "tcp"];

fn check(kind: &str) -> Result<()> {
    if !KNOWN.contains(&kind) {
        bail!("unknown KV transport `{kind}`; choose from {}", KNOWN.join(", "));
    }
    Ok(())
}

/// Starts a receiver of `kind` on `listen` until `stop` fires; returns its advertised entry
/// (`scheme://addr`).
pub async fn receiver(kind: &str, listen: SocketAddr, registry: HandoffRegistry, lease: Duration, stop: &CancellationToken) -> Result<String> {
    check(kind)?;
    match kind {
        "tcp" => {
            let r = TcpReceiver::new(TcpListener::bind(listen).await?, registry, lease);
            let addr = r.local_addr()?;
            tokio::spawn(r.run(stop.clone()));
            Ok(format!("tcp://{addr}"))
        }
        "quic" => {
            let identity = match (std::env::var_os("TANDEM_QUIC_CERT"), std::env::var_os("TANDEM_QUIC_KEY")) {
                (Some(cert), Some(key)) => QuicIdentity::from_pem_files(cert, key)?,
                (None, None) => QuicIdentity::generate(&["localhost"])?,
                _ => bail!("set both TANDEM_QUIC_CERT and TANDEM_QUIC_KEY, or neither"),
            };
            let r = QuicReceiver::bind(listen, &identity, registry, lease)?;
            let addr = r.advertised_addr()?;
            tokio::spawn(r.run(stop.clone()));
            Ok(if addr.starts_with("quic://") { addr } else { format!("quic://{addr}") })
        }
        "ucx" => {
            let r = UcxReceiver::new(listen, registry, lease).await?;
            let addr = r.local_addr()?;
            tokio::spawn(r.run(stop.clone()));
            Ok(format!("ucx://{addr}"))
        }
        other => bail!("the {other} transport is not built into this binary"),
    }
}

/// A sender for one transport.
pub fn sender(kind: &str) -> Result<Arc<dyn KvTransport>> {
    check(kind)?;
    match kind {
        "tcp" => Ok(Arc::new(TcpTransport)),
        "quic" => {
            let trust = match std::env::var_os("TANDEM_QUIC_CA") {
                Some(ca) => QuicTrust::from_ca_file(ca)?,
                None => QuicTrust::pinned_only(),
            };
            Ok(Arc::new(QuicTransport::new(trust)))
        }
        "ucx" => Ok(Arc::new(UcxTransport::new()?)),
        other => bail!("the {other} transport is not built into this binary"),
    }
}

/// Senders for `kinds`, in that order of preference. A transport that cannot start here (no UCX
/// devices, say) is left out with a warning, so TCP still carries the blocks.
pub fn sender_set(kinds: &[String]) -> Result<TransportSet> {
    let mut out = Vec::new();
    for k in kinds {
        match sender(k) {
            Ok(t) => out.push(t),
            Err(e) => tracing::warn!(transport = %k, error = %e, "KV transport unavailable; not offered"),
        }
    }
    if out.is_empty() {
        bail!("none of the KV transports {kinds:?} can start");
    }
    Ok(TransportSet::new(out))
}

/// Starts receivers for `kinds` (the TCP one on `tcp_listen`, the others on the same host with a
/// port of their own) and returns the advertised address list. A transport that cannot start is
/// left out with a warning.
pub async fn receivers(kinds: &[String], tcp_listen: SocketAddr, registry: &HandoffRegistry, lease: Duration, stop: &CancellationToken) -> Result<String> {
    let mut entries = Vec::new();
    for k in kinds {
        let listen = if k == "tcp" { tcp_listen } else { SocketAddr::new(tcp_listen.ip(), 0) };
        match receiver(k, listen, registry.clone(), lease, stop).await {
            Ok(e) => entries.push(e),
            Err(e) => tracing::warn!(transport = %k, error = %e, "KV receiver unavailable; not advertised"),
        }
    }
    if entries.is_empty() {
        bail!("none of the KV transports {kinds:?} can receive");
    }
    Ok(entries.join(","))
}
