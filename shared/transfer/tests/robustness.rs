//! Bytes from a KV peer are input from outside: whatever arrives, the receivers (TCP, QUIC, UCX)
//! never panic, answer with a refusal (or drop the connection), and never hand a request blocks
//! that are not the ones sent. Inputs: arbitrary bytes; valid transfers with bits flipped, cut
//! short, or with their length field rewritten; headers whose layout fields are nonsense (zero,
//! huge, inconsistent) so that the size checks must refuse them before anything is allocated.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};
use std::time::Duration;

use common::{handoff, tcp_receiver, LEASE};
use proptest::prelude::*;
use serde_json::{json, Value};
use tandem_transfer::{Handoff, HandoffRegistry, KvTransport, QuicIdentity, QuicReceiver, QuicTransport, TcpTransport, UcxReceiver};
use tandem_ucx::{Context, Endpoint, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// Panics anywhere in this process (receiver tasks included, which tokio would otherwise only
/// log): every property checks that none happened.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        count_panics();
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    })
}

/// A transfer's header as the transports write it.
fn header_json(h: &Handoff) -> Value {
    json!({
        "request_id": h.request_id,
        "first_token": h.first_token,
        "layout": h.kv.layout,
        "tokens": h.kv.tokens,
        "checksums": h.kv.checksums,
    })
}

/// A whole stream transfer (TCP or QUIC): magic, length-prefixed header, blocks.
fn stream_frame(magic: &[u8; 4], header: &[u8], blocks: &[u8]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend((header.len() as u32).to_le_bytes());
    out.extend(header);
    out.extend(blocks);
    out
}

/// What is done to a valid transfer before it is sent.
#[derive(Debug, Clone)]
enum Damage {
    /// XOR one byte.
    Flip(prop::sample::Index, u8),
    /// Cut it short.
    Cut(prop::sample::Index),
    /// Rewrite the header's length field.
    Length(u32),
    /// Set a header field (a layout field, or a list) to another value, keeping the rest.
    Field(&'static str, Value),
}

const LAYOUT_FIELDS: &[&str] =
    &["num_layers", "kv_heads", "head_dim", "block_size", "tp_rank", "tp_size", "token_count", "dtype", "model_id"];

fn nonsense() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!(0),
        json!(1),
        json!(3),
        json!(5),
        json!(1 << 20),
        json!(1u64 << 31),
        json!(1u64 << 40),
        json!(u64::MAX),
        json!(-1),
        json!(1.5),
        json!(null),
        json!("f32"),
        json!("f64"),
        json!([]),
        json!([1, 2, 3]),
        json!({}),
    ])
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, m)| Damage::Flip(i, m)),
        any::<prop::sample::Index>().prop_map(Damage::Cut),
        prop_oneof![Just(0u32), Just(1), Just(64 << 20), Just((64 << 20) + 1), Just(u32::MAX), any::<u32>(), 0u32..2000]
            .prop_map(Damage::Length),
        (prop::sample::select(LAYOUT_FIELDS), nonsense()).prop_map(|(f, v)| Damage::Field(f, v)),
        (prop::sample::select(&["tokens", "checksums", "first_token", "request_id", "layout"][..]), nonsense())
            .prop_map(|(f, v)| Damage::Field(f, v)),
    ]
}

/// The handoff's stream frame after `damage`, and where a flipped byte fell.
fn damaged_stream(magic: &[u8; 4], h: &Handoff, damage: &Damage) -> (Vec<u8>, Option<usize>) {
    let mut header = header_json(h);
    if let Damage::Field(field, value) = damage {
        if LAYOUT_FIELDS.contains(field) {
            header["layout"][*field] = value.clone();
        } else {
            header[*field] = value.clone();
        }
    }
    let header = serde_json::to_vec(&header).unwrap();
    let blocks: Vec<u8> = h.kv.blocks.iter().flat_map(|b| b.iter().copied()).collect();
    let mut bytes = stream_frame(magic, &header, &blocks);
    let mut flipped = None;
    match damage {
        Damage::Flip(at, mask) => {
            let at = at.index(bytes.len());
            bytes[at] ^= mask;
            flipped = Some(at);
        }
        Damage::Cut(at) => bytes.truncate(at.index(bytes.len())),
        Damage::Length(len) => bytes[4..8].copy_from_slice(&len.to_le_bytes()),
        Damage::Field(..) => {}
    }
    (bytes, flipped)
}

