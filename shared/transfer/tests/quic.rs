//! The QUIC transport under faults: every transfer ends in a definite outcome within its lease,
//! and only authenticated receivers get blocks.

mod common;

use common::{handoff, LEASE};
use tandem_protocol::{ApiError, ErrorCode};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tandem_transfer::{
    HandoffRegistry, KvTransport, QuicIdentity, QuicPeer, QuicReceiver, QuicTlsConfig, QuicTransport, QuicTrust, TransferError,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct Running {
    /// The advertised address, pin included.
    addr: String,
    identity: QuicIdentity,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn start(registry: &HandoffRegistry, identity: QuicIdentity, socket: std::net::UdpSocket, lease: Duration) -> Running {
    let r = QuicReceiver::new(socket, &identity, registry.clone(), lease).unwrap();
    let addr = r.advertised_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(r.run(stop.clone()));
    Running { addr, identity, stop, task }
}

async fn receiver(registry: &HandoffRegistry) -> Running {
    let identity = QuicIdentity::generate(&[]).unwrap();
    start(registry, identity, std::net::UdpSocket::bind(localhost()).unwrap(), LEASE)
}

/// A QUIC endpoint that completes handshakes with a generated certificate and then does
/// whatever `on_stream` does with each transfer stream; returns its pinned address.
fn raw_peer<F, Fut>(on_stream: F) -> String
where
    F: Fn(quinn::Connection, quinn::SendStream, quinn::RecvStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let identity = QuicIdentity::generate(&[]).unwrap();
    let endpoint = quinn::Endpoint::server(identity.server_config().unwrap(), localhost()).unwrap();
    let addr = format!("quic://{}#sha256={}", endpoint.local_addr().unwrap(), identity.fingerprint());
    let on_stream = std::sync::Arc::new(on_stream);
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let on_stream = on_stream.clone();
            tokio::spawn(async move {
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(on_stream(conn.clone(), send, recv));
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn delivers_blocks_and_the_receivers_verdict() {
    let registry = HandoffRegistry::new();
    let rx = receiver(&registry).await;
    assert!(
        rx.addr.starts_with("quic://127.0.0.1:") && rx.addr.ends_with(&format!("#sha256={}", rx.identity.fingerprint())),
        "{}",
        rx.addr
    );
    let quic = QuicTransport::pinned_only();
    assert_eq!(quic.name(), "quic");
    for (id, tokens) in [("r1", 10), ("r1b", 37)] {
        let mut pending = registry.register(id).unwrap();
        let sent = handoff(id, tokens);
        let expected = sent.clone();
        let accept = tokio::spawn(async move {
            let incoming = pending.arrived().await.unwrap();
            assert_eq!(incoming.handoff, expected);
            incoming.verdict.send(Ok(())).unwrap();
        });
        let report = quic.send(&rx.addr, &sent, LEASE).await.unwrap();
        accept.await.unwrap();
        assert_eq!(report.transport, "quic");
        assert_eq!(report.blocks as usize, sent.kv.layout.num_blocks());
        assert_eq!(report.bytes, report.blocks as u64 * sent.kv.layout.block_bytes() as u64);
        assert!(report.millis > 0.0 && report.millis < LEASE.as_secs_f64() * 1e3);
        // The second transfer rides the connection the first one opened.
        assert_eq!(quic.cached_connections(), 1);
    }
    assert_eq!(registry.waiting(), 0);
    let _first = registry.register("dup").unwrap();
    assert!(registry.register("dup").is_none());
}

#[tokio::test]
async fn a_closed_cached_connection_is_replaced() {
    let registry = HandoffRegistry::new();
    let rx = receiver(&registry).await;
    let quic = QuicTransport::pinned_only();
    let serve = |id: &'static str| {
        let mut pending = registry.register(id).unwrap();
        tokio::spawn(async move { pending.arrived().await.unwrap().verdict.send(Ok(())).unwrap() })
    };
    let accepted = serve("a1");
    quic.send(&rx.addr, &handoff("a1", 8), LEASE).await.unwrap();
    accepted.await.unwrap();

    // The receiver restarts on the same port with the same certificate: the cached connection
    // was closed by the old one and must not be used again.
    let port = rx.addr.trim_start_matches("quic://127.0.0.1:").split('#').next().unwrap().parse::<u16>().unwrap();
    rx.stop.cancel();
    rx.task.await.unwrap();
    let socket = {
        let mut tries = 0;
        loop {
            match std::net::UdpSocket::bind(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot rebind port {port}: {e}"),
            }
        }
    };
    let again = start(&registry, rx.identity.clone(), socket, LEASE);
    assert_eq!(again.addr, rx.addr);
    let accepted = serve("a2");
    let started = Instant::now();
    quic.send(&again.addr, &handoff("a2", 8), LEASE).await.unwrap();
    accepted.await.unwrap();
    assert!(started.elapsed() < LEASE);
    assert_eq!(quic.cached_connections(), 1);
    assert_eq!(registry.waiting(), 0);
}

/// A one-client UDP relay in front of `target` that can be told to drop everything, like a
/// peer host that vanished or a partitioned network: no close, no ICMP, just silence.
async fn relay(target: SocketAddr) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let socket = tokio::net::UdpSocket::bind(localhost()).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let silent = std::sync::Arc::new(AtomicBool::new(false));
    let cut = silent.clone();
    tokio::spawn(async move {
        let mut client = None;
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if cut.load(Ordering::SeqCst) {
                continue;
            }
            let to = if from == target {
                client
            } else {
                client = Some(from);
                Some(target)
            };
            if let Some(to) = to {
                let _ = socket.send_to(&buf[..n], to).await;
            }
        }
    });
    (addr, silent)
}

#[tokio::test]
async fn a_peer_that_goes_silent_loses_its_cached_connection() {
    let registry = HandoffRegistry::new();
    let rx = receiver(&registry).await;
    let peer = QuicPeer::parse(&rx.addr).unwrap();
    let (via, silent) = relay(format!("{}:{}", peer.host(), peer.port()).parse().unwrap()).await;
    let addr = format!("quic://{via}#sha256={}", rx.identity.fingerprint());
    let quic = QuicTransport::pinned_only();
    let serve = |id: &'static str| {
        let mut pending = registry.register(id).unwrap();
        tokio::spawn(async move { pending.arrived().await.unwrap().verdict.send(Ok(())).unwrap() })
    };
    let accepted = serve("s1");
    quic.send(&addr, &handoff("s1", 8), LEASE).await.unwrap();
    accepted.await.unwrap();
    assert_eq!(quic.cached_connections(), 1);

    // The path goes dark mid-life of the cached connection: the transfer costs its lease, and
    // the connection it ran on is given up rather than kept for the next transfer.
    silent.store(true, std::sync::atomic::Ordering::SeqCst);
    let waiting = registry.register("s2").unwrap();
    let started = Instant::now();
    let err = quic.send(&addr, &handoff("s2", 8), LEASE).await.unwrap_err();
    assert_eq!(err, TransferError::LeaseExpired(LEASE));
    assert!(started.elapsed() < LEASE * 2);
    assert_eq!(quic.cached_connections(), 0);
    drop(waiting);

    // Once the path is back, the next transfer runs on a fresh connection.
    silent.store(false, std::sync::atomic::Ordering::SeqCst);
    let accepted = serve("s3");
    quic.send(&addr, &handoff("s3", 8), LEASE).await.unwrap();
    accepted.await.unwrap();
    assert_eq!(quic.cached_connections(), 1);
    assert_eq!(registry.waiting(), 0);
}

#[tokio::test]
async fn a_refusal_reaches_the_sender() {
    let registry = HandoffRegistry::new();
    let rx = receiver(&registry).await;
    let quic = QuicTransport::pinned_only();
    // Nobody registered r2.
    let err = quic.send(&rx.addr, &handoff("r2", 5), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Refused { code: ErrorCode::NotFound, message: m } if m.contains("no request r2")), "{err}");
    // Registered, then the receiver turns the blocks down (e.g. out of KV blocks).
    let mut pending = registry.register("r3").unwrap();
    tokio::spawn(async move {
        pending.arrived().await.unwrap().verdict.send(Err(ApiError::new(ErrorCode::OutOfKvBlocks, "out of blocks"))).unwrap()
    });
    let err = quic.send(&rx.addr, &handoff("r3", 5), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Refused { code: ErrorCode::OutOfKvBlocks, message: m } if m.contains("out of blocks")), "{err}");
    assert_eq!(registry.waiting(), 0);
}

