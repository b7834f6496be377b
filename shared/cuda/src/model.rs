//! Weights on the device and the layer-by-layer forward pass.
//!
//! The residual stream stays in f32; projections read bf16 activations and bf16 weights. The O
//! and down projections add straight into the residual stream (cuBLAS beta = 1, or the
//! matrix-vector kernel's accumulate mode), so the residual add is part of the GEMM.

use tandem_engine::weights::WeightSource;
use tandem_engine::ModelConfig;

use crate::device::{Buf, Dt, Gpu, Matrix, PrefillAttention, Prologue, WeightFormat};
use crate::group::Nccl;
use crate::plan::{Offsets, Plan};
use crate::shard::{take_cols, take_rows, Tp};
use crate::{CudaError, Result};

struct LayerW {
    attn_norm: Buf,
    /// Q, K and V stacked: [(heads + 2·kv_heads)·head_dim, hidden].
    qkv: Matrix,
    qkv_bias: Option<Buf>,
    q_norm: Option<Buf>,
    k_norm: Option<Buf>,
    o: Matrix,
    mlp_norm: Buf,
    /// Gate and up stacked: [2·intermediate, hidden].
    gate_up: Matrix,
    down: Matrix,
}

pub struct Weights {
    embed: Buf,
    layers: Vec<LayerW>,
    norm: Buf,
    /// `None` when tied to the embedding.
    lm_head: Option<Buf>,
    inv_freq: Buf,
    /// Bytes a decode step reads (each matrix once; the embedding only for its rows).
    pub step_bytes: usize,
    /// Of those, the LM head's (read by rank 0 alone in a group).
    pub head_bytes: usize,
    pub total_bytes: usize,
    pub format: WeightFormat,
}

fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
}

fn upload_bf16(gpu: &Gpu, v: &[f32]) -> Result<Buf> {
    let b = gpu.alloc(v.len() * 2)?;
    gpu.upload(b.ptr, &to_bf16_bits(v))?;
    Ok(b)
}

/// A projection from bf16 values on the device, kept as bf16 or quantised per `format`.
fn matrix(gpu: &Gpu, bf16: Buf, rows: usize, cols: usize, format: WeightFormat) -> Result<Matrix> {
    match format {
        WeightFormat::Bf16 => Ok(Matrix { data: bf16, scale: None, rows, cols }),
        // The bf16 copy is freed once the quantising kernel has read it.
        WeightFormat::Fp8 => {
            let m = gpu.quantize_fp8(&bf16, rows, cols)?;
            gpu.sync()?;
            Ok(m)
        }
    }
}

fn upload_f32(gpu: &Gpu, v: &[f32]) -> Result<Buf> {
    let b = gpu.alloc(v.len() * 4)?;
    gpu.upload(b.ptr, v)?;
    Ok(b)
}

fn dense(src: &mut WeightSource, name: &str) -> Result<Vec<f32>> {
    let t = src.dense(name)?;
    Ok(t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(tandem_engine::EngineError::from)?)
}

/// The model's matrix shapes, for a TP rank.
pub(crate) struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub layers: usize,
}

impl Dims {
    pub fn new(c: &ModelConfig, tp: Tp) -> Result<Self> {
        let split = |n: usize, what: &str| {
            tp.share(n).map(|r| r.len()).ok_or_else(|| CudaError::Unsupported(format!("{n} {what} do not split over TP={}", tp.size)))
        };
        Ok(Self {
            hidden: c.hidden,
            heads: split(c.heads, "heads")?,
            kv_heads: split(c.kv_heads, "kv heads")?,
            hd: c.head_dim,
            ffn: split(c.intermediate, "FFN rows")?,
            vocab: c.vocab_size,
            layers: c.layers,
        })
    }
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.hd
    }
}

fn inv_freq(c: &ModelConfig, factors: Option<Vec<f32>>) -> Vec<f32> {
    let mut f = c.rope_inv_freq();
    if let Some(factors) = factors {
        for (x, d) in f.iter_mut().zip(factors) {
            *x /= d;
        }
    }
    f
}

