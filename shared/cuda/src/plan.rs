//! The host side of one forward pass: which token goes where, packed into one array of `i32`s
//! that is copied to the device in a single transfer. Pure bookkeeping, tested without a GPU.

/// Rows of a prefill tile handled by one block of the prefill attention kernel.
pub const TILE_ROWS: usize = 64;

/// One sequence's part of a forward pass.
#[derive(Debug, Clone)]
pub struct PlanItem<'a> {
    /// The sequence's block table, long enough for `start + tokens.len()` tokens.
    pub blocks: &'a [u32],
    /// Tokens already in the cache.
    pub start: usize,
    pub tokens: &'a [u32],
    /// Logits for every new token.
    pub all_logits: bool,
    /// Logits for the last new token (a chunk that ends mid-prompt needs none).
    pub last_logit: bool,
}

/// Where each array starts in [`Plan::meta`] (in `i32`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offsets {
    pub tokens: usize,
    pub positions: usize,
    pub slots: usize,
    pub block_tables: usize,
    pub ctx_lens: usize,
    pub q_start: usize,
    pub q_len: usize,
    pub tiles: usize,
    pub logit_rows: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Token rows, padding included.
    pub n_tokens: usize,
    /// Sequence rows, padding included.
    pub n_seqs: usize,
    /// Row stride of the block tables.
    pub max_blocks: usize,
    /// Every sequence adds exactly one token (the decode kernel applies).
    pub decode_only: bool,
    pub n_tiles: usize,
    pub n_logits: usize,
    /// Longest context after this pass.
    pub max_ctx: usize,
    pub off: Offsets,
    pub meta: Vec<i32>,
}

impl Plan {
    /// Lays out a pass. `pad_to` pads a decode-only pass to a captured batch size: padding rows
    /// have no context, write no cache slot (slot −1) and ask for logits that nobody reads.
    /// `min_blocks` widens the block-table rows (a captured graph fixes the stride).
    pub fn build(items: &[PlanItem<'_>], block_size: usize, pad_to: Option<usize>, min_blocks: usize) -> Plan {
        let decode_only = !items.is_empty() && items.iter().all(|it| it.tokens.len() == 1 && it.last_logit && !it.all_logits);
        let real_tokens: usize = items.iter().map(|it| it.tokens.len()).sum();
        let n_seqs = pad_to.filter(|_| decode_only).unwrap_or(items.len()).max(items.len());
        let n_tokens = if decode_only { n_seqs } else { real_tokens };
        let max_ctx = items.iter().map(|it| it.start + it.tokens.len()).max().unwrap_or(0);
        let max_blocks = max_ctx.div_ceil(block_size).max(min_blocks).max(1);
        let n_tiles = if decode_only { 0 } else { items.iter().map(|it| it.tokens.len().div_ceil(TILE_ROWS)).sum() };
        let n_logits = if decode_only {
            n_seqs
        } else {
            items.iter().map(|it| if it.all_logits { it.tokens.len() } else { usize::from(it.last_logit && !it.tokens.is_empty()) }).sum()
        };

        let mut off = Offsets::default();
        let mut at = 0;
        let mut next = |n: usize| {
            let o = at;
            at += n;
            o
        };
        off.tokens = next(n_tokens);
        off.positions = next(n_tokens);
        off.slots = next(n_tokens);
        off.block_tables = next(n_seqs * max_blocks);
        off.ctx_lens = next(n_seqs);
        off.q_start = next(n_seqs);
        off.q_len = next(n_seqs);
        off.tiles = next(2 * n_tiles);
        off.logit_rows = next(n_logits);
        off.end = at;

        let mut meta = vec![0i32; off.end];
        for i in 0..n_tokens {
            meta[off.slots + i] = -1;
        }
        let (mut row, mut tile, mut lrow) = (0usize, 0usize, 0usize);
        for (s, it) in items.iter().enumerate() {
            meta[off.q_start + s] = row as i32;
            meta[off.q_len + s] = it.tokens.len() as i32;
            meta[off.ctx_lens + s] = (it.start + it.tokens.len()) as i32;
            for (j, &b) in it.blocks.iter().take(max_blocks).enumerate() {
                meta[off.block_tables + s * max_blocks + j] = b as i32;
            }
            for t in 0..it.tokens.len().div_ceil(TILE_ROWS) {
                if !decode_only {
                    meta[off.tiles + 2 * tile] = s as i32;
                    meta[off.tiles + 2 * tile + 1] = (t * TILE_ROWS) as i32;
                    tile += 1;
                }
            }
            for (j, &tok) in it.tokens.iter().enumerate() {
                let pos = it.start + j;
                meta[off.tokens + row] = tok as i32;
                meta[off.positions + row] = pos as i32;
                meta[off.slots + row] = (it.blocks[pos / block_size] as usize * block_size + pos % block_size) as i32;
                if !decode_only && (it.all_logits || (it.last_logit && j + 1 == it.tokens.len())) {
                    meta[off.logit_rows + lrow] = row as i32;
                    lrow += 1;
                }
                row += 1;
            }
        }
        if decode_only {
            for i in 0..n_seqs {
                meta[off.logit_rows + i] = i as i32;
            }
        }
        Plan { n_tokens, n_seqs, max_blocks, decode_only, n_tiles, n_logits, max_ctx, off, meta }
    }
}

/// Batch sizes that get a captured decode graph; a batch runs in the smallest that holds it.
pub const BUCKETS: [usize; 12] = [1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 192, 256];

pub fn bucket_for(batch: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|&b| b >= batch)
}

