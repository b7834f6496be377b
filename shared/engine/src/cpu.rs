//! The CPU backend: candle matmuls (quantized GGUF or dense safetensors), own attention loops,
//! a block-paged KV store in f32.

use tandem_protocol::{Bytes, KvDtype, KvLayout};
use tandem_tokenizer::ModelFiles;

use crate::config::ModelConfig;
use crate::engine::{Engine, EngineInfo, ForwardItem};
use crate::kv::{BlockId, KvCache, SeqTable};
use crate::model::{Model, TokenSlot};
use crate::weights::WeightSource;
use crate::Result;

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

pub struct CpuEngine {
    model: Model,
    info: EngineInfo,
    store: KvCache,
}

impl std::fmt::Debug for CpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuEngine").field("info", &self.info).finish_non_exhaustive()
    }
}

impl CpuEngine {
    pub fn load(files: &ModelFiles, cfg: &EngineConfig) -> Result<Self> {
        let (model_cfg, src) = WeightSource::open(files)?;
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
        let info =
            EngineInfo { model_name, vocab_size: c.vocab_size, max_context, block_size: cfg.block_size, kv_blocks: num_blocks, layout };
        tracing::info!(
            model = %info.model_name, layers = c.layers, hidden = c.hidden, kv_blocks = num_blocks,
            block_size = cfg.block_size, max_context, "cpu engine ready"
        );
        Ok(Self { store: KvCache::new(num_blocks, cfg.block_size, c.layers, c.kv_heads, c.head_dim), model, info })
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model.cfg
    }
}

impl Engine for CpuEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn forward(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut slots = Vec::new();
        let mut logit_rows = Vec::new();
        for it in items {
            let s = seqs.get(it.seq)?;
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
        seqs.commit(items);

        let mut rows = logits.into_iter();
        Ok(items
            .iter()
            .map(|it| {
                let n = if it.all_logits { it.tokens.len() } else { usize::from(!it.tokens.is_empty()) };
                rows.by_ref().take(n).collect()
            })
            .collect())
    }

    fn read_blocks(&self, blocks: &[BlockId]) -> Result<Vec<Bytes>> {
        Ok(blocks.iter().map(|&b| Bytes::copy_from_slice(bytemuck::cast_slice::<f32, u8>(self.store.block(b)))).collect())
    }

    fn write_blocks(&mut self, writes: &[(BlockId, &[u8])]) -> Result<()> {
        for &(b, bytes) in writes {
            bytemuck::cast_slice_mut::<f32, u8>(self.store.block_mut(b)).copy_from_slice(bytes);
        }
        Ok(())
    }
}
