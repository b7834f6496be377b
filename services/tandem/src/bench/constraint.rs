//! `tandem bench constraint`: what structured output costs per token on the CPU engine. The same
//! requests (a nested JSON schema, temperature 1, one seed each) run through the batcher twice in
//! one run: constrained, and unconstrained for the same number of tokens. Then the constrained
//! outputs are replayed through the grammar alone, on the model's whole vocabulary, to time the
//! mask and the advance per token without the model around them.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::json;
use tandem_engine::{Batcher, BatcherConfig, Event, Mode, NewRequest};
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
    let engine =
        crate::serve::open_engine(&files, tandem_runtime::Device::Cpu, &crate::serve::Sizing::default(), &BatcherConfig::default())
            .context("loading the model")?;
    let vocab = engine.info().vocab_size;
    let t = Instant::now();
    let compiler = crate::serve::constraints(&files, vocab)?;
    let compiler_build_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut batcher = Batcher::new(engine, BatcherConfig::default());
    let prompt = tokenizer.encode_chat(&[ChatMessage::new("user", "Describe a made-up person as JSON.".to_string())])?;
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
    };
    let json = serde_json::to_string_pretty(&result)?;
    if let Some(path) = &args.output {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}