impl Weights {
    /// Loads (dequantising GGUF, converting safetensors) into bf16, keeping rank `tp`'s shard;
    /// the projections then take `format`.
    pub fn load(gpu: &Gpu, c: &ModelConfig, src: &mut WeightSource, tp: Tp, format: WeightFormat) -> Result<Self> {
        let d = Dims::new(c, tp)?;
        let (h, hd) = (c.hidden, c.head_dim);
        let q_rows = tp.share(c.heads).expect("checked by Dims").start * hd..tp.share(c.heads).expect("checked").end * hd;
        let kv = tp.share(c.kv_heads).expect("checked");
        let kv_rows = kv.start * hd..kv.end * hd;
        let f_rows = tp.share(c.intermediate).expect("checked");
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = format!("model.layers.{i}");
            let mut qkv = take_rows(&dense(src, &format!("{p}.self_attn.q_proj.weight"))?, h, q_rows.clone());
            qkv.extend(take_rows(&dense(src, &format!("{p}.self_attn.k_proj.weight"))?, h, kv_rows.clone()));
            qkv.extend(take_rows(&dense(src, &format!("{p}.self_attn.v_proj.weight"))?, h, kv_rows.clone()));
            let qkv_bias = if c.qkv_bias {
                let mut b = dense(src, &format!("{p}.self_attn.q_proj.bias"))?[q_rows.clone()].to_vec();
                b.extend_from_slice(&dense(src, &format!("{p}.self_attn.k_proj.bias"))?[kv_rows.clone()]);
                b.extend_from_slice(&dense(src, &format!("{p}.self_attn.v_proj.bias"))?[kv_rows.clone()]);
                Some(upload_f32(gpu, &b)?)
            } else {
                None
            };
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(upload_bf16(gpu, &dense(src, &format!("{p}.self_attn.q_norm.weight"))?)?),
                    Some(upload_bf16(gpu, &dense(src, &format!("{p}.self_attn.k_norm.weight"))?)?),
                )
            } else {
                (None, None)
            };
            let o = take_cols(&dense(src, &format!("{p}.self_attn.o_proj.weight"))?, c.heads * hd, q_rows.clone());
            let mut gate_up = take_rows(&dense(src, &format!("{p}.mlp.gate_proj.weight"))?, h, f_rows.clone());
            gate_up.extend(take_rows(&dense(src, &format!("{p}.mlp.up_proj.weight"))?, h, f_rows.clone()));
            let down = take_cols(&dense(src, &format!("{p}.mlp.down_proj.weight"))?, c.intermediate, f_rows.clone());
            layers.push(LayerW {
                attn_norm: upload_bf16(gpu, &dense(src, &format!("{p}.input_layernorm.weight"))?)?,
                qkv: matrix(gpu, upload_bf16(gpu, &qkv)?, d.qkv_width(), h, format)?,
                qkv_bias,
                q_norm,
                k_norm,
                o: matrix(gpu, upload_bf16(gpu, &o)?, h, d.heads * hd, format)?,
                mlp_norm: upload_bf16(gpu, &dense(src, &format!("{p}.post_attention_layernorm.weight"))?)?,
                gate_up: matrix(gpu, upload_bf16(gpu, &gate_up)?, 2 * d.ffn, h, format)?,
                down: matrix(gpu, upload_bf16(gpu, &down)?, h, d.ffn, format)?,
            });
        }
        let embed = upload_bf16(gpu, &dense(src, "model.embed_tokens.weight")?)?;
        let lm_head = if !c.tie_embeddings && src.contains("lm_head.weight") {
            Some(upload_bf16(gpu, &dense(src, "lm_head.weight")?)?)
        } else {
            None
        };
        let norm = upload_bf16(gpu, &dense(src, "model.norm.weight")?)?;
        let inv = upload_f32(gpu, &inv_freq(c, src.rope_freq_factors()?))?;
        gpu.sync()?;
        Ok(Self::finish(d, embed, layers, norm, lm_head, inv, format))
    }

    /// Random weights of the given shape, drawn on the device (benchmarks: values do not change
    /// the speed, but they are never zeros); the projections drawn in bf16, then take `format`.
    pub fn random(gpu: &Gpu, c: &ModelConfig, seed: u64, tp: Tp, format: WeightFormat) -> Result<Self> {
        let d = Dims::new(c, tp)?;
        let mut n = 0u64;
        let mut mat = |elems: usize, scale: f32, offset: f32| -> Result<Buf> {
            n += 1;
            let b = gpu.alloc(elems * 2)?;
            gpu.fill_bf16(b.ptr, elems, seed.wrapping_mul(0x9e37_79b9).wrapping_add(n), scale, offset)?;
            Ok(b)
        };
        // Uniform in ±0.035 has about the spread of N(0, 0.02).
        let s = 0.035;
        let mut layers = Vec::with_capacity(d.layers);
        for _ in 0..d.layers {
            layers.push(LayerW {
                attn_norm: mat(d.hidden, 0.05, 1.0)?,
                qkv: matrix(gpu, mat(d.qkv_width() * d.hidden, s, 0.0)?, d.qkv_width(), d.hidden, format)?,
                qkv_bias: None,
                q_norm: if c.qk_norm { Some(mat(d.hd, 0.05, 1.0)?) } else { None },
                k_norm: if c.qk_norm { Some(mat(d.hd, 0.05, 1.0)?) } else { None },
                o: matrix(gpu, mat(d.hidden * d.heads * d.hd, s, 0.0)?, d.hidden, d.heads * d.hd, format)?,
                mlp_norm: mat(d.hidden, 0.05, 1.0)?,
                gate_up: matrix(gpu, mat(2 * d.ffn * d.hidden, s, 0.0)?, 2 * d.ffn, d.hidden, format)?,
                down: matrix(gpu, mat(d.hidden * d.ffn, s, 0.0)?, d.hidden, d.ffn, format)?,
            });
        }
        let embed = mat(d.vocab * d.hidden, 1.0, 0.0)?;
        let lm_head = if c.tie_embeddings { None } else { Some(mat(d.vocab * d.hidden, s, 0.0)?) };
        let norm = mat(d.hidden, 0.05, 1.0)?;
        let inv = upload_f32(gpu, &inv_freq(c, None))?;
        gpu.sync()?;
        Ok(Self::finish(d, embed, layers, norm, lm_head, inv, format))
    }

    fn finish(d: Dims, embed: Buf, layers: Vec<LayerW>, norm: Buf, lm_head: Option<Buf>, inv_freq: Buf, format: WeightFormat) -> Self {
        let per_layer: usize = layers
            .iter()
            .map(|l| {
                l.attn_norm.bytes
                    + l.qkv.bytes()
                    + l.o.bytes()
                    + l.mlp_norm.bytes
                    + l.gate_up.bytes()
                    + l.down.bytes()
                    + l.qkv_bias.as_ref().map_or(0, |b| b.bytes)
                    + l.q_norm.as_ref().map_or(0, |b| b.bytes)
                    + l.k_norm.as_ref().map_or(0, |b| b.bytes)
            })
            .sum();
        let head = lm_head.as_ref().map_or(embed.bytes, |b| b.bytes);
        let step_bytes = per_layer + norm.bytes + head;
        let total_bytes = per_layer + norm.bytes + embed.bytes + lm_head.as_ref().map_or(0, |b| b.bytes);
        let _ = d;
        Self { embed, layers, norm, lm_head, inv_freq, step_bytes, head_bytes: head, total_bytes, format }
    }
}

