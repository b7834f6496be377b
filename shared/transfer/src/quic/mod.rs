//! KV over QUIC (quinn + rustls with the *ring* provider).
//!
//! The sender keeps one QUIC connection per peer and reuses it across transfers; each transfer
//! is one bidirectional stream: `TKQ1`, a length-prefixed JSON header (request, layout, tokens,
//! checksums), the blocks back to back, then the receiver's length-prefixed JSON verdict on the
//! same stream. The header is checked before any payload is read and the checksums before the
//! blocks are handed over, exactly as over TCP.
//!
//! Peers are always authenticated, in one of two ways:
//! - **generated**: the receiver makes a self-signed certificate when it starts and advertises
//!   its SHA-256 fingerprint in its address (`quic://10.0.0.7:4433#sha256=<64 hex digits>`);
//!   the sender accepts exactly that certificate;
//! - **configured**: the receiver presents a PEM chain and key, and the sender validates it
//!   against a CA bundle for the address's host name (or the `sni=` name, if given).
//!
//! An address with no pin, sent from a transport with no CA bundle, is refused: nothing is ever
//! trusted on first sight.

mod peer;
mod receive;
mod send;
mod tls;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, IdleTimeout, RecvStream, SendStream, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::wire::{check_header, deliver, Header, Verdict, MAX_HEADER};
use crate::{Handoff, HandoffRegistry, KvTransport, TransferError, TransferReport};

const MAGIC: &[u8; 4] = b"TKQ1";
/// Application protocol negotiated in the TLS handshake, so a QUIC endpoint serving something
/// else fails the handshake instead of receiving KV blocks.
const ALPN: &[u8] = b"tandem-kv/1";
const SCHEME: &str = "quic://";
const MAX_VERDICT: usize = 1 << 20;
/// How long a sender waits for a QUIC handshake unless told otherwise (the lease still applies).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stopping receiver lets its final close frames drain.
const CLOSE_DRAIN: Duration = Duration::from_secs(1);
/// Application close codes.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_UNRESPONSIVE: u32 = 2;
const RESET_ABANDONED: u32 = 1;

pub use peer::*;
pub use receive::*;
pub use send::*;
pub use tls::*;

/// A stream or connection failure, with the underlying cause spelled out: quinn's stream errors
/// say only "connection lost" and keep the reason (closed by peer, timed out, ...) as a source.
fn lost(e: impl std::error::Error) -> TransferError {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.dedup();
    if parts.len() > 1 && parts[0] == "connection lost" {
        parts.remove(0);
    }
    TransferError::Io(parts.join(": "))
}

fn protocol(e: impl fmt::Display) -> TransferError {
    TransferError::Protocol(e.to_string())
}

async fn write_frame(s: &mut SendStream, bytes: &[u8]) -> Result<(), TransferError> {
    let len = u32::try_from(bytes.len()).map_err(|_| protocol(format!("frame of {} bytes is too long", bytes.len())))?;
    s.write_all(&len.to_le_bytes()).await.map_err(lost)?;
    s.write_all(bytes).await.map_err(lost)
}

async fn read_frame(s: &mut RecvStream, max: usize) -> Result<Vec<u8>, TransferError> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.map_err(lost)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(protocol(format!("frame of {len} bytes exceeds {max}")));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.map_err(lost)?;
    Ok(buf)
}

async fn read_verdict(s: &mut RecvStream) -> Result<Verdict, TransferError> {
    serde_json::from_slice(&read_frame(s, MAX_VERDICT).await?).map_err(protocol)
}

/// Resets the send half if a transfer is abandoned (lease expired, error) before it finished,
/// so the peer stops waiting for the rest and buffered data is not sent for nothing.
struct Outgoing {
    stream: SendStream,
    finished: bool,
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.stream.reset(VarInt::from_u32(RESET_ABANDONED));
        }
    }
}
