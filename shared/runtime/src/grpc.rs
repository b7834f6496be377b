//! The cluster's gRPC connections in one place: how a service serves, and how it reaches another
//! service at the address that one advertises. With mutual TLS configured ([`use_mutual_tls`]),
//! every service presents a certificate signed by the cluster's CA, and serves and answers only
//! peers that present one too; without it, gRPC is plain HTTP/2 for a private network.
//!
//! The choice is the process's, made once at start: every role in a process speaks to its peers
//! the same way, so no call site can forget it.

use std::path::Path;
use std::sync::OnceLock;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// This process's identity in the cluster and the CA its peers' identities must come from.
#[derive(Clone)]
pub struct MutualTls {
    ca: Certificate,
    identity: Identity,
    /// The name checked in a peer's certificate instead of the host it was reached at (one
    /// name for every worker, when workers come and go at addresses no certificate can list).
    server_name: Option<String>,
}

impl MutualTls {
    /// From PEM files: the CA certificate(s), this process's certificate chain and its key.
    pub fn load(ca: &Path, cert: &Path, key: &Path, server_name: Option<String>) -> Result<Self, String> {
        let read = |p: &Path, what: &str| std::fs::read(p).map_err(|e| format!("reading the gRPC TLS {what} {}: {e}", p.display()));
        let (ca, cert, key) = (read(ca, "CA")?, read(cert, "certificate")?, read(key, "key")?);
        for (what, pem, tag) in [("CA", &ca, "CERTIFICATE"), ("certificate", &cert, "CERTIFICATE"), ("key", &key, "PRIVATE KEY")] {
            if !String::from_utf8_lossy(pem).contains(tag) {
                return Err(format!("the gRPC TLS {what} is not PEM (no {tag} block)"));
            }
        }
        let server_name = server_name.filter(|n| !n.is_empty());
        Ok(Self { ca: Certificate::from_pem(ca), identity: Identity::from_pem(cert, key), server_name })
    }
}

static TLS: OnceLock<MutualTls> = OnceLock::new();

/// Makes ring this process's default TLS provider (idempotent): tonic's TLS and every HTTP
/// client built without a provider of its own (the OTLP exporter's, the tests') take theirs
/// from the process default, and fail to build without one.
pub fn default_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Makes every gRPC server and client of this process use mutual TLS. Once per process; a
/// second call is refused.
pub fn use_mutual_tls(tls: MutualTls) -> Result<(), String> {
    default_tls_provider();
    TLS.set(tls).map_err(|_| "gRPC TLS is already configured".to_string())
}

/// Whether this process speaks mutual TLS to its peers.
pub fn mutual_tls() -> bool {
    TLS.get().is_some()
}

/// A gRPC server builder, with this process's TLS when it has one.
pub fn server() -> Result<Server, tonic::transport::Error> {
    let builder = Server::builder();
    match TLS.get() {
        None => Ok(builder),
        Some(t) => builder.tls_config(ServerTlsConfig::new().identity(t.identity.clone()).client_ca_root(t.ca.clone())),
    }
}

/// An endpoint for a peer at `addr` (`host:port`, or a URL whose scheme is replaced by the one
/// this process speaks), not yet connected.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let authority = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let tls = TLS.get();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{authority}"))?;
    let Some(t) = tls else { return Ok(endpoint) };
    let mut client = ClientTlsConfig::new().ca_certificate(t.ca.clone()).identity(t.identity.clone());
    if let Some(name) = &t.server_name {
        client = client.domain_name(name.clone());
    }
    endpoint.tls_config(client)
}
