//! Block bookkeeping: reference counts, the hash → block map of cached full blocks, and the LRU
//! order in which unreferenced cached blocks are reclaimed.

use std::collections::{BTreeMap, HashMap};

use tandem_protocol::BlockHash;

use crate::{EngineError, Result};

pub type BlockId = u32;

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub total_blocks: usize,
    /// Blocks referenced by at least one sequence.
    pub used_blocks: usize,
    /// Unreferenced blocks whose contents are kept for prefix reuse (evictable).
    pub cached_blocks: usize,
    /// Blocks handed to a sequence from the prefix cache instead of being computed.
    pub prefix_hit_blocks: u64,
    pub evictions: u64,
}

#[derive(Debug)]
pub struct BlockPool {
    refs: Vec<u32>,
    hash_of: Vec<Option<BlockHash>>,
    by_hash: HashMap<BlockHash, BlockId>,
    /// Never-hashed or evicted blocks.
    free: Vec<BlockId>,
    /// Unreferenced hashed blocks by release order; oldest first.
    lru: BTreeMap<u64, BlockId>,
    lru_key: Vec<u64>,
    tick: u64,
    hits: u64,
    evictions: u64,
    /// Hashes evicted since the last [`BlockPool::take_evicted`], for the cluster's prefix index.
    evicted: Vec<BlockHash>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            by_hash: HashMap::new(),
            free: (0..num_blocks as BlockId).rev().collect(),
            lru: BTreeMap::new(),
            lru_key: vec![0; num_blocks],
            tick: 0,
            hits: 0,
            evictions: 0,
            evicted: Vec::new(),
        }
    }

    /// Blocks that can be handed out now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Takes a block for new contents, evicting the least recently used cached block if needed.
    pub fn allocate(&mut self) -> Result<BlockId> {
        let id = if let Some(id) = self.free.pop() {
            id
        } else if let Some((_, id)) = self.lru.pop_first() {
            if let Some(h) = self.hash_of[id as usize].take() {
                self.by_hash.remove(&h);
                // Bounded: a reader that never drains loses old entries, which only makes the
                // index stale until their TTL.
                if self.evicted.len() < 1 << 16 {
                    self.evicted.push(h);
                }
            }
            self.evictions += 1;
            id
        } else {
            return Err(EngineError::OutOfBlocks { needed: 1, available: 0 });
        };
        self.refs[id as usize] = 1;
        Ok(id)
    }

    /// Reserves `n` blocks at once, or none.
    pub fn allocate_n(&mut self, n: usize) -> Result<Vec<BlockId>> {
        if n > self.available() {
            return Err(EngineError::OutOfBlocks { needed: n, available: self.available() });
        }
        (0..n).map(|_| self.allocate()).collect()
    }

    /// The longest run of `hashes` held in the cache, each block's reference taken.
    pub fn acquire_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let mut out = Vec::new();
        for h in hashes {
            let Some(&id) = self.by_hash.get(h) else { break };
            if self.refs[id as usize] == 0 {
                self.lru.remove(&self.lru_key[id as usize]);
            }
            self.refs[id as usize] += 1;
            out.push(id);
        }
        self.hits += out.len() as u64;
        out
    }

    /// Marks a full block's contents as `hash` so later sequences can share it. If an identical
    /// block is already cached, this one simply stays private.
    pub fn publish(&mut self, id: BlockId, hash: BlockHash) {
        if self.hash_of[id as usize].is_none() && !self.by_hash.contains_key(&hash) {
            self.hash_of[id as usize] = Some(hash);
            self.by_hash.insert(hash, id);
        }
    }

    pub fn is_cached(&self, hash: BlockHash) -> bool {
        self.by_hash.contains_key(&hash)
    }

    /// How many leading hashes of a chain are cached.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.by_hash.contains_key(h)).count()
    }

    /// Every cached hash (held or evictable).
    pub fn cached_hashes(&self) -> Vec<BlockHash> {
        self.by_hash.keys().copied().collect()
    }

    /// Hashes evicted since the last call.
    pub fn take_evicted(&mut self) -> Vec<BlockHash> {
        std::mem::take(&mut self.evicted)
    }

    pub fn release(&mut self, id: BlockId) {
        let r = &mut self.refs[id as usize];
        debug_assert!(*r > 0, "block {id} released twice");
        *r = r.saturating_sub(1);
        if *r == 0 {
            if self.hash_of[id as usize].is_some() {
                self.tick += 1;
                self.lru_key[id as usize] = self.tick;
                self.lru.insert(self.tick, id);
            } else {
                self.free.push(id);
            }
        }
    }

    pub fn stats(&self) -> PoolStats {
        let total = self.refs.len();
        PoolStats {
            total_blocks: total,
            used_blocks: total - self.free.len() - self.lru.len(),
            cached_blocks: self.lru.len(),
            prefix_hit_blocks: self.hits,
            evictions: self.evictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_blocks_are_counted_and_evicted_in_lru_order() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        pool.publish(a, 10);
        pool.publish(b, 20);
        // A second sequence shares both blocks.
        assert_eq!(pool.acquire_prefix(&[10, 20, 30]), vec![a, b]);
        assert_eq!(pool.stats().prefix_hit_blocks, 2);
        for id in [a, b, a, b] {
            pool.release(id);
        }
        assert_eq!(pool.stats().cached_blocks, 2);
        assert_eq!(pool.stats().used_blocks, 0);
        // One free block, then the oldest released cached block (a) goes first.
        let c = pool.allocate().unwrap();
        assert_ne!(c, a);
        assert_ne!(c, b);
        assert_eq!(pool.allocate().unwrap(), a);
        assert!(!pool.is_cached(10));
        assert!(pool.is_cached(20));
        assert_eq!(pool.stats().evictions, 1);
    }

    #[test]
    fn running_out_is_an_error_and_takes_nothing() {
        let mut pool = BlockPool::new(2);
        let _a = pool.allocate().unwrap();
        let err = pool.allocate_n(2).unwrap_err();
        assert!(matches!(err, EngineError::OutOfBlocks { needed: 2, available: 1 }));
        assert_eq!(pool.available(), 1);
    }
}
