//! `tandem generate`: one prompt through the engine, text streamed to stdout.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_engine::{Batcher, BatcherConfig, Event, Mode, NewRequest};
use tandem_protocol::SamplingParams;
use tandem_tokenizer::{ChatMessage, DecodeStream, ModelFiles, Tokenizer};

use crate::default_model;

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// A .gguf file, a model folder (safetensors + config.json + tokenizer.json) or a hub id.
    /// Defaults to the embedded SmolLM2-135M-Instruct, fetched on first use.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,
    #[arg(long)]
    pub prompt: String,
    /// Feed the prompt as-is instead of as one user message through the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the engine runs: `cpu`, or `cuda:N` for an NVIDIA GPU.
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: tandem_runtime::Device,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    match stream(args) {
        // The reader went away (`| head`): not an error worth a message.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => Ok(()),
        other => other,
    }
}

fn stream(args: GenerateArgs) -> Result<()> {
    let spec = default_model::resolve_spec(args.model.as_deref())?;
    let files = ModelFiles::resolve(&spec)?;
    let tokenizer = Tokenizer::load(&files)?;
    let engine = crate::serve::open_engine(&files, args.device, &crate::serve::Sizing::default(), &BatcherConfig::default())
        .context("loading the model")?;

    let prompt =
        if args.raw { tokenizer.encode(&args.prompt)? } else { tokenizer.encode_chat(&[ChatMessage::new("user", args.prompt.clone())])? };
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        max_tokens: args.max_tokens,
        seed: args.seed,
        ..SamplingParams::default()
    };
    if let Err(e) = params.validate() {
        bail!("--{}: {e}", e.param.replace('_', "-"));
    }
    let seed = params.seed.unwrap_or_else(rand::random);
    let mut batcher = Batcher::new(engine, BatcherConfig::default());
    batcher.add(NewRequest {
        id: 1,
        prompt,
        params,
        seed,
        eos_ids: tokenizer.eos_ids().to_vec(),
        mode: Mode::Full,
        resumed: Vec::new(),
        grammar: None,
    });

    let started = Instant::now();
    let mut first_token = None;
    let mut stream = DecodeStream::new();
    let mut out = std::io::stdout().lock();
    loop {
        for event in batcher.step() {
            match event {
                Event::PromptLogprobs { .. } => {}
                Event::Token { token, .. } => {
                    first_token.get_or_insert_with(|| started.elapsed());
                    if tokenizer.eos_ids().contains(&token) {
                        continue;
                    }
                    if let Some(text) = stream.step(&tokenizer, token)? {
                        out.write_all(text.as_bytes())?;
                        out.flush()?;
                    }
                }
                Event::Finished { reason, usage, .. } => {
                    if let Some(text) = stream.finish(&tokenizer)? {
                        out.write_all(text.as_bytes())?;
                    }
                    if out.is_terminal() {
                        writeln!(out)?;
                    }
                    out.flush()?;
                    let total = started.elapsed().as_secs_f64();
                    let ttft = first_token.unwrap_or_default().as_secs_f64();
                    let decode_tps = (usage.completion_tokens.saturating_sub(1)) as f64 / (total - ttft).max(1e-9);
                    tracing::info!(
                        prompt_tokens = usage.prompt_tokens,
                        completion_tokens = usage.completion_tokens,
                        finish_reason = reason.as_str(),
                        ttft_ms = ttft * 1e3,
                        decode_tokens_per_s = decode_tps,
                        "done"
                    );
                    return Ok(());
                }
                Event::Failed { error, .. } => bail!("generation failed: {error}"),
                Event::Prefilled { .. } => unreachable!("generate runs in full mode"),
            }
        }
    }
}
