//! The UCX transport under faults: every transfer ends in a definite outcome within its lease, and
//! no registered buffer outlives its transfer (or, for an abandoned one, its connection).

mod common;

use common::{handoff, LEASE};
use tandem_protocol::{ApiError, ErrorCode};

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Once;
use std::time::{Duration, Instant};

use tandem_protocol::KvLayout;
use tandem_transfer::{Handoff, HandoffRegistry, KvTransport, TransferError, UcxReceiver, UcxStats, UcxTransport};
use tandem_ucx::{Context, Endpoint, Worker};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

// The wire format, as the hand-written peers below speak it: an active-message kind (OFFER, READY,
// DONE = 3, VERDICT, ABORT), then the transfer id (u64, little endian) and the body.
const OFFER: u16 = 1;
const READY: u16 = 2;
const VERDICT: u16 = 4;
const ABORT: u16 = 5;

/// Unless the environment already chooses, pins UCX to TCP before any UCX context exists in this
/// process (child processes inherit it). Loopback works without this (these tests also pass with
/// UCX's defaults and with `tcp,sm,self`), but then the transport carrying them, and so the
/// timings the fault tests assert, would depend on the host: shared memory here, verbs on a
/// machine with an RDMA NIC. TCP is the path between hosts without RDMA, where the puts travel
/// over the same sockets whose loss the fault tests provoke.
fn ucx_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("UCX_TLS").is_none() {
            std::env::set_var("UCX_TLS", "tcp");
        }
    });
}

fn transport() -> UcxTransport {
    ucx_env();
    UcxTransport::new().unwrap()
}

async fn receiver(registry: &HandoffRegistry, lease: Duration) -> (String, UcxStats, CancellationToken) {
    ucx_env();
    let r = UcxReceiver::new("127.0.0.1:0".parse().unwrap(), registry.clone(), lease).await.unwrap();
    let addr = r.local_addr().unwrap().to_string();
    let stats = r.stats();
    let stop = CancellationToken::new();
    tokio::spawn(r.run(stop.clone()));
    (addr, stats, stop)
}

fn worker() -> Worker {
    ucx_env();
    Worker::new(Context::new().unwrap()).unwrap()
}

fn frame(xfer: u64, body: &[u8]) -> Vec<u8> {
    let mut data = xfer.to_le_bytes().to_vec();
    data.extend_from_slice(body);
    data
}

fn offer_of(h: &Handoff) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "request_id": h.request_id,
        "first_token": h.first_token,
        "layout": h.kv.layout,
        "tokens": h.kv.tokens,
        "checksums": h.kv.checksums,
    }))
    .unwrap()
}

/// Waits (briefly: releases are asynchronous) until no registered buffer is in use.
async fn no_buffers_in_use(stats: &[&UcxStats]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.iter().any(|s| s.buffers_in_use() != 0) {
        assert!(Instant::now() < deadline, "registered buffers leaked: {stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn delivers_blocks_and_the_receivers_verdict_twice_over_one_endpoint() {
    let registry = HandoffRegistry::new();
    let (addr, received, _stop) = receiver(&registry, LEASE).await;
    let ucx = transport();
    for id in ["r1", "r1-again"] {
        let mut pending = registry.register(id).unwrap();
        let sent = handoff(id, 10);
        let expected = sent.clone();
        let accept = tokio::spawn(async move {
            let incoming = pending.arrived().await.unwrap();
            assert_eq!(incoming.handoff, expected);
            incoming.verdict.send(Ok(())).unwrap();
        });
        let report = ucx.send(&addr, &sent, LEASE).await.unwrap();
        accept.await.unwrap();
        assert_eq!(ucx.name(), "ucx");
        assert_eq!(report.transport, "ucx");
        assert_eq!(report.blocks, 3);
        assert_eq!(report.bytes, 3 * sent.kv.layout.block_bytes() as u64);
    }
    // The second transfer reused the first one's endpoint and receive buffer (back in the pool
    // once the first request dropped its blocks); the sender put the blocks from where they lay,
    // with no buffer of its own.
    assert_eq!((ucx.stats().connections(), received.connections()), (1, 1));
    assert_eq!((ucx.stats().buffers_registered(), received.buffers_registered()), (0, 1));
    assert_eq!(registry.waiting(), 0);
    no_buffers_in_use(&[&ucx.stats(), &received]).await;
}

#[tokio::test]
async fn a_refusal_reaches_the_sender() {
    let registry = HandoffRegistry::new();
    let (addr, received, _stop) = receiver(&registry, LEASE).await;
    let ucx = transport();
    // Nobody registered r2.
    let err = ucx.send(&addr, &handoff("r2", 5), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Refused { code: ErrorCode::NotFound, message: m } if m.contains("no request r2")), "{err}");
    // Registered, then the receiver turns the blocks down (e.g. out of KV blocks).
    let mut pending = registry.register("r3").unwrap();
    tokio::spawn(async move {
        pending.arrived().await.unwrap().verdict.send(Err(ApiError::new(ErrorCode::OutOfKvBlocks, "out of blocks"))).unwrap()
    });
    let err = ucx.send(&addr, &handoff("r3", 5), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Refused { code: ErrorCode::OutOfKvBlocks, message: m } if m.contains("out of blocks")), "{err}");
    // An inconsistent header is refused before any payload moves.
    let mut bad = handoff("r3b", 8);
    bad.kv.checksums.pop();
    let err = ucx.send(&addr, &bad, LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Refused { message: m, .. } if m.contains("inconsistent header")), "{err}");
    no_buffers_in_use(&[&ucx.stats(), &received]).await;
}

