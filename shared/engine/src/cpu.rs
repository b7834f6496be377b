//! The CPU backend: candle matmuls (quantized GGUF or dense safetensors), own attention loops,
//! a block-paged KV store in f32.

use std::collections::HashMap;

use tandem_protocol::{chain_hash, BlockHash, KvDtype, KvLayout, ROOT_HASH};
use tandem_tokenizer::{ModelFiles, ModelFormat};

use crate::config::ModelConfig;
use crate::engine::{Engine, EngineInfo, ForwardItem, SeqId};
use tandem_protocol::KvExport;
use crate::kv::{BlockId, BlockPool, KvStore, PoolStats};
use crate::model::{Model, TokenSlot};
use crate::weights::WeightSource;
use crate::{EngineError, Result};

/// Sizing of the KV cache.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub block_size: usize,
    /// Memory for KV blocks; the block count follows from it.
    pub kv_cache_bytes: usize,
    /// Caps the context below the model's own limit (the KV budget, not the model, often binds).
    pub max_context: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { block_size: 16, kv_cache_bytes: 512 << 20, max_context: None }
    }
}

struct Seq {
    /// Tokens whose KV is in the cache.
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
    /// Chained hashes of the full blocks.
    hashes: Vec<BlockHash>,
}

pub struct CpuEngine {
    model: Model,
    info: EngineInfo,
    pool: BlockPool,
    store: KvStore,
    seqs: HashMap<SeqId, Seq>,
}

impl std::fmt::Debug for CpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuEngine").field("info", &self.info).field("sequences", &self.seqs.len()).finish_non_exhaustive()
    }
}

impl CpuEngine {
    pub fn load(files: &ModelFiles, cfg: &EngineConfig) -> Result<Self> {
        let (model_cfg, src) = match &files.format {
            ModelFormat::Gguf(path) => {
                let src = WeightSource::open_gguf(path)?;
                let WeightSource::Gguf { content, .. } = &src else { unreachable!("opened as gguf") };
                (ModelConfig::from_gguf(content)?, src)
            }
            ModelFormat::Folder(dir) => {
                let text = std::fs::read_to_string(dir.join("config.json"))
                    .map_err(|e| EngineError::Load(format!("{}: {e}", dir.display())))?;
                (ModelConfig::from_hf_json(&text)?, WeightSource::open_safetensors(dir)?)
            }
        };
        Self::new(files.name.clone(), Model::load(model_cfg, src)?, cfg)
    }

    fn new(model_name: String, model: Model, cfg: &EngineConfig) -> Result<Self> {
        let c = &model.cfg;
        let layout = KvLayout {
            model_id: model_name.clone(),
            num_layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            dtype: KvDtype::F32,
            block_size: cfg.block_size,
            tp_rank: 0,
            tp_size: 1,
            token_count: 0,
        };
        let num_blocks = (cfg.kv_cache_bytes / layout.block_bytes()).max(1);
        let max_context = cfg.max_context.unwrap_or(c.max_context).min(c.max_context).min(num_blocks * cfg.block_size);
        let info = EngineInfo { model_name, vocab_size: c.vocab_size, max_context, block_size: cfg.block_size, layout };
        tracing::info!(
            model = %info.model_name, layers = c.layers, hidden = c.hidden, kv_blocks = num_blocks,
            block_size = cfg.block_size, max_context, "cpu engine ready"
        );
        Ok(Self {
            store: KvStore::new(num_blocks, cfg.block_size, c.layers, c.kv_heads, c.head_dim),
            pool: BlockPool::new(num_blocks),
            seqs: HashMap::new(),
            model,
            info,
        })
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    fn seq(&self, id: SeqId) -> Result<&Seq> {
        self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))
    }

    /// Publishes blocks that became full so other sequences can share them.
    fn publish_full_blocks(pool: &mut BlockPool, seq: &mut Seq, block_size: usize) {
        let full = seq.tokens.len() / block_size;
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let parent = seq.hashes.last().copied().unwrap_or(ROOT_HASH);
            let h = chain_hash(parent, &seq.tokens[i * block_size..(i + 1) * block_size]);
            pool.publish(seq.blocks[i], h);
            seq.hashes.push(h);
        }
    }
}

