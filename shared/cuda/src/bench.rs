//! The engine benchmark: decode step time and prefill throughput on performance shapes with
//! random weights (bf16, or quantised to FP8), against the device's measured copy bandwidth (MBU) and bf16 GEMM rate
//! (MFU). Times are wall-clock per pass as a caller sees them: metadata upload, the pass (a
//! captured graph for decode), the sampled tokens' download.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;
use tandem_engine::{Family, ForwardItem, Llama3Scaling, ModelConfig, PagedEngine};

use crate::device::{Dt, Gpu};
use crate::{CudaConfig, CudaEngine, DevicePasses, Result};

/// A named model shape.
pub fn shape(name: &str) -> Option<ModelConfig> {
    let llama3 = |factor: f32| Llama3Scaling { factor, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8192 };
    let base = ModelConfig {
        family: Family::Llama,
        vocab_size: 128_256,
        hidden: 2048,
        intermediate: 8192,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        rms_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: Some(llama3(32.0)),
        rope_interleaved: false,
        max_context: 131_072,
        tie_embeddings: true,
        qkv_bias: false,
        qk_norm: false,
    };
    match name {
        "llama-1b" => Some(base),
        "llama-8b" => Some(ModelConfig {
            hidden: 4096,
            intermediate: 14336,
            layers: 32,
            head_dim: 128,
            rope_scaling: Some(llama3(8.0)),
            tie_embeddings: false,
            ..base
        }),
        _ => None,
    }
}

/// Parameters multiplied per token in the linear layers (attention and MLP projections).
pub fn linear_params(c: &ModelConfig) -> usize {
    let hd = c.head_dim;
    c.layers * (c.hidden * c.heads * hd * 2 + 2 * c.hidden * c.kv_heads * hd + 3 * c.hidden * c.intermediate)
}