/// Activation buffers sized for the largest pass.
pub struct Scratch {
    pub cap_tokens: usize,
    pub cap_seqs: usize,
    pub cap_logits: usize,
    pub cap_meta: usize,
    x: Buf,
    h: Buf,
    qkv: Buf,
    attn: Buf,
    gu: Buf,
    act: Buf,
    hl: Buf,
    pub logits: Buf,
    pub sampled: Buf,
    pub sample_params: Buf,
    /// Structured output: per logit row, a bitmask over the vocabulary (`mask_words` words) and
    /// whether the row's argmax honours it (zero unless a pass sets it).
    pub mask: Buf,
    pub masked: Buf,
    pub mask_words: usize,
    pub meta: Buf,
    part_o: Buf,
    part_ml: Buf,
}

impl Scratch {
    pub fn new(
        gpu: &Gpu,
        d: &Dims,
        cap_tokens: usize,
        cap_seqs: usize,
        cap_logits: usize,
        max_blocks: usize,
        max_splits: usize,
    ) -> Result<Self> {
        let t = cap_tokens.max(cap_seqs);
        let cap_meta = 3 * t + cap_seqs * max_blocks + 3 * cap_seqs + 2 * (t.div_ceil(crate::plan::TILE_ROWS) + cap_seqs) + cap_logits;
        Ok(Self {
            cap_tokens: t,
            cap_seqs,
            cap_logits,
            cap_meta,
            x: gpu.alloc(t * d.hidden * 4)?,
            h: gpu.alloc(t * d.hidden * 2)?,
            qkv: gpu.alloc(t * d.qkv_width() * 2)?,
            attn: gpu.alloc(t * d.heads * d.hd * 2)?,
            gu: gpu.alloc(t * 2 * d.ffn * 2)?,
            act: gpu.alloc(t * d.ffn * 2)?,
            hl: gpu.alloc(cap_logits * d.hidden * 2)?,
            logits: gpu.alloc(cap_logits * d.vocab * 4)?,
            sampled: gpu.alloc(cap_logits * 4)?,
            sample_params: gpu.alloc(cap_logits * 8 * 4)?,
            mask: gpu.alloc(cap_logits * d.vocab.div_ceil(32) * 4)?,
            masked: gpu.alloc(cap_logits * 4)?,
            mask_words: d.vocab.div_ceil(32),
            meta: gpu.alloc(cap_meta * 4)?,
            part_o: gpu.alloc(cap_seqs * d.heads * max_splits * d.hd * 4)?,
            part_ml: gpu.alloc(cap_seqs * d.heads * max_splits * 2 * 4)?,
        })
    }

