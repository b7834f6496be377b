//! Correctness checks that need a GPU, callable from tests and from `tandem bench gpu-check`:
//!
//! - the attention kernels against a float64 reference on random inputs in a paged cache with
//!   shuffled block tables (several batch sizes, context lengths, head layouts);
//! - whole-model logits against reference files written by transformers in float64 from the
//!   same bf16 weights (`scripts/gpu/reference.py`), through both the prefill and the decode
//!   (captured graph) paths;
//! - greedy tokens of a GGUF model on the GPU against the CPU engine.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tandem_engine::{CpuEngine, EngineConfig, ForwardItem, PagedEngine};
use tandem_tokenizer::{ModelFiles, ModelFormat};

use tandem_protocol::KvDtype;

use crate::device::{DecodeAttention, Gpu, PrefillAttention, WeightFormat};
use crate::fp8::{e4m3_to_f32, f32_to_e4m3, row_scale};
use crate::plan::{decode_split, TILE_ROWS};
use crate::{CudaConfig, CudaEngine, CudaError, DevicePasses, Result};

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// Relative error ‖out − ref‖ / ‖ref‖ where it applies.
    pub rel_err: Option<f64>,
    pub tolerance: Option<f64>,
    pub detail: String,
}

/// bf16 operands with f32 accumulation land between 1e-3 and 1e-2 of a float64 reference.
pub const ATTENTION_TOLERANCE: f64 = 1e-2;
/// Whole-model logits: every layer adds bf16 rounding of activations.
pub const LOGITS_TOLERANCE: f64 = 3e-2;
/// Whole-model logits with FP8 (E4M3, per-row scales) projections against the bf16 weights'
/// float64 reference.
pub const FP8_LOGITS_TOLERANCE: f64 = 0.15;

fn bf16_round(x: f32) -> (u16, f64) {
    let b = half::bf16::from_f32(x);
    (b.to_bits(), b.to_f64())
}

fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    let num: f64 = out.iter().zip(reference).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = reference.iter().map(|b| b * b).sum();
    if out.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    (num / den.max(1e-300)).sqrt()
}

/// One attention case: `ctx[i]` tokens in sequence i's cache after the pass, the last `q[i]` of
/// them new (q = 1 everywhere for decode).
pub struct AttnCase {
    pub hd: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ctx: Vec<usize>,
    pub q: Vec<usize>,
    pub decode: bool,
    /// The prefill kernel checked (unused for decode).
    pub prefill_kernel: PrefillAttention,
    /// The decode kernel checked (unused for prefill).
    pub decode_kernel: DecodeAttention,
    /// The cache holds E4M3 rows with a scale each (the kernels' FP8 forms), not bf16.
    pub fp8: bool,
}

