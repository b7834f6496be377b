//! The `Engine` seam: what a model backend must do. Everything about sequences (which blocks
//! hold which tokens, prefix sharing, export and import checks) is written once, in
//! [`PagedEngine`], over any backend.

use std::sync::Arc;

use tandem_protocol::{BlockHash, BlockMemory, Bytes, DeviceBlocks, DevicePeer, KvExport, KvLayout};

use crate::kv::{BlockId, PoolStats, SeqTable};
use crate::{EngineError, Result};

pub type SeqId = u64;

/// Static facts about a loaded engine.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The name clients use for the model.
    pub model_name: String,
    pub vocab_size: usize,
    pub max_context: usize,
    pub block_size: usize,
    /// Blocks in the KV cache.
    pub kv_blocks: usize,
    /// This engine's KV layout; `token_count` is zero.
    pub layout: KvLayout,
    /// Ranks of the engine's tensor-parallel group (1: none). A CPU group's blocks travel in
    /// the whole model's layout, so this can differ from `layout.tp_size`.
    pub tp_size: usize,
}

/// Tokens to append to one sequence in a forward pass: a prefill chunk or one decode token.
#[derive(Debug, Clone)]
pub struct ForwardItem {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    /// Return logits for every token (scoring) instead of only the last.
    pub all_logits: bool,
}

/// Structured output's masks for a pass, computed when the engine asks: per item, a bitmask
/// over the vocabulary (bit `t % 32` of word `t / 32`) for the items that draw within one.
pub type MaskSource<'a> = &'a mut dyn FnMut() -> Vec<Option<Vec<u32>>>;

/// A model backend over a paged KV cache of `info().kv_blocks` blocks: forward passes, and the
/// bytes of blocks. Which block belongs to which sequence is the [`SeqTable`]'s business, which
/// [`PagedEngine`] keeps and hands to each pass. Implementations run on their own thread; callers
/// drive them through the [`crate::Batcher`].
pub trait Engine: Send {
    fn info(&self) -> &EngineInfo;

    /// One forward pass over many sequences at different positions; every item's blocks are
    /// already reserved in `seqs`. For each item, returns the logits of its last token, or of
    /// every token when `all_logits` is set. The backend commits (`SeqTable::commit`) the tokens
    /// it ran, once their KV is written; a failed pass leaves uncommitted what did not run.
    fn forward(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> Result<Vec<Vec<Vec<f32>>>>;

    /// A forward pass that also picks each item's greedy next token (the first largest logit of
    /// its last token) where the logits are, sparing their trip to the host. `None`: this engine
    /// has no such path, and the caller samples from [`Engine::forward`]'s logits. Items whose
    /// chunk ends mid-prompt get a placeholder the caller ignores.
    fn forward_argmax(&mut self, _seqs: &mut SeqTable, _items: &[ForwardItem]) -> Option<Result<Vec<u32>>> {
        None
    }

    /// As [`Engine::forward_argmax`], with the largest logit taken among the tokens an item's
    /// mask allows (structured output): `masks[i]`, when set, is a bitmask over the vocabulary
    /// (bit `t % 32` of word `t / 32`), applied where the logits are, so a batch with
    /// constrained sequences in it still never brings its logits to the host. `None`: this
    /// engine has no such path.
    ///
    /// The engine asks `masks` for them once per call (one entry per item), after it has set
    /// the pass's work going, so the host computes them while the device runs the layers.
    fn forward_argmax_masked(&mut self, _seqs: &mut SeqTable, _items: &[ForwardItem], _masks: MaskSource<'_>) -> Option<Result<Vec<u32>>> {
        None
    }

    /// Whether [`Engine::forward_argmax_masked`] is implemented (then the batcher computes masks
    /// for it rather than masking logits on the host).
    fn masks_on_device(&self) -> bool {
        false
    }

    /// The bytes of each block, in the layout `info().layout` describes.
    fn read_blocks(&self, blocks: &[BlockId]) -> Result<Vec<Bytes>>;

    /// Overwrites each block with its bytes (`layout.block_bytes()` each, already checked).
    fn write_blocks(&mut self, writes: &[(BlockId, &[u8])]) -> Result<()>;

    /// Memory that blocks to import are best received into (for a GPU, page-locked host memory
    /// its copies read at full speed); `None`: the heap is as good.
    fn block_memory(&self) -> Option<Arc<dyn BlockMemory>> {
        None
    }

    /// How this engine maps the device pools of other processes on its host, when it can take
    /// and give blocks that stay in device memory ([`Engine::export_device`],
    /// [`Engine::import_device`]); `None`: its blocks travel through host memory.
    fn device_peer(&self) -> Option<Arc<dyn DevicePeer>> {
        None
    }

    /// Describes `blocks` where they lie, for a process of this host to copy them from: the
    /// pool's handle, their offsets and checksums ([`tandem_protocol::device_checksum`]) computed
    /// on the device. The blocks must not change until the receiver has copied them. `None`: not
    /// possible here (the caller reads the blocks out instead).
    fn export_device(&self, _blocks: &[BlockId]) -> Option<Result<DeviceBlocks>> {
        None
    }

    /// Copies another process's blocks (`src`, already mapped by [`Engine::device_peer`]) into
    /// `blocks`, `blocks[i]` from `src.offsets[i]`, and checks each copy against its checksum
    /// where it landed.
    fn import_device(&mut self, _blocks: &[BlockId], _src: &DeviceBlocks) -> Result<()> {
        Err(EngineError::Import("this engine takes no device handoffs".into()))
    }
}

/// A backend and its sequence table: the operations the services need, written once for every
/// backend.
pub struct PagedEngine<E: Engine + ?Sized = dyn Engine> {
    seqs: SeqTable,
    engine: Box<E>,
}

impl<E: Engine + ?Sized> std::fmt::Debug for PagedEngine<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedEngine").field("info", self.engine.info()).field("sequences", &self.seqs.len()).finish_non_exhaustive()
    }
}

