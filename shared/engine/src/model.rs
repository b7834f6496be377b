//! The Llama-family decoder: one implementation, parameterised by [`ModelConfig`], run as one
//! rank or as a tensor-parallel group of ranks on threads.
//!
//! A rank holds its query heads' rows of Q, its KV heads' rows of K and V
//! ([`tandem_protocol::tp`]), the matching columns of O, and a run of the FFN's rows of gate and
//! up and columns of down. The partial outputs of O and down are summed across the group (the
//! all-reduce of [`crate::group`]) before the residual add, so every rank carries the same hidden
//! state. Embedding, norms and the LM head are shared, and the logits are computed once.

use tandem_protocol::tp;

use crate::attention::{apply_rope, head_rms_norm, paged_attention, QueryCtx};
use crate::config::ModelConfig;
use crate::group::{AllReduce, Member};
use crate::kv::{BlockId, KvCache};
use crate::weights::{Linear, Stacked, WeightSource};
use crate::{EngineError, Result};

struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V, one product where their matrices stack.
    qkv: Stacked,
    o: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    mlp_norm: Vec<f32>,
    /// Gate and up, likewise.
    gate_up: Stacked,
    down: Linear,
}

/// Each row of `x` divided by its root mean square and scaled by `w` (Llama's RMSNorm, in the
/// order candle computes it).
fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(w.len()) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let rms = (sum2 / w.len() as f32 + eps as f32).sqrt();
        out.extend(row.iter().zip(w).map(|(v, w)| v / rms * w));
    }
    out
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

/// One rank's part of every layer.
pub(crate) struct Rank {
    /// Query and KV heads this rank computes and stores.
    pub heads: usize,
    pub kv_heads: usize,
    layers: Vec<Layer>,
}

pub(crate) struct Model {
    pub cfg: ModelConfig,
    /// `[vocab × hidden]`, dense.
    embed: Vec<f32>,
    /// One entry without tensor parallelism; the group's ranks in order with it.
    pub ranks: Vec<Rank>,
    norm: Vec<f32>,
    lm_head: Linear,
    inv_freq: Vec<f32>,
}

/// One token of a forward pass: what it is, where it sits, and where its keys and values go.
pub(crate) struct TokenSlot<'a> {
    pub token: u32,
    pub pos: usize,
    /// The sequence's block table, long enough to hold `pos`.
    pub blocks: &'a [BlockId],
}