/// Runs one attention case on the GPU and compares with float64.
pub fn attention_case(gpu: &Gpu, case: &AttnCase, seed: u64) -> Result<Check> {
    let (hd, heads, kvh) = (case.hd, case.heads, case.kv_heads);
    let (layers, layer, bs) = (2usize, 1usize, 16usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let nseq = case.ctx.len();
    let blocks_per: Vec<usize> = case.ctx.iter().map(|c| c.div_ceil(bs)).collect();
    let num_blocks: usize = blocks_per.iter().sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut rng);
    let mut tables = Vec::new();
    let mut at = 0;
    for &n in &blocks_per {
        tables.push(ids[at..at + n].to_vec());
        at += n;
    }
    let kvw = kvh * hd;
    let block_elems = layers * 2 * bs * kvw;
    // `cache` holds the values the kernels see, in the bf16 layout whatever the device's.
    let mut cache = vec![0f64; num_blocks * block_elems];
    let cache_bytes: Vec<u8> = if case.fp8 {
        // Each row its own magnitude (1e-2 to 10), so that the scales matter.
        let rows = layers * 2 * bs;
        let block_bytes = rows * kvh * (hd + 4);
        let mut bytes = vec![0u8; num_blocks * block_bytes];
        for blk in 0..num_blocks {
            for r in 0..rows {
                for h in 0..kvh {
                    let mag = 10f32.powf(rng.random_range(-2.0f32..1.0));
                    let vals: Vec<f32> = (0..hd).map(|_| rng.random_range(-mag..mag)).collect();
                    let amax = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let sc = row_scale(amax);
                    let (e, o) = (blk * block_elems + r * kvw + h * hd, blk * block_bytes + r * kvw + h * hd);
                    for (d, v) in vals.iter().enumerate() {
                        let q = f32_to_e4m3(v / sc);
                        bytes[o + d] = q;
                        cache[e + d] = e4m3_to_f32(q) as f64 * sc as f64;
                    }
                    let so = blk * block_bytes + rows * kvw + (r * kvh + h) * 4;
                    bytes[so..so + 4].copy_from_slice(&sc.to_le_bytes());
                }
            }
        }
        bytes
    } else {
        let mut bytes = Vec::with_capacity(num_blocks * block_elems * 2);
        for v in cache.iter_mut() {
            let (bits, val) = bf16_round(rng.random_range(-1.0f32..1.0));
            bytes.extend_from_slice(&bits.to_le_bytes());
            *v = val;
        }
        bytes
    };
    let width = (heads + 2 * kvh) * hd;
    let rows: usize = case.q.iter().sum();
    let mut qkv_bits = vec![0u16; rows * width];
    let mut qkv = vec![0f64; rows * width];
    for (b, v) in qkv_bits.iter_mut().zip(qkv.iter_mut()) {
        let (bits, val) = bf16_round(rng.random_range(-1.0f32..1.0));
        *b = bits;
        *v = val;
    }
    let scale = 1.0 / (hd as f64).sqrt();
    let kv_at = |blk: u32, kv: usize, slot: usize, head: usize| -> usize {
        blk as usize * block_elems + ((layer * 2 + kv) * bs + slot) * kvw + head * hd
    };
    // Reference.
    let mut reference = vec![0f64; rows * heads * hd];
    let mut row = 0;
    for s in 0..nseq {
        for i in 0..case.q[s] {
            let pos = case.ctx[s] - case.q[s] + i;
            for h in 0..heads {
                let g = h / (heads / kvh);
                let q = &qkv[row * width + h * hd..row * width + (h + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|t| {
                        let k = kv_at(tables[s][t / bs], 0, t % bs, g);
                        (0..hd).map(|d| q[d] * cache[k + d]).sum::<f64>() * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    reference[(row * heads + h) * hd + d] =
                        (0..=pos).map(|t| e[t] * cache[kv_at(tables[s][t / bs], 1, t % bs, g) + d]).sum::<f64>() / z;
                }
            }
            row += 1;
        }
    }
    // Device.
    let max_blocks = blocks_per.iter().copied().max().unwrap_or(1).max(1);
    let max_ctx = case.ctx.iter().copied().max().unwrap_or(1);
    let mut meta: Vec<i32> = Vec::new();
    let bt_off = meta.len();
    for t in &tables {
        let mut r: Vec<i32> = t.iter().map(|&b| b as i32).collect();
        r.resize(max_blocks, 0);
        meta.extend(r);
    }
    let ctx_off = meta.len();
    meta.extend(case.ctx.iter().map(|&c| c as i32));
    let qs_off = meta.len();
    let mut start = 0;
    for &q in &case.q {
        meta.push(start as i32);
        start += q;
    }
    let ql_off = meta.len();
    meta.extend(case.q.iter().map(|&q| q as i32));
    let tiles_off = meta.len();
    let mut n_tiles = 0u32;
    for (s, &q) in case.q.iter().enumerate() {
        for t in 0..q.div_ceil(TILE_ROWS) {
            meta.push(s as i32);
            meta.push((t * TILE_ROWS) as i32);
            n_tiles += 1;
        }
    }
    let meta_buf = gpu.alloc(meta.len() * 4)?;
    gpu.upload(meta_buf.ptr, &meta)?;
    let cache_buf = gpu.alloc(cache_bytes.len())?;
    gpu.upload(cache_buf.ptr, &cache_bytes)?;
    let qkv_buf = gpu.alloc(qkv_bits.len() * 2)?;
    gpu.upload(qkv_buf.ptr, &qkv_bits)?;
    let out_buf = gpu.alloc(rows * heads * hd * 2)?;
    // Poison the output: every element must be written.
    gpu.upload(out_buf.ptr, &vec![0x7fc0u16; rows * heads * hd])?;
    let m = |o: usize| meta_buf.at(o, 4);
    let (hd_i, heads_i, kvh_i, bs_i, layers_i, layer_i) = (hd as i32, heads as i32, kvh as i32, bs as i32, layers as i32, layer as i32);
    let (q_stride, mb) = (width as i32, max_blocks as i32);
    let scale32 = scale as f32;
    let mut split_used = 0;
    if case.decode {
        let (split, splits) = decode_split(nseq, kvh, max_ctx, gpu.sms, 64);
        split_used = split;
        let part_o = gpu.alloc(nseq * heads * splits * hd * 4)?;
        let part_ml = gpu.alloc(nseq * heads * splits * 2 * 4)?;
        let (split_i, splits_i) = (split as i32, splits as i32);
        gpu.decode_attention(
            case.decode_kernel,
            hd,
            heads / kvh,
            case.fp8,
            (kvh as u32, nseq as u32, splits as u32),
            &[
                &qkv_buf.ptr,
                &q_stride,
                &cache_buf.ptr,
                &m(bt_off),
                &mb,
                &m(ctx_off),
                &part_o.ptr,
                &part_ml.ptr,
                &layer_i,
                &layers_i,
                &heads_i,
                &kvh_i,
                &bs_i,
                &split_i,
                &splits_i,
                &scale32,
            ],
        )?;
        gpu.launch(
            &gpu.k.attn_combine,
            (nseq as u32, heads as u32, 1),
            hd as u32,
            0,
            &[&part_o.ptr, &part_ml.ptr, &m(ctx_off), &out_buf.ptr, &heads_i, &hd_i, &split_i, &splits_i],
        )?;
        gpu.sync()?;
    } else {
        let out_stride = (heads * hd) as i32;
        gpu.prefill_attention(
            case.prefill_kernel,
            hd,
            case.fp8,
            n_tiles as usize,
            heads,
            &[
                &qkv_buf.ptr,
                &q_stride,
                &cache_buf.ptr,
                &m(bt_off),
                &mb,
                &m(tiles_off),
                &m(qs_off),
                &m(ql_off),
                &m(ctx_off),
                &out_buf.ptr,
                &out_stride,
                &layer_i,
                &layers_i,
                &heads_i,
                &kvh_i,
                &bs_i,
                &scale32,
            ],
        )?;
        gpu.sync()?;
    }
    let mut out_bits = vec![0u16; rows * heads * hd];
    gpu.download(&mut out_bits, out_buf.ptr)?;
    let out: Vec<f64> = out_bits.iter().map(|&b| half::bf16::from_bits(b).to_f64()).collect();
    let err = rel_err(&out, &reference);
    Ok(Check {
        name: format!(
            "{}{} attention hd={hd} heads={heads}/{kvh} ctx={:?} new={:?}",
            if case.fp8 { "FP8 cache: " } else { "" },
            match (case.decode, case.decode_kernel, case.prefill_kernel) {
                (true, DecodeAttention::Mma, _) => "decode",
                (true, DecodeAttention::Lanes, _) => "decode (lanes)",
                (false, _, PrefillAttention::Pipelined) => "prefill",
                (false, _, PrefillAttention::Staged) => "prefill (staged)",
                (false, _, PrefillAttention::Wide) => "prefill (wide)",
            },
            case.ctx,
            if case.decode { vec![1] } else { case.q.clone() }
        ),
        passed: err <= ATTENTION_TOLERANCE,
        rel_err: Some(err),
        tolerance: Some(ATTENTION_TOLERANCE),
        detail: if case.decode { format!("split {split_used}") } else { format!("{n_tiles} tiles") },
    })
}

/// The standard set of attention cases.
pub fn attention_cases() -> Vec<AttnCase> {
    let mut cases = Vec::new();
    for (hd, heads, kvh) in [(64, 8, 2), (128, 32, 8), (64, 9, 3), (128, 4, 4)] {
        for ctx in [vec![1], vec![17, 64, 100], vec![513], vec![2000, 33, 4096, 7, 1000, 250, 129, 64]] {
            let q = vec![1; ctx.len()];
            for decode_kernel in [DecodeAttention::Mma, DecodeAttention::Lanes] {
                let (ctx, q) = (ctx.clone(), q.clone());
                cases.push(AttnCase {
                    hd,
                    heads,
                    kv_heads: kvh,
                    ctx,
                    q,
                    decode: true,
                    prefill_kernel: PrefillAttention::Pipelined,
                    decode_kernel,
                    fp8: false,
                });
            }
        }
        // Prefill, every kernel: whole prompts, chunks after a cached prefix, tiles that end
        // mid-way, and a long chunk whose tiles see unmasked, diagonal and skipped key tiles.
        for prefill_kernel in [PrefillAttention::Pipelined, PrefillAttention::Staged, PrefillAttention::Wide] {
            for (ctx, q) in [
                (vec![7, 64, 65, 200], vec![7, 64, 65, 200]),
                (vec![300, 1030], vec![100, 30]),
                (vec![1, 5], vec![1, 2]),
                (vec![777], vec![700]),
            ] {
                cases.push(AttnCase {
                    hd,
                    heads,
                    kv_heads: kvh,
                    ctx,
                    q,
                    decode: false,
                    prefill_kernel,
                    decode_kernel: DecodeAttention::Mma,
                    fp8: false,
                });
            }
        }
    }
    // Decode past 32k: 128k contexts take 256 splits of 512.
    for decode_kernel in [DecodeAttention::Mma, DecodeAttention::Lanes] {
        let prefill_kernel = PrefillAttention::Pipelined;
        cases.push(AttnCase {
            hd: 64,
            heads: 8,
            kv_heads: 2,
            ctx: vec![131_072, 70_001, 5],
            q: vec![1; 3],
            decode: true,
            prefill_kernel,
            decode_kernel,
            fp8: false,
        });
        cases.push(AttnCase {
            hd: 128,
            heads: 32,
            kv_heads: 8,
            ctx: vec![131_072],
            q: vec![1],
            decode: true,
            prefill_kernel,
            decode_kernel,
            fp8: false,
        });
    }
    // The FP8 cache through every kernel: the same shapes of prompt and chunk, decode over one
    // to four blocks of splits, and a 128k context.
    for (hd, heads, kvh) in [(64, 8, 2), (128, 32, 8), (64, 9, 3)] {
        for ctx in [vec![1], vec![17, 64, 100], vec![2000, 33, 4096, 7, 1000, 250, 129, 64]] {
            for decode_kernel in [DecodeAttention::Mma, DecodeAttention::Lanes] {
                let q = vec![1; ctx.len()];
                let (ctx, prefill_kernel) = (ctx.clone(), PrefillAttention::Pipelined);
                cases.push(AttnCase { hd, heads, kv_heads: kvh, ctx, q, decode: true, prefill_kernel, decode_kernel, fp8: true });
            }
        }
        for prefill_kernel in [PrefillAttention::Pipelined, PrefillAttention::Staged, PrefillAttention::Wide] {
            for (ctx, q) in [(vec![7, 64, 65, 200], vec![7, 64, 65, 200]), (vec![300, 1030], vec![100, 30]), (vec![777], vec![700])] {
                let decode_kernel = DecodeAttention::Mma;
                cases.push(AttnCase { hd, heads, kv_heads: kvh, ctx, q, decode: false, prefill_kernel, decode_kernel, fp8: true });
            }
        }
    }
    cases.push(AttnCase {
        hd: 128,
        heads: 32,
        kv_heads: 8,
        ctx: vec![131_072],
        q: vec![1],
        decode: true,
        prefill_kernel: PrefillAttention::Pipelined,
        decode_kernel: DecodeAttention::Mma,
        fp8: true,
    });
    cases
}

pub fn attention(gpu: &Gpu) -> Result<Vec<Check>> {
    attention_cases().iter().enumerate().map(|(i, c)| attention_case(gpu, c, 100 + i as u64)).collect()
}

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<Vec<u32>>,
    logits: Vec<Vec<Vec<f64>>>,
    greedy: Vec<Vec<u32>>,
}

/// Model folders under `dir` with a `reference.json`, in name order.
fn reference_folders(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| CudaError::Unsupported(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.json").exists())
        .collect();
    entries.sort();
    if entries.is_empty() {
        return Err(CudaError::Unsupported(format!("no model folders with reference.json under {}", dir.display())));
    }
    Ok(entries)
}

/// Each reference model under `dir`: its folder's name, its reference, and its weights as model
/// files (weights and config only: the reference works on token ids, no tokenizer needed).
fn reference_models_in(dir: &Path) -> Result<Vec<(String, Reference, ModelFiles)>> {
    reference_folders(dir)?
        .into_iter()
        .map(|path| {
            let model = path.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string();
            let text = std::fs::read_to_string(path.join("reference.json")).map_err(|e| CudaError::Unsupported(e.to_string()))?;
            let reference = serde_json::from_str(&text).map_err(|e| CudaError::Unsupported(e.to_string()))?;
            let files = ModelFiles { format: ModelFormat::Folder(path), name: model.clone() };
            Ok((model, reference, files))
        })
        .collect()
}

/// Logits of every model folder under `dir` (each with `reference.json`) against the reference,
/// through the prefill path (all positions at once) and the decode path (one token a pass,
/// captured graphs), plus greedy continuations; the engine runs as a group of `tp` GPUs from
/// `device`.
///
/// With FP8 projections the tolerance is [`FP8_LOGITS_TOLERANCE`]: E4M3 keeps 3 mantissa bits,
/// so each weight carries up to 6% rounding error (about 2% RMS) against the bf16 weights the
/// reference ran on.
pub fn reference_models(dir: &Path, device: usize, tp: usize, weights: WeightFormat) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let tolerance = match weights {
        WeightFormat::Bf16 => LOGITS_TOLERANCE,
        WeightFormat::Fp8 => FP8_LOGITS_TOLERANCE,
    };
    for (model, reference, files) in reference_models_in(dir)? {
        let mut name = if tp > 1 { format!("{model} TP={tp}") } else { model };
        if weights != WeightFormat::Bf16 {
            name = format!("{name} {}", weights.as_str());
        }
        let cfg =
            CudaConfig { device, tp, kv_cache_bytes: Some(256 << 20), max_step_tokens: 512, weights: Some(weights), ..Default::default() };
        let Some(engine) = load_or_refused(&files, &cfg, &name, &mut checks)? else { continue };
        let mut engine = PagedEngine::new(engine);
        let (mut prefill_out, mut prefill_ref, mut decode_out, mut decode_ref) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut greedy_same, mut greedy_total) = (0usize, 0usize);
        for (pi, prompt) in reference.prompts.iter().enumerate() {
            let id = 1000 + pi as u64;
            // Prefill path: one pass over the whole prompt, logits at every position.
            engine.add_sequence(id, prompt)?;
            let got = engine.forward(&[ForwardItem { seq: id, tokens: prompt.clone(), all_logits: true }])?;
            engine.release(id);
            for (g, r) in got[0].iter().zip(&reference.logits[pi]) {
                prefill_out.extend(g.iter().map(|&x| x as f64));
                prefill_ref.extend_from_slice(r);
            }
            // Decode path: the first token as a prefill, then one token a pass.
            let id = 2000 + pi as u64;
            engine.add_sequence(id, &prompt[..1])?;
            let first = engine.forward(&[ForwardItem { seq: id, tokens: prompt[..1].to_vec(), all_logits: false }])?;
            decode_out.extend(first[0][0].iter().map(|&x| x as f64));
            decode_ref.extend_from_slice(&reference.logits[pi][0]);
            for (j, &tok) in prompt.iter().enumerate().skip(1) {
                let got = engine.forward(&[ForwardItem { seq: id, tokens: vec![tok], all_logits: false }])?;
                decode_out.extend(got[0][0].iter().map(|&x| x as f64));
                decode_ref.extend_from_slice(&reference.logits[pi][j]);
            }
            engine.release(id);
            // Greedy continuation on the device (decode graphs, argmax on the GPU).
            let id = 3000 + pi as u64;
            engine.add_sequence(id, prompt)?;
            let mut next = engine.forward_greedy(&[ForwardItem { seq: id, tokens: prompt.clone(), all_logits: false }])?[0];
            let mut produced = vec![next];
            while produced.len() < reference.greedy[pi].len() {
                next = engine.forward_greedy(&[ForwardItem { seq: id, tokens: vec![next], all_logits: false }])?[0];
                produced.push(next);
            }
            engine.release(id);
            let same = produced.iter().zip(&reference.greedy[pi]).take_while(|(a, b)| a == b).count();
            greedy_same += same;
            greedy_total += reference.greedy[pi].len();
        }
        for (path_name, out, r) in [("prefill", &prefill_out, &prefill_ref), ("decode", &decode_out, &decode_ref)] {
            let err = rel_err(out, r);
            checks.push(Check {
                name: format!("{name} logits, {path_name} path, {} prompts", reference.prompts.len()),
                passed: err <= tolerance,
                rel_err: Some(err),
                tolerance: Some(tolerance),
                detail: format!("{} logits compared", out.len()),
            });
        }
        checks.push(Check {
            name: format!("{name} greedy continuation"),
            passed: true,
            rel_err: None,
            tolerance: None,
            detail: format!("{greedy_same} of {greedy_total} reference tokens matched before the first difference (reported, not asserted: near-ties in a random model flip under bf16)"),
        });
    }
    Ok(checks)
}

