//! Re-sharding KV blocks between tensor-parallel degrees.
//!
//! A TP rank holds `kv_heads / tp_size` consecutive KV heads: rank `r` holds global heads
//! `r·h .. (r+1)·h`. Each of its blocks is laid out `[layer][k|v][slot][head][head_dim]`. Moving a
//! sequence from a prefill pool at TP=p to a decode pool at TP=d regroups heads: gathered when
//! p > d, split when p < d, and both at once when neither degree divides the other (4 → 6 with 12
//! heads). Both degrees must divide the KV head count. Runs of heads that stay together are
//! copied as one slice, so a p → 1 gather is one copy per (layer, k|v, slot, source rank).

use tandem_protocol::{Bytes, KvExport, KvLayout};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReshardError {
    #[error("no shards given")]
    Empty,
    #[error("shard {index} is rank {rank} of TP={tp_size}, but {given} shards were given")]
    WrongRanks { index: usize, rank: usize, tp_size: usize, given: usize },
    #[error("shards disagree on {0}")]
    Mismatch(&'static str),
    #[error("{kv_heads} KV heads cannot be split evenly over TP={tp}")]
    Uneven { kv_heads: usize, tp: usize },
    #[error("shard of rank {rank}: {reason}")]
    BadShard { rank: usize, reason: String },
}

/// Turns the shards of one sequence at TP=p (rank `r` of them at index `r` after sorting; any
/// order accepted) into its shards at TP=`to`. Checksums are verified on the way in and computed
/// afresh on the way out.
pub fn reshard(shards: &[KvExport], to: usize) -> Result<Vec<KvExport>, ReshardError> {
    let first = shards.first().ok_or(ReshardError::Empty)?;
    let p = shards.len();
    let mut by_rank: Vec<Option<&KvExport>> = vec![None; p];
    for (index, s) in shards.iter().enumerate() {
        let l = &s.layout;
        if l.tp_size != p || l.tp_rank >= p || by_rank[l.tp_rank].is_some() {
            return Err(ReshardError::WrongRanks { index, rank: l.tp_rank, tp_size: l.tp_size, given: p });
        }
        let same = |a: &KvLayout, b: &KvLayout| {
            a.model_id == b.model_id
                && a.num_layers == b.num_layers
                && a.kv_heads == b.kv_heads
                && a.head_dim == b.head_dim
                && a.dtype == b.dtype
                && a.block_size == b.block_size
                && a.token_count == b.token_count
        };
        if !same(l, &first.layout) {
            return Err(ReshardError::Mismatch("layout"));
        }
        if s.tokens != first.tokens {
            return Err(ReshardError::Mismatch("tokens"));
        }
        by_rank[l.tp_rank] = Some(s);
    }
    let src: Vec<&KvExport> = by_rank.into_iter().map(|s| s.expect("every rank present")).collect();
    let l = &first.layout;
    for tp in [p, to] {
        if tp == 0 || l.kv_heads % tp != 0 {
            return Err(ReshardError::Uneven { kv_heads: l.kv_heads, tp });
        }
    }
    let nblocks = l.num_blocks();
    for s in &src {
        let want = s.layout.block_bytes();
        let rank = s.layout.tp_rank;
        if s.blocks.len() != nblocks || s.checksums.len() != nblocks {
            return Err(ReshardError::BadShard { rank, reason: format!("{} blocks for {} tokens", s.blocks.len(), l.token_count) });
        }
        if let Some(b) = s.blocks.iter().position(|b| b.len() != want) {
            return Err(ReshardError::BadShard { rank, reason: format!("block {b} is not {want} bytes") });
        }
        if let Some(b) = s.first_corrupt_block() {
            return Err(ReshardError::BadShard { rank, reason: format!("block {b} fails its checksum") });
        }
    }

    let head_bytes = l.head_dim * l.dtype.size();
    let (hs, ht) = (l.kv_heads / p, l.kv_heads / to);
    let rows = l.num_layers * 2 * l.block_size; // (layer, k|v, slot) rows of one block
    let mut out = Vec::with_capacity(to);
    for t in 0..to {
        let layout = KvLayout { tp_rank: t, tp_size: to, ..l.clone() };
        let mut blocks = Vec::with_capacity(nblocks);
        for b in 0..nblocks {
            let mut dst = vec![0u8; rows * ht * head_bytes];
            for row in 0..rows {
                // Target heads t·ht .. (t+1)·ht, taken in runs that live on one source rank.
                let mut g = t * ht;
                while g < (t + 1) * ht {
                    let (r, i) = (g / hs, g % hs);
                    let run = (hs - i).min((t + 1) * ht - g);
                    let from = &src[r].blocks[b][(row * hs + i) * head_bytes..(row * hs + i + run) * head_bytes];
                    let j = g - t * ht;
                    dst[(row * ht + j) * head_bytes..(row * ht + j + run) * head_bytes].copy_from_slice(from);
                    g += run;
                }
            }
            blocks.push(Bytes::from(dst));
        }
        let checksums = blocks.iter().map(|b| KvExport::checksum(b)).collect();
        out.push(KvExport { layout, tokens: first.tokens.clone(), blocks, checksums });
    }
    Ok(out)
}
