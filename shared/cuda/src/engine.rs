//! `CudaEngine`: the [`Engine`] seam over the device model, the paged bf16 KV cache and the
//! captured decode graphs.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys, CudaGraph};
use tandem_engine::kv::{BlockId, SeqTable};
use tandem_engine::weights::WeightSource;
use tandem_engine::{Engine, EngineError, EngineInfo, ForwardItem, MaskSource, ModelConfig, PagedEngine, SeqId};
use tandem_protocol::{BlockMemory, Bytes, DeviceBlocks, DevicePeer, KvDtype, KvLayout};
use tandem_tokenizer::ModelFiles;

use crate::device::{Gpu, WeightFormat};
use crate::group::Nccl;
use crate::model::{Dims, Head, Model, PassShape, Rank, Scratch, Weights};
use crate::pinned::{Filling, LazySlots};
use crate::plan::{bucket_for, ctx_bucket, decode_split, Plan, PlanItem, BUCKETS};
use crate::shard::Tp;
use crate::{CudaError, Result};

/// Sizing and switches of a CUDA engine.
#[derive(Debug, Clone)]
pub struct CudaConfig {
    /// The GPU of rank 0; rank `r` of a tensor-parallel group runs on GPU `device + r`.
    pub device: usize,
    /// Tensor-parallel degree: GPUs in the group, each holding its share of the heads and FFN
    /// rows. The query and KV head counts and the FFN width must divide by it.
    pub tp: usize,
    pub block_size: usize,
    /// Memory for KV blocks, all ranks together; by default what `memory_fraction` of each
    /// device leaves after the weights and activations.
    pub kv_cache_bytes: Option<usize>,
    pub memory_fraction: f64,
    pub max_context: Option<usize>,
    /// Most sequences in one pass (the largest captured decode batch).
    pub max_batch: usize,
    /// Most tokens in one pass; longer prompts are computed in chunks.
    pub max_step_tokens: usize,
    /// Capture decode passes as CUDA graphs.
    pub graphs: bool,
    /// Page-locked host memory that blocks read out of the cache (exports) are copied into, at
    /// most; allocated on the first export. Past it, exports fall back to pageable memory.
    pub export_pinned_bytes: usize,
    /// Page-locked host memory that arriving blocks are received into before their import, at
    /// most; allocated on the first handoff received. Past it, they arrive in pageable memory.
    pub import_pinned_bytes: usize,
    /// How the projections are stored; `None` takes `TANDEM_CUDA_WEIGHTS` (bf16 when unset).
    pub weights: Option<WeightFormat>,
    /// The KV cache's element type, bf16 or fp8 (E4M3 rows with a scale each); `None` takes
    /// `TANDEM_CUDA_KV` (bf16 when unset).
    pub kv_dtype: Option<KvDtype>,
}

impl Default for CudaConfig {
    fn default() -> Self {
        Self {
            device: 0,
            tp: 1,
            block_size: 16,
            kv_cache_bytes: None,
            memory_fraction: 0.9,
            max_context: None,
            max_batch: 256,
            max_step_tokens: 8192,
            graphs: true,
            export_pinned_bytes: 1 << 30,
            import_pinned_bytes: 1 << 30,
            weights: None,
            kv_dtype: None,
        }
    }
}

impl CudaConfig {
    /// The projections' format: as set, else as `TANDEM_CUDA_WEIGHTS` names it.
    pub fn weight_format(&self) -> Result<WeightFormat> {
        self.weights.map_or_else(WeightFormat::from_env, Ok)
    }

    /// The KV cache's element type: `kv_dtype`, else `TANDEM_CUDA_KV`, else bf16.
    pub fn kv_format(&self) -> Result<KvDtype> {
        let dtype = match self.kv_dtype {
            Some(d) => d,
            None => match std::env::var("TANDEM_CUDA_KV") {
                Ok(v) if !v.is_empty() => v.parse().map_err(|e: String| CudaError::Unsupported(format!("TANDEM_CUDA_KV: {e}")))?,
                _ => KvDtype::Bf16,
            },
        };
        match dtype {
            KvDtype::Bf16 | KvDtype::Fp8E4m3 => Ok(dtype),
            other => Err(CudaError::Unsupported(format!("a {} KV cache (the CUDA engine keeps bf16 or fp8)", other.as_str()))),
        }
    }
}

/// Most tokens one split of decode attention covers (the kernel's `DEC_MAX_SPLIT`).
const DECODE_SPLIT_TOKENS: usize = 512;
/// Fewest partial results per head the split decode attention's scratch holds.
const MIN_SPLITS: usize = 64;
/// Longest context served: the longest checked against float64 (`checks::attention_cases`).
const DECODE_CONTEXT_LIMIT: usize = 131_072;

/// Partial results per head the scratch holds for contexts up to `max_context`: every split of
/// the longest context, 512 tokens each at that length (a 128k context takes 256), and at least
/// `MIN_SPLITS`, so that short contexts still spread over every SM in small splits.
fn max_splits(max_context: usize) -> usize {
    max_context.div_ceil(DECODE_SPLIT_TOKENS).max(MIN_SPLITS)
}
/// Logit rows of one pass (a scoring request asking for every token is chunked to this).
const MAX_LOGIT_ROWS: usize = 512;

/// A captured decode pass: one graph per rank.
struct Graph(Vec<CudaGraph>);

/// A captured decode graph's shape: batch bucket, context bucket, and whether it stops at the
/// logits (a masked pass launches its argmax after the masks are uploaded).
type GraphKey = (usize, usize, bool);

