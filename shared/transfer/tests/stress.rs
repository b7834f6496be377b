//! Many handoffs at once over every transport, with everything that made buffers change hands
//! under load: random sizes, receive buffers pooled, freed and allocated again, senders dropping
//! their blocks as soon as a transfer ends, the same blocks sent to two receivers at once, fast
//! and slow receivers, receivers that refuse, requests withdrawn mid-transfer and senders that
//! give up mid-transfer. Every block a receiver accepts is compared byte for byte with what was
//! sent, and no transfer may fail a checksum.
//!
//! UCX runs with its defaults here (its own test binary, so nothing pins it to TCP): on one host
//! that is POSIX shared memory, where a put is a plain copy into the receiver's memory through a
//! mapping the sender made from the receiver's key.
//!
//! `TANDEM_STRESS_SECS` (default 4) sets how long each randomised run lasts.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_protocol::{Bytes, KvDtype, KvExport, KvLayout};
use tandem_transfer::{
    Handoff, HandoffRegistry, KvTransport, QuicIdentity, QuicReceiver, QuicTransport, TransferError, UcxReceiver, UcxStats, UcxTransport,
};
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ucx,
    Tcp,
    Quic,
}

struct Pair {
    transport: Arc<dyn KvTransport>,
    addr: String,
    registry: HandoffRegistry,
    stats: Option<(UcxStats, UcxStats)>,
    _stop: tokio_util::sync::DropGuard,
}

async fn pair(kind: Kind) -> Pair {
    let registry = HandoffRegistry::new();
    let stop = CancellationToken::new();
    let (transport, addr, stats): (Arc<dyn KvTransport>, String, _) = match kind {
        Kind::Ucx => {
            let r = UcxReceiver::new("127.0.0.1:0".parse().unwrap(), registry.clone(), LEASE).await.unwrap();
            let addr = r.local_addr().unwrap().to_string();
            let received = r.stats();
            tokio::spawn(r.run(stop.clone()));
            let t = UcxTransport::new().unwrap();
            let sent = t.stats();
            (Arc::new(t), addr, Some((sent, received)))
        }
        Kind::Tcp => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let r = tandem_transfer::TcpReceiver::new(listener, registry.clone(), LEASE);
            let addr = r.local_addr().unwrap().to_string();
            tokio::spawn(r.run(stop.clone()));
            (Arc::new(tandem_transfer::TcpTransport), addr, None)
        }
        Kind::Quic => {
            let identity = QuicIdentity::generate(&[]).unwrap();
            let r = QuicReceiver::bind("127.0.0.1:0".parse().unwrap(), &identity, registry.clone(), LEASE).unwrap();
            let addr = r.advertised_addr().unwrap();
            tokio::spawn(r.run(stop.clone()));
            (Arc::new(QuicTransport::pinned_only()), addr, None)
        }
    };
    Pair { transport, addr, registry, stats, _stop: stop.drop_guard() }
}

fn layout(tokens: usize) -> KvLayout {
    // 2 layers × K,V × 16 tokens × 2 heads × 64 dims × 2 bytes: 16 KiB a block.
    KvLayout {
        model_id: "stress".into(),
        num_layers: 2,
        kv_heads: 2,
        head_dim: 64,
        dtype: KvDtype::Bf16,
        block_size: 16,
        tp_rank: 0,
        tp_size: 1,
        token_count: tokens,
    }
}

