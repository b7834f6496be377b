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

// ---------------------------------------------------------------------------------------------
// Crypto plumbing

/// The *ring* provider, handed to every rustls builder explicitly so no process-wide default
/// has to be installed.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    // The hash behind this TLS 1.3 suite is SHA-256; borrowing it avoids a direct dependency on
    // a hashing crate.
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite");
    let digest = suite.common.hash_provider.hash(bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a SHA-256 fingerprint: 64 hex digits, optionally separated by colons.
fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = s.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

fn invalid(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

/// Transport parameters for bulk KV traffic.
///
/// quinn's defaults are sized for the internet (a 1.25 MB per-stream window, i.e. 100 Mbit/s at
/// 100 ms). KV handoffs are tens to hundreds of megabytes between machines in one data centre,
/// so the windows are sized to the bandwidth-delay product of a fast link with headroom: a
/// 64 MiB per-stream window keeps a single transfer at full speed up to roughly 25 GB/s at 2.5 ms
/// RTT, and a 256 MiB connection window (and send window) lets a few transfers share one
/// connection at that rate. These are ceilings on unread data, not allocations: the receiver
/// reads each stream as it arrives, so little is buffered in practice.
///
/// Connections are cached between transfers, so the sender pings every second to keep an idle
/// connection (and any middlebox state) alive, and either side gives up on a peer it has not
/// heard from for 5 s. A cached connection to a peer that vanished is therefore seen closed
/// and replaced within seconds even when no transfer notices first (a transfer that hears
/// nothing back for its whole lease drops the connection at once, see `KvTransport::send`).
fn transport_config(client: bool) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(64 << 20))
        .receive_window(VarInt::from_u32(256 << 20))
        .send_window(256 << 20)
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(5_000))))
        .datagram_receive_buffer_size(None)
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    if client {
        // Receivers never open streams towards senders.
        t.keep_alive_interval(Some(Duration::from_secs(1))).max_concurrent_bidi_streams(VarInt::from_u32(0));
    } else {
        t.max_concurrent_bidi_streams(VarInt::from_u32(256));
    }
    t
}

/// Accepts exactly one certificate, identified by the SHA-256 of its DER encoding; the
/// handshake signatures are still checked against that certificate's key, so a peer has to
/// hold the private key, not just a copy of the certificate. Names and validity dates are not
/// consulted: the pin is the whole of the trust.
struct PinnedCert {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedCert").field("sha256", &to_hex(&self.pin)).finish()
    }
}

/// rustls reports a verifier's own error through its `Debug` form, so both forms carry the
/// message.
struct PinMismatch;

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the certificate does not match the pinned sha256 fingerprint")
    }
}

impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if sha256(end_entity.as_ref()) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(PinMismatch)))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// TLS configuration

/// How a node authenticates its QUIC KV traffic, as it would appear in a service's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum QuicTlsConfig {
    /// The receiver generates a self-signed certificate at start and advertises its fingerprint
    /// in its address; senders pin that fingerprint.
    Generated,
    /// Certificates from PEM files: the receiver's chain (leaf first) and key, and the CA
    /// bundle senders validate receivers against.
    Files { cert_chain: PathBuf, key: PathBuf, ca_bundle: PathBuf },
}

impl QuicTlsConfig {
    /// The receiver's identity; in `Generated` mode a fresh certificate on every call.
    pub fn identity(&self) -> io::Result<QuicIdentity> {
        match self {
            QuicTlsConfig::Generated => QuicIdentity::generate(&[]),
            QuicTlsConfig::Files { cert_chain, key, .. } => QuicIdentity::from_pem_files(cert_chain, key),
        }
    }

    /// What a sender trusts: only pinned addresses, or also peers signed by the CA bundle.
    pub fn trust(&self) -> io::Result<QuicTrust> {
        match self {
            QuicTlsConfig::Generated => Ok(QuicTrust::pinned_only()),
            QuicTlsConfig::Files { ca_bundle, .. } => QuicTrust::from_ca_file(ca_bundle),
        }
    }
}

/// A receiver's certificate chain and private key.
pub struct QuicIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    fingerprint: [u8; 32],
    generated: bool,
}

impl Clone for QuicIdentity {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key(), fingerprint: self.fingerprint, generated: self.generated }
    }
}

impl fmt::Debug for QuicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicIdentity")
            .field("sha256", &self.fingerprint())
            .field("chain_len", &self.chain.len())
            .field("generated", &self.generated)
            .finish_non_exhaustive()
    }
}

