//! Re-sharding on synthetic tensors whose every element names its own coordinates, so any
//! misplaced byte shows up.

use tandem_protocol::{Bytes, KvDtype, KvExport, KvLayout};
use tandem_transfer::{reshard, ReshardError};

const LAYERS: usize = 3;
const HEADS: usize = 12;
const DIM: usize = 4;
const BS: usize = 4;
const TOKENS: usize = 10; // three blocks, the last partly filled

/// The value stored at (block, layer, k|v, slot, global head, dim): unique per coordinate.
fn value(b: usize, l: usize, kv: usize, s: usize, g: usize, d: usize) -> f32 {
    (((((b * LAYERS + l) * 2 + kv) * BS + s) * HEADS + g) * DIM + d) as f32
}

fn layout(rank: usize, tp: usize) -> KvLayout {
    KvLayout {
        model_id: "synthetic".into(),
        num_layers: LAYERS,
        kv_heads: HEADS,
        head_dim: DIM,
        dtype: KvDtype::F32,
        block_size: BS,
        tp_rank: rank,
        tp_size: tp,
        token_count: TOKENS,
    }
}

/// Rank `rank` of TP=`tp`, built directly from the coordinates.
fn shard(rank: usize, tp: usize) -> KvExport {
    shard_of(HEADS, rank, tp)
}

/// Rank `rank` of TP=`tp` of a model with `heads` KV heads.
fn shard_of(heads: usize, rank: usize, tp: usize) -> KvExport {
    let mine = tandem_protocol::tp::kv_heads_of_rank(heads, tp, rank);
    let blocks: Vec<Bytes> = (0..TOKENS.div_ceil(BS))
        .map(|b| {
            let mut v = Vec::new();
            for l in 0..LAYERS {
                for kv in 0..2 {
                    for s in 0..BS {
                        for g in mine.clone() {
                            for d in 0..DIM {
                                v.extend_from_slice(&value(b, l, kv, s, g, d).to_le_bytes());
                            }
                        }
                    }
                }
            }
            Bytes::from(v)
        })
        .collect();
    let checksums = blocks.iter().map(|b| KvExport::checksum(b)).collect();
    KvExport {
        layout: KvLayout { kv_heads: heads, ..layout(rank, tp) },
        tokens: (0..TOKENS as u32).collect(),
        blocks,
        checksums,
        device: None,
    }
}

fn shards(tp: usize) -> Vec<KvExport> {
    (0..tp).map(|r| shard(r, tp)).collect()
}

#[test]
fn uneven_and_shared_heads_regroup_exactly() {
    // Three KV heads (the default model's) over degrees that do not divide them, and over more
    // ranks than heads, where ranks hold copies of a shared head.
    let of = |tp: usize| (0..tp).map(|r| shard_of(3, r, tp)).collect::<Vec<_>>();
    for p in 1..=8 {
        for d in 1..=8 {
            let out = reshard(&of(p), d).unwrap_or_else(|e| panic!("{p} -> {d}: {e}"));
            assert_eq!(out, of(d), "TP {p} -> {d} over 3 heads");
        }
    }
    assert_eq!(2 * of(2)[0].layout.block_bytes(), of(2)[1].layout.block_bytes(), "1 head and 2");
}

#[test]
fn every_degree_pair_regroups_heads_exactly() {
    for p in [1, 2, 3, 4, 6, 12] {
        for d in [1, 2, 3, 4, 6, 12] {
            let out = reshard(&shards(p), d).unwrap_or_else(|e| panic!("{p} -> {d}: {e}"));
            assert_eq!(out, shards(d), "TP {p} -> {d}");
        }
    }
}

#[test]
fn shards_may_arrive_in_any_order() {
    let mut s = shards(4);
    s.reverse();
    s.swap(0, 2);
    assert_eq!(reshard(&s, 2).unwrap(), shards(2));
}

#[test]
fn inconsistent_shards_are_refused() {
    // A missing rank, a duplicated rank.
    assert!(matches!(reshard(&shards(4)[..3], 1), Err(ReshardError::WrongRanks { .. })));
    let dup = vec![shard(0, 2), shard(0, 2)];
    assert!(matches!(reshard(&dup, 1), Err(ReshardError::WrongRanks { .. })));
    // Heads that cannot be split evenly.
    assert!(matches!(reshard(&shards(2), 0), Err(ReshardError::ZeroDegree { tp: 0 })));
    // Shards of different sequences or models.
    let mut other = shards(2);
    other[1].tokens[0] = 99;
    assert_eq!(reshard(&other, 1), Err(ReshardError::Mismatch("tokens")));
    let mut other = shards(2);
    other[1].layout.head_dim = 8;
    assert_eq!(reshard(&other, 1), Err(ReshardError::Mismatch("layout")));
    // A corrupted block is caught before it is spread over new shards.
    let mut bad = shards(2);
    let mut block = bad[1].blocks[2].to_vec();
    block[5] ^= 0xff;
    bad[1].blocks[2] = block.into();
    assert!(matches!(reshard(&bad, 4), Err(ReshardError::BadShard { rank: 1, .. })));
    assert_eq!(reshard(&[], 1), Err(ReshardError::Empty));
}

/// Rank `rank` of TP=`tp` of an FP8 cache: E4M3 bytes naming their coordinates, then one f32
/// scale per (layer, k|v, slot, head) row naming its own.
fn fp8_shard(rank: usize, tp: usize) -> KvExport {
    let mine = tandem_protocol::tp::kv_heads_of_rank(HEADS, tp, rank);
    let blocks: Vec<Bytes> = (0..TOKENS.div_ceil(BS))
        .map(|b| {
            let (mut bytes, mut scales) = (Vec::new(), Vec::new());
            for l in 0..LAYERS {
                for kv in 0..2 {
                    for s in 0..BS {
                        for g in mine.clone() {
                            for d in 0..DIM {
                                bytes.push((value(b, l, kv, s, g, d) as usize % 251) as u8);
                            }
                            scales.extend_from_slice(&(value(b, l, kv, s, g, 0) + 0.5).to_le_bytes());
                        }
                    }
                }
            }
            bytes.extend_from_slice(&scales);
            Bytes::from(bytes)
        })
        .collect();
    let checksums = blocks.iter().map(|b| KvExport::checksum(b)).collect();
    let layout = KvLayout { dtype: KvDtype::Fp8E4m3, ..layout(rank, tp) };
    assert_eq!(blocks[0].len(), layout.block_bytes());
    KvExport { layout, tokens: (0..TOKENS as u32).collect(), blocks, checksums, device: None }
}

#[test]
fn fp8_rows_and_their_scales_regroup_together() {
    let of = |tp: usize| (0..tp).map(|r| fp8_shard(r, tp)).collect::<Vec<_>>();
    for p in [1, 2, 3, 4, 6, 12] {
        for d in [1, 2, 3, 4, 6, 12] {
            let out = reshard(&of(p), d).unwrap_or_else(|e| panic!("{p} -> {d}: {e}"));
            assert_eq!(out, of(d), "FP8 TP {p} -> {d}");
        }
    }
}