    pub fn bytes(&self) -> usize {
        [
            &self.x,
            &self.h,
            &self.qkv,
            &self.attn,
            &self.gu,
            &self.act,
            &self.hl,
            &self.logits,
            &self.sampled,
            &self.sample_params,
            &self.mask,
            &self.masked,
            &self.meta,
            &self.part_o,
            &self.part_ml,
        ]
        .iter()
        .map(|b| b.bytes)
        .sum()
    }
}

/// Shape of one pass as the kernels see it (everything of a [`Plan`] but the metadata values),
/// so a captured graph and the pass that fills its metadata agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassShape {
    pub n_tokens: usize,
    pub n_seqs: usize,
    pub max_blocks: usize,
    pub decode_only: bool,
    pub n_tiles: usize,
    pub n_logits: usize,
    pub split: usize,
    pub splits: usize,
    pub off: Offsets,
}

impl PassShape {
    pub fn of(plan: &Plan, split: (usize, usize)) -> Self {
        Self {
            n_tokens: plan.n_tokens,
            n_seqs: plan.n_seqs,
            max_blocks: plan.max_blocks,
            decode_only: plan.decode_only,
            n_tiles: plan.n_tiles,
            n_logits: plan.n_logits,
            split: split.0,
            splits: split.1,
            off: plan.off,
        }
    }
}

/// What the pass ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// f32 logits for the logit rows.
    Logits,
    /// Logits, then the greedy token of each row into `sampled`.
    Argmax,
    /// Logits, then a sampled token of each row (parameters in `sample_params`).
    Sample,
}

/// One rank of a tensor-parallel group: a GPU with its shard of the weights, its activations
/// and its KV heads. Rank 0 also computes the logits and draws the tokens.
pub struct Rank {
    pub gpu: Gpu,
    pub w: Weights,
    pub s: Scratch,
    /// This rank's KV heads of every block.
    pub cache: Buf,
    /// Bytes of one block of this rank's KV heads.
    pub block_bytes: usize,
}