/// Where the payload starts in an undamaged stream frame of `h`.
fn payload_start(h: &Handoff) -> usize {
    8 + serde_json::to_vec(&header_json(h)).unwrap().len()
}

/// Registers `h`'s request and waits (in a task) for what arrives: the receiver gets a yes if the
/// blocks are exactly those sent. Returns a handle that tells whether anything was delivered and
/// whether it was intact.
fn expect(registry: &HandoffRegistry, h: &Handoff) -> tokio::task::JoinHandle<Option<bool>> {
    let mut pending = registry.register(&h.request_id).expect("a fresh request id");
    let sent = h.kv.blocks.clone();
    runtime().spawn(async move {
        let incoming = tokio::time::timeout(LEASE * 2, pending.arrived()).await.ok()??;
        let intact = incoming.handoff.kv.blocks == sent;
        let _ = incoming.verdict.send(Ok(()));
        Some(intact)
    })
}

/// What [`expect`] saw, once the exchange is over. A delivery happens before the receiver
/// answers, and the waiting task accepts it, so a verdict other than a yes means nothing was
/// delivered (a dropped connection gets a moment's grace).
async fn delivered(mut waiting: tokio::task::JoinHandle<Option<bool>>, verdict: &Option<Value>) -> Option<bool> {
    let grace = match verdict {
        Some(v) if v["ok"] == json!(true) => LEASE,
        Some(_) => Duration::from_millis(1),
        None => Duration::from_millis(50),
    };
    let seen = tokio::time::timeout(grace, &mut waiting).await;
    waiting.abort();
    seen.ok().and_then(Result::ok).flatten()
}

/// Sends raw bytes over TCP, half-closes, and reads the verdict frame (`None` if the receiver
/// closed the connection without one).
async fn tcp_exchange(addr: &str, bytes: &[u8]) -> Option<Value> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let read = async {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.ok()?;
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut buf).await.ok()?;
        serde_json::from_slice(&buf).ok()
    };
    tokio::time::timeout(LEASE * 3, read).await.expect("the receiver answers or closes within its lease")
}

/// A verdict that refuses, with a reason.
fn assert_refused(verdict: &Value) {
    assert_eq!(verdict["ok"], json!(false), "{verdict}");
    assert!(verdict["error"].as_str().is_some_and(|e| !e.is_empty()), "{verdict}");
}

struct Tcp {
    addr: String,
    registry: HandoffRegistry,
    _stop: CancellationToken,
}

fn tcp() -> &'static Tcp {
    static T: OnceLock<Tcp> = OnceLock::new();
    T.get_or_init(|| {
        let registry = HandoffRegistry::new();
        let (addr, stop) = runtime().block_on(tcp_receiver(&registry));
        Tcp { addr, registry, _stop: stop }
    })
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