impl<E: Engine + 'static> PagedEngine<E> {
    pub fn new(engine: E) -> Self {
        Self::from_box(Box::new(engine))
    }

    /// The same engine behind the trait object the batcher drives.
    pub fn into_dyn(self) -> PagedEngine {
        PagedEngine { seqs: self.seqs, engine: self.engine }
    }
}

impl<E: Engine + ?Sized> PagedEngine<E> {
    pub fn from_box(engine: Box<E>) -> Self {
        let i = engine.info();
        Self { seqs: SeqTable::new(i.kv_blocks, i.block_size, i.max_context), engine }
    }

    pub fn info(&self) -> &EngineInfo {
        self.engine.info()
    }

    pub fn backend(&self) -> &E {
        &self.engine
    }

    /// The backend with the table its passes need, for backend-specific passes (benchmarks,
    /// device checks).
    pub fn parts_mut(&mut self) -> (&mut E, &mut SeqTable) {
        (&mut self.engine, &mut self.seqs)
    }

    /// Registers a sequence about to prefill `prompt`. Cached blocks holding a prefix of the
    /// prompt are shared instead of recomputed; returns how many prompt tokens they cover (always
    /// fewer than the whole prompt, so the last token is computed and yields logits).
    pub fn add_sequence(&mut self, seq: SeqId, prompt: &[u32]) -> Result<usize> {
        self.seqs.add(seq, prompt, true)
    }

    /// Registers a sequence whose whole prompt is computed, cached prefix or not (to score
    /// every position of it).
    pub fn add_sequence_uncached(&mut self, seq: SeqId, prompt: &[u32]) -> Result<usize> {
        self.seqs.add(seq, prompt, false)
    }

    /// See [`Engine::forward`]. Either all items get their blocks or the call fails with
    /// `OutOfBlocks` and changes nothing.
    pub fn forward(&mut self, items: &[ForwardItem]) -> Result<Vec<Vec<Vec<f32>>>> {
        self.seqs.reserve(items)?;
        self.engine.forward(&mut self.seqs, items)
    }

    /// See [`Engine::forward_argmax`].
    pub fn forward_argmax(&mut self, items: &[ForwardItem]) -> Option<Result<Vec<u32>>> {
        if let Err(e) = self.seqs.reserve(items) {
            return Some(Err(e));
        }
        self.engine.forward_argmax(&mut self.seqs, items)
    }

    /// See [`Engine::forward_argmax_masked`]. `None` (nothing reserved) when the engine has no
    /// such path.
    pub fn forward_argmax_masked(&mut self, items: &[ForwardItem], masks: MaskSource<'_>) -> Option<Result<Vec<u32>>> {
        if !self.engine.masks_on_device() {
            return None;
        }
        if let Err(e) = self.seqs.reserve(items) {
            return Some(Err(e));
        }
        self.engine.forward_argmax_masked(&mut self.seqs, items, masks)
    }

    /// Whether the engine applies structured output's masks where its logits are.
    pub fn masks_on_device(&self) -> bool {
        self.engine.masks_on_device()
    }

    /// Drops a sequence; its full blocks stay cached for prefix reuse until evicted.
    pub fn release(&mut self, seq: SeqId) {
        self.seqs.release(seq);
    }