#[tokio::test]
async fn corrupted_payload_is_detected() {
    let registry = HandoffRegistry::new();
    let rx = receiver(&registry).await;
    let mut pending = registry.register("r4").unwrap();
    let mut bad = handoff("r4", 8);
    common::corrupt(&mut bad.kv, 1, 3);
    let err = QuicTransport::pinned_only().send(&rx.addr, &bad, LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Refused { code: ErrorCode::KvHandoffFailed, message: m } if m.contains("checksum")), "{err}");
    // Corrupt blocks never reach the waiting request.
    assert!(tokio::time::timeout(Duration::from_millis(100), pending.arrived()).await.is_err());
    drop(pending);
    assert_eq!(registry.waiting(), 0);
}

#[tokio::test]
async fn a_silent_peer_costs_one_lease_not_a_hang() {
    // Takes the connection and the whole payload, never answers.
    let addr = raw_peer(|_conn, send, mut recv| async move {
        let _ = recv.read_to_end(usize::MAX).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(send);
    });
    let quic = QuicTransport::pinned_only();
    let started = Instant::now();
    let err = quic.send(&addr, &handoff("r5", 8), LEASE).await.unwrap_err();
    assert_eq!(err, TransferError::LeaseExpired(LEASE));
    let took = started.elapsed();
    assert!(took >= LEASE && took < LEASE * 2, "{took:?}");
    // The peer is alive at the QUIC level (it acknowledged the payload), so the connection stays.
    assert_eq!(quic.cached_connections(), 1);

    // A real receiver whose request takes the blocks but never gives its verdict: same outcome.
    let registry = HandoffRegistry::new();
    let socket = std::net::UdpSocket::bind(localhost()).unwrap();
    let rx = start(&registry, QuicIdentity::generate(&[]).unwrap(), socket, LEASE * 10);
    let mut pending = registry.register("r5b").unwrap();
    let held = tokio::spawn(async move {
        let incoming = pending.arrived().await.unwrap();
        tokio::time::sleep(LEASE * 3).await;
        drop(incoming);
    });
    let started = Instant::now();
    let err = QuicTransport::pinned_only().send(&rx.addr, &handoff("r5b", 8), LEASE).await.unwrap_err();
    assert_eq!(err, TransferError::LeaseExpired(LEASE));
    assert!(started.elapsed() < LEASE * 2);
    held.abort();
    assert_eq!(registry.waiting(), 0);
}

