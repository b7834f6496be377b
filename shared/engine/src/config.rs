//! One description of a Llama-family decoder, read from Hugging Face `config.json` or from GGUF
//! metadata. Families differ only in a few switches (biases, q/k norms, RoPE layout).

use candle_core::quantized::gguf_file::{Content, Value};
use serde::Deserialize;

use crate::{EngineError, Result};

/// Family of the checkpoint; kept for logs and for defaults that differ by family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// Llama 3's frequency-dependent RoPE scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3Scaling>,
    /// RoPE rotates adjacent pairs (GGUF Llama, whose Q/K rows were permuted on conversion)
    /// instead of the two halves of each head (Hugging Face layout).
    pub rope_interleaved: bool,
    pub max_context: usize,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
}

/// RoPE settings: `rope_scaling` in older configs, `rope_parameters` (which also carries
/// `rope_theta`) in newer ones.
#[derive(Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f32>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    rope_parameters: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
}

impl ModelConfig {
    pub fn from_hf_json(text: &str) -> Result<Self> {
        // The architecture first: another family's config lacks fields a Llama config has, and
        // "unsupported" says more than "missing field".
        let raw: serde_json::Value = serde_json::from_str(text).map_err(|e| EngineError::Config(format!("config.json: {e}")))?;
        let family = match raw.get("model_type").and_then(|t| t.as_str()).unwrap_or("llama") {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => return Err(EngineError::Config(format!("unsupported model_type `{other}` (llama, mistral, qwen2, qwen3)"))),
        };
        let c: HfConfig = serde_json::from_value(raw).map_err(|e| EngineError::Config(format!("config.json: {e}")))?;
        let rope_theta = c.rope_theta.or(c.rope_parameters.as_ref().and_then(|r| r.rope_theta)).unwrap_or(10_000.0);
        let rope_scaling = match c.rope_scaling.or(c.rope_parameters) {
            Some(s) if s.rope_type.as_deref() == Some("llama3") => Some(Llama3Scaling {
                factor: s.factor.unwrap_or(8.0),
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position: s.original_max_position_embeddings.unwrap_or(8192),
            }),
            Some(s) if matches!(s.rope_type.as_deref(), None | Some("default")) => None,
            Some(s) => return Err(EngineError::Config(format!("unsupported rope_scaling type `{}`", s.rope_type.unwrap_or_default()))),
            None => None,
        };
        let cfg = Self {
            family,
            vocab_size: c.vocab_size,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            // `max(1)`: no division by zero here; `validate` refuses zero heads.
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads.max(1)),
            rms_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_interleaved: false,
            max_context: c.max_position_embeddings.unwrap_or(4096),
            tie_embeddings: c.tie_word_embeddings.unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || c.attention_bias.unwrap_or(false),
            qk_norm: family == Family::Qwen3,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_gguf(content: &Content) -> Result<Self> {
        let arch = get(content, "general.architecture")?.to_string().map_err(cfg_err)?.clone();
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => return Err(EngineError::Config(format!("unsupported GGUF architecture `{other}` (llama, mistral, qwen2, qwen3)"))),
        };
        let n = |key: &str| -> Result<usize> { num(get(content, &format!("{arch}.{key}"))?) };
        let opt = |key: &str| content.metadata.get(&format!("{arch}.{key}"));
        let hidden = n("embedding_length")?;
        let heads = n("attention.head_count")?;
        let vocab_size = match opt("vocab_size") {
            Some(v) => num(v)?,
            None => get(content, "tokenizer.ggml.tokens")?.to_vec().map_err(cfg_err)?.len(),
        };
        let f = |v: &Value| v.to_f32().map_err(cfg_err);
        let cfg = Self {
            family,
            vocab_size,
            hidden,
            intermediate: n("feed_forward_length")?,
            layers: n("block_count")?,
            heads,
            kv_heads: opt("attention.head_count_kv").map(num).transpose()?.unwrap_or(heads),
            // `max(1)`: no division by zero here; `validate` refuses zero heads.
            head_dim: opt("attention.key_length").map(num).transpose()?.unwrap_or(hidden / heads.max(1)),
            rms_eps: opt("attention.layer_norm_rms_epsilon").map(f).transpose()?.unwrap_or(1e-5) as f64,
            rope_theta: opt("rope.freq_base").map(f).transpose()?.unwrap_or(10_000.0),
            // Llama 3 GGUFs carry the scaling as a `rope_freqs` tensor instead.
            rope_scaling: None,
            // llama.cpp's converter permutes Llama Q/K rows for adjacent-pair rotation; Qwen keeps halves.
            rope_interleaved: matches!(family, Family::Llama | Family::Mistral),
            max_context: opt("context_length").map(num).transpose()?.unwrap_or(4096),
            tie_embeddings: !content.tensor_infos.contains_key("output.weight"),
            qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            qk_norm: content.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab size", self.vocab_size),
            ("hidden size", self.hidden),
            ("intermediate size", self.intermediate),
            ("layer count", self.layers),
            ("head dim", self.head_dim),
            ("max context", self.max_context),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(EngineError::Config(format!("{name} must be positive")));
        }
        // The loader multiplies these (tensor shapes, KV block sizes): the products must fit.
        let products = [
            self.heads.checked_mul(self.head_dim),
            self.kv_heads.checked_mul(self.head_dim).and_then(|x| x.checked_mul(self.layers)).and_then(|x| x.checked_mul(8)),
            self.vocab_size.checked_mul(self.hidden),
            self.intermediate.checked_mul(self.hidden),
        ];
        if products.iter().any(Option::is_none) {
            return Err(EngineError::Config(format!("model dimensions too large: {self:?}")));
        }
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(EngineError::Config(format!("heads ({}) must be a multiple of kv heads ({})", self.heads, self.kv_heads)));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(EngineError::Config(format!("head dim {} must be even for RoPE", self.head_dim)));
        }
        Ok(())
    }

    /// Inverse RoPE frequencies, one per rotated pair, with Llama 3 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let inv = 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32);
                match &self.rope_scaling {
                    None => inv,
                    Some(s) => {
                        let old = s.original_max_position as f32;
                        let low_wavelen = old / s.low_freq_factor;
                        let high_wavelen = old / s.high_freq_factor;
                        let wavelen = 2.0 * std::f32::consts::PI / inv;
                        if wavelen < high_wavelen {
                            inv
                        } else if wavelen > low_wavelen {
                            inv / s.factor
                        } else {
                            let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * inv / s.factor + smooth * inv
                        }
                    }
                }
            })
            .collect()
    }
}

fn cfg_err(e: candle_core::Error) -> EngineError {
    EngineError::Config(e.to_string())
}

fn get<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content.metadata.get(key).ok_or_else(|| EngineError::Config(format!("GGUF metadata has no `{key}`")))
}

fn num(v: &Value) -> Result<usize> {
    v.to_u64().or_else(|_| v.to_u32().map(u64::from)).or_else(|_| v.to_i32().map(|x| x as u64)).map(|x| x as usize).map_err(cfg_err)
}
