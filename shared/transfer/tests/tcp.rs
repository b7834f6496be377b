//! The TCP transport under faults: every transfer ends in a definite outcome within its lease.

mod common;

use common::{handoff, tcp_receiver, LEASE};
use tandem_protocol::{ApiError, ErrorCode};

use std::time::{Duration, Instant};

use tandem_transfer::{HandoffRegistry, KvTransport, TcpTransport, TransferError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

#[tokio::test]
async fn delivers_blocks_and_the_receivers_verdict() {
    let registry = HandoffRegistry::new();
    let (addr, _stop) = tcp_receiver(&registry).await;
    let mut pending = registry.register("r1").unwrap();
    let sent = handoff("r1", 10);
    let expected = sent.clone();
    let accept = tokio::spawn(async move {
        let incoming = pending.arrived().await.unwrap();
        assert_eq!(incoming.handoff, expected);
        incoming.verdict.send(Ok(())).unwrap();
    });
    let report = TcpTransport.send(&addr, &sent, LEASE).await.unwrap();
    accept.await.unwrap();
    assert_eq!(report.transport, "tcp");
    assert_eq!(report.blocks, 3);
    assert_eq!(report.bytes, 3 * sent.kv.layout.block_bytes() as u64);
    assert_eq!(registry.waiting(), 0);
    // One registration per request id at a time.
    let _first = registry.register("dup").unwrap();
    assert!(registry.register("dup").is_none());
}

#[tokio::test]
async fn a_refusal_reaches_the_sender() {
    let registry = HandoffRegistry::new();
    let (addr, _stop) = tcp_receiver(&registry).await;
    // Nobody registered r2.
    let err = TcpTransport.send(&addr, &handoff("r2", 5), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Refused { code: ErrorCode::NotFound, message: m } if m.contains("no request r2")), "{err}");
    // Registered, then the receiver turns the blocks down (e.g. out of KV blocks).
    let mut pending = registry.register("r3").unwrap();
    tokio::spawn(async move {
        pending.arrived().await.unwrap().verdict.send(Err(ApiError::new(ErrorCode::OutOfKvBlocks, "out of blocks"))).unwrap()
    });
    let err = TcpTransport.send(&addr, &handoff("r3", 5), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Refused { code: ErrorCode::OutOfKvBlocks, message: m } if m.contains("out of blocks")), "{err}");
}

#[tokio::test]
async fn corrupted_payload_is_detected() {
    let registry = HandoffRegistry::new();
    let (addr, _stop) = tcp_receiver(&registry).await;
    let _pending = registry.register("r4").unwrap();
    let mut bad = handoff("r4", 8);
    common::corrupt(&mut bad.kv, 1, 3);
    let err = TcpTransport.send(&addr, &bad, LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Refused { code: ErrorCode::KvHandoffFailed, message: m } if m.contains("checksum")), "{err}");
}

#[tokio::test]
async fn a_silent_peer_costs_one_lease_not_a_hang() {
    let hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hole.local_addr().unwrap().to_string();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let started = Instant::now();
    let err = TcpTransport.send(&addr, &handoff("r5", 8), LEASE).await.unwrap_err();
    assert_eq!(err, TransferError::LeaseExpired(LEASE));
    let took = started.elapsed();
    assert!(took >= LEASE && took < LEASE * 2, "{took:?}");
}

#[tokio::test]
async fn a_dead_peer_or_a_cut_connection_fails_fast() {
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
    let err = TcpTransport.send(&gone, &handoff("r6", 8), LEASE).await.unwrap_err();
    assert!(matches!(err, TransferError::Connect { .. }), "{err}");

    // The peer reads a little, then drops the connection mid-payload.
    let cut = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = cut.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut s, _) = cut.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
        let _ = s.shutdown().await;
    });
    let started = Instant::now();
    let err = TcpTransport.send(&addr, &handoff("r7", 4000), LEASE).await.unwrap_err();
    assert!(matches!(err, TransferError::Io(_)), "{err}");
    assert!(started.elapsed() < LEASE);
}

#[tokio::test]
async fn a_sender_that_stalls_mid_payload_is_cut_off_by_the_receivers_lease() {
    let registry = HandoffRegistry::new();
    let (addr, _stop) = tcp_receiver(&registry).await;
    let mut pending = registry.register("r8").unwrap();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"TKV1").await.unwrap();
    // Half a header, then silence: the receiver must give up and never deliver.
    s.write_all(&100u32.to_le_bytes()).await.unwrap();
    s.write_all(b"{\"request_id\":").await.unwrap();
    let arrived = tokio::time::timeout(LEASE * 2, pending.arrived()).await;
    assert!(arrived.is_err(), "nothing may be delivered from a stalled transfer");
    // The receiver answered with a failure verdict and closed.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest)).await.unwrap().unwrap();
    assert!(n > 0 && String::from_utf8_lossy(&rest).contains("lease"), "{}", String::from_utf8_lossy(&rest));
}