#[tokio::test]
async fn corrupted_payload_is_detected() {
    let registry = HandoffRegistry::new();
    let (addr, received, _stop) = receiver(&registry, LEASE).await;
    let _pending = registry.register("r4").unwrap();
    let ucx = transport();
    let mut bad = handoff("r4", 8);
    common::corrupt(&mut bad.kv, 1, 3);
    let err = ucx.send(&addr, &bad, LEASE).await.unwrap_err();
    assert!(
        matches!(&err, TransferError::Refused { code: ErrorCode::KvHandoffFailed, message: m } if m.contains("block 1 fails its checksum")),
        "{err}"
    );
    no_buffers_in_use(&[&ucx.stats(), &received]).await;
}

#[tokio::test]
async fn a_dropped_message_costs_one_lease_not_a_hang() {
    // A receiver that takes the offer and never answers it.
    let hole = worker();
    let listener = hole.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().to_string();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let _keep = tokio::spawn(async move {
        let ep = listener.accept().await.unwrap();
        while let Ok(m) = ep.recv().await {
            let _ = seen_tx.send((m.kind, m.data[..8].to_vec()));
        }
    });
    let ucx = transport();
    let started = Instant::now();
    let err = ucx.send(&addr, &handoff("r5", 8), LEASE).await.unwrap_err();
    assert_eq!(err, TransferError::LeaseExpired(LEASE));
    let took = started.elapsed();
    assert!(took >= LEASE && took < LEASE * 2, "{took:?}");
    // Having given up, the sender says so, for the same transfer.
    let (kind, offered) = seen.recv().await.unwrap();
    assert_eq!(kind, OFFER);
    let (kind, aborted) = tokio::time::timeout(Duration::from_secs(1), seen.recv()).await.unwrap().unwrap();
    assert_eq!((kind, aborted), (ABORT, offered));
    no_buffers_in_use(&[&ucx.stats()]).await;
}

/// A hand-written sender that offers, learns where to put the blocks, and then goes quiet.
async fn stall(client: &Worker, addr: &str, xfer: u64, id: &str) -> Endpoint {
    let ep = client.connect(addr.parse().unwrap()).await.unwrap();
    ep.send(OFFER, frame(xfer, &offer_of(&handoff(id, 8)))).await.unwrap();
    let ready = ep.recv().await.unwrap();
    assert_eq!((ready.kind, &ready.data[..8]), (READY, &xfer.to_le_bytes()[..]));
    ep
}

async fn verdict_text(ep: &Endpoint) -> String {
    let verdict = tokio::time::timeout(Duration::from_secs(2), ep.recv()).await.unwrap().unwrap();
    assert_eq!(verdict.kind, VERDICT);
    String::from_utf8_lossy(&verdict.data[8..]).into_owned()
}

#[tokio::test]
async fn a_sender_that_stalls_mid_transfer_is_cut_off_by_the_receivers_lease() {
    let registry = HandoffRegistry::new();
    let (addr, received, _stop) = receiver(&registry, LEASE).await;
    let mut pending = registry.register("r8").unwrap();
    let client = worker();
    let ep = stall(&client, &addr, 77, "r8").await;
    assert_eq!(received.buffers_in_use(), 1);
    let arrived = tokio::time::timeout(LEASE * 2, pending.arrived()).await;
    assert!(arrived.is_err(), "nothing may be delivered from a stalled transfer");
    // The receiver answered with a failure verdict...
    let text = verdict_text(&ep).await;
    assert!(text.contains("lease"), "{text}");
    // ...but holds back the buffer it exposed while this sender could still write into it, until
    // the sender reports (after a flush) that it gave up,
    assert_eq!(received.buffers_in_use(), 1);
    ep.send(ABORT, frame(77, &[])).await.unwrap();
    no_buffers_in_use(&[&received]).await;
    // or until the connection closes.
    let ep = stall(&client, &addr, 78, "r8").await;
    assert!(verdict_text(&ep).await.contains("lease"));
    assert_eq!(received.buffers_in_use(), 1);
    drop(ep);
    no_buffers_in_use(&[&received]).await;
    // A sender that gives up in time ends the transfer at once, without waiting for the lease.
    let ep = stall(&client, &addr, 79, "r8").await;
    let started = Instant::now();
    ep.send(ABORT, frame(79, &[])).await.unwrap();
    let text = verdict_text(&ep).await;
    assert!(text.contains("gave up") && started.elapsed() < LEASE / 2, "{text}");
    no_buffers_in_use(&[&received]).await;
    assert_eq!(received.buffers_registered(), 1, "buffers left registered");
}

