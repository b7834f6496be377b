//! The block store's tiers: host memory under a byte budget, then (optionally) a directory on
//! disk under its own budget. Both evict least recently used first; a block leaving memory
//! moves to disk, a block leaving disk is gone. Blocks of different layouts (models, dtypes, TP
//! ranks) never mix: the layout is part of the key.
//!
//! Blocks are kept as the shared [`Bytes`] they arrived in (no copy on the way in, none on the
//! way out). The blocks of one put share the allocation their message was decoded into, which is
//! freed once the last of them leaves; one put's blocks are neighbours in the LRU order, so they
//! mostly leave together.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use tandem_protocol::Bytes;

/// A layout (by its [`layout_id`]) and a block hash.
type Key = (u64, u64);

/// Names a layout by a hash of its JSON, so that a key costs no allocation.
pub fn layout_id(layout_json: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(layout_json.as_bytes())
}

/// Byte-budgeted LRU bookkeeping shared by both tiers.
#[derive(Debug)]
struct Lru<V> {
    budget: usize,
    used: usize,
    items: HashMap<Key, (V, usize, u64)>,
    order: BTreeMap<u64, Key>,
    tick: u64,
}

impl<V> Lru<V> {
    fn new(budget: usize) -> Self {
        Self { budget, used: 0, items: HashMap::new(), order: BTreeMap::new(), tick: 0 }
    }

    fn touch(&mut self, key: &Key) {
        self.tick += 1;
        if let Some((_, _, t)) = self.items.get_mut(key) {
            self.order.remove(t);
            *t = self.tick;
            self.order.insert(self.tick, *key);
        }
    }

    /// Inserts, returning what had to leave to make room.
    fn insert(&mut self, key: Key, value: V, size: usize) -> Vec<(Key, V)> {
        let mut out = Vec::new();
        while self.used + size > self.budget {
            let Some((_, old)) = self.order.pop_first() else { break };
            if let Some((v, s, _)) = self.items.remove(&old) {
                self.used -= s;
                out.push((old, v));
            }
        }
        self.used += size;
        self.tick += 1;
        self.order.insert(self.tick, key);
        self.items.insert(key, (value, size, self.tick));
        out
    }

    fn remove(&mut self, key: &Key) -> Option<V> {
        let (v, s, t) = self.items.remove(key)?;
        self.order.remove(&t);
        self.used -= s;
        Some(v)
    }
}

/// The disk tier: one file per block in a directory the store owns (emptied at start).
#[derive(Debug)]
struct Disk {
    dir: PathBuf,
    lru: Lru<()>,
}

impl Disk {
    fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(format!("{:016x}-{:016x}.kv", key.0, key.1))
    }
}

#[derive(Debug)]
pub struct BlockStore {
    mem: Lru<Bytes>,
    disk: Option<Disk>,
}

impl BlockStore {
    pub fn new(memory_budget: usize) -> Self {
        Self { mem: Lru::new(memory_budget), disk: None }
    }