/// Loads a reference model; where its heads or FFN width do not divide by the degree, the load
/// must be refused by name, and that refusal is the check.
fn load_or_refused(files: &ModelFiles, cfg: &CudaConfig, name: &str, checks: &mut Vec<Check>) -> Result<Option<CudaEngine>> {
    match CudaEngine::load(files, cfg) {
        Ok(e) => Ok(Some(e)),
        Err(CudaError::Unsupported(why)) if cfg.tp > 1 && why.contains("do not divide") => {
            checks.push(Check { name: format!("{name}: refused"), passed: true, rel_err: None, tolerance: None, detail: why });
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A group of `tp` GPUs against one GPU on the same weights (every reference model under `dir`):
/// the logits of every prompt position, and greedy continuations. The group sums its ranks'
/// partial products in another order than one GPU's GEMMs do, so the two agree to bf16 rounding,
/// not bit for bit.
pub fn group_against_single(dir: &Path, device: usize, tp: usize) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (model, reference, files) in reference_models_in(dir)? {
        let cfg = |tp| CudaConfig { device, tp, kv_cache_bytes: Some(256 << 20), max_step_tokens: 512, ..Default::default() };
        let Some(group) = load_or_refused(&files, &cfg(tp), &format!("{model} TP={tp} against TP=1"), &mut checks)? else { continue };
        let mut group = PagedEngine::new(group);
        let mut one = PagedEngine::new(CudaEngine::load(&files, &cfg(1))?);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (mut same, mut total) = (0usize, 0usize);
        for (pi, prompt) in reference.prompts.iter().enumerate() {
            let id = 4000 + pi as u64;
            let item = [ForwardItem { seq: id, tokens: prompt.clone(), all_logits: true }];
            for (engine, out) in [(&mut one, &mut a), (&mut group, &mut b)] {
                engine.add_sequence(id, prompt)?;
                let got = engine.forward(&item)?;
                engine.release(id);
                out.extend(got[0].iter().flatten().map(|&x| x as f64));
            }
            let mut runs = Vec::new();
            for engine in [&mut one, &mut group] {
                engine.add_sequence(id, prompt)?;
                let mut next = engine.forward_greedy(&[ForwardItem { seq: id, tokens: prompt.clone(), all_logits: false }])?[0];
                let mut produced = vec![next];
                while produced.len() < 12 {
                    next = engine.forward_greedy(&[ForwardItem { seq: id, tokens: vec![next], all_logits: false }])?[0];
                    produced.push(next);
                }
                engine.release(id);
                runs.push(produced);
            }
            same += runs[0].iter().zip(&runs[1]).take_while(|(x, y)| x == y).count();
            total += runs[0].len();
        }
        let err = rel_err(&b, &a);
        checks.push(Check {
            name: format!("{model} TP={tp} against TP=1: logits and greedy"),
            passed: err <= GROUP_TOLERANCE,
            rel_err: Some(err),
            tolerance: Some(GROUP_TOLERANCE),
            detail: format!("{} logits; {same} of {total} greedy tokens equal before the first difference", a.len()),
        });
    }
    Ok(checks)
}

/// A group against one GPU: both round to bf16 between layers, the sums differ in order only.
pub const GROUP_TOLERANCE: f64 = 1e-2;

/// Greedy tokens of `model` (GGUF or folder) on the GPU and on the CPU engine, for each prompt:
/// the first `must_match` must agree; all `tokens` are reported. The engines do not compute the
/// same function bit for bit (the CPU multiplies GGUF blocks with 8-bit-quantised activations,
/// the GPU dequantised bf16 weights with bf16 activations), so after a near-tie they may part.
pub fn greedy_vs_cpu(model: &str, prompts: &[&str], tokens: usize, must_match: usize, device: usize) -> Result<Vec<Check>> {
    let files = ModelFiles::resolve(model).map_err(|e| CudaError::Engine(e.into()))?;
    let tokenizer = tandem_tokenizer::Tokenizer::load(&files).map_err(|e| CudaError::Engine(e.into()))?;
    let mut cpu = PagedEngine::new(CpuEngine::load(&files, &EngineConfig::default())?);
    let cfg = CudaConfig { device, kv_cache_bytes: Some(512 << 20), max_step_tokens: 1024, ..Default::default() };
    let mut gpu = PagedEngine::new(CudaEngine::load(&files, &cfg)?);
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map(|(i, _)| i as u32).unwrap_or(0);
    let mut checks = Vec::new();
    for (pi, text) in prompts.iter().enumerate() {
        let ids = tokenizer.encode(text).map_err(|e| CudaError::Engine(e.into()))?;
        let id = 500 + pi as u64;
        cpu.add_sequence(id, &ids)?;
        gpu.add_sequence(id, &ids)?;
        let (mut c_tok, mut g_tok) = (Vec::new(), Vec::new());
        let mut c_in = ids.clone();
        let mut g_in = ids.clone();
        for _ in 0..tokens {
            let c = argmax(&cpu.forward(&[ForwardItem { seq: id, tokens: c_in, all_logits: false }])?[0][0]);
            let g = gpu.forward_greedy(&[ForwardItem { seq: id, tokens: g_in, all_logits: false }])?[0];
            c_tok.push(c);
            g_tok.push(g);
            c_in = vec![c];
            g_in = vec![g];
        }
        cpu.release(id);
        gpu.release(id);
        let same = c_tok.iter().zip(&g_tok).take_while(|(a, b)| a == b).count();
        checks.push(Check {
            name: format!("greedy GPU vs CPU: {text:?}"),
            passed: same >= must_match.min(tokens),
            rel_err: None,
            tolerance: None,
            detail: format!("{same} of {tokens} equal (first {must_match} required): cpu {c_tok:?} gpu {g_tok:?}"),
        });
    }
    Ok(checks)
}

/// Log-softmax of one row of logits, in f64.
fn log_softmax(v: &[f32]) -> Vec<f64> {
    let max = v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = max + v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    v.iter().map(|&x| x as f64 - lse).collect()
}

/// The index of the largest logit (the lower index on ties), as the device's argmax.
fn argmax_row(v: &[f32]) -> u32 {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map(|(i, _)| i as u32).unwrap_or(0)
}

/// Most the FP8 model's perplexity may exceed the bf16 model's on the same text
/// ([`fp8_against_bf16`]). A guard against a broken FP8 path (a wrong scale or byte layout
/// moves perplexity many times over), not a claim about quality: E4M3's three mantissa bits
/// cost a 135M-parameter model a few percent (docs/cuda-engine.md has the measured figures).
pub const FP8_PERPLEXITY_RATIO: f64 = 1.10;

/// A configuration measured by [`fp8_against_bf16`]: how the projections and the KV cache are
/// stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Variant {
    pub weights: WeightFormat,
    pub kv: KvDtype,
}

impl Fp8Variant {
    /// FP8 projections; FP8 KV cache; both.
    pub const ALL: [Fp8Variant; 3] = [
        Fp8Variant { weights: WeightFormat::Fp8, kv: KvDtype::Bf16 },
        Fp8Variant { weights: WeightFormat::Bf16, kv: KvDtype::Fp8E4m3 },
        Fp8Variant { weights: WeightFormat::Fp8, kv: KvDtype::Fp8E4m3 },
    ];

    pub fn label(self) -> &'static str {
        match (self.weights, self.kv) {
            (WeightFormat::Fp8, KvDtype::Fp8E4m3) => "FP8 weights and KV cache",
            (WeightFormat::Fp8, _) => "FP8 weights",
            (_, KvDtype::Fp8E4m3) => "FP8 KV cache",
            _ => "bf16",
        }
    }
}

