//! The `Engine` seam: what the batcher and the services need from a model backend.

use serde::{Deserialize, Serialize};
use tandem_protocol::KvLayout;

use crate::kv::PoolStats;
use crate::Result;

pub type SeqId = u64;

/// Static facts about a loaded engine.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The name clients use for the model.
    pub model_name: String,
    pub vocab_size: usize,
    pub max_context: usize,
    pub block_size: usize,
    /// This engine's KV layout; `token_count` is zero.
    pub layout: KvLayout,
}

/// Tokens to append to one sequence in a forward pass: a prefill chunk or one decode token.
#[derive(Debug, Clone)]
pub struct ForwardItem {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    /// Return logits for every token (scoring) instead of only the last.
    pub all_logits: bool,
}

/// A sequence's KV cache as bytes: the prefill-to-decode handoff.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvExport {
    pub layout: KvLayout,
    /// The tokens whose keys and values the blocks hold (`layout.token_count` of them).
    pub tokens: Vec<u32>,
    /// One entry per block, each `layout.block_bytes()` long, little-endian.
    pub blocks: Vec<Vec<u8>>,
    /// xxh3-64 of each block.
    pub checksums: Vec<u64>,
}

impl KvExport {
    pub fn checksum(bytes: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(bytes)
    }

    /// Index of the first block whose bytes do not match its checksum.
    pub fn first_corrupt_block(&self) -> Option<usize> {
        self.blocks.iter().zip(&self.checksums).position(|(b, c)| Self::checksum(b) != *c)
    }
}

/// A model backend with a paged KV cache. Implementations run on their own thread; callers
/// drive them through the [`crate::Batcher`].
pub trait Engine: Send {
    fn info(&self) -> &EngineInfo;

    /// Registers a sequence about to prefill `prompt`. Cached blocks holding a prefix of the
    /// prompt are shared instead of recomputed; returns how many prompt tokens they cover (always
    /// fewer than the whole prompt, so the last token is computed and yields logits).
    fn add_sequence(&mut self, seq: SeqId, prompt: &[u32]) -> Result<usize>;

    /// One forward pass over many sequences at different positions. For each item, returns the
    /// logits of its last token, or of every token when `all_logits` is set. Either all items
    /// get their blocks or the call fails with `OutOfBlocks` and changes nothing.
    fn forward(&mut self, items: &[ForwardItem]) -> Result<Vec<Vec<Vec<f32>>>>;

    /// Drops a sequence; its full blocks stay cached for prefix reuse until evicted.
    fn release(&mut self, seq: SeqId);

    /// Tokens whose KV the sequence holds.
    fn seq_len(&self, seq: SeqId) -> Option<usize>;

    fn export(&self, seq: SeqId) -> Result<KvExport>;

    /// Creates `seq` from another engine's export; decoding then continues as if this engine
    /// had run the prefill.
    fn import(&mut self, seq: SeqId, kv: &KvExport) -> Result<()>;

    fn stats(&self) -> PoolStats;
}
