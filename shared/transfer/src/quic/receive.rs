//! The receiving side: accepts authenticated connections and a transfer per stream.

use super::*;

/// Accepts KV blocks over QUIC and hands them to the [`HandoffRegistry`].
pub struct QuicReceiver {
    pub(super) endpoint: Endpoint,
    pub(super) registry: HandoffRegistry,
    pub(super) lease: Duration,
    pub(super) fingerprint: [u8; 32],
    pub(super) advertise_pin: bool,
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

pub(super) fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "kv receiver task panicked");
        }
    }
}

pub(super) async fn serve_connection(incoming: quinn::Incoming, registry: HandoffRegistry, lease: Duration, shutdown: CancellationToken) {
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

pub(super) async fn serve_transfer(
    mut send: SendStream,
    mut recv: RecvStream,
    registry: HandoffRegistry,
    lease: Duration,
    peer: SocketAddr,
) {
    let outcome = tokio::time::timeout(lease, receive(&mut recv, &registry)).await.unwrap_or(Err(TransferError::LeaseExpired(lease)));
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

pub(super) async fn receive(s: &mut RecvStream, registry: &HandoffRegistry) -> Result<(), TransferError> {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic).await.map_err(lost)?;
    if &magic != MAGIC {
        return Err(protocol("not a tandem kv transfer"));
    }
    let h: Header = serde_json::from_slice(&read_frame(s, MAX_HEADER).await?).map_err(protocol)?;
    let (n, block) = check_header(&h, false)?;
    let mut blocks = Vec::with_capacity(n);
    for _ in 0..n {
        // Straight into the importing engine's memory where it has room.
        let mut b = registry.block_buffer(block);
        s.read_exact(b.as_mut_slice()).await.map_err(lost)?;
        blocks.push(b.freeze());
    }
    deliver(registry, h, blocks).await
}