#[tokio::test]
async fn a_dead_peer_or_a_cut_connection_fails_fast() {
    // Nothing listens on the port. UDP has no refusal, so the handshake timeout decides.
    let gone = std::net::UdpSocket::bind(localhost()).unwrap().local_addr().unwrap();
    let pin = QuicIdentity::generate(&[]).unwrap().fingerprint();
    let quic = QuicTransport::pinned_only().with_connect_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let err = quic.send(&format!("quic://{gone}#sha256={pin}"), &handoff("r6", 8), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Connect { reason, .. } if reason.contains("handshake")), "{err}");
    assert!(started.elapsed() < LEASE / 2, "{:?}", started.elapsed());

    // The peer reads a little, then drops the connection mid-payload.
    let addr = raw_peer(|conn, send, mut recv| async move {
        let mut buf = [0u8; 64];
        let _ = recv.read(&mut buf).await;
        conn.close(quinn::VarInt::from_u32(7), b"gone");
        drop(send);
    });
    let started = Instant::now();
    let err = quic.send(&addr, &handoff("r7", 4000), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Io(m) if m.contains("gone")), "{err}");
    assert!(started.elapsed() < LEASE / 2, "{:?}", started.elapsed());

    // The receiver process dies (its task is aborted) while the sender waits for the verdict.
    let registry = HandoffRegistry::new();
    let rx = receiver(&registry).await;
    let mut pending = registry.register("r8").unwrap();
    let task = rx.task;
    let killer = tokio::spawn(async move {
        let incoming = pending.arrived().await.unwrap();
        task.abort();
        let _ = task.await;
        drop(incoming);
    });
    let started = Instant::now();
    let err = quic.send(&rx.addr, &handoff("r8", 4000), LEASE).await.unwrap_err();
    assert!(matches!(err, TransferError::Io(_)), "{err}");
    assert!(started.elapsed() < LEASE / 2, "{:?}", started.elapsed());
    killer.await.unwrap();
    assert_eq!(registry.waiting(), 0);
    // The dead connection is not kept.
    assert_eq!(quic.cached_connections(), 0);
}