fn fresh(tokens: usize) -> Handoff {
    handoff(&format!("req-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)), tokens)
}

/// The outcome of one damaged transfer: a refusal (or a dropped connection), unless the blocks
/// arrived intact. A transfer cut short, or with a payload byte flipped, is never delivered.
fn check_outcome(verdict: Option<Value>, delivered: Option<bool>, damage: &Damage, flipped: Option<usize>, payload_at: usize) {
    match delivered {
        Some(intact) => {
            assert!(intact, "damaged blocks were delivered ({damage:?})");
            assert!(!matches!(damage, Damage::Cut(_)), "a transfer cut short was delivered");
            assert!(flipped.is_none_or(|at| at < payload_at), "a flipped payload byte passed the checksums ({damage:?})");
        }
        None => {
            if let Some(v) = verdict {
                assert_refused(&v);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary bytes, with or without the right magic in front: a refusal, never a panic.
    #[test]
    fn tcp_arbitrary_bytes_are_refused(magic in any::<bool>(), body in prop::collection::vec(any::<u8>(), 0..300)) {
        let t = tcp();
        let bytes = if magic { [b"TKV1".as_slice(), &body].concat() } else { body };
        let verdict = runtime().block_on(tcp_exchange(&t.addr, &bytes));
        if let Some(v) = verdict {
            assert_refused(&v);
        }
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    }

    /// A valid transfer, damaged: refused, or (for a harmless header change) delivered intact.
    /// Payload damage is always caught by the checksums.
    #[test]
    fn tcp_damaged_transfers_are_refused(damage in damage()) {
        let t = tcp();
        let h = fresh(10);
        let (bytes, flipped) = damaged_stream(b"TKV1", &h, &damage);
        let waiting = expect(&t.registry, &h);
        let verdict = runtime().block_on(tcp_exchange(&t.addr, &bytes));
        let delivered = runtime().block_on(delivered(waiting, &verdict));
        check_outcome(verdict, delivered, &damage, flipped, payload_start(&h));
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// QUIC: the same framing on an authenticated stream, one stream per transfer.
// ---------------------------------------------------------------------------------------------

struct Quic {
    registry: HandoffRegistry,
    conn: quinn::Connection,
    addr: String,
    _stop: CancellationToken,
}

fn quic() -> &'static Quic {
    static Q: OnceLock<Quic> = OnceLock::new();
    Q.get_or_init(|| {
        runtime().block_on(async {
            let registry = HandoffRegistry::new();
            let identity = QuicIdentity::generate(&[]).unwrap();
            let r = QuicReceiver::bind("127.0.0.1:0".parse().unwrap(), &identity, registry.clone(), LEASE).unwrap();
            let addr = r.advertised_addr().unwrap();
            let stop = CancellationToken::new();
            tokio::spawn(r.run(stop.clone()));
            let config = QuicTransport::pinned_only().client_config(&addr).unwrap();
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let target: SocketAddr = addr.trim_start_matches("quic://").split('#').next().unwrap().parse().unwrap();
            let conn = endpoint.connect_with(config, target, "127.0.0.1").unwrap().await.unwrap();
            Quic { registry, conn, addr, _stop: stop }
        })
    })
}

/// Sends raw bytes on a new stream, finishes it, and reads the verdict frame (`None` if the
/// receiver ended the stream without one).
async fn quic_exchange(conn: &quinn::Connection, bytes: &[u8]) -> Option<Value> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let answer = tokio::time::timeout(LEASE * 3, recv.read_to_end(1 << 20)).await.expect("the receiver answers within its lease").ok()?;
    let (len, body) = answer.split_first_chunk::<4>()?;
    assert_eq!(u32::from_le_bytes(*len) as usize, body.len(), "one verdict frame");
    serde_json::from_slice(body).ok()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn quic_arbitrary_bytes_are_refused(magic in any::<bool>(), body in prop::collection::vec(any::<u8>(), 0..300)) {
        let q = quic();
        let bytes = if magic { [b"TKQ1".as_slice(), &body].concat() } else { body };
        if let Some(v) = runtime().block_on(quic_exchange(&q.conn, &bytes)) {
            assert_refused(&v);
        }
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn quic_damaged_transfers_are_refused(damage in damage()) {
        let q = quic();
        let h = fresh(10);
        let (bytes, flipped) = damaged_stream(b"TKQ1", &h, &damage);
        let waiting = expect(&q.registry, &h);
        let verdict = runtime().block_on(quic_exchange(&q.conn, &bytes));
        let delivered = runtime().block_on(delivered(waiting, &verdict));
        check_outcome(verdict, delivered, &damage, flipped, payload_start(&h));
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// UCX: the header travels as the body of an OFFER message.
// ---------------------------------------------------------------------------------------------

const OFFER: u16 = 1;
const READY: u16 = 2;
const VERDICT: u16 = 4;
const ABORT: u16 = 5;

struct Ucx {
    addr: String,
    client: Worker,
    _stop: CancellationToken,
}

/// A connection of the caller's own to the UCX receiver (two tests sharing one would take each
/// other's answers).
fn ucx_endpoint(slot: &'static OnceLock<Endpoint>) -> &'static Endpoint {
    let u = ucx();
    slot.get_or_init(|| runtime().block_on(u.client.connect(u.addr.parse().unwrap())).unwrap())
}

fn ucx() -> &'static Ucx {
    static U: OnceLock<Ucx> = OnceLock::new();
    U.get_or_init(|| {
        // As in the UCX transport tests: TCP, whatever the host offers.
        if std::env::var_os("UCX_TLS").is_none() {
            std::env::set_var("UCX_TLS", "tcp");
        }
        runtime().block_on(async {
            let r = UcxReceiver::new("127.0.0.1:0".parse().unwrap(), HandoffRegistry::new(), LEASE).await.unwrap();
            let addr = r.local_addr().unwrap().to_string();
            let stop = CancellationToken::new();
            tokio::spawn(r.run(stop.clone()));
            let client = Worker::new(Context::new().unwrap()).unwrap();
            Ucx { addr, client, _stop: stop }
        })
    })
}

fn ucx_frame(xfer: u64, body: &[u8]) -> Vec<u8> {
    [xfer.to_le_bytes().as_slice(), body].concat()
}

/// Offers `body` as transfer `xfer`; a READY (the header passed its checks) is answered with
/// ABORT. Returns the verdict and whether a READY came first.
async fn ucx_offer(ep: &Endpoint, xfer: u64, body: &[u8]) -> (Value, bool) {
    ep.send(OFFER, ucx_frame(xfer, body)).await.unwrap();
    let next = || async { tokio::time::timeout(LEASE * 3, ep.recv()).await.expect("the receiver answers within its lease").unwrap() };
    let mut answer = next().await;
    let ready = answer.kind == READY;
    if ready {
        ep.send(ABORT, ucx_frame(xfer, &[])).await.unwrap();
        answer = next().await;
    }
    assert_eq!(answer.kind, VERDICT);
    assert_eq!(answer.data[..8], xfer.to_le_bytes(), "the verdict names the transfer");
    (serde_json::from_slice(&answer.data[8..]).expect("a JSON verdict"), ready)
}

/// Small nonsense only: a header the checks pass makes the receiver register a buffer of the
/// size it declares (bounded by the payload limit, but not something to do hundreds of times).
fn small_nonsense() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![json!(0), json!(1), json!(3), json!(-1), json!(1.5), json!(null), json!("f64"), json!([]), json!({})])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary offers, and valid headers with a field made nonsense: refused, or (a header
    /// still consistent) answered with READY and refused once the sender aborts. Never a panic;
    /// every transfer gets its verdict.
    #[test]
    fn ucx_bad_offers_are_refused(
        body in prop::collection::vec(any::<u8>(), 0..300),
        field in prop::option::of((prop::sample::select(LAYOUT_FIELDS), small_nonsense())),
        xfer in any::<u64>(),
    ) {
        static EP: OnceLock<Endpoint> = OnceLock::new();
        let ep = ucx_endpoint(&EP);
        let body = match field {
            None => body,
            Some((field, value)) => {
                let mut h = header_json(&fresh(10));
                h["layout"][field] = value;
                serde_json::to_vec(&h).unwrap()
            }
        };
        let (verdict, _) = runtime().block_on(ucx_offer(ep, xfer, &body));
        assert_refused(&verdict);
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Length and size fields past the limits are refused before anything is allocated, and every
// receiver still works afterwards.
// ---------------------------------------------------------------------------------------------

/// Headers whose declared payload is far past the 8 GiB limit (or whose size does not fit in
/// 64 bits): refused by the header check, not attempted.
fn oversized_headers() -> Vec<Value> {
    let h = header_json(&handoff("huge", 10));
    let with = |changes: &[(&str, Value)]| {
        let mut h = h.clone();
        for (k, v) in changes {
            h["layout"][*k] = v.clone();
        }
        h
    };
    vec![
        with(&[("head_dim", json!(1u64 << 40))]),
        with(&[("num_layers", json!(u64::MAX)), ("head_dim", json!(u64::MAX))]),
        with(&[("block_size", json!(1)), ("token_count", json!(u64::MAX))]),
        with(&[("kv_heads", json!(u64::MAX)), ("tp_size", json!(1))]),
        with(&[("block_size", json!(0))]),
        with(&[("tp_size", json!(0))]),
    ]
}

#[test]
fn oversized_and_degenerate_headers_are_refused_on_every_transport() {
    static EP: OnceLock<Endpoint> = OnceLock::new();
    let (t, q, ep) = (tcp(), quic(), ucx_endpoint(&EP));
    for (xfer, header) in oversized_headers().into_iter().enumerate() {
        let bytes = serde_json::to_vec(&header).unwrap();
        let v = runtime().block_on(tcp_exchange(&t.addr, &stream_frame(b"TKV1", &bytes, &[]))).expect("a verdict");
        assert_refused(&v);
        let v = runtime().block_on(quic_exchange(&q.conn, &stream_frame(b"TKQ1", &bytes, &[]))).expect("a verdict");
        assert_refused(&v);
        let (v, ready) = runtime().block_on(ucx_offer(ep, xfer as u64, &bytes));
        assert!(!ready, "{header}");
        assert_refused(&v);
        let error = v["error"].as_str().unwrap();
        assert!(error.contains("limit") || error.contains("positive"), "{header}: {error}");
    }
    // A header length past the 64 MiB limit is refused without reading (or allocating) it.
    for len in [(64u32 << 20) + 1, u32::MAX] {
        let mut frame = b"TKV1".to_vec();
        frame.extend(len.to_le_bytes());
        let v = runtime().block_on(tcp_exchange(&t.addr, &frame)).expect("a verdict");
        assert!(v["error"].as_str().unwrap().contains("exceeds"), "{v}");
        frame[..4].copy_from_slice(b"TKQ1");
        let v = runtime().block_on(quic_exchange(&q.conn, &frame)).expect("a verdict");
        assert!(v["error"].as_str().unwrap().contains("exceeds"), "{v}");
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

#[test]
fn the_receivers_still_deliver_after_all_that() {
    static EP: OnceLock<Endpoint> = OnceLock::new();
    let (t, q, ep) = (tcp(), quic(), ucx_endpoint(&EP));
    runtime().block_on(async {
        for (transport, addr, registry) in [
            (Box::new(TcpTransport) as Box<dyn KvTransport>, t.addr.clone(), t.registry.clone()),
            (Box::new(QuicTransport::pinned_only()), q.addr.clone(), q.registry.clone()),
        ] {
            let h = fresh(10);
            let waiting = expect(&registry, &h);
            transport.send(&addr, &h, LEASE).await.unwrap();
            assert_eq!(waiting.await.unwrap(), Some(true));
        }
        // The UCX receiver answers a fresh offer as it should.
        let (v, ready) = ucx_offer(ep, u64::MAX, &serde_json::to_vec(&header_json(&fresh(10))).unwrap()).await;
        assert!(ready);
        assert!(v["error"].as_str().unwrap().contains("gave up"), "{v}");
    });
}
