//! `tandem bench cpu`: prefill and decode speed of the CPU engine on one model, measured the way
//! llama.cpp's `llama-bench` measures its `pp` and `tg` tests: a prompt of random tokens computed
//! in one forward pass, then tokens generated one at a time, each repetition on a fresh sequence.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tandem_engine::{ForwardItem, PagedEngine, SeqId};
use tandem_tokenizer::ModelFiles;

use crate::default_model;

#[derive(Debug, Clone, Args)]
pub struct CpuArgs {
    /// Model (`.gguf`, folder or hub id); the embedded default when omitted.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,
    /// Prompt tokens computed in one prefill pass.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Tokens generated one at a time after the prompt.
    #[arg(long, default_value_t = 128)]
    pub gen: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Sequences prefilled in one pass and then decoded together, one token each per step
    /// (the rates count every sequence's tokens).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tensor-parallel degree of the engine (ranks as threads).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Element type of the KV cache (`f16` or `f32`).
    #[arg(long, env = "TANDEM_KV_DTYPE", default_value = "f16")]
    pub kv_dtype: tandem_protocol::KvDtype,
    /// Write the JSON result here.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct CpuResult {
    pub engine: String,
    pub model: String,
    pub threads: usize,
    pub tp: usize,
    pub kv_dtype: tandem_protocol::KvDtype,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen: usize,
    pub reps: usize,
    /// Prompt tokens per second, mean over the repetitions.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second, mean over the repetitions.
    pub decode_tokens_per_s: f64,
    pub prefill_ms: Vec<f64>,
    pub decode_ms: Vec<f64>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

pub fn run(args: &CpuArgs) -> Result<()> {
    ensure!(
        args.prompt_len > 0 && args.gen > 0 && args.reps > 0 && args.batch > 0,
        "--prompt-len, --gen, --reps and --batch must be positive"
    );
    let spec = default_model::resolve_spec(args.model.as_deref())?;
    let files = ModelFiles::resolve(&spec)?;
    let mut engine = PagedEngine::from_box(
        crate::serve::open_engine(
            &files,
            tandem_runtime::Device::Cpu,
            &crate::serve::Sizing { tp: args.tp, kv_dtype: args.kv_dtype, ..Default::default() },
            &tandem_engine::BatcherConfig::default(),
        )
        .context("loading the model")?,
    );
    let vocab = engine.info().vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut prefill_ms, mut decode_ms) = (Vec::new(), Vec::new());
    let b = args.batch;
    for rep in 0..=args.reps {
        // Fresh random tokens each time, so no repetition reuses an earlier one's cached blocks.
        let seqs: Vec<SeqId> = (0..b).map(|i| (rep * b + i) as u64).collect();
        let prompts: Vec<Vec<u32>> = seqs.iter().map(|_| (0..args.prompt_len).map(|_| rng.random_range(0..vocab)).collect()).collect();
        for (seq, prompt) in seqs.iter().zip(&prompts) {
            engine.add_sequence(*seq, prompt)?;
        }
        let t = Instant::now();
        let mut next = step(&mut engine, &seqs, prompts)?;
        let prefill = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        for _ in 0..args.gen {
            next = step(&mut engine, &seqs, next.into_iter().map(|t| vec![t]).collect())?;
        }
        let decode = t.elapsed().as_secs_f64() * 1e3;
        for seq in seqs {
            engine.release(seq);
        }
        eprintln!("rep {rep}{}: prefill {prefill:.1} ms, decode {decode:.1} ms", if rep == 0 { " (warm-up)" } else { "" });
        if rep > 0 {
            prefill_ms.push(prefill);
            decode_ms.push(decode);
        }
    }
    let result = CpuResult {
        engine: "tandem (CPU engine)".into(),
        model: files.name.clone(),
        threads: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        tp: args.tp,
        kv_dtype: args.kv_dtype,
        batch: b,
        prompt_len: args.prompt_len,
        gen: args.gen,
        reps: args.reps,
        prefill_tokens_per_s: (b * args.prompt_len) as f64 / (mean(&prefill_ms) / 1e3),
        decode_tokens_per_s: (b * args.gen) as f64 / (mean(&decode_ms) / 1e3),
        prefill_ms,
        decode_ms,
    };
    let json = serde_json::to_string_pretty(&result)?;
    if let Some(path) = &args.output {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}

/// One forward pass of each sequence's `tokens`; each sequence's greedy next token.
fn step(engine: &mut PagedEngine, seqs: &[SeqId], tokens: Vec<Vec<u32>>) -> Result<Vec<u32>> {
    let items: Vec<ForwardItem> = seqs.iter().zip(tokens).map(|(&seq, tokens)| ForwardItem { seq, tokens, all_logits: false }).collect();
    let logits = engine.forward(&items)?;
    ensure!(logits.len() == seqs.len(), "the engine returned logits for {} of {} sequences", logits.len(), seqs.len());
    logits
        .iter()
        .map(|l| {
            let last = l.last().context("the engine returned no logits")?;
            last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).context("empty logits")
        })
        .collect()
}