// SAFETY: a graph's handles are plain driver objects with no thread affinity; the engine owns
// them and launches them from whichever single thread drives it (`Engine` is `Send`, not `Sync`).
unsafe impl Send for Graph {}

pub struct CudaEngine {
    graphs: HashMap<GraphKey, Graph>,
    info: EngineInfo,
    model: Model,
    /// Bytes of one block in the whole model's layout (every rank's heads).
    block_bytes: usize,
    use_graphs: bool,
    /// Slots exported blocks are copied into, and arriving ones received into.
    exports: LazySlots,
    imports: Arc<LazySlots>,
    /// The group's all-reduce; `None` for a group of one. Dropped before the ranks' GPUs.
    group: Option<Nccl>,
    /// The KV pool as other processes of the host see it (a group of one whose pool could be
    /// shared): device handoffs. Dropped before the ranks, closing what it mapped.
    ipc: Option<Arc<crate::ipc::IpcPool>>,
    /// Rank 0 first; it alone computes logits and draws tokens.
    ranks: Vec<Rank>,
    /// Leading logit rows whose mask flag the last pass may have left set.
    masked_rows: usize,
    /// Partial results per head the decode attention's scratch holds ([`max_splits`]).
    max_splits: usize,
}

impl std::fmt::Debug for CudaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaEngine")
            .field("gpu", &self.ranks[0].gpu)
            .field("tp", &self.ranks.len())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn dev(e: CudaError) -> EngineError {
    match e {
        CudaError::Engine(e) => e,
        other => EngineError::Device(other.to_string()),
    }
}

impl CudaEngine {
    /// Loads a model (GGUF dequantised to bf16, or safetensors) onto `cfg.tp` GPUs from
    /// `cfg.device`, each rank taking its shard of every matrix.
    pub fn load(files: &ModelFiles, cfg: &CudaConfig) -> Result<Self> {
        let (model_cfg, mut src) = WeightSource::open(files)?;
        let tp = check_tp(&model_cfg, cfg.tp)?;
        let format = cfg.weight_format()?;
        let mut ranks = Vec::with_capacity(tp);
        for rank in 0..tp {
            let gpu = Gpu::open(cfg.device + rank)?;
            gpu.bind()?;
            let w = Weights::load(&gpu, &model_cfg, &mut src, Tp { rank, size: tp }, format)?;
            ranks.push((gpu, w));
        }
        drop(src);
        Self::assemble(files.name.clone(), ranks, model_cfg, cfg)
    }

    /// An engine with random weights of the given shape (benchmarks); each rank draws its shard
    /// with its own seed.
    pub fn random(name: &str, model_cfg: ModelConfig, seed: u64, cfg: &CudaConfig) -> Result<Self> {
        let tp = check_tp(&model_cfg, cfg.tp)?;
        let format = cfg.weight_format()?;
        let mut ranks = Vec::with_capacity(tp);
        for rank in 0..tp {
            let gpu = Gpu::open(cfg.device + rank)?;
            gpu.bind()?;
            let w = Weights::random(&gpu, &model_cfg, seed.wrapping_add(rank as u64 * 7919), Tp { rank, size: tp }, format)?;
            ranks.push((gpu, w));
        }
        Self::assemble(name.to_string(), ranks, model_cfg, cfg)
    }

