//! What the transport tests share: a small handoff with recognisable bytes, and a TCP receiver.
#![allow(dead_code)]

use std::time::Duration;

use tandem_protocol::{Bytes, KvDtype, KvExport, KvLayout};
use tandem_transfer::{Handoff, HandoffRegistry, TcpReceiver};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const LEASE: Duration = Duration::from_millis(800);

/// A request of `tokens` tokens in a tiny layout, each byte set from its position and block.
pub fn handoff(id: &str, tokens: usize) -> Handoff {
    let layout = KvLayout {
        model_id: "m".into(),
        num_layers: 2,
        kv_heads: 2,
        head_dim: 4,
        dtype: KvDtype::F32,
        block_size: 4,
        tp_rank: 0,
        tp_size: 1,
        token_count: tokens,
    };
    let blocks: Vec<Bytes> =
        (0..layout.num_blocks()).map(|b| (0..layout.block_bytes()).map(|i| (i * 7 + b) as u8).collect::<Vec<u8>>().into()).collect();
    let checksums = blocks.iter().map(|b| KvExport::checksum(b)).collect();
    Handoff {
        request_id: id.into(),
        first_token: 42,
        kv: KvExport { layout, tokens: (0..tokens as u32).collect(), blocks, checksums, device: None },
    }
}

/// Flips the bits of one byte of one block (behind its checksum's back).
pub fn corrupt(kv: &mut KvExport, block: usize, byte: usize) {
    let mut bytes = kv.blocks[block].to_vec();
    bytes[byte] ^= 0xff;
    kv.blocks[block] = bytes.into();
}

/// A TCP receiver on loopback delivering into `registry`: its address and what stops it.
pub async fn tcp_receiver(registry: &HandoffRegistry) -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = TcpReceiver::new(listener, registry.clone(), LEASE);
    let addr = r.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(r.run(stop.clone()));
    (addr, stop)
}
