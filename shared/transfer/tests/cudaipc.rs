//! The device handoff's control path (`cudaipc`): the header with the pool's handle, offsets and
//! checksums, the receiver mapping the pool before it delivers, the verdict, and the fall back
//! to a host transport when the pool cannot be mapped. The mapping itself and the device copy
//! are the GPU engine's, checked on a GPU (`scripts/gpu/ipc_handoff.py`); here a peer that maps
//! what it is told to stands in for it.

mod common;

use common::{handoff, tcp_receiver, LEASE};

use std::sync::{Arc, Mutex};

use tandem_protocol::{host_node_id, DeviceBlocks, DevicePeer, ErrorCode};
use tandem_transfer::{
    bind_receiver, offers_device, sender, CudaIpcTransport, Handoff, HandoffRegistry, KvTransport, TcpTransport, TransferError,
    TransportKind, TransportSet,
};
use tokio_util::sync::CancellationToken;

/// Maps the pools whose handle starts with `ok`, and remembers every handle it was asked for.
#[derive(Debug)]
struct Peer {
    node: String,
    asked: Mutex<Vec<Vec<u8>>>,
}

impl DevicePeer for Peer {
    fn node(&self) -> &str {
        &self.node
    }
    fn open(&self, blocks: &DeviceBlocks, block_bytes: usize) -> Result<(), String> {
        self.asked.lock().unwrap().push(blocks.handle.clone());
        if !blocks.handle.starts_with(b"ok") {
            return Err("invalid device context".into());
        }
        // A pool of 16 blocks.
        blocks.check_within(16 * block_bytes as u64, block_bytes)
    }
}

/// `handoff(id, tokens)` with its blocks described as lying in the pool named `handle`.
fn on_device(id: &str, tokens: usize, handle: &[u8]) -> Handoff {
    let mut h = handoff(id, tokens);
    let n = h.kv.blocks.len();
    let bytes = h.kv.layout.block_bytes() as u64;
    h.kv.device = Some(DeviceBlocks {
        node: host_node_id(),
        handle: handle.to_vec(),
        offsets: (0..n as u64).map(|b| (b * 3 + 1) * bytes).collect(),
        sums: h.kv.blocks.iter().map(|b| tandem_protocol::device_checksum(b)).collect(),
    });
    h.kv.blocks.clear();
    h.kv.checksums.clear();
    h
}

/// A decode worker's receivers (`cudaipc` and TCP) over one registry that maps through `peer`.
async fn receivers(peer: Arc<Peer>) -> (HandoffRegistry, String, CancellationToken) {
    let registry = HandoffRegistry::new();
    registry.use_device(peer);
    let stop = CancellationToken::new();
    let ipc = bind_receiver(TransportKind::CudaIpc, "127.0.0.1:0".parse().unwrap(), &registry, LEASE, None).await.unwrap();
    let ipc_addr = ipc.advertised().unwrap();
    tokio::spawn(ipc.run(stop.clone()));
    let (tcp_addr, tcp_stop) = tcp_receiver(&registry).await;
    let stop2 = stop.clone();
    tokio::spawn(async move {
        stop2.cancelled().await;
        tcp_stop.cancel();
    });
    (registry, format!("{ipc_addr},tcp://{tcp_addr}"), stop)
}

fn peer() -> Arc<Peer> {
    Arc::new(Peer { node: host_node_id(), asked: Mutex::new(Vec::new()) })
}

fn set() -> TransportSet {
    TransportSet::new(vec![sender(TransportKind::CudaIpc, None).unwrap(), Arc::new(TcpTransport)])
}

#[tokio::test]
async fn a_device_handoff_delivers_the_descriptor_and_waits_for_the_importers_verdict() {
    let peer = peer();
    let (registry, addr, _stop) = receivers(peer.clone()).await;
    assert!(offers_device(&addr, &host_node_id()), "{addr}");
    assert!(!offers_device(&addr, "another-host"));
    let sent = on_device("a", 10, b"ok-pool-1");
    let mut pending = registry.register("a").unwrap();
    let decode = tokio::spawn(async move {
        let incoming = pending.arrived().await.unwrap();
        // What the engine copies from: the descriptor as sent, and no payload.
        let kv = incoming.handoff.kv.clone();
        incoming.verdict.send(Ok(())).unwrap();
        kv
    });
    let report = set().send(&addr, &sent, LEASE).await.unwrap();
    let got = decode.await.unwrap();
    assert_eq!(report.transport, "cudaipc");
    assert_eq!(report.blocks, 3);
    assert_eq!(report.bytes, 3 * sent.kv.layout.block_bytes() as u64);
    assert_eq!(got.device, sent.kv.device);
    assert!(got.blocks.is_empty() && got.checksums.is_empty());
    assert_eq!(got.tokens, sent.kv.tokens);
    assert_eq!(*peer.asked.lock().unwrap(), vec![b"ok-pool-1".to_vec()]);
}

