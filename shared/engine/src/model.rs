//! The Llama-family decoder: one implementation, parameterised by [`ModelConfig`].

use candle_core::{Device, Tensor};

use crate::attention::{apply_rope, head_rms_norm, paged_attention, QueryCtx};
use crate::config::ModelConfig;
use crate::kv::{BlockId, KvCache};
use crate::weights::{Linear, WeightSource};
use crate::Result;

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    mlp_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub(crate) struct Model {
    pub cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
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
    pub fn load(cfg: ModelConfig, mut src: WeightSource) -> Result<Self> {
        // Every tensor must have the shape the config implies (see `WeightSource::dense_of`).
        let (h, ff, vocab, d) = (cfg.hidden, cfg.intermediate, cfg.vocab_size, cfg.head_dim);
        let (qd, kvd) = (cfg.heads * d, cfg.kv_heads * d);
        let embed = src.dense_of("model.embed_tokens.weight", &[vocab, h])?;
        // Not `with_capacity(cfg.layers)`: the count comes from the file, and a missing layer
        // ends the loop with an error long before a huge one would be allocated.
        let mut layers = Vec::new();
        for i in 0..cfg.layers {
            let p = format!("model.layers.{i}");
            let vec = |src: &mut WeightSource, name: &str| -> Result<Vec<f32>> { Ok(src.dense_of(name, &[d])?.flatten_all()?.to_vec1()?) };
            layers.push(Layer {
                attn_norm: src.dense_of(&format!("{p}.input_layernorm.weight"), &[h])?,
                q: src.linear(&format!("{p}.self_attn.q_proj"), cfg.qkv_bias, qd, h)?,
                k: src.linear(&format!("{p}.self_attn.k_proj"), cfg.qkv_bias, kvd, h)?,
                v: src.linear(&format!("{p}.self_attn.v_proj"), cfg.qkv_bias, kvd, h)?,
                o: src.linear(&format!("{p}.self_attn.o_proj"), false, h, qd)?,
                q_norm: if cfg.qk_norm { Some(vec(&mut src, &format!("{p}.self_attn.q_norm.weight"))?) } else { None },
                k_norm: if cfg.qk_norm { Some(vec(&mut src, &format!("{p}.self_attn.k_norm.weight"))?) } else { None },
                mlp_norm: src.dense_of(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate: src.linear(&format!("{p}.mlp.gate_proj"), false, ff, h)?,
                up: src.linear(&format!("{p}.mlp.up_proj"), false, ff, h)?,
                down: src.linear(&format!("{p}.mlp.down_proj"), false, h, ff)?,
            });
        }
        let norm = src.dense_of("model.norm.weight", &[h])?;
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
        Ok(Self { cfg, embed, layers, norm, lm_head, inv_freq })
    }

    /// Runs `tokens` through the model, writing their keys and values into `store`, and returns
    /// the logits of the tokens listed in `logit_rows` (indices into `tokens`).
    pub fn forward(&self, tokens: &[TokenSlot<'_>], store: &mut KvCache, logit_rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let (n, d) = (tokens.len(), c.head_dim);
        let eps = c.rms_eps;
        let ids = Tensor::from_vec(tokens.iter().map(|t| t.token).collect::<Vec<u32>>(), n, &Device::Cpu)?;
        let positions: Vec<usize> = tokens.iter().map(|t| t.pos).collect();
        let queries: Vec<QueryCtx<'_>> = tokens.iter().map(|t| QueryCtx { pos: t.pos, blocks: t.blocks }).collect();
        let bs = store.block_size;

        let mut x = self.embed.index_select(&ids, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps as f32)?;
            let mut q: Vec<f32> = layer.q.forward(&h)?.flatten_all()?.to_vec1()?;
            let mut k: Vec<f32> = layer.k.forward(&h)?.flatten_all()?.to_vec1()?;
            let v: Vec<f32> = layer.v.forward(&h)?.flatten_all()?.to_vec1()?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                head_rms_norm(&mut q, d, qn, eps);
                head_rms_norm(&mut k, d, kn, eps);
            }
            apply_rope(&mut q, c.heads, d, &positions, &self.inv_freq, c.rope_interleaved);
            apply_rope(&mut k, c.kv_heads, d, &positions, &self.inv_freq, c.rope_interleaved);
            let row = c.kv_heads * d;
            for (i, t) in tokens.iter().enumerate() {
                store.write(t.blocks[t.pos / bs], li, t.pos % bs, &k[i * row..(i + 1) * row], &v[i * row..(i + 1) * row]);
            }
            let attn = paged_attention(&q, &queries, store, li, c.heads, c.kv_heads, d);
            let attn = Tensor::from_vec(attn, (n, c.heads * d), &Device::Cpu)?;
            x = (x + layer.o.forward(&attn)?)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, eps as f32)?;
            let act = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&act)?)?;
        }
        if logit_rows.is_empty() {
            return Ok(Vec::new());
        }
        let rows = Tensor::from_vec(logit_rows.iter().map(|&r| r as u32).collect::<Vec<u32>>(), logit_rows.len(), &Device::Cpu)?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps as f32)?;
        Ok(self.lm_head.forward(&x)?.to_vec2()?)
    }
}
