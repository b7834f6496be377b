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
    /// Tensor-parallel degree: ranks on threads, each with its share of the heads and FFN rows
    /// and its own KV store (1: no tensor parallelism).
    pub tp: usize,
    /// Element type of the KV cache: f16 (the default) or f32.
    pub kv_dtype: KvDtype,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { block_size: 16, kv_cache_bytes: 512 << 20, max_context: None, tp: 1, kv_dtype: KvDtype::F16 }
    }
}

pub struct CpuEngine {
    model: Model,
    info: EngineInfo,
    /// One KV store per rank, holding that rank's KV heads.
    stores: Vec<KvCache>,
}

impl std::fmt::Debug for CpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuEngine").field("info", &self.info).finish_non_exhaustive()
    }
}

impl CpuEngine {
    pub fn load(files: &ModelFiles, cfg: &EngineConfig) -> Result<Self> {
        let (model_cfg, src) = WeightSource::open(files)?;
        Self::new(files.name.clone(), Model::load(model_cfg, src, cfg.tp)?, cfg)
    }

    fn new(model_name: String, model: Model, cfg: &EngineConfig) -> Result<Self> {
        let c = &model.cfg;
        if !matches!(cfg.kv_dtype, KvDtype::F16 | KvDtype::F32) {
            return Err(crate::EngineError::Config(format!(
                "the CPU engine keeps its KV cache as f16 or f32, not {}",
                cfg.kv_dtype.as_str()
            )));
        }
        let layout = KvLayout {
            model_id: model_name.clone(),
            num_layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            dtype: cfg.kv_dtype,
            block_size: cfg.block_size,
            tp_rank: 0,
            tp_size: 1,
            token_count: 0,
        };
        // Blocks of every rank come out of the budget; a head that ranks share is stored by each.
        let elem = layout.dtype.size();
        let group_block_bytes: usize = model.ranks.iter().map(|r| c.layers * 2 * cfg.block_size * r.kv_heads * c.head_dim * elem).sum();
        let num_blocks = (cfg.kv_cache_bytes / group_block_bytes).max(1);
        let max_context = cfg.max_context.unwrap_or(c.max_context).min(c.max_context).min(num_blocks * cfg.block_size);
        let info = EngineInfo {
            model_name,
            vocab_size: c.vocab_size,
            max_context,
            block_size: cfg.block_size,
            kv_blocks: num_blocks,
            layout,
            tp_size: model.ranks.len(),
        };
        tracing::info!(
            model = %info.model_name, layers = c.layers, hidden = c.hidden, kv_blocks = num_blocks,
            block_size = cfg.block_size, max_context, tp = model.ranks.len(), "cpu engine ready"
        );
        let stores =
            model.ranks.iter().map(|r| KvCache::new(num_blocks, cfg.block_size, c.layers, r.kv_heads, c.head_dim, cfg.kv_dtype)).collect();
        Ok(Self { stores, model, info })
    }

    /// The tensor-parallel degree the engine runs.
    pub fn tp(&self) -> usize {
        self.model.ranks.len()
    }

    /// Blocks as rank `rank` of the group stores them: its shard, laid out as
    /// [`tandem_protocol::KvLayout`] describes rank `rank` of `tp()` (what a rank sending its own
    /// shard would send).
    pub fn read_rank_blocks(&self, rank: usize, blocks: &[BlockId]) -> Vec<Bytes> {
        blocks.iter().map(|&b| Bytes::copy_from_slice(self.stores[rank].block_bytes(b))).collect()
    }

    /// Where each rank's KV heads sit among the model's: (rank, its global heads).
    fn rank_heads(&self) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
        let (kv, tp) = (self.model.cfg.kv_heads, self.tp());
        (0..tp).map(move |r| (r, tandem_protocol::tp::kv_heads_of_rank(kv, tp, r)))
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
        // Alone, the rank's pass runs on one of rayon's threads, so the parallel parts inside it
        // (matmuls, attention heads) are split from a worker, which its idle peers steal from
        // while still spinning, rather than injected from outside, which sleeps this thread and
        // wakes theirs every time: a decode step has hundreds of such parts (18 % more decode
        // tokens/s with the project's kernels, docs/performance.md). A group's ranks are threads
        // of their own, which would block the worker that started them.
        let (model, stores) = (&self.model, &mut self.stores);
        let logits = if stores.len() == 1 {
            rayon::scope(|_| model.forward(&slots, stores, &logit_rows))?
        } else {
            model.forward(&slots, stores, &logit_rows)?
        };
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

    // A group's blocks travel in the whole model's layout (`tp_size` 1): its ranks live in this
    // process and share the one connection a handoff uses, so the group gathers its ranks' heads
    // into the block on the way out and scatters them on the way in, and a group of any degree
    // hands to a group of any other.
    fn read_blocks(&self, blocks: &[BlockId]) -> Result<Vec<Bytes>> {
        if let [store] = &self.stores[..] {
            return Ok(blocks.iter().map(|&b| Bytes::copy_from_slice(store.block_bytes(b))).collect());
        }
        let (kv, d) = (self.model.cfg.kv_heads, self.model.cfg.head_dim);
        let owners: Vec<(usize, std::ops::Range<usize>)> = self.rank_heads().collect();
        let rows = self.stores[0].rows_per_block();
        // Byte runs: a head's `d` elements.
        let hd = d * self.stores[0].elem_size();
        Ok(blocks
            .iter()
            .map(|&b| {
                let mut out = vec![0u8; rows * kv * hd];
                for g in 0..kv {
                    // The first rank holding head `g`; a shared head's copies are equal.
                    let (r, heads) = owners.iter().find(|(_, h)| h.contains(&g)).expect("every head has a rank");
                    let (src, w, i) = (self.stores[*r].block_bytes(b), heads.len() * hd, (g - heads.start) * hd);
                    for row in 0..rows {
                        out[row * kv * hd + g * hd..][..hd].copy_from_slice(&src[row * w + i..][..hd]);
                    }
                }
                Bytes::from(out)
            })
            .collect())
    }

    fn write_blocks(&mut self, writes: &[(BlockId, &[u8])]) -> Result<()> {
        if let [store] = &mut self.stores[..] {
            for &(b, bytes) in writes {
                let dst = store.block_bytes_mut(b);
                if bytes.len() != dst.len() {
                    return Err(crate::EngineError::Import(format!(
                        "a block of {} bytes; the layout's blocks have {}",
                        bytes.len(),
                        dst.len()
                    )));
                }
                dst.copy_from_slice(bytes);
            }
            return Ok(());
        }
        let (kv, d) = (self.model.cfg.kv_heads, self.model.cfg.head_dim);
        let owners: Vec<(usize, std::ops::Range<usize>)> = self.rank_heads().collect();
        let rows = self.stores[0].rows_per_block();
        let hd = d * self.stores[0].elem_size();
        for &(b, bytes) in writes {
            if bytes.len() != rows * kv * hd {
                return Err(crate::EngineError::Import(format!(
                    "a block of {} bytes; the layout's blocks have {}",
                    bytes.len(),
                    rows * kv * hd
                )));
            }
            for (r, heads) in &owners {
                let dst = self.stores[*r].block_bytes_mut(b);
                let w = heads.len() * hd;
                for row in 0..rows {
                    dst[row * w..(row + 1) * w].copy_from_slice(&bytes[row * kv * hd + heads.start * hd..][..w]);
                }
            }
        }
        Ok(())
    }
}