/// A real model with FP8 projections and/or an FP8 KV cache (`variants`) against the same model
/// in bf16, all on this GPU: over `text` (token ids) cut into windows of `window` tokens, each
/// one prefill pass from an empty cache (FP8 GEMMs there multiply E4M3 activations too; the
/// prefill attention reads the keys and values back from the cache), the perplexity of each
/// (the check: the variant's at most [`FP8_PERPLEXITY_RATIO`] times bf16's), and at every
/// position the logits' relative error, the mean KL divergence of the variant's next-token
/// distribution from bf16's and how often their top choices agree; then greedy continuations
/// of `prompts` for `steps` tokens through the decode path, reported as the tokens equal
/// before the first difference.
pub fn fp8_against_bf16(
    model: &str,
    text: &[u32],
    window: usize,
    prompts: &[&str],
    steps: usize,
    device: usize,
    variants: &[Fp8Variant],
) -> Result<Vec<Check>> {
    let files = ModelFiles::resolve(model).map_err(|e| CudaError::Engine(e.into()))?;
    let tokenizer = tandem_tokenizer::Tokenizer::load(&files).map_err(|e| CudaError::Engine(e.into()))?;
    let load = |v: Fp8Variant| -> Result<PagedEngine<CudaEngine>> {
        let cfg = CudaConfig {
            device,
            kv_cache_bytes: Some(512 << 20),
            max_step_tokens: window.max(64),
            weights: Some(v.weights),
            kv_dtype: Some(v.kv),
            ..Default::default()
        };
        Ok(PagedEngine::new(CudaEngine::load(&files, &cfg)?))
    };
    let base = Fp8Variant { weights: WeightFormat::Bf16, kv: KvDtype::Bf16 };
    let mut engines = vec![load(base)?];
    for v in variants {
        engines.push(load(*v)?);
    }
    let windows: Vec<&[u32]> = text.chunks(window).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        return Err(CudaError::Unsupported(format!("a text of {} tokens has no window of 2 or more", text.len())));
    }
    let n = engines.len();
    let (mut nll, mut scored) = (vec![0f64; n], 0usize);
    let (mut diff2, mut ref2, mut kl, mut agree) = (vec![0f64; n], 0f64, vec![0f64; n], vec![0usize; n]);
    let mut positions = 0usize;
    for (wi, w) in windows.iter().enumerate() {
        let mut logits = Vec::with_capacity(n);
        for e in engines.iter_mut() {
            let id = 7000 + wi as u64;
            e.add_sequence(id, w)?;
            let got = e.forward(&[ForwardItem { seq: id, tokens: w.to_vec(), all_logits: true }])?;
            e.release(id);
            logits.push(got.into_iter().next().unwrap_or_default());
        }
        for (j, b) in logits[0].iter().enumerate() {
            let lb = log_softmax(b);
            let next = w.get(j + 1).map(|&t| t as usize);
            if let Some(t) = next {
                nll[0] -= lb[t];
                scored += 1;
            }
            ref2 += b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>();
            positions += 1;
            for vi in 1..n {
                let f = &logits[vi][j];
                let lf = log_softmax(f);
                if let Some(t) = next {
                    nll[vi] -= lf[t];
                }
                kl[vi] += lb.iter().zip(&lf).map(|(p, q)| p.exp() * (p - q)).sum::<f64>();
                agree[vi] += usize::from(argmax_row(b) == argmax_row(f));
                diff2[vi] += f.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>();
            }
        }
    }
    let ppl: Vec<f64> = nll.iter().map(|v| (v / scored as f64).exp()).collect();
    let mut checks = Vec::new();
    for (vi, v) in variants.iter().enumerate().map(|(i, v)| (i + 1, v)) {
        let ratio = ppl[vi] / ppl[0];
        checks.push(Check {
            name: format!("{} against bf16 on {}: perplexity over {} tokens", v.label(), files.name, text.len()),
            passed: ratio.is_finite() && ratio <= FP8_PERPLEXITY_RATIO,
            rel_err: Some((diff2[vi] / ref2.max(1e-300)).sqrt()),
            tolerance: None,
            detail: format!(
                "perplexity bf16 {:.4}, {} {:.4} ({:+.2}%; at most {:+.0}%); {} windows of up to {window} tokens, {scored} scored; \
                 top-1 agreement {:.2}% of {positions} positions; mean KL(bf16‖variant) {:.2e} nats; rel_err = the logits' relative error",
                ppl[0],
                v.label(),
                ppl[vi],
                (ratio - 1.0) * 100.0,
                (FP8_PERPLEXITY_RATIO - 1.0) * 100.0,
                windows.len(),
                100.0 * agree[vi] as f64 / positions as f64,
                kl[vi] / positions as f64
            ),
        });
    }
    for (pi, prompt) in prompts.iter().enumerate() {
        let ids = tokenizer.encode(prompt).map_err(|e| CudaError::Engine(e.into()))?;
        let mut produced = vec![Vec::new(); n];
        for (e, out) in engines.iter_mut().zip(produced.iter_mut()) {
            let id = 8000 + pi as u64;
            e.add_sequence(id, &ids)?;
            let mut input = ids.clone();
            for _ in 0..steps {
                let t = e.forward_greedy(&[ForwardItem { seq: id, tokens: input, all_logits: false }])?[0];
                out.push(t);
                input = vec![t];
            }
            e.release(id);
        }
        let text = |t: &[u32]| tokenizer.decode(t).unwrap_or_default();
        for (vi, v) in variants.iter().enumerate().map(|(i, v)| (i + 1, v)) {
            let same = produced[0].iter().zip(&produced[vi]).take_while(|(a, b)| a == b).count();
            checks.push(Check {
                name: format!("{} against bf16 greedy: {prompt:?}", v.label()),
                passed: true,
                rel_err: None,
                tolerance: None,
                detail: format!(
                    "{same} of {steps} tokens equal before the first difference (reported): bf16 {:?} | {} {:?}",
                    text(&produced[0]),
                    v.label(),
                    text(&produced[vi])
                ),
            });
        }
    }
    Ok(checks)
}