/// Context bucket of a captured decode graph: the longest context it serves.
pub fn ctx_bucket(max_ctx: usize, limit: usize) -> usize {
    max_ctx.max(512).next_power_of_two().min(limit.max(1))
}

/// Split size (tokens per block) and split count for decode attention over `max_ctx` tokens:
/// enough blocks to fill the GPU at small batches, at most `max_splits` partial results per head,
/// and no more than 512 tokens a split (the kernel's shared-memory score buffer).
pub fn decode_split(batch: usize, kv_heads: usize, max_ctx: usize, sms: usize, max_splits: usize) -> (usize, usize) {
    let want_blocks = 2 * sms.max(1);
    let per_seq = want_blocks.div_ceil((batch * kv_heads).max(1));
    let mut split = max_ctx.div_ceil(per_seq.max(1)).next_power_of_two().clamp(32, 512);
    while max_ctx.div_ceil(split) > max_splits && split < 512 {
        split *= 2;
    }
    (split, max_ctx.div_ceil(split).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_plan_places_tokens_slots_tiles_and_logit_rows() {
        let blocks_a = [7u32, 3, 9];
        let blocks_b = [5u32];
        let toks_a: Vec<u32> = (0..70).collect();
        let items = [
            PlanItem { blocks: &blocks_a, start: 0, tokens: &toks_a[..40], all_logits: false, last_logit: true },
            PlanItem { blocks: &blocks_b, start: 2, tokens: &[11, 12], all_logits: true, last_logit: true },
        ];
        let p = Plan::build(&items, 16, None, 0);
        assert!(!p.decode_only);
        assert_eq!((p.n_tokens, p.n_seqs, p.max_blocks, p.n_tiles, p.n_logits), (42, 2, 3, 2, 3));
        let m = &p.meta;
        // Token 17 of sequence a: block 3 (second), slot 1.
        assert_eq!(m[p.off.slots + 17], 3 * 16 + 1);
        assert_eq!(m[p.off.positions + 40], 2);
        assert_eq!(m[p.off.slots + 41], 5 * 16 + 3);
        assert_eq!(&m[p.off.ctx_lens..p.off.ctx_lens + 2], &[40, 4]);
        assert_eq!(&m[p.off.q_start..p.off.q_start + 2], &[0, 40]);
        assert_eq!(&m[p.off.logit_rows..p.off.logit_rows + 3], &[39, 40, 41]);
        assert_eq!(&m[p.off.tiles..p.off.tiles + 4], &[0, 0, 1, 0]);
        assert_eq!(&m[p.off.block_tables..p.off.block_tables + 6], &[7, 3, 9, 5, 0, 0]);
    }

    #[test]
    fn decode_plan_pads_to_the_bucket_without_touching_the_cache() {
        let blocks = [4u32, 8];
        let items = [PlanItem { blocks: &blocks, start: 20, tokens: &[99], all_logits: false, last_logit: true }];
        let p = Plan::build(&items, 16, Some(4), 32);
        assert!(p.decode_only);
        assert_eq!((p.n_tokens, p.n_seqs, p.max_blocks, p.n_logits), (4, 4, 32, 4));
        assert_eq!(p.meta[p.off.slots], 8 * 16 + 4);
        assert_eq!(&p.meta[p.off.slots + 1..p.off.slots + 4], &[-1, -1, -1]);
        assert_eq!(&p.meta[p.off.ctx_lens..p.off.ctx_lens + 4], &[21, 0, 0, 0]);
        assert_eq!(p.off.end, p.meta.len());
    }

    #[test]
    fn buckets_and_splits() {
        assert_eq!(bucket_for(1), Some(1));
        assert_eq!(bucket_for(9), Some(12));
        assert_eq!(bucket_for(257), None);
        assert_eq!(ctx_bucket(100, 8192), 512);
        assert_eq!(ctx_bucket(4097, 8192), 8192);
        // Batch 1, 8 KV heads, 4096 tokens on 132 SMs: many splits to fill the GPU.
        let (split, n) = decode_split(1, 8, 4096, 132, 64);
        assert!(8 * n >= 132, "split {split} gives {n}");
        // Large batches need no splitting beyond the kernel's cap.
        let (split, n) = decode_split(256, 8, 4096, 132, 64);
        assert_eq!((split, n), (512, 8));
        // The split count never exceeds the cap.
        let (_, n) = decode_split(1, 1, 32768, 132, 64);
        assert!(n <= 64);
    }
}