impl QuicIdentity {
    /// A fresh self-signed certificate for `names` (DNS names or IP addresses; a placeholder
    /// name if empty). Senders reach it by pinning [`fingerprint`](Self::fingerprint).
    pub fn generate(names: &[&str]) -> io::Result<Self> {
        let names: Vec<String> =
            if names.is_empty() { vec!["tandem-kv".to_string()] } else { names.iter().map(|n| n.to_string()).collect() };
        let certified = rcgen::generate_simple_self_signed(names).map_err(invalid)?;
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        Ok(Self { fingerprint: sha256(cert.as_ref()), chain: vec![cert], key, generated: true })
    }

    /// A configured chain (leaf first) and its private key, both PEM. Fails if the key does not
    /// belong to the leaf certificate.
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> io::Result<Self> {
        let chain = CertificateDer::pem_slice_iter(cert_chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("bad certificate PEM: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(invalid("no certificate in the PEM chain"));
        };
        let fingerprint = sha256(leaf.as_ref());
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| invalid(format!("bad private key PEM: {e}")))?;
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
            .map_err(|e| invalid(format!("unusable certificate and key: {e}")))?;
        Ok(Self { chain, key, fingerprint, generated: false })
    }

    /// [`from_pem`](Self::from_pem) reading the two files.
    pub fn from_pem_files(cert_chain: impl AsRef<Path>, key: impl AsRef<Path>) -> io::Result<Self> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())));
        Self::from_pem(&read(cert_chain.as_ref())?, &read(key.as_ref())?)
    }

    /// Lower-case hex SHA-256 of the leaf certificate's DER encoding.
    pub fn fingerprint(&self) -> String {
        to_hex(&self.fingerprint)
    }

    /// Whether this certificate was generated here (and so can only be reached by its pin).
    pub fn is_generated(&self) -> bool {
        self.generated
    }

    /// The QUIC server configuration a receiver with this identity uses: TLS 1.3 only, the KV
    /// application protocol, and the bulk-transfer transport parameters.
    pub fn server_config(&self) -> io::Result<quinn::ServerConfig> {
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(invalid)?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(invalid)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).map_err(invalid)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport_config(false)));
        Ok(config)
    }
}

/// What a sender trusts besides pinned fingerprints.
#[derive(Clone, Default)]
pub struct QuicTrust {
    roots: Option<Arc<RootCertStore>>,
}

impl fmt::Debug for QuicTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicTrust").field("ca_roots", &self.roots.as_ref().map(|r| r.len())).finish()
    }
}

impl QuicTrust {
    /// Only peers whose address carries a `sha256=` pin.
    pub fn pinned_only() -> Self {
        Self::default()
    }

    /// Peers whose certificate chains to one of the CA certificates in `pem` (and pinned peers).
    pub fn from_ca_pem(pem: &[u8]) -> io::Result<Self> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| invalid(format!("bad CA PEM: {e}")))?;
            roots.add(cert).map_err(|e| invalid(format!("unusable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(invalid("no CA certificate in the bundle"));
        }
        Ok(Self { roots: Some(Arc::new(roots)) })
    }

    /// [`from_ca_pem`](Self::from_ca_pem) reading a file.
    pub fn from_ca_file(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Self::from_ca_pem(&pem)
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses

/// A receiver's address: `[quic://]host:port[#key=value[&key=value]]`, IPv6 hosts bracketed
/// (`quic://[::1]:4433`). Keys: `sha256` pins the receiver's certificate (64 hex digits, colons
/// allowed); `sni` names the host the certificate is validated for against a CA (default: the
/// host part). Any other key is an error, so a mistyped pin cannot silently go unchecked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicPeer {
    host: String,
    port: u16,
    pin: Option<[u8; 32]>,
    server_name: Option<String>,
}

impl QuicPeer {
    pub fn parse(s: &str) -> Result<Self, TransferError> {
        let bad = |reason: String| TransferError::Connect { peer: s.to_string(), reason };
        let rest = s.strip_prefix(SCHEME).unwrap_or(s);
        let (authority, fragment) = match rest.split_once('#') {
            Some((a, f)) => (a, Some(f)),
            None => (rest, None),
        };
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| bad("expected host:port".into()))?;
        let port: u16 = port.parse().map_err(|_| bad(format!("bad port {port:?}")))?;
        let host = match host.strip_prefix('[') {
            Some(h) => h.strip_suffix(']').ok_or_else(|| bad("unclosed [ in host".into()))?,
            None => host,
        };
        if host.is_empty() || (host.contains(':') && host.parse::<IpAddr>().is_err()) {
            return Err(bad(format!("bad host {host:?}")));
        }
        let mut peer = QuicPeer { host: host.to_string(), port, pin: None, server_name: None };
        for pair in fragment.into_iter().flat_map(|f| f.split('&')).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sha256", v)) => {
                    let pin = parse_fingerprint(v).ok_or_else(|| bad("sha256 pin must be 64 hex digits".into()))?;
                    peer.pin = Some(pin);
                }
                Some(("sni", v)) if !v.is_empty() => peer.server_name = Some(v.to_string()),
                // An unknown key could be a mistyped pin: refuse rather than connect without it.
                _ => return Err(bad(format!("unknown address parameter {pair:?}"))),
            }
        }
        Ok(peer)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The pinned certificate fingerprint (lower-case hex), if any.
    pub fn fingerprint(&self) -> Option<String> {
        self.pin.map(|p| to_hex(&p))
    }

    /// The name the certificate is validated against.
    pub fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or(&self.host)
    }
}

