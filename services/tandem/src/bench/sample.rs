//! `tandem bench sample`: what one sampled token costs on the host, on the default model's
//! logits, against the sort of the whole vocabulary a draw used to start with.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use tandem_engine::sampling::{sample, top_n, SampleContext};
use tandem_engine::{ForwardItem, PagedEngine};
use tandem_protocol::SamplingParams;
use tandem_tokenizer::{ChatMessage, ModelFiles, Tokenizer};

use crate::default_model;

#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// Model (`.gguf`, folder or hub id); the embedded default when omitted.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,
    /// Timed draws per setting.
    #[arg(long, default_value_t = 200)]
    pub draws: usize,
    /// Write the JSON result here.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    setting: String,
    ms_per_draw: f64,
}

#[derive(Debug, Serialize)]
struct SampleResult {
    model: String,
    vocab: usize,
    draws: usize,
    rows: Vec<Row>,
}

pub fn run(args: &SampleArgs) -> Result<()> {
    let spec = default_model::resolve_spec(args.model.as_deref())?;
    let files = ModelFiles::resolve(&spec)?;
    let tokenizer = Tokenizer::load(&files)?;
    let mut engine = PagedEngine::from_box(
        crate::serve::open_engine(
            &files,
            tandem_runtime::Device::Cpu,
            &crate::serve::Sizing::default(),
            &tandem_engine::BatcherConfig::default(),
        )
        .context("loading the model")?,
    );
    // The logits after a real prompt: their shape (a few likely tokens, a long tail) is what
    // the cuts meet in serving.
    let prompt = tokenizer.encode_chat(&[ChatMessage::new("user", "Write a short story about a lighthouse.")])?;
    engine.add_sequence(1, &prompt)?;
    let logits = engine.forward(&[ForwardItem { seq: 1, tokens: prompt, all_logits: false }])?.remove(0).remove(0);
    let time = |f: &mut dyn FnMut(u64)| {
        let t = Instant::now();
        for seed in 0..args.draws as u64 {
            f(seed);
        }
        t.elapsed().as_secs_f64() * 1e3 / args.draws as f64
    };
    let mut rows = Vec::new();
    let settings = [
        ("temperature 1 (no cut)", SamplingParams { temperature: 1.0, ..Default::default() }),
        ("temperature 1, top_p 0.95", SamplingParams { temperature: 1.0, top_p: 0.95, ..Default::default() }),
        ("temperature 1, min_p 0.05", SamplingParams { temperature: 1.0, min_p: 0.05, ..Default::default() }),
        ("temperature 1, top_k 50", SamplingParams { temperature: 1.0, top_k: 50, ..Default::default() }),
    ];
    for (name, p) in settings {
        let ms = time(&mut |seed| {
            let ctx = SampleContext { prompt: &[], output: &[], seed, suppress: &[] };
            std::hint::black_box(sample(logits.clone(), &p, &ctx));
        });
        rows.push(Row { setting: name.into(), ms_per_draw: ms });
    }
    // The baseline: every candidate sorted by logit before a draw walks them (the engine's own
    // sort, as a draw without top-k used to call it).
    let ms = time(&mut |_| {
        std::hint::black_box(top_n(&logits, logits.len()));
    });
    rows.push(Row { setting: "baseline: sorting the whole vocabulary".into(), ms_per_draw: ms });
    let result = SampleResult { model: files.name.clone(), vocab: logits.len(), draws: args.draws, rows };
    let json = serde_json::to_string_pretty(&result)?;
    if let Some(path) = &args.output {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}