    /// Adds a disk tier in `dir` (created, and emptied of earlier blocks) of `budget` bytes.
    pub fn with_disk(mut self, dir: PathBuf, budget: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "kv") {
                std::fs::remove_file(path)?;
            }
        }
        self.disk = Some(Disk { dir, lru: Lru::new(budget) });
        Ok(self)
    }

    /// Blocks held in memory and on disk.
    pub fn len(&self) -> usize {
        self.mem.items.len() + self.disk.as_ref().map_or(0, |d| d.lru.items.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn memory_bytes(&self) -> usize {
        self.mem.used
    }

    pub fn disk_bytes(&self) -> usize {
        self.disk.as_ref().map_or(0, |d| d.lru.used)
    }

    fn contains(&self, key: &Key) -> bool {
        self.mem.items.contains_key(key) || self.disk.as_ref().is_some_and(|d| d.lru.items.contains_key(key))
    }

    /// Stores a block, moving or dropping the least recently used ones to fit. Returns whether it
    /// was stored and the hashes that left the store entirely.
    pub fn put(&mut self, layout: u64, hash: u64, bytes: Bytes) -> (bool, Vec<u64>) {
        let key = (layout, hash);
        if self.mem.items.contains_key(&key) {
            self.mem.touch(&key);
            return (true, Vec::new());
        }
        if bytes.len() > self.mem.budget {
            return (false, Vec::new());
        }
        if let Some(d) = self.disk.as_mut() {
            if d.lru.remove(&key).is_some() {
                let _ = std::fs::remove_file(d.path(&key));
            }
        }
        let size = bytes.len();
        let spilled = self.mem.insert(key, bytes, size);
        (true, self.spill(spilled))
    }

    /// Moves blocks pushed out of memory to disk; returns the hashes that are gone for good.
    fn spill(&mut self, blocks: Vec<(Key, Bytes)>) -> Vec<u64> {
        let mut gone = Vec::new();
        for (key, bytes) in blocks {
            let Some(d) = self.disk.as_mut() else {
                gone.push(key.1);
                continue;
            };
            if bytes.len() > d.lru.budget || std::fs::write(d.path(&key), &bytes).is_err() {
                gone.push(key.1);
                continue;
            }
            for (old, ()) in d.lru.insert(key, (), bytes.len()) {
                let _ = std::fs::remove_file(d.path(&old));
                gone.push(old.1);
            }
        }
        gone
    }

    /// The blocks of the longest stored prefix of `hashes`, from either tier (a disk hit moves
    /// back to memory), and the hashes that left the store to make room.
    pub fn get_prefix(&mut self, layout: u64, hashes: &[u64]) -> (Vec<Bytes>, Vec<u64>) {
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for h in hashes {
            let key = (layout, *h);
            if let Some((b, _, _)) = self.mem.items.get(&key) {
                out.push(b.clone());
                self.mem.touch(&key);
                continue;
            }
            let Some(d) = self.disk.as_mut() else { break };
            if d.lru.remove(&key).is_none() {
                break;
            }
            let path = d.path(&key);
            let Ok(bytes) = std::fs::read(&path).map(Bytes::from) else {
                gone.push(*h);
                break;
            };
            let _ = std::fs::remove_file(path);
            out.push(bytes.clone());
            let size = bytes.len();
            let spilled = self.mem.insert(key, bytes, size);
            gone.extend(self.spill(spilled));
        }
        debug_assert!(hashes.iter().take(out.len()).all(|h| self.contains(&(layout, *h)) || gone.contains(h)));
        (out, gone)
    }

    /// Every stored hash, for republishing the index.
    pub fn hashes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.mem.items.keys().map(|k| k.1).collect();
        if let Some(d) = &self.disk {
            v.extend(d.lru.items.keys().map(|k| k.1));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: u64 = 1;

    fn block(v: u64) -> Bytes {
        Bytes::from(vec![v as u8; 10])
    }

    #[test]
    fn budget_evicts_least_recently_used_and_prefixes_stop_at_gaps() {
        let mut s = BlockStore::new(30);
        for h in 1..=3 {
            assert!(s.put(L, h, block(h)).0);
        }
        // Touch 1 so that 2 is the oldest, then overflow.
        assert_eq!(s.get_prefix(L, &[1]).0.len(), 1);
        let (stored, gone) = s.put(L, 4, block(4));
        assert!(stored);
        assert_eq!(gone, vec![2], "without a disk tier an evicted block is gone");
        assert_eq!(s.memory_bytes(), 30);
        assert_eq!(s.get_prefix(L, &[1, 2, 3]).0.len(), 1, "2 was evicted, so the prefix stops at it");
        assert_eq!(s.get_prefix(L, &[3, 4]).0, vec![block(3), block(4)]);
        assert!(s.get_prefix(2, &[3]).0.is_empty());
        assert!(!s.put(L, 9, Bytes::from(vec![0; 31])).0);
    }

    #[test]
    fn memory_spills_to_disk_and_disk_hits_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = BlockStore::new(20).with_disk(dir.path().join("blocks"), 20).unwrap();
        for h in 1..=4 {
            let (stored, gone) = s.put(L, h, block(h));
            assert!(stored && gone.is_empty(), "blocks 1 and 2 moved to disk, none lost");
        }
        assert_eq!((s.memory_bytes(), s.disk_bytes(), s.len()), (20, 20, 4));
        assert_eq!(std::fs::read_dir(dir.path().join("blocks")).unwrap().count(), 2);
        // Reading 1..=4 brings 1 and 2 back from disk, pushing 3 and 4 down.
        let (blocks, gone) = s.get_prefix(L, &[1, 2, 3, 4]);
        assert_eq!(blocks, (1..=4).map(|h| vec![h as u8; 10]).collect::<Vec<_>>());
        assert!(gone.is_empty());
        assert_eq!(s.len(), 4);
        // A fifth block overflows both tiers: the oldest on disk is gone for good.
        let (_, gone) = s.put(L, 5, block(5));
        assert_eq!(gone.len(), 1);
        assert_eq!(s.len(), 4);
    }
}