impl fmt::Display for QuicPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{SCHEME}[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{SCHEME}{}:{}", self.host, self.port)?;
        }
        let mut sep = '#';
        if let Some(pin) = &self.pin {
            write!(f, "{sep}sha256={}", to_hex(pin))?;
            sep = '&';
        }
        if let Some(name) = &self.server_name {
            write!(f, "{sep}sni={name}")?;
        }
        Ok(())
    }
}

impl FromStr for QuicPeer {
    type Err = TransferError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Stream framing and error mapping

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

// ---------------------------------------------------------------------------------------------
// Sender

/// Sends KV blocks over QUIC, keeping one connection per peer address for reuse.
///
/// Cheap to clone; clones share the endpoints and the connection cache.
#[derive(Clone)]
pub struct QuicTransport {
    inner: Arc<Shared>,
    connect_timeout: Duration,
}

struct Shared {
    trust: QuicTrust,
    transport: Arc<TransportConfig>,
    /// Client endpoints, created on first use: one for IPv4 peers, one for IPv6.
    endpoints: Mutex<[Option<Endpoint>; 2]>,
    /// The connection to each peer (keyed by its canonical address), behind a per-peer lock so
    /// concurrent transfers to a new peer share one handshake.
    connections: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Connection>>>>>,
}

impl fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicTransport")
            .field("trust", &self.inner.trust)
            .field("connect_timeout", &self.connect_timeout)
            .field("cached_connections", &self.cached_connections())
            .finish()
    }
}

impl Default for QuicTransport {
    fn default() -> Self {
        Self::new(QuicTrust::pinned_only())
    }
}

impl QuicTransport {
    /// A sender trusting pinned addresses and, if `trust` has a CA bundle, CA-signed peers.
    /// Endpoints are opened lazily, on the first send (inside the Tokio runtime).
    pub fn new(trust: QuicTrust) -> Self {
        Self {
            inner: Arc::new(Shared {
                trust,
                transport: Arc::new(transport_config(true)),
                endpoints: Mutex::new([None, None]),
                connections: Mutex::new(HashMap::new()),
            }),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// A sender that only reaches peers whose address pins their certificate.
    pub fn pinned_only() -> Self {
        Self::default()
    }

    /// Bounds the QUIC handshake (default 2 s). UDP gives no "connection refused", so an
    /// address with nothing behind it is only noticed by this timeout (or the lease, if shorter).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Number of cached connections that are still open.
    pub fn cached_connections(&self) -> usize {
        let connections = self.inner.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections
            .values()
            .filter(|slot| slot.try_lock().is_ok_and(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none())))
            .count()
    }

    /// Closes every cached connection; later sends connect again.
    pub fn close(&self) {
        let slots: Vec<_> = self.inner.connections.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, s)| s).collect();
        for slot in slots {
            if let Ok(mut c) = slot.try_lock() {
                if let Some(c) = c.take() {
                    c.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"sender closing");
                }
            }
        }
    }

    /// The QUIC client configuration used for `peer` (TLS trust and transport parameters), for
    /// tools that talk to a receiver directly. Fails like a send would if `peer` cannot be
    /// authenticated.
    pub fn client_config(&self, peer: &str) -> Result<quinn::ClientConfig, TransferError> {
        self.inner.client_config(peer, &QuicPeer::parse(peer)?)
    }
}

