//! `tandem bench constraint`: what structured output costs per token, on the CPU or a GPU. The
//! same requests (a nested JSON schema, temperature 1, one seed each) run through the batcher
//! twice in one run: constrained, and unconstrained for the same number of tokens. Then the
//! constrained outputs are replayed through the grammar alone, on the model's whole vocabulary,
//! to time the mask and the advance per token without the model around them. Last, a greedy
//! batch: all plain, then with some constrained sequences among them, their masks applied by the
//! engine (on a GPU, beside the logits, computed while the layers run), for comparison the same
//! with the masks computed before the pass is launched, and on the host (every row's logits
//! brought back), to see what constrained sequences cost the others.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::json;
use tandem_engine::kv::{BlockId, SeqTable};
use tandem_engine::{Batcher, BatcherConfig, Engine, EngineInfo, Event, ForwardItem, Mode, NewRequest};
use tandem_protocol::{Constraint, SamplingParams};
use tandem_tokenizer::{ChatMessage, ModelFiles, Tokenizer};

use crate::default_model;

#[derive(Debug, Clone, Args)]
pub struct ConstraintArgs {
    /// Model (`.gguf`, folder or hub id); the embedded default when omitted.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,
    /// Requests (seeds) per variant.
    #[arg(long, default_value_t = 8)]
    pub requests: usize,
    /// Where the engine runs: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: tandem_runtime::Device,
    /// Sequences in the greedy batch (0: skip it).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens each sequence of the greedy batch generates.
    #[arg(long, default_value_t = 64)]
    pub batch_tokens: usize,
    /// Constrained sequences among the greedy batch's.
    #[arg(long, default_value_t = 1)]
    pub constrained: usize,
    /// Write the JSON result here.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct ConstraintResult {
    benchmark: &'static str,
    machine: String,
    model: String,
    vocab: usize,
    requests: usize,
    /// Building the compiler for the vocabulary, once per worker.
    compiler_build_ms: f64,
    /// Compiling the schema, once per request (median).
    compile_ms_p50: f64,
    tokens: usize,
    /// Decode tokens per second through the batcher, one request at a time.
    constrained_tokens_per_s: f64,
    unconstrained_tokens_per_s: f64,
    /// Mask (computed and applied to the logits) plus advance, per token, on the grammar alone.
    grammar_us_per_token_p50: f64,
    grammar_us_per_token_p99: f64,
    grammar_us_per_token_mean: f64,
    /// Every constrained output parsed as JSON.
    all_outputs_parse: bool,
    /// The greedy batch, decode tokens per second of the whole batch (`None`: skipped).
    batch: Option<BatchResult>,
}

#[derive(Debug, Serialize)]
struct BatchResult {
    sequences: usize,
    tokens_per_sequence: usize,
    /// How many of the sequences are constrained.
    constrained_sequences: usize,
    /// Whether the engine applies masks beside its logits (a GPU) or the batcher on the host.
    engine_masks: bool,
    all_plain_tokens_per_s: f64,
    /// Constrained sequences among them, masked where the engine masks, the masks computed
    /// while the pass's layers run.
    constrained_tokens_per_s: f64,
    /// The same, with the masks computed before the pass is launched (no overlap).
    constrained_masks_first_tokens_per_s: f64,
    /// Masked on the host: every row's logits come back.
    constrained_host_mask_tokens_per_s: f64,
    /// The first constrained sequence drew the same tokens on every path.
    constrained_tokens_equal: bool,
}

/// How the benchmark's baselines mask a constrained sequence.
#[derive(Clone, Copy, PartialEq)]
enum Baseline {
    /// As an engine without masks beside its logits: a batch with a constrained sequence brings
    /// every row's logits to the host, where the batcher masks them.
    HostMasks,
    /// The engine's own masking, with the masks computed before its pass is launched, as a
    /// batcher without the overlap would.
    MasksFirst,
}

/// An engine run as one of the [`Baseline`]s the overlapped path is measured against.
struct BaselineEngine(Box<dyn Engine>, Baseline);