/// FLOPs of prefilling `len` tokens: the projections, the LM head for the last token, and causal
/// attention (QKᵀ and PV, each half of a full len × len product).
pub fn prefill_flops(c: &ModelConfig, len: usize) -> f64 {
    let l = len as f64;
    2.0 * l * linear_params(c) as f64 + 2.0 * (c.hidden * c.vocab_size) as f64 + 2.0 * (c.layers * c.heads * c.head_dim) as f64 * l * l
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub gpu: String,
    pub shape: String,
    pub phase: &'static str,
    /// GPUs of the tensor-parallel group; utilisation is against all of them together.
    pub tp: usize,
    pub batch: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_len: Option<usize>,
    pub engine: &'static str,
    /// The projections' storage (`bf16`, `fp8`).
    pub dtype: &'static str,
    /// The KV cache's element type (`bf16`, `fp8`).
    pub kv_dtype: &'static str,
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mbu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Bytes one decode step must read (weights + every sequence's KV), for the floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The attention kernel of the row (`TANDEM_CUDA_DECODE_ATTENTION`,
    /// `TANDEM_CUDA_PREFILL_ATTENTION`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<&'static str>,
    /// Device milliseconds per stage of one eager pass (summed over layers), where profiled.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub breakdown_ms: Vec<(&'static str, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ceilings {
    pub gpu: String,
    /// Device-to-device copy, bytes read plus written, GB/s.
    pub copy_gbps: f64,
    /// cuBLAS bf16 GEMM 8192³ on random data, TFLOP/s.
    pub matrix_tflops: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Measures the two ceilings on `gpu`.
pub fn ceilings(gpu: &Gpu) -> Result<Ceilings> {
    let bytes = 2usize << 30;
    let (a, b) = (gpu.alloc(bytes)?, gpu.alloc(bytes)?);
    gpu.fill_bf16(a.ptr, bytes / 2, 1, 1.0, 0.0)?;
    let mut copies = Vec::new();
    for i in 0..13 {
        let ms = gpu.time_ms(|| gpu.copy(b.ptr, a.ptr, bytes))?;
        if i >= 3 {
            copies.push(ms as f64);
        }
    }
    drop((a, b));
    let copy_gbps = 2.0 * bytes as f64 / (median(copies) / 1e3) / 1e9;
    let n = 8192usize;
    let (x, w, y) = (gpu.alloc(n * n * 2)?, gpu.alloc(n * n * 2)?, gpu.alloc(n * n * 2)?);
    gpu.fill_bf16(x.ptr, n * n, 2, 1.0, 0.0)?;
    gpu.fill_bf16(w.ptr, n * n, 3, 1.0, 0.0)?;
    let mut gemms = Vec::new();
    for i in 0..13 {
        let ms = gpu.time_ms(|| gpu.gemm(w.ptr, Dt::Bf16, x.ptr, Dt::Bf16, y.ptr, Dt::Bf16, n, n, n, false))?;
        if i >= 3 {
            gemms.push(ms as f64);
        }
    }
    let matrix_tflops = 2.0 * (n as f64).powi(3) / (median(gemms) / 1e3) / 1e12;
    Ok(Ceilings { gpu: gpu.name.clone(), copy_gbps, matrix_tflops })
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub shape: String,
    pub batches: Vec<usize>,
    pub contexts: Vec<usize>,
    pub prefill_lens: Vec<usize>,
    pub warmup: usize,
    pub iters: usize,
    pub device: usize,
    /// Tensor-parallel degree (GPUs from `device`).
    pub tp: usize,
    pub graphs: bool,
    /// Add a per-stage device-time breakdown to each decode and prefill row.
    pub profile: bool,
    /// The projections' format (`None`: `TANDEM_CUDA_WEIGHTS`).
    pub weights: Option<crate::WeightFormat>,
}

/// Runs the decode and prefill sweeps of one shape, reporting each row through `each` as it
/// completes.
pub fn run(spec: &Spec, ceil: &Ceilings, mut each: impl FnMut(&Row)) -> Result<Vec<Row>> {
    let c = shape(&spec.shape).ok_or_else(|| crate::CudaError::Unsupported(format!("unknown shape {}", spec.shape)))?;
    let cfg = CudaConfig {
        device: spec.device,
        tp: spec.tp,
        max_step_tokens: spec.prefill_lens.iter().copied().max().unwrap_or(2048).max(2048),
        graphs: spec.graphs,
        weights: spec.weights,
        ..Default::default()
    };
    let mut engine = PagedEngine::new(CudaEngine::random(&spec.shape, c.clone(), 7, &cfg)?);
    let kv_per_token = engine.info().layout.block_bytes() / engine.info().block_size;
    let weights = engine.backend().weight_step_bytes();
    let dtype = engine.backend().weight_format().as_str();
    let kv_dtype = engine.info().layout.dtype.as_str();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut rows = Vec::new();
    let gpu = ceil.gpu.clone();
    let mut next_id = 1u64;
    let mut push = |rows: &mut Vec<Row>, r: Row| {
        each(&r);
        rows.push(r);
    };

    for &ctx in &spec.contexts {
        for &batch in &spec.batches {
            let steps = spec.warmup + spec.iters;
            let blocks_needed = batch * (ctx + steps + 1).div_ceil(engine.info().block_size);
            let bytes = (weights + batch * ctx * kv_per_token) as u64;
            let mut row = Row {
                gpu: gpu.clone(),
                shape: spec.shape.clone(),
                phase: "decode",
                tp: spec.tp,
                batch,
                context: Some(ctx),
                prompt_len: None,
                engine: "tandem",
                dtype,
                kv_dtype,
                tokens_per_s: None,
                step_ms: None,
                time_ms: None,
                mbu: None,
                mfu: None,
                bytes_per_step: Some(bytes),
                error: None,
                attention: Some(crate::DecodeAttention::from_env().as_str()),
                breakdown_ms: Vec::new(),
            };
            if blocks_needed > engine.stats().total_blocks - engine.stats().used_blocks {
                row.error = Some(format!(
                    "does not fit: {:.1} GB of KV needed, {:.1} GB of cache",
                    (blocks_needed * engine.info().layout.block_bytes()) as f64 / 1e9,
                    (engine.info().kv_blocks * engine.info().layout.block_bytes()) as f64 / 1e9
                ));
                push(&mut rows, row);
                continue;
            }
            let ids: Vec<u64> = (0..batch as u64).map(|i| next_id + i).collect();
            next_id += batch as u64;
            for &id in &ids {
                let tokens: Vec<u32> = (0..ctx).map(|_| rng.random_range(0..c.vocab_size as u32)).collect();
                engine.adopt(id, &tokens)?;
            }
            let mut times = Vec::new();
            for step in 0..steps {
                let items: Vec<ForwardItem> = ids
                    .iter()
                    .map(|&seq| ForwardItem { seq, tokens: vec![rng.random_range(0..c.vocab_size as u32)], all_logits: false })
                    .collect();
                let t = Instant::now();
                engine.forward_greedy(&items)?;
                if step >= spec.warmup {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            if spec.profile {
                let items: Vec<ForwardItem> = ids.iter().map(|&seq| ForwardItem { seq, tokens: vec![1], all_logits: false }).collect();
                row.breakdown_ms = engine.profile_pass(&items)?;
            }
            for &id in &ids {
                engine.release(id);
            }
            let s = median(times);
            row.step_ms = Some(s * 1e3);
            row.tokens_per_s = Some(batch as f64 / s);
            row.mbu = Some(bytes as f64 / s / (spec.tp as f64 * ceil.copy_gbps * 1e9));
            push(&mut rows, row);
        }
    }

    for &len in &spec.prefill_lens {
        let mut times = Vec::new();
        for i in 0..spec.warmup.min(2) + spec.iters.clamp(1, 5) {
            let id = next_id;
            next_id += 1;
            let tokens: Vec<u32> = (0..len).map(|_| rng.random_range(0..c.vocab_size as u32)).collect();
            engine.add_sequence(id, &tokens).map_err(crate::CudaError::Engine)?;
            let t = Instant::now();
            let out = engine.forward_greedy(&[ForwardItem { seq: id, tokens, all_logits: false }]);
            let el = t.elapsed().as_secs_f64();
            engine.release(id);
            out?;
            if i >= spec.warmup.min(2) {
                times.push(el);
            }
        }
        let mut breakdown_ms = Vec::new();
        if spec.profile {
            let id = next_id;
            next_id += 1;
            let tokens: Vec<u32> = (0..len).map(|_| rng.random_range(0..c.vocab_size as u32)).collect();
            engine.add_sequence(id, &tokens).map_err(crate::CudaError::Engine)?;
            let out = engine.profile_pass(&[ForwardItem { seq: id, tokens, all_logits: false }]);
            engine.release(id);
            breakdown_ms = out?;
        }
        let s = median(times);
        let row = Row {
            gpu: gpu.clone(),
            shape: spec.shape.clone(),
            phase: "prefill",
            tp: spec.tp,
            batch: 1,
            context: None,
            prompt_len: Some(len),
            engine: "tandem",
            dtype,
            kv_dtype,
            tokens_per_s: Some(len as f64 / s),
            step_ms: None,
            time_ms: Some(s * 1e3),
            mbu: None,
            mfu: Some(prefill_flops(&c, len) / s / (spec.tp as f64 * ceil.matrix_tflops * 1e12)),
            bytes_per_step: None,
            error: None,
            attention: Some(crate::PrefillAttention::for_pass(crate::PrefillAttention::from_env(), len).as_str()),
            breakdown_ms,
        };
        push(&mut rows, row);
    }
    Ok(rows)
}

/// One projection shape timed alone: `rows × cols` weights times `tokens` inputs.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionRow {
    pub shape: String,
    pub stage: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub tokens: usize,
    pub dtype: &'static str,
    /// What ran: `bf16`, or the FP8 path `Gpu::fp8_path` names.
    pub path: &'static str,
    /// Device microseconds a call, over back-to-back calls that cycle through enough copies of
    /// the matrix to miss the L2 cache.
    pub us: f64,
    /// Weight bytes (and scales) read a second, GB/s.
    pub weight_gbps: f64,
}

/// The four projections of each shape (stacked Q/K/V, O, stacked gate/up, down), each in bf16
/// and in FP8, timed alone at each token count: the kernels as the decode graph launches them
/// (O and down add into an f32 residual, the others write bf16), `calls` launches back to back
/// between two events.
pub fn projections(gpu: &Gpu, shapes: &[String], tokens: &[usize], calls: usize) -> Result<Vec<ProjectionRow>> {
    let mut rows = Vec::new();
    let max_tokens = tokens.iter().copied().max().unwrap_or(1);
    for name in shapes {
        let c = shape(name).ok_or_else(|| crate::CudaError::Unsupported(format!("unknown shape {name}")))?;
        let (h, f) = (c.hidden, c.intermediate);
        let stages = [
            ("qkv", (c.heads + 2 * c.kv_heads) * c.head_dim, h, Dt::Bf16),
            ("o", h, c.heads * c.head_dim, Dt::F32),
            ("gate_up", 2 * f, h, Dt::Bf16),
            ("down", h, f, Dt::F32),
        ];
        gpu.reserve_fp8_inputs(max_tokens, h.max(f))?;
        for (stage, m, k, out) in stages {
            // Enough copies that one pass over them is four times the L2 cache (50 MB on an H200).
            let copies = (200usize << 20).div_ceil(m * k).max(2);
            let x = gpu.alloc(max_tokens * k * 2)?;
            let y = gpu.alloc(max_tokens * m * 4)?;
            gpu.fill_bf16(x.ptr, max_tokens * k, 5, 1.0, 0.0)?;
            let mut bf = Vec::with_capacity(copies);
            let mut q = Vec::with_capacity(copies);
            for i in 0..copies {
                let w = gpu.alloc(m * k * 2)?;
                gpu.fill_bf16(w.ptr, m * k, 100 + i as u64, 0.05, 0.0)?;
                q.push(gpu.quantize_fp8(&w, m, k)?);
                bf.push(w);
            }
            gpu.sync()?;
            for &n in tokens {
                for fp8 in [false, true] {
                    let call = |i: usize| -> Result<()> {
                        if fp8 {
                            gpu.project(x.ptr, &q[i % copies], y.ptr, n, out, out == Dt::F32)
                        } else {
                            gpu.linear(x.ptr, bf[i % copies].ptr, y.ptr, n, m, k, out, out == Dt::F32)
                        }
                    };
                    for i in 0..copies {
                        call(i)?;
                    }
                    let ms = gpu.time_ms(|| (0..calls).try_for_each(call))? as f64;
                    let us = 1e3 * ms / calls as f64;
                    let bytes = if fp8 { m * k + 4 * m } else { 2 * m * k };
                    rows.push(ProjectionRow {
                        shape: name.clone(),
                        stage,
                        rows: m,
                        cols: k,
                        tokens: n,
                        dtype: if fp8 { "fp8" } else { "bf16" },
                        path: if fp8 { gpu.fp8_path(&q[0], n, out)? } else { "bf16" },
                        us,
                        weight_gbps: bytes as f64 / (us / 1e6) / 1e9,
                    });
                }
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_their_published_sizes() {
        let one = shape("llama-1b").unwrap();
        let eight = shape("llama-8b").unwrap();
        // Parameters: projections + embedding (+ untied head) + norms.
        let total = |c: &ModelConfig| {
            linear_params(c) + c.vocab_size * c.hidden * if c.tie_embeddings { 1 } else { 2 } + c.hidden * (2 * c.layers + 1)
        };
        assert!((total(&one) as f64 / 1.236e9 - 1.0).abs() < 0.01, "{}", total(&one));
        assert!((total(&eight) as f64 / 8.03e9 - 1.0).abs() < 0.01, "{}", total(&eight));
        // KV per token: 32 KiB and 128 KiB in bf16.
        let kv = |c: &ModelConfig| 2 * c.layers * c.kv_heads * c.head_dim * 2;
        assert_eq!(kv(&one), 32 << 10);
        assert_eq!(kv(&eight), 128 << 10);
        // Prefill FLOPs are dominated by the projections at 2k tokens.
        let f = prefill_flops(&eight, 2048);
        assert!(f > 2.0 * 2048.0 * 6.9e9 && f < 2.0 * 2048.0 * 8.5e9, "{f}");
    }
}