impl Shared {
    fn client_config(&self, raw: &str, peer: &QuicPeer) -> Result<quinn::ClientConfig, TransferError> {
        let refuse = |reason: String| TransferError::Connect { peer: raw.to_string(), reason };
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| refuse(e.to_string()))?;
        // A pin, when present, is the stronger statement and wins over the CA.
        let mut tls = match (peer.pin, &self.trust.roots) {
            (Some(pin), _) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert { pin, algorithms: provider.signature_verification_algorithms }))
                .with_no_client_auth(),
            (None, Some(roots)) => builder.with_root_certificates(roots.clone()).with_no_client_auth(),
            (None, None) => {
                return Err(refuse(
                    "the address pins no certificate (#sha256=...) and no CA bundle is configured; refusing an unauthenticated peer"
                        .into(),
                ))
            }
        };
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| refuse(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(self.transport.clone());
        Ok(config)
    }

    fn endpoint(&self, for_peer: &SocketAddr) -> io::Result<Endpoint> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let (i, bind): (usize, SocketAddr) = match for_peer {
            SocketAddr::V4(_) => (0, (std::net::Ipv4Addr::UNSPECIFIED, 0).into()),
            SocketAddr::V6(_) => (1, (std::net::Ipv6Addr::UNSPECIFIED, 0).into()),
        };
        if let Some(e) = &endpoints[i] {
            return Ok(e.clone());
        }
        let e = Endpoint::client(bind)?;
        endpoints[i] = Some(e.clone());
        Ok(e)
    }

    fn slot(&self, key: &str) -> Arc<tokio::sync::Mutex<Option<Connection>>> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = connections.get(key) {
            return slot.clone();
        }
        // Forget peers whose connection has died, so the map does not grow with every peer
        // ever seen.
        connections.retain(|_, slot| match slot.try_lock() {
            Ok(c) => c.as_ref().is_some_and(|c| c.close_reason().is_none()),
            Err(_) => true, // a handshake is under way
        });
        connections.entry(key.to_string()).or_default().clone()
    }

    /// The cached connection to `peer` if it is still open, else a new one. The flag tells
    /// whether the connection was reused.
    async fn connection(&self, raw: &str, peer: &QuicPeer, timeout: Duration) -> Result<(Connection, bool), TransferError> {
        let slot = self.slot(&peer.to_string());
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref() {
            match c.close_reason() {
                None => return Ok((c.clone(), true)),
                Some(why) => tracing::debug!(peer = raw, reason = %why, "cached kv connection is closed; reconnecting"),
            }
        }
        *cached = None;
        let c = self.connect(raw, peer, timeout).await?;
        *cached = Some(c.clone());
        Ok((c, false))
    }

    /// Drops `dead` from the cache (if it is still the cached one).
    async fn forget(&self, peer: &QuicPeer, dead: &Connection) {
        let slot = self.slot(&peer.to_string());
        let mut cached = slot.lock().await;
        if cached.as_ref().is_some_and(|c| c.stable_id() == dead.stable_id()) {
            *cached = None;
        }
    }

    async fn connect(&self, raw: &str, peer: &QuicPeer, timeout: Duration) -> Result<Connection, TransferError> {
        let refuse = |reason: String| TransferError::Connect { peer: raw.to_string(), reason };
        let config = self.client_config(raw, peer)?;
        let addr = tokio::net::lookup_host((peer.host.as_str(), peer.port))
            .await
            .map_err(|e| refuse(e.to_string()))?
            .next()
            .ok_or_else(|| refuse("the host name resolves to no address".into()))?;
        let endpoint = self.endpoint(&addr).map_err(|e| refuse(format!("cannot open a UDP endpoint: {e}")))?;
        let connecting = endpoint.connect_with(config, addr, peer.server_name()).map_err(|e| refuse(e.to_string()))?;
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(refuse(format!("QUIC handshake failed: {e}"))),
            Err(_) => Err(refuse(format!("no QUIC handshake within {timeout:?}"))),
        }
    }

    /// `used` learns the connection the transfer runs on, and how many datagrams had arrived on
    /// it when the transfer started.
    async fn send(
        &self,
        raw: &str,
        h: &Handoff,
        connect_timeout: Duration,
        used: &mut Option<(Connection, u64)>,
    ) -> Result<TransferReport, TransferError> {
        let started = Instant::now();
        let peer = QuicPeer::parse(raw)?;
        let header = serde_json::to_vec(&Header::of(h)).map_err(protocol)?;
        let (conn, reused) = self.connection(raw, &peer, connect_timeout).await?;
        *used = Some((conn.clone(), conn.stats().udp_rx.datagrams));
        let (send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            // The cached connection died after it was checked. Nothing has been sent yet, so
            // one attempt on a fresh connection is safe.
            Err(e) if reused => {
                tracing::debug!(peer = raw, error = %e, "cached kv connection failed; reconnecting");
                self.forget(&peer, &conn).await;
                let (conn, _) = self.connection(raw, &peer, connect_timeout).await?;
                *used = Some((conn.clone(), conn.stats().udp_rx.datagrams));
                conn.open_bi().await.map_err(lost)?
            }
            Err(e) => return Err(lost(e)),
        };
        let mut out = Outgoing { stream: send, finished: false };
        let written = async {
            out.stream.write_all(MAGIC).await.map_err(lost)?;
            write_frame(&mut out.stream, &header).await?;
            for b in &h.kv.blocks {
                out.stream.write_all(b).await.map_err(lost)?;
            }
            out.stream.finish().map_err(lost)
        }
        .await;
        out.finished = written.is_ok();
        let verdict = match written {
            Ok(()) => read_verdict(&mut recv).await?,
            // The receiver stops reading when it rejects a transfer early (a bad header, say)
            // and then answers why; prefer that answer to the bare write error.
            Err(e) => read_verdict(&mut recv).await.map_err(|_| e)?,
        };
        verdict.into_result()?;
        Ok(TransferReport {
            transport: "quic".into(),
            bytes: h.kv.total_bytes() as u64,
            blocks: h.kv.blocks.len() as u32,
            millis: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

#[async_trait::async_trait]
impl KvTransport for QuicTransport {
    fn name(&self) -> &'static str {
        "quic"
    }

    async fn send(&self, peer: &str, handoff: &Handoff, lease: Duration) -> Result<TransferReport, TransferError> {
        let mut used = None;
        let outcome = tokio::time::timeout(lease, self.inner.send(peer, handoff, self.connect_timeout, &mut used)).await;
        if outcome.is_err() {
            // A live peer acknowledges the payload at the QUIC level even while its verdict is
            // slow. If not a single datagram came back during the whole lease, the peer (or the
            // path to it) is gone: close the connection now, so the next transfer connects
            // afresh instead of waiting for the idle timeout on a dead one.
            if let Some((conn, before)) = used {
                if conn.stats().udp_rx.datagrams == before {
                    tracing::debug!(peer, "kv peer silent for a whole lease; dropping its connection");
                    conn.close(VarInt::from_u32(CLOSE_UNRESPONSIVE), b"peer unresponsive");
                }
            }
        }
        outcome.unwrap_or(Err(TransferError::LeaseExpired(lease)))
    }
}

// ---------------------------------------------------------------------------------------------
// Receiver

/// Accepts KV blocks over QUIC and hands them to the [`HandoffRegistry`].
pub struct QuicReceiver {
    endpoint: Endpoint,
    registry: HandoffRegistry,
    lease: Duration,
    fingerprint: [u8; 32],
    advertise_pin: bool,
}

impl fmt::Debug for QuicReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicReceiver")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("lease", &self.lease)
            .field("sha256", &to_hex(&self.fingerprint))
            .finish_non_exhaustive()
    }
}