type Mark<'a> = &'a mut dyn FnMut(&Gpu, &'static str) -> Result<()>;

pub struct Model {
    pub cfg: ModelConfig,
    /// One rank's shapes (every rank's are equal: the CUDA engine splits heads evenly).
    pub(crate) d: Dims,
    pub layers: usize,
    pub block_size: usize,
    /// The cache holds E4M3 rows and their scales ([`tandem_protocol::KvDtype::Fp8E4m3`]), not bf16.
    pub kv_fp8: bool,
}

impl Model {
    /// Runs one pass whose metadata is already in every rank's `meta`. Only launches: no host
    /// sync, no allocation, so it can be captured into graphs (one per rank).
    pub fn run(&self, ranks: &[Rank], group: Option<&Nccl>, p: &PassShape, head: Head) -> Result<()> {
        self.run_marked(ranks, group, p, head, &mut |_, _| Ok(()))
    }

    /// [`Model::run`] calling `mark(gpu, stage)` after each stage of rank 0 (profiling records
    /// an event there; the plain run does nothing). Each layer runs its attention half on every
    /// rank, sums the ranks' residual streams, then its MLP half, and sums again; rank 0 alone
    /// adds the partial products to the residual it holds, the others start from zero, so the
    /// sum is the residual plus every rank's share.
    pub fn run_marked(&self, ranks: &[Rank], group: Option<&Nccl>, p: &PassShape, head: Head, mark: Mark<'_>) -> Result<()> {
        let lead = ranks.first().ok_or_else(|| CudaError::Unsupported("a group of no ranks".into()))?;
        if !matches!(self.d.hd, 64 | 128) {
            return Err(CudaError::Unsupported(format!("head_dim {} (the CUDA kernels take 64 or 128)", self.d.hd)));
        }
        let gpus: Vec<&Gpu> = ranks.iter().map(|r| &r.gpu).collect();
        let residuals: Vec<u64> = ranks.iter().map(|r| r.s.x.ptr).collect();
        let reduce = |mark: Mark<'_>| -> Result<()> {
            if let Some(g) = group {
                g.all_reduce_f32(&gpus, &residuals, p.n_tokens * self.d.hidden)?;
                mark(&lead.gpu, "all_reduce")?;
            }
            Ok(())
        };
        let mut quiet = |_: &Gpu, _: &'static str| Ok(());
        for (i, r) in ranks.iter().enumerate() {
            r.gpu.bind()?;
            let n = p.n_tokens;
            r.gpu.launch(
                &r.gpu.k.embed,
                (n as u32, 1, 1),
                256,
                0,
                &[&r.s.meta.at(p.off.tokens, 4), &r.w.embed.ptr, &r.s.x.ptr, &(self.d.hidden as i32)],
            )?;
            if i == 0 {
                mark(&r.gpu, "embed")?;
            }
        }
        for li in 0..self.layers {
            for (i, r) in ranks.iter().enumerate() {
                self.attention_half(r, li, p, i == 0, if i == 0 { &mut *mark } else { &mut quiet })?;
            }
            reduce(&mut *mark)?;
            for (i, r) in ranks.iter().enumerate() {
                self.mlp_half(r, li, p, i == 0, if i == 0 { &mut *mark } else { &mut quiet })?;
            }
            reduce(&mut *mark)?;
        }
        if p.n_logits == 0 {
            return Ok(());
        }
        lead.gpu.bind()?;
        self.head(lead, p, head)?;
        mark(&lead.gpu, "lm_head+sampling")?;
        Ok(())
    }

    fn threads(w: usize) -> u32 {
        (w.div_ceil(32) * 32).clamp(64, 1024) as u32
    }

    /// Norm, QKV, RoPE with the KV write, attention and the O projection of layer `li` on one
    /// rank; `lead` adds the O product into the residual, the other ranks overwrite theirs.
    fn attention_half(&self, r: &Rank, li: usize, p: &PassShape, lead: bool, mark: Mark<'_>) -> Result<()> {
        let (d, c, gpu, s, l) = (&self.d, &self.cfg, &r.gpu, &r.s, &r.w.layers[li]);
        let k = &gpu.k;
        let (n, hid) = (p.n_tokens, d.hidden);
        let meta = |o: usize| s.meta.at(o, 4);
        let width = d.qkv_width();
        let (layers, bs, heads, kvh, hd) = (self.layers as i32, self.block_size as i32, d.heads as i32, d.kv_heads as i32, d.hd as i32);
        let li = li as i32;
        let cache = r.cache.ptr;
        let eps = c.rms_eps as f32;
        let scale = 1.0 / (d.hd as f32).sqrt();
        let null = 0u64;
        gpu.bind()?;
        if l.qkv.scale.is_some()
            || !gpu.gemv_fused(Prologue::Norm, s.x.ptr, l.attn_norm.ptr, eps, l.qkv.data.ptr, s.qkv.ptr, n, width, hid, Dt::Bf16, false)?
        {
            gpu.launch_dependent(
                &k.rms_norm,
                (n as u32, 1, 1),
                Self::threads(hid),
                0,
                &[&s.x.ptr, &null, &l.attn_norm.ptr, &s.h.ptr, &(hid as i32), &eps],
            )?;
            gpu.project(s.h.ptr, &l.qkv, s.qkv.ptr, n, Dt::Bf16, false)?;
        }
        mark(gpu, "qkv")?;
        // Eight heads a block from 64 tokens up (prefill, large decode batches); one below, for
        // the shortest chain at a handful of tokens.
        let heads_per_block: usize = if n >= 64 { 8 } else { 1 };
        let n_heads = d.heads + 2 * d.kv_heads;
        gpu.launch_dependent(
            &k.rope_store,
            (n as u32, n_heads.div_ceil(heads_per_block) as u32, 1),
            (d.hd / 2) as u32,
            0,
            &[
                &s.qkv.ptr,
                &l.qkv_bias.as_ref().map_or(0, |b| b.ptr),
                &l.q_norm.as_ref().map_or(0, |b| b.ptr),
                &l.k_norm.as_ref().map_or(0, |b| b.ptr),
                &meta(p.off.positions),
                &meta(p.off.slots),
                &r.w.inv_freq.ptr,
                &cache,
                &li,
                &layers,
                &heads,
                &kvh,
                &hd,
                &bs,
                &i32::from(c.rope_interleaved),
                &eps,
                &(heads_per_block as i32),
                &i32::from(self.kv_fp8),
            ],
        )?;
        mark(gpu, "rope_store")?;
        let q_stride = width as i32;
        let mb = p.max_blocks as i32;
        if p.decode_only {
            let (split, splits) = (p.split as i32, p.splits as i32);
            gpu.decode_attention(
                gpu.decode_kernel,
                d.hd,
                d.heads / d.kv_heads,
                self.kv_fp8,
                (d.kv_heads as u32, p.n_seqs as u32, p.splits as u32),
                &[
                    &s.qkv.ptr,
                    &q_stride,
                    &cache,
                    &meta(p.off.block_tables),
                    &mb,
                    &meta(p.off.ctx_lens),
                    &s.part_o.ptr,
                    &s.part_ml.ptr,
                    &li,
                    &layers,
                    &heads,
                    &kvh,
                    &bs,
                    &split,
                    &splits,
                    &scale,
                ],
            )?;
            gpu.launch_dependent(
                &k.attn_combine,
                (p.n_seqs as u32, d.heads as u32, 1),
                d.hd as u32,
                0,
                &[&s.part_o.ptr, &s.part_ml.ptr, &meta(p.off.ctx_lens), &s.attn.ptr, &heads, &hd, &split, &splits],
            )?;
        } else {
            let out_stride = (d.heads * d.hd) as i32;
            gpu.prefill_attention(
                PrefillAttention::for_pass(gpu.prefill_kernel, p.n_tokens),
                d.hd,
                self.kv_fp8,
                p.n_tiles,
                d.heads,
                &[
                    &s.qkv.ptr,
                    &q_stride,
                    &cache,
                    &meta(p.off.block_tables),
                    &mb,
                    &meta(p.off.tiles),
                    &meta(p.off.q_start),
                    &meta(p.off.q_len),
                    &meta(p.off.ctx_lens),
                    &s.attn.ptr,
                    &out_stride,
                    &li,
                    &layers,
                    &heads,
                    &kvh,
                    &bs,
                    &scale,
                ],
            )?;
        }
        mark(gpu, "attention")?;
        gpu.project(s.attn.ptr, &l.o, s.x.ptr, n, Dt::F32, lead)?;
        mark(gpu, "o")
    }

    /// Norm, gate·up, SiLU·mul and the down projection of layer `li` on one rank (`lead` as in
    /// [`Model::attention_half`]).
    fn mlp_half(&self, r: &Rank, li: usize, p: &PassShape, lead: bool, mark: Mark<'_>) -> Result<()> {
        let (d, gpu, s, l) = (&self.d, &r.gpu, &r.s, &r.w.layers[li]);
        let (n, hid) = (p.n_tokens, d.hidden);
        let eps = self.cfg.rms_eps as f32;
        let null = 0u64;
        gpu.bind()?;
        let gu_rows = 2 * d.ffn;
        if l.gate_up.scale.is_some()
            || !gpu.gemv_fused(
                Prologue::Norm,
                s.x.ptr,
                l.mlp_norm.ptr,
                eps,
                l.gate_up.data.ptr,
                s.gu.ptr,
                n,
                gu_rows,
                hid,
                Dt::Bf16,
                false,
            )?
        {
            gpu.launch_dependent(
                &gpu.k.rms_norm,
                (n as u32, 1, 1),
                Self::threads(hid),
                0,
                &[&s.x.ptr, &null, &l.mlp_norm.ptr, &s.h.ptr, &(hid as i32), &eps],
            )?;
            gpu.project(s.h.ptr, &l.gate_up, s.gu.ptr, n, Dt::Bf16, false)?;
        }
        mark(gpu, "gate_up")?;
        if l.down.scale.is_some()
            || !gpu.gemv_fused(Prologue::SiluMul, s.gu.ptr, 0, 0.0, l.down.data.ptr, s.x.ptr, n, hid, d.ffn, Dt::F32, lead)?
        {
            let total = (n * d.ffn) as u64;
            let blocks = (n * d.ffn).div_ceil(256).min(65536) as u32;
            gpu.launch_dependent(&gpu.k.silu_mul, (blocks, 1, 1), 256, 0, &[&s.gu.ptr, &s.act.ptr, &(d.ffn as i32), &total])?;
            gpu.project(s.act.ptr, &l.down, s.x.ptr, n, Dt::F32, lead)?;
        }
        mark(gpu, "down")
    }

    /// The final norm of the logit rows, the LM head and, per `head`, the token choice.
    fn head(&self, r: &Rank, p: &PassShape, head: Head) -> Result<()> {
        let (d, gpu, s) = (&self.d, &r.gpu, &r.s);
        let (rows, hid) = (p.n_logits, d.hidden);
        let eps = self.cfg.rms_eps as f32;
        gpu.launch_dependent(
            &gpu.k.rms_norm,
            (rows as u32, 1, 1),
            Self::threads(hid),
            0,
            &[&s.x.ptr, &s.meta.at(p.off.logit_rows, 4), &r.w.norm.ptr, &s.hl.ptr, &(hid as i32), &eps],
        )?;
        let head_w = r.w.lm_head.as_ref().unwrap_or(&r.w.embed).ptr;
        gpu.linear(s.hl.ptr, head_w, s.logits.ptr, rows, d.vocab, hid, Dt::F32, false)?;
        match head {
            Head::Logits => Ok(()),
            Head::Argmax => self.argmax(r, rows),
            Head::Sample => {
                let vocab = d.vocab as i32;
                gpu.launch(&gpu.k.sample, (rows as u32, 1, 1), 1024, 0, &[&s.logits.ptr, &vocab, &s.sample_params.ptr, &s.sampled.ptr])
            }
        }
    }

    /// The greedy token of each of the first `rows` logit rows into `sampled`, within its mask
    /// where its `masked` flag is set. Part of an [`Head::Argmax`] pass; launched on its own
    /// after a [`Head::Logits`] pass when the masks are computed while the layers run.
    pub fn argmax(&self, r: &Rank, rows: usize) -> Result<()> {
        let (gpu, s) = (&r.gpu, &r.s);
        let (vocab, words) = (self.d.vocab as i32, s.mask_words as i32);
        gpu.launch_dependent(
            &gpu.k.argmax,
            (rows as u32, 1, 1),
            1024,
            0,
            &[&s.logits.ptr, &vocab, &s.mask.ptr, &s.masked.ptr, &words, &s.sampled.ptr],
        )
    }
}
