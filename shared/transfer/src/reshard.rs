//! Re-sharding KV blocks between tensor-parallel degrees.
//!
//! A TP rank holds a run of consecutive KV heads ([`tandem_protocol::tp::kv_heads_of_rank`]):
//! equal runs when the degree divides the head count, runs one head apart when it does not, and
//! one shared head per rank when the degree exceeds the head count. Each of its blocks is laid
//! out `[layer][k|v][slot][head][head_dim]`. Moving a sequence from a prefill pool at TP=p to a
//! decode pool at TP=d regroups heads: gathered when p > d, split when p < d, and both at once
//! when neither degree divides the other (4 → 6 with 12 heads). A head held by several source
//! ranks is read from the first of them. Runs of heads that stay together are copied as one
//! slice, so a p → 1 gather is one copy per (layer, k|v, slot, source rank).

use tandem_protocol::tp::kv_heads_of_rank;
use tandem_protocol::{Bytes, KvExport, KvLayout};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReshardError {
    #[error("no shards given")]
    Empty,
    #[error("shard {index} is rank {rank} of TP={tp_size}, but {given} shards were given")]
    WrongRanks { index: usize, rank: usize, tp_size: usize, given: usize },
    #[error("shards disagree on {0}")]
    Mismatch(&'static str),
    #[error("TP={tp} is not a degree a group can have")]
    ZeroDegree { tp: usize },
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
    if to == 0 {
        return Err(ReshardError::ZeroDegree { tp: to });
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

    // A block is one or two parts (the elements; FP8 adds the rows' scales), each [row][head].
    let parts = l.dtype.head_parts(l.head_dim);
    let source: Vec<_> = (0..p).map(|r| kv_heads_of_rank(l.kv_heads, p, r)).collect();
    // The first source rank holding each global head.
    let owner: Vec<usize> =
        (0..l.kv_heads).map(|g| source.iter().position(|h| h.contains(&g)).expect("every head is held by some rank")).collect();
    let rows = l.num_layers * 2 * l.block_size; // (layer, k|v, slot) rows of one block
    let mut out = Vec::with_capacity(to);
    for t in 0..to {
        let layout = KvLayout { tp_rank: t, tp_size: to, ..l.clone() };
        let target = layout.head_range();
        let ht = target.len();
        let mut blocks = Vec::with_capacity(nblocks);
        for b in 0..nblocks {
            let mut dst = vec![0u8; layout.block_bytes()];
            // Where the current part starts in the target block and in each source rank's.
            let (mut at, mut src_at) = (0, vec![0; p]);
            for &head_bytes in &parts {
                for row in 0..rows {
                    // The target's heads, taken in runs that live on one source rank.
                    let mut g = target.start;
                    while g < target.end {
                        let r = owner[g];
                        let (hs, i) = (source[r].len(), g - source[r].start);
                        let run = (source[r].end - g).min(target.end - g);
                        let from = &src[r].blocks[b][src_at[r] + (row * hs + i) * head_bytes..][..run * head_bytes];
                        let j = g - target.start;
                        dst[at + (row * ht + j) * head_bytes..][..run * head_bytes].copy_from_slice(from);
                        g += run;
                    }
                }
                at += rows * ht * head_bytes;
                for (r, heads) in source.iter().enumerate() {
                    src_at[r] += rows * heads.len() * head_bytes;
                }
            }
            blocks.push(Bytes::from(dst));
        }
        let checksums = blocks.iter().map(|b| KvExport::checksum(b)).collect();
        out.push(KvExport { layout, tokens: first.tokens.clone(), blocks, checksums, device: None });
    }
    Ok(out)
}