/// The bytes of block `block` of request `seed`: a stream no other block shares.
fn block_bytes(seed: u64, block: usize, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (block as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A request's handoff, its blocks freshly allocated (and freed again when the caller drops it).
fn make_handoff(id: &str, seed: u64, tokens: usize) -> Handoff {
    let layout = layout(tokens);
    let blocks: Vec<Bytes> = (0..layout.num_blocks()).map(|b| Bytes::from(block_bytes(seed, b, layout.block_bytes()))).collect();
    let checksums = blocks.iter().map(|b| KvExport::checksum(b)).collect();
    Handoff {
        request_id: id.into(),
        first_token: seed as u32,
        kv: KvExport { layout, tokens: vec![7; tokens], blocks, checksums, device: None },
    }
}

/// What the receiving request does with its blocks.
#[derive(Debug, Clone, Copy)]
enum Receiving {
    /// Checks and takes them at once, and lets go of them.
    Fast,
    /// Takes a while to answer, then keeps the blocks a while longer (an import).
    Slow,
    /// Turns them down (out of KV blocks).
    Refuse,
    /// Gives up on the request before or while they arrive.
    Withdraw,
}

#[derive(Debug, Default)]
struct Tally {
    accepted: AtomicU64,
    refused: AtomicU64,
    withdrawn: AtomicU64,
    sender_gave_up: AtomicU64,
    other_failures: AtomicU64,
    bytes_checked: AtomicU64,
}

/// The receiving side of one request: its task, and what withdraws it (as the gateway cancels
/// the decode side of a request whose prefill gave up).
struct Receiver {
    task: tokio::task::JoinHandle<()>,
    withdraw: CancellationToken,
}

/// Registers `id` and plays the receiving request, comparing every byte it takes with what `seed`
/// says was sent.
fn receive(registry: &HandoffRegistry, id: String, seed: u64, tokens: usize, how: Receiving, tally: Arc<Tally>) -> Receiver {
    let mut pending = registry.register(&id).expect("ids are unique");
    let withdraw = CancellationToken::new();
    let withdrawn = withdraw.clone();
    let task = tokio::spawn(async move {
        if let Receiving::Withdraw = how {
            tokio::time::sleep(Duration::from_micros(seed % 3000)).await;
            drop(pending);
            return;
        }
        let incoming = tokio::select! {
            _ = withdrawn.cancelled() => return,
            arrived = tokio::time::timeout(LEASE * 2, pending.arrived()) => arrived,
        };
        let Ok(Some(incoming)) = incoming else { panic!("{id}: the blocks never came, and nobody withdrew the request") };
        let kv = &incoming.handoff.kv;
        assert_eq!(kv.layout.token_count, tokens, "{id}: wrong request delivered");
        assert_eq!(kv.first_corrupt_block(), None, "{id}: a block handed over does not match its checksum");
        for (b, block) in kv.blocks.iter().enumerate() {
            assert!(block[..] == block_bytes(seed, b, block.len())[..], "{id}: block {b} differs from what was sent");
        }
        tally.bytes_checked.fetch_add(kv.total_bytes() as u64, Ordering::Relaxed);
        match how {
            Receiving::Refuse => drop(
                incoming
                    .verdict
                    .send(Err(tandem_protocol::ApiError::new(tandem_protocol::ErrorCode::OutOfKvBlocks, "out of KV cache blocks"))),
            ),
            Receiving::Slow => {
                tokio::time::sleep(Duration::from_micros(seed % 8000)).await;
                let _ = incoming.verdict.send(Ok(()));
                // Keep reading the blocks a little (as an engine importing them would).
                tokio::time::sleep(Duration::from_micros(seed % 5000)).await;
                assert_eq!(incoming.handoff.kv.first_corrupt_block(), None, "{id}: blocks changed while held");
            }
            _ => drop(incoming.verdict.send(Ok(()))),
        }
    });
    Receiver { task, withdraw }
}

/// Sends one handoff and files its outcome; checksum refusals fail the test. A sender that gives
/// up withdraws its receiver.
async fn send(pair: &Pair, h: Handoff, deadline: Option<Duration>, expect_ok: bool, tally: &Tally, receiver: &Receiver) {
    let started = Instant::now();
    let sent = match deadline {
        // The sender gives up (its caller was cancelled): the future is dropped mid-transfer.
        Some(d) => match tokio::time::timeout(d, pair.transport.send(&pair.addr, &h, LEASE)).await {
            Ok(r) => r,
            Err(_) => {
                tally.sender_gave_up.fetch_add(1, Ordering::Relaxed);
                receiver.withdraw.cancel();
                return;
            }
        },
        None => pair.transport.send(&pair.addr, &h, LEASE).await,
    };
    assert!(started.elapsed() < LEASE + Duration::from_secs(1), "{}: a send outlived its lease", h.request_id);
    match sent {
        Ok(_) => {
            assert!(expect_ok, "{}: accepted by a receiver that refuses", h.request_id);
            tally.accepted.fetch_add(1, Ordering::Relaxed);
        }
        Err(TransferError::Refused { code, message: why }) => {
            assert!(!why.contains("checksum"), "{}: {why}", h.request_id);
            if code == tandem_protocol::ErrorCode::OutOfKvBlocks {
                tally.refused.fetch_add(1, Ordering::Relaxed);
            } else {
                tally.withdrawn.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => {
            assert!(!e.to_string().contains("checksum"), "{}: {e}", h.request_id);
            tally.other_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn stress_duration() -> Duration {
    let secs = std::env::var("TANDEM_STRESS_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(4.0);
    Duration::from_secs_f64(secs)
}

/// Waves of concurrent handoffs with random sizes and behaviours until the time is up.
async fn stress(kind: Kind, seed: u64) {
    let pair = Arc::new(pair(kind).await);
    let tally = Arc::new(Tally::default());
    let mut rng = StdRng::seed_from_u64(seed);
    let until = Instant::now() + stress_duration();
    let mut next = 0u64;
    let mut waves = 0;
    while Instant::now() < until || waves < 3 {
        waves += 1;
        // Bursts of very different widths make the receive pool grow, shrink and grow again.
        let width = [4usize, 48, 8, 64, 24][waves % 5];
        let mut tasks = Vec::new();
        for _ in 0..width {
            next += 1;
            let id = format!("{kind:?}-{next}");
            let req_seed = rng.random::<u64>();
            // Mostly a few sizes (as prompts of one length give), now and then anything.
            let tokens = if rng.random_bool(0.7) { [64, 80, 200][rng.random_range(0..3)] } else { rng.random_range(1..400) };
            let how = match rng.random_range(0..10) {
                0..=4 => Receiving::Fast,
                5..=6 => Receiving::Slow,
                7 => Receiving::Refuse,
                _ => Receiving::Withdraw,
            };
            let give_up = rng.random_bool(0.1).then(|| Duration::from_micros(rng.random_range(50..3000)));
            let receiver = receive(&pair.registry, id.clone(), req_seed, tokens, how, tally.clone());
            let h = make_handoff(&id, req_seed, tokens);
            // Now and then the same blocks go to a second request at once (shared, not copied).
            let twin = rng.random_bool(0.1).then(|| {
                next += 1;
                let twin_id = format!("{kind:?}-{next}");
                let r = receive(&pair.registry, twin_id.clone(), req_seed, tokens, Receiving::Fast, tally.clone());
                (Handoff { request_id: twin_id, ..h.clone() }, r)
            });
            let (pair, tally) = (pair.clone(), tally.clone());
            let expect_ok = !matches!(how, Receiving::Refuse);
            tasks.push(tokio::spawn(async move {
                let twin_send = async {
                    if let Some((twin, r)) = twin {
                        send(&pair, twin, None, true, &tally, &r).await;
                        r.task.await.unwrap();
                    }
                };
                // `h` is moved in and dropped as the send returns: the sender frees its blocks.
                tokio::join!(send(&pair, h, give_up, expect_ok, &tally, &receiver), twin_send);
                receiver.task.await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    eprintln!("{kind:?}: {waves} waves, {tally:?}");
    assert!(tally.accepted.load(Ordering::Relaxed) > 0);
    assert_eq!(tally.other_failures.load(Ordering::Relaxed), 0, "{kind:?}: transfers failed for no reason the test gave");
    if let Some((sent, received)) = &pair.stats {
        let deadline = Instant::now() + Duration::from_secs(5);
        while sent.buffers_in_use() + received.buffers_in_use() != 0 {
            assert!(Instant::now() < deadline, "registered buffers leaked: {sent:?} {received:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ucx_under_load_delivers_every_block_intact() {
    stress(Kind::Ucx, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_under_load_delivers_every_block_intact() {
    stress(Kind::Tcp, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quic_under_load_delivers_every_block_intact() {
    stress(Kind::Quic, 3).await;
}

/// The pattern that corrupted handoffs on one host: a burst wider than the receiver's idle pool
/// returns more buffers than it keeps, so some are freed; the next burst allocates new ones,
/// and UCX hands out the same file descriptor at the same address for the same size, so the new
/// buffer's packed key is byte for byte the old one's. A sender must not put into it through the
/// mapping it made of the freed buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ucx_buffers_freed_and_allocated_again_are_never_written_through_a_stale_key() {
    let pair = pair(Kind::Ucx).await;
    let tally = Arc::new(Tally::default());
    let mut next = 0u64;
    for round in 0..6u64 {
        let mut receivers = Vec::new();
        let mut sends = Vec::new();
        for _ in 0..40 {
            next += 1;
            let id = format!("burst-{next}");
            receivers.push(receive(&pair.registry, id.clone(), next, 64, Receiving::Fast, tally.clone()));
            sends.push(make_handoff(&id, next, 64));
        }
        futures::future::join_all(sends.into_iter().zip(&receivers).map(|(h, r)| send(&pair, h, None, true, &tally, r))).await;
        for r in receivers {
            r.task.await.unwrap();
        }
        assert_eq!(tally.accepted.load(Ordering::Relaxed), 40 * (round + 1), "{tally:?}");
    }
}