impl Engine for CpuEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn add_sequence(&mut self, id: SeqId, prompt: &[u32]) -> Result<usize> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id));
        }
        if prompt.len() > self.info.max_context {
            return Err(EngineError::ContextOverflow { len: prompt.len(), max: self.info.max_context });
        }
        let bs = self.info.block_size;
        // Leave at least one token to compute: its logits start the generation.
        let reusable = tandem_protocol::block_hashes(&prompt[..prompt.len().saturating_sub(1)], bs);
        let blocks = self.pool.acquire_prefix(&reusable);
        let cached = blocks.len() * bs;
        let hashes = reusable[..blocks.len()].to_vec();
        self.seqs.insert(id, Seq { tokens: prompt[..cached].to_vec(), blocks, hashes });
        Ok(cached)
    }

    fn forward(&mut self, items: &[ForwardItem]) -> Result<Vec<Vec<Vec<f32>>>> {
        let bs = self.info.block_size;
        // Check everything and count the blocks needed before touching any state.
        let mut needed = Vec::with_capacity(items.len());
        for it in items {
            let s = self.seq(it.seq)?;
            let len = s.tokens.len() + it.tokens.len();
            if len > self.info.max_context {
                return Err(EngineError::ContextOverflow { len, max: self.info.max_context });
            }
            needed.push(len.div_ceil(bs).saturating_sub(s.blocks.len()));
        }
        let mut fresh = self.pool.allocate_n(needed.iter().sum())?.into_iter();
        for (it, n) in items.iter().zip(&needed) {
            let s = self.seqs.get_mut(&it.seq).expect("checked above");
            s.blocks.extend(fresh.by_ref().take(*n));
        }

        let mut slots = Vec::new();
        let mut logit_rows = Vec::new();
        for it in items {
            let s = &self.seqs[&it.seq];
            let start = s.tokens.len();
            for (j, &token) in it.tokens.iter().enumerate() {
                if it.all_logits || j + 1 == it.tokens.len() {
                    logit_rows.push(slots.len());
                }
                slots.push(TokenSlot { token, pos: start + j, blocks: &s.blocks });
            }
        }
        let logits = self.model.forward(&slots, &mut self.store, &logit_rows)?;
        drop(slots);

        let mut rows = logits.into_iter();
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            let s = self.seqs.get_mut(&it.seq).expect("checked above");
            s.tokens.extend_from_slice(&it.tokens);
            Self::publish_full_blocks(&mut self.pool, s, bs);
            let n = if it.all_logits { it.tokens.len() } else { usize::from(!it.tokens.is_empty()) };
            out.push(rows.by_ref().take(n).collect());
        }
        Ok(out)
    }

    fn release(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.remove(&id) {
            for b in s.blocks {
                self.pool.release(b);
            }
        }
    }

    fn seq_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.tokens.len())
    }

    fn export(&self, id: SeqId) -> Result<KvExport> {
        let s = self.seq(id)?;
        let layout = KvLayout { token_count: s.tokens.len(), ..self.info.layout.clone() };
        let blocks: Vec<Vec<u8>> = s.blocks[..layout.num_blocks()]
            .iter()
            .map(|&b| bytemuck::cast_slice::<f32, u8>(self.store.block(b)).to_vec())
            .collect();
        let checksums = blocks.iter().map(|b| KvExport::checksum(b)).collect();
        Ok(KvExport { layout, tokens: s.tokens.clone(), blocks, checksums })
    }

    fn import(&mut self, id: SeqId, kv: &KvExport) -> Result<()> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id));
        }
        kv.layout.check_compatible(&self.info.layout)?;
        if kv.layout.tp_size != 1 {
            return Err(EngineError::Import(format!("blocks are sharded for TP={}; re-shard before import", kv.layout.tp_size)));
        }
        let n = kv.layout.num_blocks();
        if kv.tokens.len() != kv.layout.token_count || kv.blocks.len() != n || kv.checksums.len() != n {
            return Err(EngineError::Import(format!(
                "{} tokens and {} blocks for a layout of {} tokens",
                kv.tokens.len(),
                kv.blocks.len(),
                kv.layout.token_count
            )));
        }
        if kv.layout.token_count > self.info.max_context {
            return Err(EngineError::ContextOverflow { len: kv.layout.token_count, max: self.info.max_context });
        }
        let want = self.store.block_elems() * 4;
        if let Some(bad) = kv.blocks.iter().position(|b| b.len() != want) {
            return Err(EngineError::Import(format!("block {bad} has {} bytes, expected {want}", kv.blocks[bad].len())));
        }
        if let Some(bad) = kv.first_corrupt_block() {
            return Err(EngineError::Import(format!("block {bad} fails its checksum")));
        }
        let blocks = self.pool.allocate_n(n)?;
        for (&b, bytes) in blocks.iter().zip(&kv.blocks) {
            bytemuck::cast_slice_mut::<f32, u8>(self.store.block_mut(b)).copy_from_slice(bytes);
        }
        let mut seq = Seq { tokens: kv.tokens.clone(), blocks, hashes: Vec::new() };
        Self::publish_full_blocks(&mut self.pool, &mut seq, self.info.block_size);
        self.seqs.insert(id, seq);
        Ok(())
    }

    fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        self.pool.cached_prefix(hashes)
    }

    fn cached_hashes(&self) -> Vec<BlockHash> {
        self.pool.cached_hashes()
    }

    fn take_evicted(&mut self) -> Vec<BlockHash> {
        self.pool.take_evicted()
    }

    fn insert_cached(&mut self, parent: BlockHash, tokens: &[u32], blocks: &[Vec<u8>]) -> Result<usize> {
        let bs = self.info.block_size;
        if tokens.len() != blocks.len() * bs {
            return Err(EngineError::Import(format!("{} tokens for {} blocks of {bs}", tokens.len(), blocks.len())));
        }
        let want = self.store.block_elems() * 4;
        if let Some(bad) = blocks.iter().position(|b| b.len() != want) {
            return Err(EngineError::Import(format!("block {bad} has {} bytes, expected {want}", blocks[bad].len())));
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
            bytemuck::cast_slice_mut::<f32, u8>(self.store.block_mut(b)).copy_from_slice(bytes);
            self.pool.publish(b, h);
            self.pool.release(b);
            added += 1;
        }
        Ok(added)
    }
}
