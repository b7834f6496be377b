//! The `Engine` seam: what the batcher and the services need from a model backend.

use tandem_protocol::{BlockHash, KvExport, KvLayout};

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

    /// A forward pass that also picks each item's greedy next token (the first largest logit of
    /// its last token) where the logits are, sparing their trip to the host. `None`: this engine
    /// has no such path, and the caller samples from [`Engine::forward`]'s logits. Items whose
    /// chunk ends mid-prompt get a placeholder the caller ignores.
    fn forward_argmax(&mut self, _items: &[ForwardItem]) -> Option<Result<Vec<u32>>> {
        None
    }

    /// Drops a sequence; its full blocks stay cached for prefix reuse until evicted.
    fn release(&mut self, seq: SeqId);

    /// Tokens whose KV the sequence holds.
    fn seq_len(&self, seq: SeqId) -> Option<usize>;

    fn export(&self, seq: SeqId) -> Result<KvExport>;

    /// Creates `seq` from another engine's export; decoding then continues as if this engine
    /// had run the prefill.
    fn import(&mut self, seq: SeqId, kv: &KvExport) -> Result<()>;

    fn stats(&self) -> PoolStats;

    /// How many leading blocks of a hash chain the cache holds.
    fn cached_prefix(&self, hashes: &[BlockHash]) -> usize;

    /// Every hash the cache holds, for republishing the prefix index.
    fn cached_hashes(&self) -> Vec<BlockHash>;

    /// Hashes evicted since the last call, for withdrawing them from the prefix index.
    fn take_evicted(&mut self) -> Vec<BlockHash>;

    /// Adds full blocks fetched from elsewhere (the cluster's block store) to the prefix cache:
    /// block `i` holds `tokens[i*bs..(i+1)*bs]` and chains from the block before it, the first
    /// from `parent`. They stay cached, unreferenced, until a sequence uses them or they are
    /// evicted. Returns how many were new.
    fn insert_cached(&mut self, parent: BlockHash, tokens: &[u32], blocks: &[Vec<u8>]) -> Result<usize>;
}
