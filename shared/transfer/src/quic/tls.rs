//! Certificates and keys: a receiver's identity (generated or configured), a sender's trust
//! (pins, or a CA bundle), and the rustls and quinn configurations made from them.

use super::*;

/// The *ring* provider, handed to every rustls builder explicitly so no process-wide default
/// has to be installed.
pub(super) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

pub(super) fn sha256(bytes: &[u8]) -> [u8; 32] {
    // The hash behind this TLS 1.3 suite is SHA-256; borrowing it avoids a direct dependency on
    // a hashing crate.
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13().expect("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite");
    let digest = suite.common.hash_provider.hash(bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

pub(super) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a SHA-256 fingerprint: 64 hex digits, optionally separated by colons.
pub(super) fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
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

pub(super) fn invalid(e: impl fmt::Display) -> io::Error {
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
pub(super) fn transport_config(client: bool) -> TransportConfig {
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
pub(super) struct PinnedCert {
    pub(super) pin: [u8; 32],
    pub(super) algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedCert").field("sha256", &to_hex(&self.pin)).finish()
    }
}

/// rustls reports a verifier's own error through its `Debug` form, so both forms carry the
/// message.
pub(super) struct PinMismatch;

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
    pub(super) chain: Vec<CertificateDer<'static>>,
    pub(super) key: PrivateKeyDer<'static>,
    pub(super) fingerprint: [u8; 32],
    pub(super) generated: bool,
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
    pub(super) roots: Option<Arc<RootCertStore>>,
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