/// The projections' other paths against float64 on random bf16 operands: split-K GEMMs (K cut
/// into slices, partial products summed by `splitk_reduce`, with and without the residual add)
/// and the matrix-vector kernels with the RMSNorm or SiLU·mul in their prologue. Each output is
/// poisoned first.
pub fn projections(gpu: &Gpu) -> Result<Vec<Check>> {
    use crate::device::{split_k_slices, Dt, Prologue};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    fn bf16_vec(rng: &mut rand::rngs::StdRng, len: usize, scale: f32) -> (Vec<u16>, Vec<f64>) {
        (0..len).map(|_| bf16_round(rng.random_range(-scale..scale))).unzip()
    }
    let mut checks = Vec::new();
    // (rows, tokens, depth, f32 output accumulating into a residual)
    for (m, n, k, residual) in
        [(3072usize, 128usize, 2048usize, false), (2048, 128, 8192, true), (1024, 40, 4096, true), (6144, 8, 4096, false)]
    {
        let (w, wf) = bf16_vec(&mut rng, m * k, 0.05);
        let (x, xf) = bf16_vec(&mut rng, n * k, 1.0);
        let base: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 - 3.0).collect();
        let (wb, xb, yb) = (gpu.alloc(m * k * 2)?, gpu.alloc(n * k * 2)?, gpu.alloc(m * n * 4)?);
        gpu.upload(wb.ptr, &w)?;
        gpu.upload(xb.ptr, &x)?;
        let mut out = vec![0f64; m * n];
        if residual {
            gpu.upload(yb.ptr, &base)?;
            gpu.linear(xb.ptr, wb.ptr, yb.ptr, n, m, k, Dt::F32, true)?;
            let mut y = vec![0f32; m * n];
            gpu.download(&mut y, yb.ptr)?;
            out.iter_mut().zip(&y).for_each(|(o, v)| *o = *v as f64);
        } else {
            gpu.upload(yb.ptr, &vec![0xFFFFu16; m * n])?;
            gpu.linear(xb.ptr, wb.ptr, yb.ptr, n, m, k, Dt::Bf16, false)?;
            let mut y = vec![0u16; m * n];
            gpu.download(&mut y, yb.ptr)?;
            out.iter_mut().zip(&y).for_each(|(o, v)| *o = half::bf16::from_bits(*v).to_f64());
        }
        let reference: Vec<f64> = (0..n * m)
            .map(|i| {
                let (t, r) = (i / m, i % m);
                let dot: f64 = (0..k).map(|j| wf[r * k + j] * xf[t * k + j]).sum();
                dot + if residual { base[i] as f64 } else { 0.0 }
            })
            .collect();
        let err = rel_err(&out, &reference);
        let slices = split_k_slices(m, n, k, gpu.sms);
        checks.push(Check {
            name: format!("projection {m}×{k} for {n} tokens{}", if residual { " into the residual" } else { ", bf16 out" }),
            passed: err < ATTENTION_TOLERANCE,
            rel_err: Some(err),
            tolerance: Some(ATTENTION_TOLERANCE),
            detail: format!("{slices} K slice(s) on {} SMs", gpu.sms),
        });
    }
    // Fused matrix-vector kernels: norm (hidden 4096 → 6144 rows, bf16 out) and SiLU·mul (ffn
    // 14336 → 4096 rows into the residual), for one and two tokens.
    for n in 1..=crate::device::GEMV_MAX {
        let (hid, rows) = (4096usize, 6144usize);
        let xres: Vec<f32> = (0..n * hid).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let (nw, nwf) = bf16_vec(&mut rng, hid, 1.5);
        let (w, wf) = bf16_vec(&mut rng, rows * hid, 0.05);
        let (xb, nb, wb, yb) = (gpu.alloc(n * hid * 4)?, gpu.alloc(hid * 2)?, gpu.alloc(rows * hid * 2)?, gpu.alloc(n * rows * 2)?);
        gpu.upload(xb.ptr, &xres)?;
        gpu.upload(nb.ptr, &nw)?;
        gpu.upload(wb.ptr, &w)?;
        gpu.upload(yb.ptr, &vec![0xFFFFu16; n * rows])?;
        let eps = 1e-5f32;
        let ran = gpu.gemv_fused(Prologue::Norm, xb.ptr, nb.ptr, eps, wb.ptr, yb.ptr, n, rows, hid, Dt::Bf16, false)?;
        let mut y = vec![0u16; n * rows];
        gpu.download(&mut y, yb.ptr)?;
        let out: Vec<f64> = y.iter().map(|v| half::bf16::from_bits(*v).to_f64()).collect();
        let mut reference = Vec::with_capacity(n * rows);
        for t in 0..n {
            let xr = &xres[t * hid..(t + 1) * hid];
            let inv = 1.0 / (xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / hid as f64 + eps as f64).sqrt();
            let h: Vec<f64> = xr.iter().zip(&nwf).map(|(v, g)| *v as f64 * inv * g).collect();
            reference.extend((0..rows).map(|r| (0..hid).map(|j| wf[r * hid + j] * h[j]).sum::<f64>()));
        }
        let err = rel_err(&out, &reference);
        checks.push(Check {
            name: format!("matrix-vector with RMSNorm prologue, {n} token(s)"),
            passed: ran && err < ATTENTION_TOLERANCE,
            rel_err: Some(err),
            tolerance: Some(ATTENTION_TOLERANCE),
            detail: if ran { "fused kernel".into() } else { "the fused kernel did not run (TANDEM_CUDA_FUSE=0?)".into() },
        });

        let (ffn, rows) = (14336usize, 4096usize);
        let (gu, guf) = bf16_vec(&mut rng, n * 2 * ffn, 3.0);
        let (w, wf) = bf16_vec(&mut rng, rows * ffn, 0.05);
        let base: Vec<f32> = (0..n * rows).map(|i| (i % 5) as f32 - 2.0).collect();
        let (gb, wb, yb) = (gpu.alloc(n * 2 * ffn * 2)?, gpu.alloc(rows * ffn * 2)?, gpu.alloc(n * rows * 4)?);
        gpu.upload(gb.ptr, &gu)?;
        gpu.upload(wb.ptr, &w)?;
        gpu.upload(yb.ptr, &base)?;
        let ran = gpu.gemv_fused(Prologue::SiluMul, gb.ptr, 0, 0.0, wb.ptr, yb.ptr, n, rows, ffn, Dt::F32, true)?;
        let mut y = vec![0f32; n * rows];
        gpu.download(&mut y, yb.ptr)?;
        let out: Vec<f64> = y.iter().map(|v| *v as f64).collect();
        let mut reference = Vec::with_capacity(n * rows);
        for t in 0..n {
            let g = &guf[t * 2 * ffn..t * 2 * ffn + ffn];
            let u = &guf[t * 2 * ffn + ffn..(t + 1) * 2 * ffn];
            let act: Vec<f64> = g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            reference.extend((0..rows).map(|r| base[t * rows + r] as f64 + (0..ffn).map(|j| wf[r * ffn + j] * act[j]).sum::<f64>()));
        }
        let err = rel_err(&out, &reference);
        checks.push(Check {
            name: format!("matrix-vector with SiLU·mul prologue into the residual, {n} token(s)"),
            passed: ran && err < ATTENTION_TOLERANCE,
            rel_err: Some(err),
            tolerance: Some(ATTENTION_TOLERANCE),
            detail: if ran { "fused kernel".into() } else { "the fused kernel did not run (TANDEM_CUDA_FUSE=0?)".into() },
        });
    }
    Ok(checks)
}