    fn assemble(model_name: String, loaded: Vec<(Gpu, Weights)>, c: ModelConfig, cfg: &CudaConfig) -> Result<Self> {
        let tp = loaded.len();
        let d = Dims::new(&c, Tp { rank: 0, size: tp })?;
        if d.hd != 64 && d.hd != 128 {
            return Err(CudaError::Unsupported(format!("head_dim {} (the CUDA kernels take 64 or 128)", d.hd)));
        }
        if d.heads / d.kv_heads > 8 || d.heads % d.kv_heads != 0 {
            return Err(CudaError::Unsupported(format!("{} query heads per KV head (at most 8)", d.heads / d.kv_heads)));
        }
        let bs = cfg.block_size;
        let kv_dtype = cfg.kv_format()?;
        if kv_dtype == KvDtype::Fp8E4m3 && tp > 1 {
            // The group's gather and scatter move whole rows of bf16 heads; the scales that
            // follow an FP8 block's rows are not yet among what they move.
            return Err(CudaError::Unsupported("an FP8 KV cache on a tensor-parallel group (use --tp 1 or a bf16 cache)".into()));
        }
        // Blocks leave and enter the engine in the whole model's layout: the group gathers its
        // ranks' heads on the way out and scatters them on the way in.
        let layout = KvLayout {
            model_id: model_name.clone(),
            num_layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            dtype: kv_dtype,
            block_size: bs,
            tp_rank: 0,
            tp_size: 1,
            token_count: 0,
        };
        let block_bytes = layout.block_bytes();
        let rank_block_bytes = block_bytes / tp;
        let max_context = cfg.max_context.unwrap_or(c.max_context).min(c.max_context).min(DECODE_CONTEXT_LIMIT);
        let max_splits = max_splits(max_context);
        let max_batch = cfg.max_batch.clamp(1, *BUCKETS.last().expect("buckets"));
        let mut scratches = Vec::with_capacity(tp);
        let mut fit = usize::MAX;
        for (gpu, w) in &loaded {
            gpu.bind()?;
            if w.format == WeightFormat::Fp8 {
                // Room for the E4M3 copy of the widest projection input of the largest pass
                // (FP8 GEMMs), before the KV cache takes what is left.
                gpu.reserve_fp8_inputs(cfg.max_step_tokens.max(1), d.hidden.max(d.ffn).max(d.heads * d.hd))?;
            }
            let scratch = Scratch::new(
                gpu,
                &d,
                cfg.max_step_tokens.max(1),
                max_batch,
                MAX_LOGIT_ROWS.max(max_batch),
                max_context.div_ceil(bs),
                max_splits,
            )?;
            let (free, total) = gpu.mem_info()?;
            let blocks = match cfg.kv_cache_bytes {
                Some(b) => b / block_bytes,
                None => {
                    let reserve = total as f64 * (1.0 - cfg.memory_fraction);
                    (free as f64 - reserve).max(0.0) as usize / rank_block_bytes
                }
            };
            if blocks == 0 {
                return Err(CudaError::Unsupported(format!("no room for KV blocks on {}: {free} bytes free of {total}", gpu.name)));
            }
            fit = fit.min(blocks);
            scratches.push(scratch);
        }
        let num_blocks = fit;
        let mut ranks = Vec::with_capacity(tp);
        for ((gpu, w), scratch) in loaded.into_iter().zip(scratches) {
            gpu.bind()?;
            // A group of one keeps its cache where other processes can map it (device handoffs).
            let cache =
                if tp == 1 { gpu.alloc_shareable(num_blocks * rank_block_bytes)? } else { gpu.alloc(num_blocks * rank_block_bytes)? };
            // Never compute on zeros by accident: unwritten cache reads show up as noise, not as
            // a plausible attention over zero keys.
            gpu.fill_bf16(cache.ptr, num_blocks * rank_block_bytes / 2, 0x5eed, 1.0, 0.0)?;
            if kv_dtype == KvDtype::Fp8E4m3 {
                gpu.clear_fp8_nan(cache.ptr, num_blocks * rank_block_bytes)?;
            }
            gpu.sync()?;
            ranks.push(Rank { gpu, w, s: scratch, cache, block_bytes: rank_block_bytes });
        }
        let group = if tp > 1 { Some(Nccl::new(&ranks.iter().map(|r| &r.gpu).collect::<Vec<_>>())?) } else { None };
        let max_context = max_context.min(num_blocks * bs);
        let info =
            EngineInfo { model_name, vocab_size: c.vocab_size, max_context, block_size: bs, kv_blocks: num_blocks, layout, tp_size: tp };
        let lead = &ranks[0];
        tracing::info!(
            gpu = %lead.gpu.name, tp, model = %info.model_name,
            weights_gb = ranks.iter().map(|r| r.w.total_bytes).sum::<usize>() as f64 / 1e9,
            kv = kv_dtype.as_str(), kv_blocks = num_blocks, kv_gb = (num_blocks * block_bytes) as f64 / 1e9,
            scratch_gb = lead.s.bytes() as f64 / 1e9, max_context, "cuda engine ready"
        );
        let layers = c.layers;
        let ipc = match (tp, lead.gpu.ipc_handle(&lead.cache)) {
            (1, Ok(handle)) => Some(Arc::new(crate::ipc::IpcPool::new(lead.gpu.ctx.clone(), handle))),
            (1, Err(e)) => {
                tracing::warn!(error = %e, "the KV pool cannot be shared with other processes; handoffs go through host memory");
                None
            }
            _ => None,
        };
        Ok(Self {
            ipc,
            graphs: HashMap::new(),
            info,
            model: Model { cfg: c, d, layers, block_size: bs, kv_fp8: kv_dtype == KvDtype::Fp8E4m3 },
            block_bytes,
            use_graphs: cfg.graphs,
            // Never more than the cache itself holds.
            exports: LazySlots::new(&lead.gpu.ctx, block_bytes, (cfg.export_pinned_bytes / block_bytes).min(num_blocks), "kv exports"),
            imports: Arc::new(LazySlots::new(
                &lead.gpu.ctx,
                block_bytes,
                (cfg.import_pinned_bytes / block_bytes).min(num_blocks),
                "kv imports",
            )),
            group,
            ranks,
            masked_rows: 0,
            max_splits,
        })
    }

    /// The tensor-parallel degree: GPUs in the group.
    pub fn tp(&self) -> usize {
        self.ranks.len()
    }

    fn lead(&self) -> &Rank {
        &self.ranks[0]
    }

    /// Rows of a block: one per (layer, K or V, slot), each every KV head of its token.
    fn block_rows(&self) -> usize {
        self.model.layers * 2 * self.model.block_size
    }

    /// A group's blocks in the whole model's layout: each rank's shard downloaded, then its
    /// heads laid into every row beside the other ranks' ([`crate::shard::gather_rows`]).
    fn read_group_blocks(&self, blocks: &[BlockId]) -> Result<Vec<Bytes>> {
        let rows = self.block_rows();
        let mut out = Vec::with_capacity(blocks.len());
        for &b in blocks {
            let mut parts = Vec::with_capacity(self.ranks.len());
            for r in &self.ranks {
                r.gpu.bind()?;
                let mut part = vec![0u8; r.block_bytes];
                r.gpu.download(&mut part, r.cache.at(b as usize * r.block_bytes, 1))?;
                parts.push(part);
            }
            out.push(Bytes::from(crate::shard::gather_rows(&parts, rows)));
        }
        self.lead().gpu.bind()?;
        Ok(out)
    }

