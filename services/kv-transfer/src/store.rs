//! The in-memory tier: a byte budget, LRU order, blocks keyed by (layout, hash).

use std::collections::{BTreeMap, HashMap};

/// Blocks of different layouts (models, dtypes, TP ranks) never mix: the layout is part of the key.
type Key = (String, u64);

#[derive(Debug)]
pub struct BlockStore {
    budget: usize,
    used: usize,
    blocks: HashMap<Key, (Vec<u8>, u64)>,
    lru: BTreeMap<u64, Key>,
    tick: u64,
}

impl BlockStore {
    pub fn new(budget: usize) -> Self {
        Self { budget, used: 0, blocks: HashMap::new(), lru: BTreeMap::new(), tick: 0 }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn used_bytes(&self) -> usize {
        self.used
    }

    fn touch(&mut self, key: &Key) {
        self.tick += 1;
        if let Some((_, t)) = self.blocks.get_mut(key) {
            self.lru.remove(t);
            *t = self.tick;
            self.lru.insert(self.tick, key.clone());
        }
    }

    /// Stores a block, evicting the least recently used ones to fit. Returns false when the
    /// block alone exceeds the budget.
    pub fn put(&mut self, layout: &str, hash: u64, bytes: Vec<u8>) -> bool {
        let key = (layout.to_string(), hash);
        if self.blocks.contains_key(&key) {
            self.touch(&key);
            return true;
        }
        if bytes.len() > self.budget {
            return false;
        }
        while self.used + bytes.len() > self.budget {
            let Some((_, old)) = self.lru.pop_first() else { break };
            if let Some((b, _)) = self.blocks.remove(&old) {
                self.used -= b.len();
            }
        }
        self.used += bytes.len();
        self.tick += 1;
        self.lru.insert(self.tick, key.clone());
        self.blocks.insert(key, (bytes, self.tick));
        true
    }

    /// The blocks of the longest stored prefix of `hashes`.
    pub fn get_prefix(&mut self, layout: &str, hashes: &[u64]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for h in hashes {
            let key = (layout.to_string(), *h);
            let Some((b, _)) = self.blocks.get(&key) else { break };
            out.push(b.clone());
            self.touch(&key);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_evicts_least_recently_used_and_prefixes_stop_at_gaps() {
        let mut s = BlockStore::new(30);
        for h in 1..=3 {
            assert!(s.put("l", h, vec![h as u8; 10]));
        }
        // Touch 1 so that 2 is the oldest, then overflow.
        assert_eq!(s.get_prefix("l", &[1]).len(), 1);
        assert!(s.put("l", 4, vec![4; 10]));
        assert_eq!(s.used_bytes(), 30);
        assert_eq!(s.get_prefix("l", &[1, 2, 3]).len(), 1, "2 was evicted, so the prefix stops at it");
        assert_eq!(s.get_prefix("l", &[3, 4]), vec![vec![3; 10], vec![4; 10]]);
        assert!(s.get_prefix("other-layout", &[3]).is_empty());
        assert!(!s.put("l", 9, vec![0; 31]));
    }
}
