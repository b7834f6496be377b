//! KV transports from the command line: the sender set a prefill worker tries in order, and the
//! QUIC credentials of both sides.
//!
//! QUIC authenticates receivers. By default each receiver generates a certificate and advertises
//! its fingerprint with its address, which senders pin. With `--quic-cert` and `--quic-key` (PEM
//! files; `TANDEM_QUIC_CERT`, `TANDEM_QUIC_KEY`) a receiver presents configured certificates
//! instead, and with `--quic-ca` (a PEM bundle; `TANDEM_QUIC_CA`) senders validate receivers
//! against that CA.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use tandem_transfer::{QuicIdentity, QuicTrust, TransportKind, TransportSet};

/// A receiver's QUIC certificate.
#[derive(Debug, Clone, Default, Args)]
pub struct QuicCertArgs {
    /// PEM certificate chain the QUIC receiver presents (with --quic-key; default: one generated
    /// at start, whose fingerprint the advertised address carries).
    #[arg(long, env = "TANDEM_QUIC_CERT")]
    pub quic_cert: Option<PathBuf>,
    /// PEM private key of --quic-cert.
    #[arg(long, env = "TANDEM_QUIC_KEY")]
    pub quic_key: Option<PathBuf>,
}

impl QuicCertArgs {
    pub fn identity(&self) -> Result<Option<QuicIdentity>> {
        match (&self.quic_cert, &self.quic_key) {
            (Some(cert), Some(key)) => Ok(Some(QuicIdentity::from_pem_files(cert, key)?)),
            (None, None) => Ok(None),
            _ => bail!("give both --quic-cert and --quic-key (TANDEM_QUIC_CERT, TANDEM_QUIC_KEY), or neither"),
        }
    }
}

/// How a sender trusts QUIC receivers.
#[derive(Debug, Clone, Default, Args)]
pub struct QuicTrustArgs {
    /// PEM CA bundle QUIC receivers' certificates are validated against (default: only receivers
    /// whose advertised address pins their certificate are trusted).
    #[arg(long, env = "TANDEM_QUIC_CA")]
    pub quic_ca: Option<PathBuf>,
}

impl QuicTrustArgs {
    pub fn trust(&self) -> Result<QuicTrust> {
        Ok(match &self.quic_ca {
            Some(ca) => QuicTrust::from_ca_file(ca)?,
            None => QuicTrust::pinned_only(),
        })
    }
}

/// Senders for `kinds`, in that order of preference. A transport that cannot start here (no UCX
/// devices, say) is left out with a warning, so TCP still carries the blocks.
pub fn sender_set(kinds: &[TransportKind], quic: &QuicTrustArgs) -> Result<TransportSet> {
    let mut out = Vec::new();
    for &k in kinds {
        let trust = if k == TransportKind::Quic { Some(quic.trust()?) } else { None };
        match tandem_transfer::sender(k, trust) {
            Ok(t) => out.push(t),
            Err(e) => tracing::warn!(transport = %k, error = %e, "KV transport unavailable; not offered"),
        }
    }
    if out.is_empty() {
        bail!("none of the KV transports {kinds:?} can start");
    }
    Ok(TransportSet::new(out))
}
