//! The sending side: one connection per peer, reused across transfers; one stream per transfer.

use super::*;

/// Sends KV blocks over QUIC, keeping one connection per peer address for reuse.
///
/// Cheap to clone; clones share the endpoints and the connection cache.
#[derive(Clone)]
pub struct QuicTransport {
    pub(super) inner: Arc<Shared>,
    pub(super) connect_timeout: Duration,
}

pub(super) struct Shared {
    pub(super) trust: QuicTrust,
    pub(super) transport: Arc<TransportConfig>,
    /// Client endpoints, created on first use: one for IPv4 peers, one for IPv6.
    pub(super) endpoints: Mutex<[Option<Endpoint>; 2]>,
    /// The connection to each peer (keyed by its canonical address), behind a per-peer lock so
    /// concurrent transfers to a new peer share one handshake.
    pub(super) connections: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Connection>>>>>,
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
        connections.values().filter(|slot| slot.try_lock().is_ok_and(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))).count()
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
                    "the address pins no certificate (#sha256=...) and no CA bundle is configured; refusing an unauthenticated peer".into(),
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