#[tokio::test]
async fn an_unauthenticated_receiver_is_refused_at_connect() {
    let registry = HandoffRegistry::new();
    let rx = receiver(&registry).await;
    let mut pending = registry.register("r9").unwrap();
    let quic = QuicTransport::pinned_only();
    let host_port = rx.addr.split('#').next().unwrap().to_string();

    // Pinned to another certificate.
    let other = QuicIdentity::generate(&[]).unwrap().fingerprint();
    let err = quic.send(&format!("{host_port}#sha256={other}"), &handoff("r9", 8), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Connect { reason, .. } if reason.contains("pinned")), "{err}");

    // No pin and no CA: refused before any packet is sent.
    for plain in [host_port.clone(), host_port.trim_start_matches("quic://").to_string()] {
        let err = quic.send(&plain, &handoff("r9", 8), LEASE).await.unwrap_err();
        assert!(matches!(&err, TransferError::Connect { reason, .. } if reason.contains("refusing")), "{err}");
    }

    // A CA that did not sign the receiver's certificate.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir);
    let ca_quic = QuicTransport::new(QuicTrust::from_ca_file(&pki.ca).unwrap());
    let err = ca_quic.send(&host_port, &handoff("r9", 8), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Connect { reason, .. } if reason.contains("certificate")), "{err}");

    // A malformed pin is no pin at all: refused, not ignored.
    let err = quic.send(&format!("{host_port}#sha256=abc"), &handoff("r9", 8), LEASE).await.unwrap_err();
    assert!(matches!(err, TransferError::Connect { .. }), "{err}");
    let err = quic.send(&format!("{host_port}#sha265={other}"), &handoff("r9", 8), LEASE).await.unwrap_err();
    assert!(matches!(err, TransferError::Connect { .. }), "{err}");

    // None of it reached the waiting request.
    assert!(tokio::time::timeout(Duration::from_millis(100), pending.arrived()).await.is_err());
    assert_eq!(quic.cached_connections() + ca_quic.cached_connections(), 0);
}

/// A CA and a receiver certificate it signed (for `localhost` and 127.0.0.1), as PEM files.
struct Pki {
    ca: std::path::PathBuf,
    chain: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl Pki {
    fn new(dir: &tempfile::TempDir) -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "tandem test ca");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let mut leaf_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.use_authority_key_identifier_extension = true;
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

        let pki = Pki { ca: dir.path().join("ca.pem"), chain: dir.path().join("chain.pem"), key: dir.path().join("key.pem") };
        std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
        std::fs::write(&pki.chain, format!("{}{}", leaf.pem(), ca_cert.pem())).unwrap();
        std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
        pki
    }
}

