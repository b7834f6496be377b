//! Per-sequence bookkeeping shared by every backend: which tokens a sequence holds, its block
//! table, the chained hashes of its full blocks, and the checks around import and prefix-cache
//! inserts. Backends own the block contents; this owns which blocks mean what.

use std::collections::HashMap;

use tandem_protocol::{chain_hash, BlockHash, KvExport, KvLayout, ROOT_HASH};

use super::{BlockId, BlockPool, PoolStats};
use crate::engine::{ForwardItem, SeqId};
use crate::{EngineError, Result};

/// One sequence's place in the cache.
#[derive(Debug)]
pub struct SeqState {
    /// Tokens whose KV is in the cache.
    pub tokens: Vec<u32>,
    pub blocks: Vec<BlockId>,
    /// Chained hashes of the full blocks.
    hashes: Vec<BlockHash>,
}

/// The sequences of one engine over its block pool.
#[derive(Debug)]
pub struct SeqTable {
    pool: BlockPool,
    seqs: HashMap<SeqId, SeqState>,
    block_size: usize,
    max_context: usize,
}

impl SeqTable {
    pub fn new(num_blocks: usize, block_size: usize, max_context: usize) -> Self {
        Self { pool: BlockPool::new(num_blocks), seqs: HashMap::new(), block_size, max_context }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn get(&self, id: SeqId) -> Result<&SeqState> {
        self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))
    }

    /// Registers a sequence about to prefill `prompt`, sharing cached blocks that hold a prefix
    /// of it (with `reuse_prefix`); returns the prompt tokens they cover (never all of them: the last token is
    /// computed so that it yields logits).
    pub fn add(&mut self, id: SeqId, prompt: &[u32], reuse_prefix: bool) -> Result<usize> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id));
        }
        if prompt.len() > self.max_context {
            return Err(EngineError::ContextOverflow { len: prompt.len(), max: self.max_context });
        }
        let bs = self.block_size;
        let reusable = if reuse_prefix { tandem_protocol::block_hashes(&prompt[..prompt.len().saturating_sub(1)], bs) } else { Vec::new() };
        let blocks = self.pool.acquire_prefix(&reusable);
        let cached = blocks.len() * bs;
        let hashes = reusable[..blocks.len()].to_vec();
        self.seqs.insert(id, SeqState { tokens: prompt[..cached].to_vec(), blocks, hashes });
        Ok(cached)
    }

    /// Checks a forward pass and gives every item the blocks its new tokens need: all of them
    /// or, with `OutOfBlocks`, none.
    pub fn reserve(&mut self, items: &[ForwardItem]) -> Result<()> {
        let bs = self.block_size;
        let mut needed = Vec::with_capacity(items.len());
        for it in items {
            let s = self.get(it.seq)?;
            let len = s.tokens.len() + it.tokens.len();
            if len > self.max_context {
                return Err(EngineError::ContextOverflow { len, max: self.max_context });
            }
            needed.push(len.div_ceil(bs).saturating_sub(s.blocks.len()));
        }
        let mut fresh = self.pool.allocate_n(needed.iter().sum())?.into_iter();
        for (it, n) in items.iter().zip(&needed) {
            let s = self.seqs.get_mut(&it.seq).expect("checked above");
            s.blocks.extend(fresh.by_ref().take(*n));
        }
        Ok(())
    }

    /// Records that a forward pass wrote the items' tokens, publishing blocks that became full.
    pub fn commit(&mut self, items: &[ForwardItem]) {
        for it in items {
            let s = self.seqs.get_mut(&it.seq).expect("reserved before the forward pass");
            s.tokens.extend_from_slice(&it.tokens);
            Self::publish_full(&mut self.pool, s, self.block_size);
        }
    }

    fn publish_full(pool: &mut BlockPool, seq: &mut SeqState, block_size: usize) {
        let full = seq.tokens.len() / block_size;
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let parent = seq.hashes.last().copied().unwrap_or(ROOT_HASH);
            let h = chain_hash(parent, &seq.tokens[i * block_size..(i + 1) * block_size]);
            pool.publish(seq.blocks[i], h);
            seq.hashes.push(h);
        }
    }

    pub fn release(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.remove(&id) {
            for b in s.blocks {
                self.pool.release(b);
            }
        }
    }

    pub fn seq_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.tokens.len())
    }

    /// The layout of `id`'s export and the blocks that hold it, in order.
    pub fn export_plan(&self, id: SeqId, layout: &KvLayout) -> Result<(KvLayout, &SeqState)> {
        let s = self.get(id)?;
        Ok((KvLayout { token_count: s.tokens.len(), ..layout.clone() }, s))
    }

    /// Validates an import against this engine's layout (`block_bytes` per block) and allocates
    /// its blocks; the caller fills them and then calls [`SeqTable::finish_import`].
    pub fn begin_import(&mut self, id: SeqId, kv: &KvExport, ours: &KvLayout, block_bytes: usize) -> Result<Vec<BlockId>> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id));
        }
        kv.layout.check_compatible(ours)?;
        if kv.layout.tp_size != ours.tp_size {
            return Err(EngineError::Import(format!(
                "blocks are sharded for TP={}, this engine runs TP={}; re-shard before import",
                kv.layout.tp_size, ours.tp_size
            )));
        }
        let n = kv.layout.num_blocks();
        if kv.tokens.len() != kv.layout.token_count || kv.block_count() != n || (kv.device.is_some() && !kv.blocks.is_empty()) {
            return Err(EngineError::Import(format!(
                "{} tokens and {} blocks for a layout of {} tokens",
                kv.tokens.len(),
                kv.block_count() + kv.blocks.len() * kv.device.is_some() as usize,
                kv.layout.token_count
            )));
        }
        if kv.layout.token_count > self.max_context {
            return Err(EngineError::ContextOverflow { len: kv.layout.token_count, max: self.max_context });
        }
        if let Some(bad) = kv.blocks.iter().position(|b| b.len() != block_bytes) {
            return Err(EngineError::Import(format!("block {bad} has {} bytes, expected {block_bytes}", kv.blocks[bad].len())));
        }
        self.pool.allocate_n(n)
    }

    pub fn finish_import(&mut self, id: SeqId, tokens: &[u32], blocks: Vec<BlockId>) {
        let mut seq = SeqState { tokens: tokens.to_vec(), blocks, hashes: Vec::new() };
        Self::publish_full(&mut self.pool, &mut seq, self.block_size);
        self.seqs.insert(id, seq);
    }

    /// Adds fetched full blocks to the prefix cache (see `Engine::insert_cached`); `write` fills
    /// a freshly allocated block with the `i`-th block's bytes. Returns how many were new.
    pub fn insert_cached(
        &mut self,
        parent: BlockHash,
        tokens: &[u32],
        blocks: &[Vec<u8>],
        block_bytes: usize,
        mut write: impl FnMut(BlockId, &[u8]) -> Result<()>,
    ) -> Result<usize> {
        let bs = self.block_size;
        if tokens.len() != blocks.len() * bs {
            return Err(EngineError::Import(format!("{} tokens for {} blocks of {bs}", tokens.len(), blocks.len())));
        }
        if let Some(bad) = blocks.iter().position(|b| b.len() != block_bytes) {
            return Err(EngineError::Import(format!("block {bad} has {} bytes, expected {block_bytes}", blocks[bad].len())));
        }
        let mut h = parent;
        let mut added = 0;
        for (chunk, bytes) in tokens.chunks(bs).zip(blocks) {
            h = chain_hash(h, chunk);
            if self.pool.is_cached(h) {
                continue;
            }
            // Room comes from free blocks or the oldest cached ones, never a running sequence's.
            if self.pool.available() == 0 {
                break;
            }
            let b = self.pool.allocate()?;
            if let Err(e) = write(b, bytes) {
                self.pool.release(b);
                return Err(e);
            }
            self.pool.publish(b, h);
            self.pool.release(b);
            added += 1;
        }
        Ok(added)
    }

    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        self.pool.cached_prefix(hashes)
    }

    pub fn cached_hashes(&self) -> Vec<BlockHash> {
        self.pool.cached_hashes()
    }

    pub fn take_evicted(&mut self) -> Vec<BlockHash> {
        self.pool.take_evicted()
    }
}