/// FP8 weights against the host: the device quantiser's scales and bytes equal the host's E4M3
/// rounding exactly (rows of very different magnitudes, a row of zeros, values in the
/// subnormal range); the FP8 matrix-vector kernels for 1 to 16 tokens, the mid-sized FP8 GEMM for
/// 17 to 64 (K in one slice and in several), cuBLASLt's FP8 GEMM and the widened cuBLAS path
/// for more, against float64 products of the dequantised weights (and, for
/// the FP8 GEMM, of the inputs rounded to E4M3 per token as the device rounds them). Outputs are
/// poisoned first.
pub fn fp8(gpu: &Gpu) -> Result<Vec<Check>> {
    use crate::device::{Dt, Fp8Gemv, GEMV_FP8_KERNELS, GEMV_FP8_MMA_MAX};
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let mut checks = Vec::new();
    let (rows, cols) = (1536usize, 4096usize);
    // Row r spans ±0.05·2^(r mod 9 − 4); row 7 is all zeros; every 64th weight is tiny, to land
    // in E4M3's subnormals after scaling.
    let w: Vec<u16> = (0..rows * cols)
        .map(|i| {
            let r = i / cols;
            let v = if r == 7 {
                0.0
            } else if i % 64 == 5 {
                rng.random_range(-1e-6f32..1e-6) * 2f32.powi((r % 9) as i32 - 4)
            } else {
                rng.random_range(-0.05f32..0.05) * 2f32.powi((r % 9) as i32 - 4)
            };
            bf16_round(v).0
        })
        .collect();
    let wb = gpu.alloc(rows * cols * 2)?;
    gpu.upload(wb.ptr, &w)?;
    let m = gpu.quantize_fp8(&wb, rows, cols)?;
    let mut q = vec![0u8; rows * cols];
    let mut scale = vec![0f32; rows];
    gpu.download(&mut q, m.data.ptr)?;
    gpu.download(&mut scale, m.scale.as_ref().expect("fp8").ptr)?;
    let (mut bad_scales, mut bad_bytes, mut subnormals) = (0usize, 0usize, 0usize);
    for r in 0..rows {
        let row: Vec<f32> = w[r * cols..(r + 1) * cols].iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let want = row_scale(amax);
        if scale[r] != want {
            bad_scales += 1;
        }
        for (j, v) in row.iter().enumerate() {
            let code = q[r * cols + j];
            subnormals += usize::from(code & 0x78 == 0 && code & 7 != 0);
            if code != f32_to_e4m3(v / scale[r]) {
                bad_bytes += 1;
            }
        }
    }
    checks.push(Check {
        name: format!("FP8 quantisation of {rows}×{cols} bf16 weights"),
        passed: bad_scales == 0 && bad_bytes == 0 && subnormals > 0,
        rel_err: None,
        tolerance: None,
        detail: format!("{bad_scales} scales and {bad_bytes} bytes differ from the host's rounding; {subnormals} subnormal codes"),
    });
    let wf: Vec<f64> = (0..rows * cols).map(|i| e4m3_to_f32(q[i]) as f64 * scale[i / cols] as f64).collect();
    gpu.reserve_fp8_inputs(96, cols)?;
    // 1–8 tokens: the CUDA-core FP8 matrix-vector kernel; 1–16: the tensor-core one; the
    // mid-sized GEMM for 17 to 64 tokens with K in one slice, the chosen count (8 for this
    // matrix's 24 row blocks) and two; 65 and 96 as `project` runs them (cuBLASLt's FP8 GEMM
    // where the library has it); 40 widened to bf16.
    #[derive(Clone, Copy, PartialEq)]
    enum Path {
        Kernel(Fp8Gemv),
        Mid(Option<usize>),
        Project,
        Widened,
    }
    let cases = (1..=GEMV_FP8_KERNELS)
        .map(|n| (n, Path::Kernel(Fp8Gemv::Simt)))
        .chain((1..=GEMV_FP8_MMA_MAX).map(|n| (n, Path::Kernel(Fp8Gemv::Mma))))
        .chain([(17, None), (24, Some(1)), (32, Some(2)), (33, None), (50, Some(1)), (64, None)].map(|(n, s)| (n, Path::Mid(s))))
        .chain([(17, Path::Project), (40, Path::Widened), (65, Path::Project), (96, Path::Project)]);
    for (n, kind) in cases {
        let x: Vec<(u16, f64)> = (0..n * cols).map(|_| bf16_round(rng.random_range(-1.0f32..1.0))).collect();
        let (xh, mut xf): (Vec<u16>, Vec<f64>) = x.into_iter().unzip();
        let path = match kind {
            Path::Kernel(Fp8Gemv::Simt) => "FP8 matrix-vector kernel (CUDA cores)",
            Path::Kernel(Fp8Gemv::Mma) => "FP8 matrix-vector kernel (tensor cores)",
            Path::Mid(_) => "mid-sized FP8 GEMM",
            Path::Widened => "widened to bf16, cuBLAS",
            Path::Project => gpu.fp8_path(&m, n, if n % 2 == 0 { Dt::F32 } else { Dt::Bf16 })?,
        };
        if path == "cuBLASLt FP8" {
            // The GEMM multiplies E4M3 inputs: the reference takes them rounded as the device
            // does, one scale per token.
            for row in xf.chunks_mut(cols) {
                let amax = row.iter().fold(0f64, |a, v| a.max(v.abs())) as f32;
                let s = row_scale(amax);
                row.iter_mut().for_each(|v| *v = e4m3_to_f32(f32_to_e4m3(*v as f32 / s)) as f64 * s as f64);
            }
        }
        let base: Vec<f32> = (0..n * rows).map(|i| (i % 7) as f32 - 3.0).collect();
        let (xb, yb) = (gpu.alloc(n * cols * 2)?, gpu.alloc(n * rows * 4)?);
        gpu.upload(xb.ptr, &xh)?;
        // Even token counts add into a residual (f32), odd ones write bf16.
        let residual = n % 2 == 0;
        let sc = m.scale.as_ref().expect("fp8");
        let run = |out: Dt| match kind {
            Path::Kernel(k) => gpu.gemv_fp8_on(k, xb.ptr, &m, yb.ptr, n, out, residual),
            Path::Mid(s) => gpu.gemm_fp8_mid(xb.ptr, &m, yb.ptr, n, out, residual, s),
            Path::Widened => gpu.gemm_widened(xb.ptr, &m, sc, yb.ptr, n, out, residual),
            Path::Project => gpu.project(xb.ptr, &m, yb.ptr, n, out, residual),
        };
        let out: Vec<f64> = if residual {
            gpu.upload(yb.ptr, &base)?;
            run(Dt::F32)?;
            let mut y = vec![0f32; n * rows];
            gpu.download(&mut y, yb.ptr)?;
            y.iter().map(|v| *v as f64).collect()
        } else {
            gpu.upload(yb.ptr, &vec![0xFFFFu16; n * rows])?;
            run(Dt::Bf16)?;
            let mut y = vec![0u16; n * rows];
            gpu.download(&mut y, yb.ptr)?;
            y.iter().map(|v| half::bf16::from_bits(*v).to_f64()).collect()
        };
        let reference: Vec<f64> = (0..n * rows)
            .map(|i| {
                let (t, r) = (i / rows, i % rows);
                let dot: f64 = (0..cols).map(|j| wf[r * cols + j] * xf[t * cols + j]).sum();
                dot + if residual { base[i] as f64 } else { 0.0 }
            })
            .collect();
        let err = rel_err(&out, &reference);
        checks.push(Check {
            name: format!(
                "FP8 projection {rows}×{cols} for {n} token(s){}{}",
                if residual { " into the residual" } else { ", bf16 out" },
                match kind {
                    Path::Kernel(Fp8Gemv::Simt) => ", CUDA-core kernel".to_string(),
                    Path::Kernel(Fp8Gemv::Mma) => ", tensor-core kernel".to_string(),
                    Path::Mid(Some(s)) => format!(", mid-sized GEMM, {s} K slice(s)"),
                    Path::Mid(None) => format!(
                        ", mid-sized GEMM, {} K slices",
                        crate::device::fp8_mid_splits(
                            crate::device::Fp8Mid::from_env()?.for_shape(rows, cols, n).block_rows(n),
                            rows,
                            cols,
                            n,
                            gpu.sms
                        )
                    ),
                    Path::Project | Path::Widened => String::new(),
                }
            ),
            passed: err < ATTENTION_TOLERANCE,
            rel_err: Some(err),
            tolerance: Some(ATTENTION_TOLERANCE),
            detail: path.into(),
        });
    }
    Ok(checks)
}