    /// Tokens whose KV the sequence holds.
    pub fn seq_len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.seq_len(seq)
    }

    /// The sequence's KV blocks, with their checksums.
    pub fn export(&self, seq: SeqId) -> Result<KvExport> {
        let mut kv = self.export_unsealed(seq)?;
        kv.seal();
        Ok(kv)
    }

    /// As [`Self::export`] without the checksums (`checksums` is empty): the engine's thread
    /// only copies the blocks out, and the sender seals them ([`KvExport::seal`]) on its own.
    pub fn export_unsealed(&self, seq: SeqId) -> Result<KvExport> {
        let (layout, s) = self.seqs.export_plan(seq, &self.engine.info().layout)?;
        let blocks = self.engine.read_blocks(&s.blocks[..layout.num_blocks()])?;
        Ok(KvExport { layout, tokens: s.tokens.clone(), blocks, checksums: Vec::new(), device: None })
    }

    /// The sequence's blocks described where they lie, for a process of this host to copy
    /// ([`Engine::export_device`]); the caller keeps the sequence until it has. `None`: this
    /// engine cannot, or not now.
    pub fn export_device(&self, seq: SeqId) -> Option<Result<KvExport>> {
        let (layout, s) = match self.seqs.export_plan(seq, &self.engine.info().layout) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let device = match self.engine.export_device(&s.blocks[..layout.num_blocks()])? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(KvExport { layout, tokens: s.tokens.clone(), blocks: Vec::new(), checksums: Vec::new(), device: Some(device) }))
    }

    /// A running sequence's full cache blocks from block `from` on, and the tokens of all its
    /// full blocks (what their chain hashes are computed over). Blocks still filling are left
    /// out: their KV is not final.
    pub fn read_full_blocks(&self, seq: SeqId, from: usize) -> Result<(Vec<u32>, Vec<Bytes>)> {
        let (layout, s) = self.seqs.export_plan(seq, &self.engine.info().layout)?;
        let full = s.tokens.len() / layout.block_size;
        let tokens = s.tokens[..full * layout.block_size].to_vec();
        if from >= full {
            return Ok((tokens, Vec::new()));
        }
        let blocks = self.engine.read_blocks(&s.blocks[from..full])?;
        Ok((tokens, blocks))
    }

    /// Creates `seq` from another engine's export; decoding then continues as if this engine
    /// had run the prefill. The blocks' checksums are not checked here: every KV receiver checks
    /// them on arrival, off the engine's thread, before it delivers them.
    pub fn import(&mut self, seq: SeqId, kv: &KvExport) -> Result<()> {
        let layout = &self.engine.info().layout;
        let blocks = self.seqs.begin_import(seq, kv, layout, layout.block_bytes())?;
        let written = match &kv.device {
            Some(device) => self.engine.import_device(&blocks, device),
            None => {
                let writes: Vec<(BlockId, &[u8])> = blocks.iter().copied().zip(kv.blocks.iter().map(|b| &b[..])).collect();
                self.engine.write_blocks(&writes)
            }
        };
        if let Err(e) = written {
            // The sequence never existed: its blocks go back to the pool.
            self.seqs.finish_import(seq, &[], blocks);
            self.seqs.release(seq);
            return Err(e);
        }
        self.seqs.finish_import(seq, &kv.tokens, blocks);
        Ok(())
    }

    pub fn stats(&self) -> PoolStats {
        self.seqs.stats()
    }

    /// How many leading blocks of a hash chain the cache holds.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        self.seqs.cached_prefix(hashes)
    }

    /// Every hash the cache holds, for republishing the prefix index.
    pub fn cached_hashes(&self) -> Vec<BlockHash> {
        self.seqs.cached_hashes()
    }

    /// Hashes evicted since the last call, for withdrawing them from the prefix index.
    pub fn take_evicted(&mut self) -> Vec<BlockHash> {
        self.seqs.take_evicted()
    }

    /// Adds full blocks fetched from elsewhere (the cluster's block store) to the prefix cache:
    /// block `i` holds `tokens[i*bs..(i+1)*bs]` and chains from the block before it, the first
    /// from `parent`. They stay cached, unreferenced, until a sequence uses them or they are
    /// evicted. Returns how many were new.
    pub fn insert_cached(&mut self, parent: BlockHash, tokens: &[u32], blocks: &[Vec<u8>]) -> Result<usize> {
        let engine = &mut self.engine;
        let bytes = engine.info().layout.block_bytes();
        self.seqs.insert_cached(parent, tokens, blocks, bytes, |b, data| engine.write_blocks(&[(b, data)]))
    }
}