/// A receiver that answers READY with a real registered buffer, then vanishes while the blocks
/// are on their way.
async fn cutting_receiver() -> (String, tokio::task::JoinHandle<()>) {
    let w = worker();
    let listener = w.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().to_string();
    let cut = tokio::spawn(async move {
        let ep: Endpoint = listener.accept().await.unwrap();
        let offer = ep.recv().await.unwrap();
        assert_eq!(offer.kind, OFFER);
        let h: serde_json::Value = serde_json::from_slice(&offer.data[8..]).unwrap();
        let layout: KvLayout = serde_json::from_value(h["layout"].clone()).unwrap();
        let len = layout.num_blocks() * layout.block_bytes();
        let buffer = w.register(len).await.unwrap();
        // READY: buffer id, address, length, packed key.
        let mut body = 1u64.to_le_bytes().to_vec();
        body.extend_from_slice(&buffer.address().to_le_bytes());
        body.extend_from_slice(&(len as u64).to_le_bytes());
        body.extend_from_slice(buffer.rkey());
        ep.send(READY, frame(u64::from_le_bytes(offer.data[..8].try_into().unwrap()), &body)).await.unwrap();
        // Cut: endpoint, listener and worker all go at once.
        drop((ep, buffer, w));
    });
    (addr, cut)
}

#[tokio::test]
async fn a_dead_peer_or_a_cut_connection_fails_fast() {
    let ucx = transport();
    // Nobody listens there.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let started = Instant::now();
    let err = ucx.send(&gone, &handoff("r6", 8), LEASE).await.unwrap_err();
    assert!(matches!(err, TransferError::Connect { .. }), "{err}");
    assert!(started.elapsed() < LEASE);

    // The receiver drops the connection while the payload (a few MB) is being written.
    let (addr, cut) = cutting_receiver().await;
    let started = Instant::now();
    let err = ucx.send(&addr, &handoff("r7", 40_000), LEASE).await.unwrap_err();
    assert!(matches!(err, TransferError::Io(_)), "{err}");
    assert!(started.elapsed() < LEASE, "{:?}", started.elapsed());
    cut.await.unwrap();
    no_buffers_in_use(&[&ucx.stats()]).await;

    // A broken connection is not reused: the next transfer reconnects.
    let registry = HandoffRegistry::new();
    let (addr, _received, _stop) = receiver(&registry, LEASE).await;
    let mut pending = registry.register("r7b").unwrap();
    tokio::spawn(async move { pending.arrived().await.unwrap().verdict.send(Ok(())).unwrap() });
    ucx.send(&addr, &handoff("r7b", 8), LEASE).await.unwrap();
}

/// Runs in a child process (this test binary, re-executed): a real receiver that takes the blocks
/// and then never gives its verdict, until the parent kills it.
async fn child_receiver() {
    let registry = HandoffRegistry::new();
    let (addr, _received, _stop) = receiver(&registry, Duration::from_secs(60)).await;
    let mut pending = registry.register("rk").unwrap();
    println!("ADDR {addr}");
    let _incoming = pending.arrived().await.unwrap();
    println!("ARRIVED");
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn a_receiver_killed_mid_transfer_fails_the_transfer_well_before_the_lease() {
    const CHILD: &str = "TANDEM_UCX_TEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return child_receiver().await;
    }
    ucx_env();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["a_receiver_killed_mid_transfer_fails_the_transfer_well_before_the_lease", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().expect("child exited");
        // The test harness may have started the line with the test's name.
        if let Some((_, addr)) = line.rsplit_once("ADDR ") {
            break addr.parse().unwrap();
        }
    };
    let lease = Duration::from_secs(30);
    let ucx = transport();
    let sender = ucx.clone();
    let mut transfer = tokio::spawn(async move {
        let sent = sender.send(&addr.to_string(), &handoff("rk", 4000), lease).await;
        (sent, Instant::now())
    });
    // Once the blocks are in, the sender waits for a verdict that will never come.
    loop {
        tokio::select! {
            line = lines.next_line() => match line.unwrap() {
                Some(line) if line.ends_with("ARRIVED") => break,
                Some(_) => {}
                None => panic!("the child exited"),
            },
            ended = &mut transfer => panic!("the transfer ended before the blocks arrived: {:?}", ended.unwrap().0),
            _ = tokio::time::sleep(Duration::from_secs(30)) => panic!("the blocks never arrived"),
        }
    }
    let killed = Instant::now();
    child.kill().await.unwrap();
    let (sent, failed) = tokio::time::timeout(lease, transfer).await.expect("the transfer outlived its peer").unwrap();
    let err = sent.unwrap_err();
    assert!(matches!(err, TransferError::Io(_)), "{err}");
    let took = failed.saturating_duration_since(killed);
    assert!(took < Duration::from_secs(2), "took {took:?} to notice the dead peer");
    no_buffers_in_use(&[&ucx.stats()]).await;
}