impl Engine for BaselineEngine {
    fn info(&self) -> &EngineInfo {
        self.0.info()
    }
    fn forward(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> tandem_engine::Result<Vec<Vec<Vec<f32>>>> {
        self.0.forward(seqs, items)
    }
    fn forward_argmax(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> Option<tandem_engine::Result<Vec<u32>>> {
        self.0.forward_argmax(seqs, items)
    }
    fn forward_argmax_masked(
        &mut self,
        seqs: &mut SeqTable,
        items: &[ForwardItem],
        masks: tandem_engine::MaskSource<'_>,
    ) -> Option<tandem_engine::Result<Vec<u32>>> {
        if self.1 == Baseline::HostMasks {
            return None;
        }
        let mut ready = Some(masks());
        self.0.forward_argmax_masked(seqs, items, &mut || ready.take().unwrap_or_default())
    }
    fn masks_on_device(&self) -> bool {
        self.1 == Baseline::MasksFirst && self.0.masks_on_device()
    }
    fn read_blocks(&self, blocks: &[BlockId]) -> tandem_engine::Result<Vec<tandem_protocol::Bytes>> {
        self.0.read_blocks(blocks)
    }
    fn write_blocks(&mut self, writes: &[(BlockId, &[u8])]) -> tandem_engine::Result<()> {
        self.0.write_blocks(writes)
    }
}

/// Decode tokens per second of `requests` run together, from the step where every one has its
/// first token to the end; and the tokens of the first request.
fn batch_rate(batcher: &mut Batcher, requests: Vec<NewRequest>) -> Result<(f64, Vec<u32>)> {
    let n = requests.len();
    let first_id = requests.first().map(|r| r.id);
    let mut first = Vec::new();
    let mut started = std::collections::HashSet::new();
    let (mut done, mut tokens, mut since) = (0, 0usize, None::<Instant>);
    for r in requests {
        batcher.add(r);
    }
    while done < n {
        for event in batcher.step() {
            match event {
                Event::Token { id, token, .. } => {
                    if since.is_some() {
                        tokens += 1;
                    }
                    if Some(id) == first_id {
                        first.push(token);
                    }
                    started.insert(id);
                }
                Event::Finished { .. } => done += 1,
                Event::Failed { error, .. } => bail!("request failed: {error}"),
                Event::Prefilled { .. } | Event::PromptLogprobs { .. } => {}
            }
        }
        if since.is_none() && started.len() == n {
            since = Some(Instant::now());
        }
    }
    Ok((tokens as f64 / since.map_or(f64::NAN, |s| s.elapsed().as_secs_f64()), first))
}

fn schema() -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "member": {"type": "boolean"},
            "role": {"enum": ["admin", "user", "guest"]},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}, "postcode": {"type": "integer", "minimum": 0, "maximum": 99999}},
                "required": ["city", "postcode"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "member", "role", "address"],
        "additionalProperties": false
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs `req` alone to its end; its tokens and the seconds from first to last token.
fn run_one(batcher: &mut Batcher, req: NewRequest) -> Result<(Vec<u32>, f64)> {
    batcher.add(req);
    let (mut tokens, mut first) = (Vec::new(), None);
    loop {
        for event in batcher.step() {
            match event {
                Event::Token { token, .. } => {
                    first.get_or_insert_with(Instant::now);
                    tokens.push(token);
                }
                Event::Finished { .. } => {
                    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or_default();
                    return Ok((tokens, secs));
                }
                Event::Failed { error, .. } => bail!("request failed: {error}"),
                Event::Prefilled { .. } | Event::PromptLogprobs { .. } => {}
            }
        }
    }
}