impl QuicReceiver {
    /// Serves on an already bound UDP socket. `lease` bounds how long one incoming transfer may
    /// take, verdict included. Must be called inside the Tokio runtime.
    pub fn new(socket: std::net::UdpSocket, identity: &QuicIdentity, registry: HandoffRegistry, lease: Duration) -> io::Result<Self> {
        let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime found"))?;
        let endpoint = Endpoint::new(quinn::EndpointConfig::default(), Some(identity.server_config()?), socket, runtime)?;
        Ok(Self { endpoint, registry, lease, fingerprint: identity.fingerprint, advertise_pin: identity.generated })
    }

    /// Binds `addr` and serves on it; see [`new`](Self::new).
    pub fn bind(addr: SocketAddr, identity: &QuicIdentity, registry: HandoffRegistry, lease: Duration) -> io::Result<Self> {
        Self::new(std::net::UdpSocket::bind(addr)?, identity, registry, lease)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Lower-case hex SHA-256 of the certificate this receiver presents.
    pub fn fingerprint(&self) -> String {
        to_hex(&self.fingerprint)
    }

    /// The address senders should use, built from the bound address: `quic://ip:port`, plus
    /// `#sha256=<fingerprint>` when the certificate was generated. Fails when bound to an
    /// unspecified address (0.0.0.0 or ::); use [`advertised_addr_for`](Self::advertised_addr_for).
    pub fn advertised_addr(&self) -> io::Result<String> {
        let local = self.local_addr()?;
        if local.ip().is_unspecified() {
            return Err(invalid(format!("bound to {local}; name the host to advertise")));
        }
        self.advertised_addr_for(&local.ip().to_string())
    }

    /// The address senders should use to reach this receiver as `host` (a name or IP that
    /// leads here), with the bound port and, for a generated certificate, the pin.
    pub fn advertised_addr_for(&self, host: &str) -> io::Result<String> {
        let port = self.local_addr()?.port();
        let peer = QuicPeer {
            host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            port,
            pin: self.advertise_pin.then_some(self.fingerprint),
            server_name: None,
        };
        Ok(peer.to_string())
    }

    /// Serves until `shutdown` fires, then stops accepting, lets transfers in flight finish
    /// (each within its lease) and closes its connections.
    pub async fn run(self, shutdown: CancellationToken) {
        // A child token, so that stopping on our own (the endpoint closed) does not cancel the
        // caller's token.
        let shutdown = shutdown.child_token();
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => {
                        connections.spawn(serve_connection(incoming, self.registry.clone(), self.lease, shutdown.clone()));
                    }
                    None => break,
                },
                Some(done) = connections.join_next(), if !connections.is_empty() => log_join(done),
            }
        }
        self.endpoint.set_server_config(None);
        shutdown.cancel();
        while let Some(done) = connections.join_next().await {
            log_join(done);
        }
        self.endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"receiver shutting down");
        let _ = tokio::time::timeout(CLOSE_DRAIN, self.endpoint.wait_idle()).await;
    }
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "kv receiver task panicked");
        }
    }
}