/// The device samplers: greedy and top-k = 1 equal the host's argmax; tokens drawn with
/// temperature, top-k and top-p stay inside the kept set and follow its distribution (total
/// variation under 0.06 over 4,096 draws); the same seed and counter draw the same token.
pub fn sampling(gpu: &Gpu) -> Result<Vec<Check>> {
    let vocab = 1000usize;
    let rows = 4096usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let base: Vec<f32> = (0..vocab).map(|_| rng.random_range(-4.0f32..4.0)).collect();
    let mut logits = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        if r < 8 {
            // Distinct rows for the greedy cases.
            logits.extend((0..vocab).map(|_| rng.random_range(-4.0f32..4.0)));
        } else {
            logits.extend_from_slice(&base);
        }
    }
    let (temp, top_k, top_p) = (0.7f32, 20usize, 0.9f32);
    let params_for = |r: usize, seed: u64| -> [f32; 8] {
        let (t, k, p) = match r {
            0..=3 => (0.0, 0, 1.0),
            4..=7 => (1.0, 1, 1.0),
            _ => (temp, top_k, top_p),
        };
        [t, p, 0.0, k as f32, f32::from_bits(seed as u32), f32::from_bits((seed >> 32) as u32), f32::from_bits(r as u32), 0.0]
    };
    let logits_buf = gpu.alloc(rows * vocab * 4)?;
    gpu.upload(logits_buf.ptr, &logits)?;
    let params_buf = gpu.alloc(rows * 8 * 4)?;
    let out_buf = gpu.alloc(rows * 4)?;
    let draw = |seed: u64| -> Result<Vec<i32>> {
        let params: Vec<f32> = (0..rows).flat_map(|r| params_for(r, seed)).collect();
        gpu.upload(params_buf.ptr, &params)?;
        let v = vocab as i32;
        gpu.launch(&gpu.k.sample, (rows as u32, 1, 1), 1024, 0, &[&logits_buf.ptr, &v, &params_buf.ptr, &out_buf.ptr])?;
        let mut out = vec![0i32; rows];
        gpu.download(&mut out, out_buf.ptr)?;
        Ok(out)
    };
    let first = draw(42)?;
    let again = draw(42)?;
    let other = draw(43)?;
    let mut checks = Vec::new();
    let argmax =
        |row: &[f32]| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map(|(i, _)| i as i32).unwrap_or(0);
    let greedy_ok = (0..8).all(|r| first[r] == argmax(&logits[r * vocab..(r + 1) * vocab]));
    checks.push(Check {
        name: "sampling: temperature 0 and top-k 1 pick the argmax".into(),
        passed: greedy_ok,
        rel_err: None,
        tolerance: None,
        detail: format!("{:?}", &first[..8]),
    });
    // The kept set and its probabilities, on the host.
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| base[b].total_cmp(&base[a]));
    let top: Vec<usize> = order[..top_k].to_vec();
    let mx = base[top[0]];
    let w: Vec<f64> = top.iter().map(|&i| (((base[i] - mx) / temp) as f64).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (i, &t) in top.iter().enumerate() {
        kept.push(t);
        mass += w[i];
        if mass >= top_p as f64 * total {
            break;
        }
    }
    let kept_mass: f64 = w[..kept.len()].iter().sum();
    let draws = &first[8..];
    let outside = draws.iter().filter(|&&t| !kept.contains(&(t as usize))).count();
    let mut tv = 0.0;
    for (i, &t) in kept.iter().enumerate() {
        let expected = w[i] / kept_mass;
        let seen = draws.iter().filter(|&&d| d as usize == t).count() as f64 / draws.len() as f64;
        tv += (expected - seen).abs();
    }
    tv = 0.5 * (tv + outside as f64 / draws.len() as f64);
    checks.push(Check {
        name: format!("sampling: T={temp} top-k {top_k} top-p {top_p}, {} draws", draws.len()),
        passed: outside == 0 && tv < 0.06,
        rel_err: Some(tv),
        tolerance: Some(0.06),
        detail: format!("{} tokens kept, {outside} drawn outside them, total variation {tv:.3}", kept.len()),
    });
    let differing = first.iter().zip(&other).skip(8).filter(|(a, b)| a != b).count();
    checks.push(Check {
        name: "sampling: a seed and counter fix the draw".into(),
        passed: first == again && differing > 0,
        rel_err: None,
        tolerance: None,
        detail: format!("same seed identical: {}; another seed changed {differing} of {} draws", first == again, rows - 8),
    });
    Ok(checks)
}