pub fn run(args: &ConstraintArgs) -> Result<()> {
    let spec = default_model::resolve_spec(args.model.as_deref())?;
    let files = ModelFiles::resolve(&spec)?;
    let tokenizer = Tokenizer::load(&files)?;
    let limits = BatcherConfig::default();
    let open = || crate::serve::open_engine(&files, args.device, &crate::serve::Sizing::default(), &limits).context("loading the model");
    let engine = open()?;
    let vocab = engine.info().vocab_size;
    let t = Instant::now();
    let compiler = crate::serve::constraints(&files, vocab)?;
    let compiler_build_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut batcher = Batcher::new(engine, BatcherConfig::default());
    let prompt = tokenizer
        .encode_chat(&[ChatMessage::new("user", "Describe a made-up person as JSON.".to_string())])
        .or_else(|_| tokenizer.encode("Describe a made-up person as JSON:\n"))?;
    let constraint = Constraint::JsonSchema { schema: schema() };
    let request = |id: u64, seed: u64, max_tokens: usize, grammar: Option<tandem_engine::Grammar>| NewRequest {
        id,
        prompt: prompt.clone(),
        params: SamplingParams { temperature: 1.0, max_tokens, ignore_eos: grammar.is_none(), ..SamplingParams::default() },
        seed,
        eos_ids: tokenizer.eos_ids().to_vec(),
        mode: Mode::Full,
        resumed: Vec::new(),
        grammar,
    };

    let (mut compile_ms, mut outputs, mut constrained_secs, mut unconstrained_secs, mut tokens) = (Vec::new(), Vec::new(), 0.0, 0.0, 0);
    let mut all_parse = true;
    for i in 0..args.requests {
        let t = Instant::now();
        let grammar = compiler.compile(&constraint, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
        compile_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let (out, secs) = run_one(&mut batcher, request(2 * i as u64 + 1, i as u64, 256, Some(grammar)))?;
        let text = tokenizer.decode(&out)?;
        all_parse &= serde_json::from_str::<serde_json::Value>(&text).is_ok();
        // The same number of tokens, unconstrained (the first token is the prefill's in both).
        let (plain, plain_secs) = run_one(&mut batcher, request(2 * i as u64 + 2, i as u64, out.len(), None))?;
        eprintln!(
            "request {i}: {} tokens constrained in {secs:.3} s, {} unconstrained in {plain_secs:.3} s: {text}",
            out.len(),
            plain.len()
        );
        tokens += out.len().saturating_sub(1);
        constrained_secs += secs;
        unconstrained_secs += plain_secs;
        outputs.push(out);
    }

    // The grammar alone, replaying each constrained output over full-vocabulary logits.
    let mut per_token = Vec::new();
    let mut logits = vec![0.0f32; vocab];
    for out in &outputs {
        let mut g = compiler.compile(&constraint, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
        for &token in out {
            logits.iter_mut().for_each(|l| *l = 0.0);
            let t = Instant::now();
            g.mask(&mut logits).map_err(anyhow::Error::msg)?;
            g.advance(token).map_err(anyhow::Error::msg)?;
            per_token.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    per_token.sort_by(f64::total_cmp);
    compile_ms.sort_by(f64::total_cmp);

    // The greedy batch: all plain; some constrained with the engine's masks (overlapped, then
    // computed first); the same on the host.
    let batch = if args.batch > 0 {
        let engine_masks = batcher.engine().masks_on_device();
        let greedy = |id: u64, grammar: Option<tandem_engine::Grammar>| NewRequest {
            id,
            prompt: prompt.clone(),
            params: SamplingParams { ignore_eos: grammar.is_none(), ..SamplingParams::greedy(args.batch_tokens) },
            seed: 0,
            eos_ids: tokenizer.eos_ids().to_vec(),
            mode: Mode::Full,
            resumed: Vec::new(),
            grammar,
        };
        let mut next_id = 1_000_000u64;
        let mut set = |constrained: bool| -> Result<Vec<NewRequest>> {
            (0..args.batch)
                .map(|i| {
                    next_id += 1;
                    let g = if constrained && i < args.constrained {
                        Some(compiler.compile(&constraint, &[]).map_err(|e| anyhow::anyhow!("{e}"))?)
                    } else {
                        None
                    };
                    Ok(greedy(next_id, g))
                })
                .collect()
        };
        let (all_plain, _) = batch_rate(&mut batcher, set(false)?)?;
        batch_rate(&mut batcher, set(true)?)?;
        let (constrained, engine_tokens) = batch_rate(&mut batcher, set(true)?)?;
        // One engine at a time (a GPU engine takes most of the device's memory). The first run
        // of a shape warms it up (a GPU captures its graphs then).
        drop(batcher);
        let mut first = Batcher::new(Box::new(BaselineEngine(open()?, Baseline::MasksFirst)), limits.clone());
        batch_rate(&mut first, set(true)?)?;
        let (masks_first, first_tokens) = batch_rate(&mut first, set(true)?)?;
        drop(first);
        let mut host = Batcher::new(Box::new(BaselineEngine(open()?, Baseline::HostMasks)), limits.clone());
        batch_rate(&mut host, set(true)?)?;
        let (host_mask, host_tokens) = batch_rate(&mut host, set(true)?)?;
        eprintln!(
            "greedy batch of {} ({} constrained): {all_plain:.1} tok/s plain, {constrained:.1} constrained ({}), {masks_first:.1} with masks before the pass, {host_mask:.1} masked on the host",
            args.batch,
            args.constrained,
            if engine_masks { "masked by the engine" } else { "masked on the host" }
        );
        Some(BatchResult {
            sequences: args.batch,
            tokens_per_sequence: args.batch_tokens,
            constrained_sequences: args.constrained.min(args.batch),
            engine_masks,
            all_plain_tokens_per_s: all_plain,
            constrained_tokens_per_s: constrained,
            constrained_masks_first_tokens_per_s: masks_first,
            constrained_host_mask_tokens_per_s: host_mask,
            constrained_tokens_equal: engine_tokens == host_tokens && engine_tokens == first_tokens,
        })
    } else {
        None
    };
    let result = ConstraintResult {
        benchmark: "structured output cost per token (tandem bench constraint)",
        machine: super::machine(),
        model: files.name.clone(),
        vocab,
        requests: args.requests,
        compiler_build_ms,
        compile_ms_p50: percentile(&compile_ms, 0.5),
        tokens,
        constrained_tokens_per_s: tokens as f64 / constrained_secs,
        unconstrained_tokens_per_s: tokens as f64 / unconstrained_secs,
        grammar_us_per_token_p50: percentile(&per_token, 0.5),
        grammar_us_per_token_p99: percentile(&per_token, 0.99),
        grammar_us_per_token_mean: per_token.iter().sum::<f64>() / per_token.len() as f64,
        all_outputs_parse: all_parse,
        batch,
    };
    let json = serde_json::to_string_pretty(&result)?;
    if let Some(path) = &args.output {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}