#[tokio::test]
async fn an_importer_that_refuses_after_mapping_fails_the_handoff_for_good() {
    let (registry, addr, _stop) = receivers(peer()).await;
    let mut pending = registry.register("b").unwrap();
    let decode = tokio::spawn(async move {
        let incoming = pending.arrived().await.unwrap();
        let _ = incoming.verdict.send(Err(tandem_protocol::ApiError::new(ErrorCode::KvHandoffFailed, "block 0 fails its checksum")));
    });
    let err = set().send(&addr, &on_device("b", 8, b"ok-pool"), LEASE).await.unwrap_err();
    decode.await.unwrap();
    assert!(matches!(&err, TransferError::Refused { code: ErrorCode::KvHandoffFailed, .. }), "{err}");
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[tokio::test]
async fn a_pool_that_cannot_be_mapped_leaves_the_request_waiting_for_the_host_path() {
    let peer = peer();
    let (registry, addr, _stop) = receivers(peer.clone()).await;
    let mut pending = registry.register("c").unwrap();
    // The device attempt is refused before delivery: a connect-class error, so the sender still
    // holds its blocks, and the request still waits.
    let err = set().send(&addr, &on_device("c", 8, b"stale-handle"), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("invalid device context"), "{err}");
    assert_eq!(registry.waiting(), 1);
    // The same request then arrives as bytes through a host transport.
    let host = handoff("c", 8);
    let decode = tokio::spawn(async move {
        let incoming = pending.arrived().await.unwrap();
        let kv = incoming.handoff.kv.clone();
        incoming.verdict.send(Ok(())).unwrap();
        kv
    });
    assert_eq!(set().send(&addr, &host, LEASE).await.unwrap().transport, "tcp");
    let got = decode.await.unwrap();
    assert_eq!(got.blocks, host.kv.blocks);
    assert!(got.device.is_none());
}

#[tokio::test]
async fn device_blocks_never_travel_a_host_transport_nor_host_blocks_the_device_one() {
    let (_registry, addr, _stop) = receivers(peer()).await;
    let tcp_only = addr.split(',').nth(1).unwrap().to_string();
    // Only TCP offered: the device handoff is a connect-class error (the caller reads the
    // blocks out and sends them), not a header the TCP receiver would misread.
    let err = set().send(&tcp_only, &on_device("d", 8, b"ok"), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("device blocks"), "{err}");
    // Only cudaipc offered: host bytes are not sent over it.
    let ipc_only = addr.split(',').next().unwrap().to_string();
    let err = set().send(&ipc_only, &handoff("e", 8), LEASE).await.unwrap_err();
    assert!(err.to_string().contains("host blocks"), "{err}");
    // The device transport asked directly refuses blocks it cannot carry, before connecting.
    let err = CudaIpcTransport.send(&ipc_only["cudaipc://".len()..], &handoff("f", 8), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Connect { .. }), "{err}");
}

#[tokio::test]
async fn offsets_outside_the_senders_pool_are_refused_before_delivery() {
    let (registry, addr, _stop) = receivers(peer()).await;
    let _pending = registry.register("h").unwrap();
    let mut h = on_device("h", 8, b"ok");
    h.kv.device.as_mut().unwrap().offsets[1] = 16 * h.kv.layout.block_bytes() as u64;
    let err = set().send(&addr, &h, LEASE).await.unwrap_err();
    assert!(err.to_string().contains("does not lie in a pool"), "{err}");
    assert_eq!(registry.waiting(), 1, "nothing was delivered");
}

#[tokio::test]
async fn a_receiver_of_another_host_is_not_tried() {
    let peer = Arc::new(Peer { node: "another-host".into(), asked: Mutex::new(Vec::new()) });
    let (registry, addr, _stop) = receivers(peer.clone()).await;
    let _pending = registry.register("g").unwrap();
    // The advertised node is the receiver's own (this machine's); a descriptor naming another
    // node is refused by the sender before it connects.
    let mut h = on_device("g", 8, b"ok");
    h.kv.device.as_mut().unwrap().node = "elsewhere".into();
    let err = set().send(&addr, &h, LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Connect { .. }), "{err}");
    // A receiver whose engine is on another node than the blocks refuses before mapping.
    let err = set().send(&addr, &on_device("g", 8, b"ok"), LEASE).await.unwrap_err();
    assert!(matches!(&err, TransferError::Connect { .. }), "{err}");
    assert!(peer.asked.lock().unwrap().is_empty());
    assert_eq!(registry.waiting(), 1);
}