/// The device checksum kernel against [`tandem_protocol::device_checksum`] on random blocks of
/// several sizes (a tail of words short of a full pass of the threads included) at scattered
/// offsets, and one flipped bit that must change its block's sum and no other.
pub fn block_checksums(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut out = Vec::new();
    for block_bytes in [8usize, 4096, 8 * 1023, 512 * 1024 + 8 * 77] {
        let blocks = 9usize;
        let pool: Vec<u8> = (0..block_bytes * (blocks + 3)).map(|_| rng.random()).collect();
        let buf = gpu.alloc(pool.len())?;
        gpu.upload(buf.ptr, &pool)?;
        let offsets: Vec<u64> = [3usize, 0, 7, 1, 11, 2, 9, 4, 5].iter().take(blocks).map(|&b| (b * block_bytes) as u64).collect();
        let want: Vec<u64> =
            offsets.iter().map(|&o| tandem_protocol::device_checksum(&pool[o as usize..o as usize + block_bytes])).collect();
        let got = gpu.block_checksums(buf.ptr, &offsets, block_bytes)?;
        // One bit of the block at offsets[2] flipped on the device.
        let at = offsets[2] as usize + block_bytes / 2;
        gpu.upload(buf.ptr + at as u64, &[pool[at] ^ 0x10])?;
        let flipped = gpu.block_checksums(buf.ptr, &offsets, block_bytes)?;
        let changed: Vec<usize> = (0..blocks).filter(|&i| flipped[i] != got[i]).collect();
        let passed = got == want && changed == vec![2];
        out.push(Check {
            name: format!("block checksums, {block_bytes}-byte blocks"),
            passed,
            rel_err: None,
            tolerance: None,
            detail: format!(
                "{} of {blocks} equal to the host's; a flipped bit changed blocks {changed:?}",
                got.iter().zip(&want).filter(|(a, b)| a == b).count()
            ),
        });
    }
    Ok(out)
}