impl Model {
    /// Loads the model as a group of `tp` ranks (1: no tensor parallelism).
    pub fn load(cfg: ModelConfig, mut src: WeightSource, tp: usize) -> Result<Self> {
        // Every tensor must have the shape the config implies (see `WeightSource::dense_of`).
        let (h, vocab) = (cfg.hidden, cfg.vocab_size);
        tp::check_degree(cfg.heads, cfg.kv_heads, tp).map_err(|e| EngineError::Config(e.to_string()))?;
        let embed = src.dense_of("model.embed_tokens.weight", &[vocab, h])?.flatten_all()?.to_vec1()?;
        let ranks = (0..tp).map(|r| Rank::load(&cfg, &mut src, tp, r)).collect::<Result<Vec<_>>>()?;
        let norm = src.dense_of("model.norm.weight", &[h])?.to_vec1()?;
        let lm_head = if !cfg.tie_embeddings && src.contains("lm_head.weight") {
            src.linear("lm_head", false, vocab, h)?
        } else {
            // Tied: the (possibly quantized) embedding matrix doubles as the output projection.
            src.linear("model.embed_tokens", false, vocab, h)?
        };
        let mut inv_freq = cfg.rope_inv_freq();
        if let Some(factors) = src.rope_freq_factors()? {
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        Ok(Self { cfg, embed, ranks, norm, lm_head, inv_freq })
    }

    /// Runs `tokens` through the model, writing their keys and values into `stores` (one per
    /// rank), and returns the logits of the tokens listed in `logit_rows` (indices into `tokens`).
    pub fn forward(&self, tokens: &[TokenSlot<'_>], stores: &mut [KvCache], logit_rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        let h = self.cfg.hidden;
        let mut x = Vec::with_capacity(tokens.len() * h);
        for t in tokens {
            let row = self.embed.get(t.token as usize * h..(t.token as usize + 1) * h);
            x.extend_from_slice(
                row.ok_or_else(|| EngineError::Config(format!("token {} is outside the vocabulary of {}", t.token, self.cfg.vocab_size)))?,
            );
        }
        let x = match (&self.ranks[..], stores) {
            ([rank], [store]) => rank.forward(self, x, tokens, store, None)?,
            (ranks, stores) => {
                assert_eq!(ranks.len(), stores.len(), "one KV store per rank");
                let group = AllReduce::new(ranks.len());
                let results: Vec<Result<Vec<f32>>> = std::thread::scope(|s| {
                    let handles: Vec<_> = ranks
                        .iter()
                        .zip(stores.iter_mut())
                        .enumerate()
                        .map(|(r, (rank, store))| {
                            let (x, member) = (x.clone(), group.member(r));
                            s.spawn(move || {
                                let run = std::panic::AssertUnwindSafe(|| rank.forward(self, x, tokens, store, Some(&member)));
                                let out = std::panic::catch_unwind(run);
                                if !matches!(out, Ok(Ok(_))) {
                                    // The others would wait at the next sum for this rank forever.
                                    member.abandon();
                                }
                                out.unwrap_or_else(|p| std::panic::resume_unwind(p))
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
                });
                // A rank's own failure over the abandonment it caused in the others.
                let mut first_err = None;
                let mut out = None;
                for res in results {
                    match res {
                        Ok(x) => out = out.or(Some(x)),
                        Err(EngineError::Device(m)) if m == crate::group::ABANDONED => {}
                        Err(e) => first_err = first_err.or(Some(e)),
                    }
                }
                match (first_err, out) {
                    (Some(e), _) => return Err(e),
                    (None, Some(x)) => x,
                    (None, None) => return Err(EngineError::Device(crate::group::ABANDONED.into())),
                }
            }
        };
        if logit_rows.is_empty() {
            return Ok(Vec::new());
        }
        let last: Vec<f32> = logit_rows.iter().flat_map(|&r| x[r * h..(r + 1) * h].iter().copied()).collect();
        let logits = self.lm_head.forward_rows(&rms_norm(&last, &self.norm, self.cfg.rms_eps), logit_rows.len())?;
        Ok(logits.chunks_exact(self.lm_head.rows()).map(<[f32]>::to_vec).collect())
    }
}

impl Rank {
    fn load(cfg: &ModelConfig, src: &mut WeightSource, tp: usize, rank: usize) -> Result<Self> {
        let (h, ff, d) = (cfg.hidden, cfg.intermediate, cfg.head_dim);
        let (qd, kvd) = (cfg.heads * d, cfg.kv_heads * d);
        let q_heads = tp::query_heads_of_rank(cfg.heads, cfg.kv_heads, tp, rank).map_err(|e| EngineError::Config(e.to_string()))?;
        let kv_heads = tp::kv_heads_of_rank(cfg.kv_heads, tp, rank);
        let (qs, kvs) = (q_heads.start * d..q_heads.end * d, kv_heads.start * d..kv_heads.end * d);
        // The FFN is cut on pairs of the down projection's quantization blocks, so every part
        // stays quantized (1536 rows of 32-wide Q4_1 blocks: 24 pairs to share out); a cut that
        // cannot be leaves the parts dense.
        let pair = 2 * src.block_of("model.layers.0.mlp.down_proj.weight");
        let unit = if ff.is_multiple_of(pair) && ff / pair >= tp { pair } else { 1 };
        let fs = {
            let r = tp::balanced(ff / unit, tp, rank);
            r.start * unit..r.end * unit
        };
        // Not `with_capacity(cfg.layers)`: the count comes from the file, and a missing layer
        // ends the loop with an error long before a huge one would be allocated.
        let mut layers = Vec::new();
        for i in 0..cfg.layers {
            let p = format!("model.layers.{i}");
            let vec = |src: &mut WeightSource, name: &str| -> Result<Vec<f32>> { Ok(src.dense_of(name, &[d])?.flatten_all()?.to_vec1()?) };
            let norm = |src: &mut WeightSource, name: &str| -> Result<Vec<f32>> { Ok(src.dense_of(name, &[h])?.to_vec1()?) };
            layers.push(Layer {
                attn_norm: norm(src, &format!("{p}.input_layernorm.weight"))?,
                qkv: Stacked::new(vec![
                    src.linear_part(&format!("{p}.self_attn.q_proj"), cfg.qkv_bias, (qd, h), qs.clone(), 0..h)?,
                    src.linear_part(&format!("{p}.self_attn.k_proj"), cfg.qkv_bias, (kvd, h), kvs.clone(), 0..h)?,
                    src.linear_part(&format!("{p}.self_attn.v_proj"), cfg.qkv_bias, (kvd, h), kvs.clone(), 0..h)?,
                ]),
                o: src.linear_part(&format!("{p}.self_attn.o_proj"), false, (h, qd), 0..h, qs.clone())?,
                q_norm: if cfg.qk_norm { Some(vec(src, &format!("{p}.self_attn.q_norm.weight"))?) } else { None },
                k_norm: if cfg.qk_norm { Some(vec(src, &format!("{p}.self_attn.k_norm.weight"))?) } else { None },
                mlp_norm: norm(src, &format!("{p}.post_attention_layernorm.weight"))?,
                gate_up: Stacked::new(vec![
                    src.linear_part(&format!("{p}.mlp.gate_proj"), false, (ff, h), fs.clone(), 0..h)?,
                    src.linear_part(&format!("{p}.mlp.up_proj"), false, (ff, h), fs.clone(), 0..h)?,
                ]),
                down: src.linear_part(&format!("{p}.mlp.down_proj"), false, (h, ff), 0..h, fs.clone())?,
            });
        }
        Ok(Self { heads: q_heads.len(), kv_heads: kv_heads.len(), layers })
    }

    /// This rank's pass over every layer, from the embedded tokens `x` to the last hidden state;
    /// `member` sums the row-parallel outputs across the group (none: the rank is alone).
    fn forward(
        &self,
        m: &Model,
        mut x: Vec<f32>,
        tokens: &[TokenSlot<'_>],
        store: &mut KvCache,
        member: Option<&Member<'_>>,
    ) -> Result<Vec<f32>> {
        let c = &m.cfg;
        let (n, d, eps) = (tokens.len(), c.head_dim, c.rms_eps);
        let positions: Vec<usize> = tokens.iter().map(|t| t.pos).collect();
        let queries: Vec<QueryCtx<'_>> = tokens.iter().map(|t| QueryCtx { pos: t.pos, blocks: t.blocks }).collect();
        let bs = store.block_size;
        let sum = |part: Vec<f32>| -> Result<Vec<f32>> {
            match member {
                None => Ok(part),
                Some(member) => member.all_reduce(part),
            }
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, eps);
            let [mut q, mut k, v]: [Vec<f32>; 3] =
                layer.qkv.forward_rows(&h, n)?.try_into().map_err(|_| EngineError::Config("Q, K and V".into()))?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                head_rms_norm(&mut q, d, qn, eps);
                head_rms_norm(&mut k, d, kn, eps);
            }
            apply_rope(&mut q, self.heads, d, &positions, &m.inv_freq, c.rope_interleaved);
            apply_rope(&mut k, self.kv_heads, d, &positions, &m.inv_freq, c.rope_interleaved);
            let row = self.kv_heads * d;
            for (i, t) in tokens.iter().enumerate() {
                store.write(t.blocks[t.pos / bs], li, t.pos % bs, &k[i * row..(i + 1) * row], &v[i * row..(i + 1) * row]);
            }
            let attn = paged_attention(&q, &queries, store, li, self.heads, self.kv_heads, d);
            add_into(&mut x, &sum(layer.o.forward_rows(&attn, n)?)?);

            let h = rms_norm(&x, &layer.mlp_norm, eps);
            let [gate, up]: [Vec<f32>; 2] =
                layer.gate_up.forward_rows(&h, n)?.try_into().map_err(|_| EngineError::Config("gate and up".into()))?;
            // SiLU(gate) · up, SiLU written as candle computes it.
            let act: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            add_into(&mut x, &sum(layer.down.forward_rows(&act, n)?)?);
        }
        Ok(x)
    }
}