async fn serve_connection(incoming: quinn::Incoming, registry: HandoffRegistry, lease: Duration, shutdown: CancellationToken) {
    let peer = incoming.remote_address();
    let handshake = async { incoming.accept()?.await };
    let conn = match tokio::time::timeout(lease, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "kv connection handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "kv connection handshake timed out");
            return;
        }
    };
    let mut transfers = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    transfers.spawn(serve_transfer(send, recv, registry.clone(), lease, peer));
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "kv connection ended");
                    break;
                }
            },
            Some(done) = transfers.join_next(), if !transfers.is_empty() => log_join(done),
        }
    }
    while let Some(done) = transfers.join_next().await {
        log_join(done);
    }
    conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"receiver shutting down");
}

async fn serve_transfer(mut send: SendStream, mut recv: RecvStream, registry: HandoffRegistry, lease: Duration, peer: SocketAddr) {
    let outcome = tokio::time::timeout(lease, receive(&mut recv, &registry))
        .await
        .unwrap_or(Err(TransferError::LeaseExpired(lease)));
    // Stop the sender if it is still streaming a payload we no longer read.
    drop(recv);
    let verdict = Verdict::of(&outcome);
    if let Some(e) = &verdict.error {
        tracing::warn!(%peer, error = %e, "kv transfer refused");
    }
    let Ok(bytes) = serde_json::to_vec(&verdict) else { return };
    let answered = async {
        write_frame(&mut send, &bytes).await?;
        send.finish().map_err(lost)?;
        // Keep the stream until the sender has the verdict (or gives up on it), so closing the
        // connection right after cannot swallow it.
        let _ = send.stopped().await;
        Ok::<(), TransferError>(())
    };
    if let Ok(Err(e)) = tokio::time::timeout(lease, answered).await {
        tracing::debug!(%peer, error = %e, "kv verdict not delivered");
    }
}

async fn receive(s: &mut RecvStream, registry: &HandoffRegistry) -> Result<(), TransferError> {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic).await.map_err(lost)?;
    if &magic != MAGIC {
        return Err(protocol("not a tandem kv transfer"));
    }
    let h: Header = serde_json::from_slice(&read_frame(s, MAX_HEADER).await?).map_err(protocol)?;
    let (n, block) = check_header(&h)?;
    let mut blocks = Vec::with_capacity(n);
    for _ in 0..n {
        let mut b = vec![0u8; block];
        s.read_exact(&mut b).await.map_err(lost)?;
        blocks.push(b.into());
    }
    deliver(registry, h, blocks).await
}