#[tokio::test]
async fn configured_certificates_are_validated_against_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir);
    let tls = QuicTlsConfig::Files { cert_chain: pki.chain.clone(), key: pki.key.clone(), ca_bundle: pki.ca.clone() };
    let identity = tls.identity().unwrap();
    assert!(!identity.is_generated());
    let registry = HandoffRegistry::new();
    let rx = start(&registry, identity, std::net::UdpSocket::bind(localhost()).unwrap(), LEASE);
    // CA-validated receivers advertise no pin.
    assert!(!rx.addr.contains('#'), "{}", rx.addr);
    let quic = QuicTransport::new(tls.trust().unwrap());
    let port = QuicPeer::parse(&rx.addr).unwrap().port();

    // Validated by IP (the certificate names 127.0.0.1), then by name.
    for (id, addr) in [("c1", rx.addr.clone()), ("c2", format!("127.0.0.1:{port}#sni=localhost"))] {
        let mut pending = registry.register(id).unwrap();
        let accept = tokio::spawn(async move { pending.arrived().await.unwrap().verdict.send(Ok(())).unwrap() });
        let report = quic.send(&addr, &handoff(id, 9), LEASE).await.unwrap_or_else(|e| panic!("{addr}: {e}"));
        accept.await.unwrap();
        assert_eq!(report.blocks, 3);
    }

    // A name the certificate does not carry.
    let err = quic.send(&format!("127.0.0.1:{port}#sni=decode-7.example"), &handoff("c4", 9), LEASE).await.unwrap_err();
    assert!(matches!(err, TransferError::Connect { .. }), "{err}");
    // Broken configuration is reported, not papered over.
    assert!(QuicIdentity::from_pem_files(&pki.chain, &pki.ca).is_err());
    assert!(QuicTrust::from_ca_pem(b"not a pem").is_err());
    assert_eq!(registry.waiting(), 0);
}

#[tokio::test]
async fn a_sender_that_stalls_mid_payload_is_cut_off_by_the_receivers_lease() {
    let registry = HandoffRegistry::new();
    let rx = receiver(&registry).await;
    let mut pending = registry.register("r10").unwrap();
    let config = QuicTransport::pinned_only().client_config(&rx.addr).unwrap();
    let endpoint = quinn::Endpoint::client(localhost()).unwrap();
    let target: SocketAddr = rx.addr.trim_start_matches("quic://").split('#').next().unwrap().parse().unwrap();
    let conn = endpoint.connect_with(config, target, "127.0.0.1").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"TKQ1").await.unwrap();
    // Half a header, then silence: the receiver must give up and never deliver.
    send.write_all(&100u32.to_le_bytes()).await.unwrap();
    send.write_all(b"{\"request_id\":").await.unwrap();
    let arrived = tokio::time::timeout(LEASE * 2, pending.arrived()).await;
    assert!(arrived.is_err(), "nothing may be delivered from a stalled transfer");
    // The receiver answered with a failure verdict and finished the stream.
    let rest = tokio::time::timeout(Duration::from_secs(1), recv.read_to_end(1 << 20)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("lease"), "{}", String::from_utf8_lossy(&rest));
}

#[test]
fn addresses_carry_the_pin() {
    let pin = "AB".repeat(32);
    let p = QuicPeer::parse(&format!("quic://10.0.0.7:4433#sha256={pin}")).unwrap();
    assert_eq!((p.host(), p.port(), p.server_name()), ("10.0.0.7", 4433, "10.0.0.7"));
    assert_eq!(p.fingerprint(), Some(pin.to_lowercase()));
    assert_eq!(p.to_string(), format!("quic://10.0.0.7:4433#sha256={}", pin.to_lowercase()));
    // Colon-separated fingerprints, IPv6 hosts, an SNI override, no scheme.
    let colons = vec!["ab"; 32].join(":");
    let p: QuicPeer = format!("[::1]:9#sni=decode-0&sha256={colons}").parse().unwrap();
    assert_eq!((p.host(), p.port(), p.server_name()), ("::1", 9, "decode-0"));
    assert_eq!(p.to_string(), format!("quic://[::1]:9#sha256={}&sni=decode-0", "ab".repeat(32)));
    assert_eq!(QuicPeer::parse(&p.to_string()).unwrap(), p);
    for bad in ["", "host", "host:port", ":1", "quic://h:1#sha256=zz", "h:1#pin=ab", "[::1:9"] {
        assert!(matches!(QuicPeer::parse(bad), Err(TransferError::Connect { .. })), "{bad}");
    }
}