    /// The inverse of [`CudaEngine::read_group_blocks`]: each rank receives its heads' share of
    /// every row.
    fn write_group_blocks(&self, writes: &[(BlockId, &[u8])]) -> Result<()> {
        let rows = self.block_rows();
        for &(b, bytes) in writes {
            let parts = crate::shard::scatter_rows(bytes, self.ranks.len(), rows);
            for (r, part) in self.ranks.iter().zip(&parts) {
                r.gpu.bind()?;
                r.gpu.upload(r.cache.at(b as usize * r.block_bytes, 1), part)?;
            }
        }
        // Uploads from pageable memory are complete when they return; the sync is for errors a
        // queued copy may report.
        for r in &self.ranks {
            r.gpu.bind()?;
            r.gpu.sync()?;
        }
        self.lead().gpu.bind()
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    /// Bytes of weights one decode step reads, every rank together (the LM head once: rank 0
    /// alone runs it).
    /// How the projections are stored.
    pub fn weight_format(&self) -> WeightFormat {
        self.lead().w.format
    }

    pub fn weight_step_bytes(&self) -> usize {
        let lead = &self.lead().w;
        lead.step_bytes + self.ranks[1..].iter().map(|r| r.w.step_bytes - r.w.head_bytes).sum::<usize>()
    }

    /// Runs a pass over items whose blocks `seqs` has reserved and returns, per item, the logits
    /// it asked for (`head` = Logits) or, per logit row, the token chosen on the device (`head` =
    /// Argmax/Sample). Tokens are committed chunk by chunk, after the chunk ran: a failed pass
    /// leaves each sequence as it was, holding the blocks reserved for it (a retry reuses them).
    /// Runs `items` (their blocks reserved) in as many passes as they need. With `masks` (argmax
    /// only), an item's token is the largest logit its mask allows.
    /// Runs `items` (already reserved) in as many passes as the scratch allows. With `masks`
    /// (an argmax head only), the layers of the first pass are launched before the masks are
    /// asked for, so the host computes them while the device runs; each pass's argmax is then
    /// launched after its masks are uploaded.
    fn run_reserved(
        &mut self,
        seqs: &mut SeqTable,
        items: &[ForwardItem],
        head: Head,
        mut masks: Option<MaskSource<'_>>,
    ) -> Result<Passed> {
        let late = head == Head::Argmax && masks.is_some();
        let mut computed: Option<Vec<Option<Vec<u32>>>> = None;
        let cap_t = self.lead().s.cap_tokens;
        let cap_s = self.lead().s.cap_seqs;
        let mut done = vec![0usize; items.len()];
        let mut out = Passed { logits: vec![Vec::new(); items.len()], tokens: vec![Vec::new(); items.len()] };
        loop {
            // Fill one pass: whole items while they fit, then a chunk of the next.
            let mut chunk: Vec<(usize, usize, usize)> = Vec::new(); // (item, from, to)
            let (mut tokens, mut rows) = (0usize, 0usize);
            for (i, it) in items.iter().enumerate() {
                let left = it.tokens.len() - done[i];
                if left == 0 || chunk.len() == cap_s || tokens == cap_t {
                    continue;
                }
                let mut take = left.min(cap_t - tokens);
                if it.all_logits {
                    take = take.min(MAX_LOGIT_ROWS.saturating_sub(rows));
                }
                if take == 0 {
                    continue;
                }
                let ends = done[i] + take == it.tokens.len();
                rows += if it.all_logits { take } else { usize::from(ends) };
                if rows > self.lead().s.cap_logits {
                    break;
                }
                chunk.push((i, done[i], done[i] + take));
                tokens += take;
            }
            if chunk.is_empty() {
                break;
            }
            let states: Vec<_> = chunk.iter().map(|&(i, _, _)| seqs.get(items[i].seq)).collect::<std::result::Result<_, _>>()?;
            let plan_items: Vec<PlanItem<'_>> = chunk
                .iter()
                .zip(&states)
                .map(|(&(i, from, to), s)| PlanItem {
                    blocks: &s.blocks,
                    start: s.tokens.len(),
                    tokens: &items[i].tokens[from..to],
                    all_logits: items[i].all_logits,
                    last_logit: to == items[i].tokens.len(),
                })
                .collect();
            let real_rows: usize = plan_items.len();
            let decode_only = plan_items.iter().all(|p| p.tokens.len() == 1 && p.last_logit && !p.all_logits);
            let graph_key = if self.use_graphs && decode_only {
                bucket_for(real_rows)
                    .map(|b| (b, ctx_bucket(plan_items.iter().map(|p| p.start + 1).max().unwrap_or(1), self.info.max_context), late))
            } else {
                None
            };
            let plan = match graph_key {
                Some((b, cb, _)) => Plan::build(&plan_items, self.model.block_size, Some(b), cb.div_ceil(self.model.block_size)),
                None => Plan::build(&plan_items, self.model.block_size, None, 0),
            };
            let split_ctx = graph_key.map_or(plan.max_ctx, |(_, cb, _)| cb);
            let shape = PassShape::of(
                &plan,
                decode_split(plan.n_seqs, self.model.d.kv_heads, split_ctx.max(1), self.lead().gpu.sms, self.max_splits),
            );
            drop(plan_items);
            drop(states);
            self.upload_meta(&plan.meta)?;
            // Logit rows each item has in this pass, in plan order.
            let per_row: Vec<usize> = chunk
                .iter()
                .map(|&(i, _, to)| if items[i].all_logits { to - done[i] } else { usize::from(to == items[i].tokens.len()) })
                .collect();
            // Without late masks, the flags a previous pass left set are cleared first.
            if !late {
                self.upload_masks(None, &chunk, &per_row)?;
            }
            // A masked pass runs its layers up to the logits, then its argmax on its own.
            let body = if late { Head::Logits } else { head };
            match graph_key {
                Some(key) if self.graphs.contains_key(&key) => {
                    for g in &self.graphs[&key].0 {
                        g.launch()?;
                    }
                }
                Some(key) => {
                    // First use of this shape: run it eagerly (loads every kernel it needs),
                    // then capture it for the next time.
                    let graph_head = if late { Head::Logits } else { Head::Argmax };
                    self.model.run(&self.ranks, self.group.as_ref(), &shape, graph_head)?;
                    self.capture(key, &shape, graph_head)?;
                }
                None => self.model.run(&self.ranks, self.group.as_ref(), &shape, body)?,
            }
            if late {
                // The device is busy with the layers: now the host works out the masks.
                if computed.is_none() {
                    if let Some(source) = masks.as_mut() {
                        computed = Some(source());
                    }
                }
                let refs: Vec<Option<&[u32]>> = computed.iter().flatten().map(Option::as_deref).collect();
                self.upload_masks(Some(&refs), &chunk, &per_row)?;
                self.model.argmax(self.lead(), shape.n_logits)?;
            }
            // Rows of real logits, in plan order.
            let n_rows = if plan.decode_only { real_rows } else { plan.n_logits };
            if head == Head::Logits {
                let v = self.model.d.vocab;
                let mut host = vec![0f32; n_rows * v];
                let lead = self.lead();
                lead.gpu.download(&mut host, lead.s.logits.ptr)?;
                let mut rows = host.chunks_exact(v);
                for (&(i, _, _), &k) in chunk.iter().zip(&per_row) {
                    out.logits[i].extend(rows.by_ref().take(k).map(<[f32]>::to_vec));
                }
            } else {
                let mut host = vec![0i32; n_rows];
                let lead = self.lead();
                lead.gpu.download(&mut host, lead.s.sampled.ptr)?;
                let mut rows = host.iter();
                for (&(i, _, _), &k) in chunk.iter().zip(&per_row) {
                    out.tokens[i].extend(rows.by_ref().take(k).map(|&t| t as u32));
                }
            }
            let partial: Vec<ForwardItem> = chunk
                .iter()
                .map(|&(i, from, to)| ForwardItem { seq: items[i].seq, tokens: items[i].tokens[from..to].to_vec(), all_logits: false })
                .collect();
            seqs.commit(&partial);
            for &(i, _, to) in &chunk {
                done[i] = to;
            }
        }
        Ok(out)
    }

    /// Sets the mask rows of a pass's argmax: the row of each item in `chunk` that gets a token
    /// and has a mask takes its bits and its flag; every other flag a pass may have left set is
    /// cleared, so a later pass (or a captured graph) draws unmasked.
    fn upload_masks(&mut self, masks: Option<&[Option<&[u32]>]>, chunk: &[(usize, usize, usize)], per_row: &[usize]) -> Result<()> {
        let words = self.lead().s.mask_words;
        let (mut flags, mut bits) = (Vec::new(), Vec::new());
        if let Some(masks) = masks {
            for (&(i, _, _), &k) in chunk.iter().zip(per_row) {
                for _ in 0..k {
                    match masks.get(i).copied().flatten() {
                        Some(m) if m.len() == words => {
                            flags.push(1i32);
                            bits.extend_from_slice(m);
                        }
                        Some(m) => return Err(CudaError::Unsupported(format!("a mask of {} words for a vocabulary of {words}", m.len()))),
                        None => {
                            flags.push(0);
                            bits.resize(bits.len() + words, 0);
                        }
                    }
                }
            }
        }
        let set = flags.iter().rposition(|&f| f == 1).map_or(0, |last| last + 1);
        if set > 0 {
            let lead = self.lead();
            lead.gpu.upload(lead.s.mask.ptr, &bits[..set * words])?;
        }
        let n = set.max(self.masked_rows);
        if n > 0 {
            flags.resize(n, 0);
            let lead = self.lead();
            lead.gpu.upload(lead.s.masked.ptr, &flags[..n])?;
        }
        self.masked_rows = set;
        Ok(())
    }

    /// The pass's metadata into every rank's buffer.
    fn upload_meta(&self, meta: &[i32]) -> Result<()> {
        let cap = self.lead().s.cap_meta;
        if meta.len() > cap {
            return Err(CudaError::Unsupported(format!("pass metadata of {} entries exceeds {cap}", meta.len())));
        }
        for r in &self.ranks {
            r.gpu.bind()?;
            r.gpu.upload(r.s.meta.ptr, meta)?;
        }
        self.lead().gpu.bind()
    }

    /// Captures a pass into one graph per rank (the group's all-reduces included). A group
    /// whose capture fails goes on without graphs, eagerly, and says so once.
    fn capture(&mut self, key: GraphKey, shape: &PassShape, head: Head) -> Result<()> {
        let mut begun = Vec::new();
        let mut outcome = Ok(());
        // One thread captures every rank's stream at once, and ending one capture instantiates
        // its graph while the others still capture: a call the thread-local mode refuses (as
        // it refuses anything that may allocate), so a group captures in relaxed mode.
        let mode = if self.ranks.len() > 1 {
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED
        } else {
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        };
        for r in &self.ranks {
            r.gpu.bind()?;
            match r.gpu.stream.begin_capture(mode) {
                Ok(()) => begun.push(r.gpu.stream.clone()),
                Err(e) => {
                    outcome = Err(CudaError::from(e));
                    break;
                }
            }
        }
        if outcome.is_ok() {
            outcome = self.model.run(&self.ranks, self.group.as_ref(), shape, head);
        }
        let mut graphs = Vec::new();
        for (r, stream) in self.ranks.iter().zip(&begun) {
            r.gpu.bind()?;
            match stream.end_capture(sys::CUgraphInstantiate_flags(0)) {
                Ok(Some(g)) => graphs.push(g),
                Ok(None) => {}
                Err(e) => {
                    if outcome.is_ok() {
                        outcome = Err(e.into());
                    }
                }
            }
        }
        self.lead().gpu.bind()?;
        if let Err(e) = outcome {
            if self.ranks.len() == 1 {
                return Err(e);
            }
            tracing::warn!(error = %e, tp = self.ranks.len(), "capturing the group's decode graphs failed; running its passes eagerly");
            self.use_graphs = false;
            return Ok(());
        }
        if graphs.len() == self.ranks.len() {
            for g in &graphs {
                g.upload()?;
            }
            self.graphs.insert(key, Graph(graphs));
            tracing::debug!(batch = key.0, context = key.1, masked = key.2, "captured decode graph");
        }
        Ok(())
    }

    /// Registers a sequence whose `tokens` are taken as already in the cache, without computing
    /// them: benchmarks measure decode at a given context this way (the cache holds random
    /// values from start-up, never zeros).
    pub fn adopt(seqs: &mut SeqTable, seq: SeqId, tokens: &[u32]) -> Result<()> {
        seqs.add(seq, &[], true)?;
        let item = [ForwardItem { seq, tokens: tokens.to_vec(), all_logits: false }];
        if let Err(e) = seqs.reserve(&item) {
            seqs.release(seq);
            return Err(e.into());
        }
        seqs.commit(&item);
        Ok(())
    }

    /// Runs a pass over reserved items and returns each item's greedy next token, chosen on the
    /// device.
    pub fn forward_greedy(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> Result<Vec<u32>> {
        self.forward_greedy_masked(seqs, items, None)
    }

    /// As [`CudaEngine::forward_greedy`], each item's token the largest logit its mask allows
    /// (a bitmask over the vocabulary, where given).
    pub fn forward_greedy_masked(
        &mut self,
        seqs: &mut SeqTable,
        items: &[ForwardItem],
        masks: Option<&[Option<&[u32]>]>,
    ) -> Result<Vec<u32>> {
        match masks {
            Some(m) => {
                let mut source = || m.iter().map(|x| x.map(<[u32]>::to_vec)).collect();
                self.forward_greedy_late(seqs, items, &mut source)
            }
            None => {
                let out = self.run_reserved(seqs, items, Head::Argmax, None)?;
                Ok(out.tokens.into_iter().map(|t| t.last().copied().unwrap_or(0)).collect())
            }
        }
    }

    /// As [`CudaEngine::forward_greedy_masked`], asking `masks` for the masks once the layers
    /// are running.
    pub fn forward_greedy_late(&mut self, seqs: &mut SeqTable, items: &[ForwardItem], masks: MaskSource<'_>) -> Result<Vec<u32>> {
        let out = self.run_reserved(seqs, items, Head::Argmax, Some(masks))?;
        Ok(out.tokens.into_iter().map(|t| t.last().copied().unwrap_or(0)).collect())
    }

    /// Runs a pass and samples each item's next token on the device: per item, temperature,
    /// top-p, min-p, top-k (0 = off), a seed and a counter (the token's position works).
    pub fn forward_sampled(&mut self, seqs: &mut SeqTable, items: &[ForwardItem], params: &[DeviceSampling]) -> Result<Vec<u32>> {
        if params.len() != items.len() || items.iter().any(|it| it.all_logits) {
            return Err(CudaError::Unsupported("one sampling row per item, last-token logits only".into()));
        }
        let lead = self.lead();
        if items.len() > lead.s.cap_logits {
            return Err(CudaError::Unsupported(format!("{} rows exceed {}", items.len(), lead.s.cap_logits)));
        }
        // Decode passes may be padded to a bucket; the padding rows sample too, harmlessly.
        let mut host = vec![0f32; lead.s.cap_logits * 8];
        for (i, p) in params.iter().enumerate() {
            host[8 * i..8 * i + 8].copy_from_slice(&p.pack());
        }
        lead.gpu.upload(lead.s.sample_params.ptr, &host)?;
        // Graph passes end in argmax; sampling runs eagerly after the logits.
        let saved = self.use_graphs;
        self.use_graphs = false;
        let out = seqs.reserve(items).map_err(CudaError::from).and_then(|()| self.run_reserved(seqs, items, Head::Sample, None));
        self.use_graphs = saved;
        Ok(out?.tokens.into_iter().map(|t| t.last().copied().unwrap_or(0)).collect())
    }

    /// Runs one pass eagerly with an event after each stage and returns device milliseconds per
    /// stage, summed over the layers (benchmark breakdowns). The pass's tokens are not committed.
    pub fn profile_pass(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> Result<Vec<(&'static str, f64)>> {
        seqs.reserve(items)?;
        let states: Vec<_> = items.iter().map(|it| seqs.get(it.seq)).collect::<std::result::Result<_, _>>()?;
        let plan_items: Vec<PlanItem<'_>> = items
            .iter()
            .zip(&states)
            .map(|(it, s)| PlanItem { blocks: &s.blocks, start: s.tokens.len(), tokens: &it.tokens, all_logits: false, last_logit: true })
            .collect();
        let plan = Plan::build(&plan_items, self.model.block_size, None, 0);
        let shape = PassShape::of(
            &plan,
            decode_split(plan.n_seqs, self.model.d.kv_heads, plan.max_ctx.max(1), self.lead().gpu.sms, self.max_splits),
        );
        drop(plan_items);
        drop(states);
        self.upload_meta(&plan.meta)?;
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let lead = &self.ranks[0];
        let start = lead.gpu.ctx.new_event(flags)?;
        start.record(&lead.gpu.stream)?;
        let mut marks = Vec::new();
        self.model.run_marked(&self.ranks, self.group.as_ref(), &shape, Head::Argmax, &mut |gpu, label| {
            let e = gpu.ctx.new_event(flags)?;
            e.record(&gpu.stream)?;
            marks.push((label, e));
            Ok(())
        })?;
        for r in &self.ranks {
            r.gpu.sync()?;
        }
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        let mut prev = &start;
        for (label, e) in &marks {
            let ms = prev.elapsed_ms(e)? as f64;
            match out.iter_mut().find(|(l, _)| l == label) {
                Some((_, t)) => *t += ms,
                None => out.push((label, ms)),
            }
            prev = e;
        }
        Ok(out)
    }
}

/// The degree a model can run at on GPUs: at least one rank, and the query heads, KV heads and
/// FFN width all dividing evenly (the CUDA kernels take whole KV heads per rank, none shared).
fn check_tp(c: &ModelConfig, tp: usize) -> Result<usize> {
    if tp == 0 {
        return Err(CudaError::Unsupported("a tensor-parallel group of 0 GPUs".into()));
    }
    for (n, what) in [(c.heads, "query heads"), (c.kv_heads, "KV heads"), (c.intermediate, "FFN rows")] {
        if n % tp != 0 {
            return Err(CudaError::Unsupported(format!("TP={tp} on GPUs: the model's {n} {what} do not divide into {tp} equal shares")));
        }
    }
    Ok(tp)
}

/// Device-side sampling settings of one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSampling {
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub top_k: u32,
    pub seed: u64,
    pub counter: u32,
}

impl DeviceSampling {
    fn pack(&self) -> [f32; 8] {
        [
            self.temperature,
            self.top_p,
            self.min_p,
            self.top_k as f32,
            f32::from_bits(self.seed as u32),
            f32::from_bits((self.seed >> 32) as u32),
            f32::from_bits(self.counter),
            0.0,
        ]
    }
}

struct Passed {
    logits: Vec<Vec<Vec<f32>>>,
    tokens: Vec<Vec<u32>>,
}

impl Engine for CudaEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn forward(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> tandem_engine::Result<Vec<Vec<Vec<f32>>>> {
        Ok(self.run_reserved(seqs, items, Head::Logits, None).map_err(dev)?.logits)
    }

    fn forward_argmax(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> Option<tandem_engine::Result<Vec<u32>>> {
        Some(self.forward_greedy(seqs, items).map_err(dev))
    }

    fn forward_argmax_masked(
        &mut self,
        seqs: &mut SeqTable,
        items: &[ForwardItem],
        masks: MaskSource<'_>,
    ) -> Option<tandem_engine::Result<Vec<u32>>> {
        Some(self.forward_greedy_late(seqs, items, masks).map_err(dev))
    }

    fn masks_on_device(&self) -> bool {
        true
    }

    fn read_blocks(&self, blocks: &[BlockId]) -> tandem_engine::Result<Vec<Bytes>> {
        if self.ranks.len() > 1 {
            return self.read_group_blocks(blocks).map_err(dev);
        }
        let lead = self.lead();
        // Into page-locked slots, one asynchronous copy each and one wait for all; blocks beyond
        // the free slots go the pageable way.
        let mut filling = match self.exports.get() {
            Some(p) => p.take(blocks.len()),
            None => Filling::none(),
        };
        let pinned = filling.len();
        for (i, &b) in blocks[..pinned].iter().enumerate() {
            // SAFETY: the copy is synchronised below before the slots are read or handed out.
            let dst = unsafe { filling.dst(i) };
            if let Err(e) = lead.gpu.download_async(dst, lead.cache.at(b as usize * self.block_bytes, 1)) {
                // Copies already queued may still write into the slots: let them land first.
                let _ = lead.gpu.sync();
                return Err(dev(e));
            }
        }
        let mut out = Vec::with_capacity(blocks.len());
        if pinned > 0 {
            lead.gpu.sync().map_err(dev)?;
            out.extend(filling.into_bytes());
        }
        for &b in &blocks[pinned..] {
            let mut bytes = vec![0u8; self.block_bytes];
            lead.gpu.download(&mut bytes, lead.cache.at(b as usize * self.block_bytes, 1)).map_err(dev)?;
            out.push(Bytes::from(bytes));
        }
        Ok(out)
    }

    fn block_memory(&self) -> Option<Arc<dyn BlockMemory>> {
        Some(self.imports.clone())
    }

    fn device_peer(&self) -> Option<Arc<dyn DevicePeer>> {
        self.ipc.clone().map(|p| p as Arc<dyn DevicePeer>)
    }

    fn export_device(&self, blocks: &[BlockId]) -> Option<tandem_engine::Result<DeviceBlocks>> {
        let ipc = self.ipc.as_ref()?;
        let lead = self.lead();
        let offsets: Vec<u64> = blocks.iter().map(|&b| b as u64 * self.block_bytes as u64).collect();
        // Ordered after the passes that wrote the blocks (one stream); read back synchronously.
        let sums = match lead.gpu.block_checksums(lead.cache.ptr, &offsets, self.block_bytes) {
            Ok(s) => s,
            Err(e) => return Some(Err(dev(e))),
        };
        Some(Ok(DeviceBlocks { node: ipc.node().to_string(), handle: ipc.handle.clone(), offsets, sums }))
    }

    fn import_device(&mut self, blocks: &[BlockId], src: &DeviceBlocks) -> tandem_engine::Result<()> {
        let Some(ipc) = &self.ipc else {
            return Err(EngineError::Import("this engine takes no device handoffs".into()));
        };
        if src.offsets.len() != blocks.len() || src.sums.len() != blocks.len() {
            return Err(EngineError::Import(format!(
                "{} offsets and {} checksums for {} blocks",
                src.offsets.len(),
                src.sums.len(),
                blocks.len()
            )));
        }
        // Held until the copies are done (the checksums' read-back below waits for them).
        let pool = ipc
            .checked(src, self.block_bytes)
            .map_err(|e| EngineError::Import(format!("cannot take blocks from the sender's device pool: {e}")))?;
        let base = pool.base;
        let lead = self.lead();
        let bb = self.block_bytes as u64;
        let dst: Vec<u64> = blocks.iter().map(|&b| b as u64 * bb).collect();
        for (d, s, n) in crate::ipc::copy_runs(&dst, &src.offsets, bb) {
            if let Err(e) = lead.gpu.copy(lead.cache.ptr + d, base + s, (n * bb) as usize) {
                let _ = lead.gpu.sync();
                return Err(dev(e));
            }
        }
        // Checked where they landed, after the copies (same stream).
        let sums = lead.gpu.block_checksums(lead.cache.ptr, &dst, self.block_bytes).map_err(dev)?;
        drop(pool);
        if let Some(bad) = sums.iter().zip(&src.sums).position(|(a, b)| a != b) {
            return Err(EngineError::Import(format!("block {bad} fails its checksum after the device copy")));
        }
        Ok(())
    }

    fn write_blocks(&mut self, writes: &[(BlockId, &[u8])]) -> tandem_engine::Result<()> {
        if let Some(&(_, bytes)) = writes.iter().find(|(_, bytes)| bytes.len() != self.block_bytes) {
            return Err(EngineError::Import(format!("a block of {} bytes; the layout's blocks have {}", bytes.len(), self.block_bytes)));
        }
        if self.ranks.len() > 1 {
            return self.write_group_blocks(writes).map_err(dev);
        }
        let lead = self.lead();
        // From page-locked memory (blocks received into `block_memory`) each copy is queued and
        // runs asynchronously; the sources must outlive them, so every path out waits for them.
        for &(b, bytes) in writes {
            if let Err(e) = lead.gpu.upload(lead.cache.at(b as usize * self.block_bytes, 1), bytes) {
                let _ = lead.gpu.sync();
                return Err(dev(e));
            }
        }
        lead.gpu.sync().map_err(dev)
    }
}

/// The device's own passes on an engine with its sequence table (benchmarks and checks): each
/// reserves the items' blocks, then runs.
pub trait DevicePasses {
    /// Each item's greedy next token, chosen on the device.
    fn forward_greedy(&mut self, items: &[ForwardItem]) -> Result<Vec<u32>>;
    /// See [`CudaEngine::forward_sampled`].
    fn forward_sampled(&mut self, items: &[ForwardItem], params: &[DeviceSampling]) -> Result<Vec<u32>>;
    /// See [`CudaEngine::profile_pass`].
    fn profile_pass(&mut self, items: &[ForwardItem]) -> Result<Vec<(&'static str, f64)>>;
    /// See [`CudaEngine::adopt`].
    fn adopt(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()>;
}

impl DevicePasses for PagedEngine<CudaEngine> {
    fn forward_greedy(&mut self, items: &[ForwardItem]) -> Result<Vec<u32>> {
        let (engine, seqs) = self.parts_mut();
        seqs.reserve(items)?;
        engine.forward_greedy(seqs, items)
    }

    fn forward_sampled(&mut self, items: &[ForwardItem], params: &[DeviceSampling]) -> Result<Vec<u32>> {
        let (engine, seqs) = self.parts_mut();
        engine.forward_sampled(seqs, items, params)
    }

    fn profile_pass(&mut self, items: &[ForwardItem]) -> Result<Vec<(&'static str, f64)>> {
        let (engine, seqs) = self.parts_mut();
        engine.profile_pass(seqs, items)
    }

    fn adopt(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        CudaEngine::adopt(self.parts_mut().1, seq, tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decode_scratch_holds_every_split_of_the_longest_context() {
        assert_eq!(max_splits(4096), MIN_SPLITS);
        assert_eq!(max_splits(32_768), 64);
        assert_eq!(max_splits(131_072), 256);
        for ctx in [1, 511, 513, 32_769, 100_000, 131_072] {
            for batch in [1, 8, 256] {
                let (split, n) = decode_split(batch, 8, ctx, 132, max_splits(131_072));
                assert!(split <= DECODE_SPLIT_TOKENS && n * split >= ctx && n <= max_splits(131_072), "ctx {ctx} batch {batch}");
            }
        }
    }

    #[test]
    fn the_gpu_cache_is_bf16_or_fp8() {
        let with = |d| CudaConfig { kv_dtype: Some(d), ..Default::default() }.kv_format();
        assert_eq!(with(KvDtype::Bf16).unwrap(), KvDtype::Bf16);
        assert_eq!(with(KvDtype::Fp8E4m3).unwrap(), KvDtype::Fp8E4m3);
        for other in [KvDtype::F16, KvDtype::F32] {
            let err = with(other).unwrap_err().to_string();
            assert!(err.contains(other.as_str()) && err.contains("bf16 or fp8"), "{err}");
        }
    }
}
