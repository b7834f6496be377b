//! `tandem bench perplexity`: the CPU engine's perplexity over a text, a stricter end-to-end
//! check of the engine's arithmetic than greedy tokens (which flip at near-ties). The text is cut
//! into windows of `--window` tokens, each computed in one pass from an empty cache, and every
//! token after a window's first is scored: `exp(mean(−log p(token | the window before it)))`.
//! `scripts/bench_perplexity.py` runs llama.cpp over the same token ids and compares.

use anyhow::{ensure, Context, Result};
use clap::Args;
use serde::Serialize;
use tandem_engine::{ForwardItem, PagedEngine};
use tandem_tokenizer::{ModelFiles, Tokenizer};

use crate::default_model;

#[derive(Debug, Clone, Args)]
pub struct PerplexityArgs {
    /// Model (`.gguf`, folder or hub id); the embedded default when omitted.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,
    /// The text, as UTF-8 (tokenized with the model's tokenizer, as a prompt)...
    #[arg(long, conflicts_with = "tokens")]
    pub text: Option<std::path::PathBuf>,
    /// ...or the token ids, a JSON array (so another engine can score the very same ids).
    #[arg(long)]
    pub tokens: Option<std::path::PathBuf>,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Element type of the KV cache (`f16` or `f32`).
    #[arg(long, env = "TANDEM_KV_DTYPE", default_value = "f16")]
    pub kv_dtype: tandem_protocol::KvDtype,
    /// Write the JSON result here.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct PerplexityResult {
    pub engine: String,
    pub model: String,
    pub window: usize,
    pub windows: usize,
    /// Tokens scored (every window's tokens after its first).
    pub scored: usize,
    pub perplexity: f64,
    /// Negative log-likelihood (natural log) summed over each window.
    pub window_nll: Vec<f64>,
    /// At each scored position (window by window), the greedy choice for the next token and its
    /// lead over the runner-up in logits: where another engine's greedy choice may differ only at
    /// a near-tie.
    pub argmax: Vec<u32>,
    pub margin: Vec<f32>,
    pub tokens: Vec<u32>,
}

pub fn run(args: &PerplexityArgs) -> Result<()> {
    ensure!(args.window >= 2, "--window must be at least 2");
    let spec = default_model::resolve_spec(args.model.as_deref())?;
    let files = ModelFiles::resolve(&spec)?;
    let tokens: Vec<u32> = match (&args.text, &args.tokens) {
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Tokenizer::load(&files)?.encode(&text)?
        }
        (None, Some(path)) => serde_json::from_str(&std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
            .context("--tokens holds a JSON array of token ids")?,
        _ => anyhow::bail!("give --text or --tokens"),
    };
    let mut engine = PagedEngine::from_box(
        crate::serve::open_engine(
            &files,
            tandem_runtime::Device::Cpu,
            &crate::serve::Sizing { kv_dtype: args.kv_dtype, ..Default::default() },
            &tandem_engine::BatcherConfig { max_batch_tokens: args.window, ..Default::default() },
        )
        .context("loading the model")?,
    );
    let vocab = engine.info().vocab_size;
    ensure!(tokens.iter().all(|&t| (t as usize) < vocab), "a token id is outside the model's vocabulary of {vocab}");
    let windows: Vec<&[u32]> = tokens.chunks_exact(args.window).collect();
    ensure!(!windows.is_empty(), "{} tokens make no window of {}", tokens.len(), args.window);
    let mut window_nll = Vec::with_capacity(windows.len());
    let (mut argmax, mut margin) = (Vec::new(), Vec::new());
    for (i, w) in windows.iter().enumerate() {
        let seq = i as u64;
        engine.add_sequence_uncached(seq, w)?;
        let rows = engine.forward(&[ForwardItem { seq, tokens: w.to_vec(), all_logits: true }])?;
        engine.release(seq);
        let rows = rows.into_iter().next().context("the engine returned no logits")?;
        ensure!(rows.len() == w.len(), "{} logit rows for a window of {}", rows.len(), w.len());
        let nll: f64 = rows.iter().zip(&w[1..]).map(|(row, &next)| -log_softmax_at(row, next as usize)).sum();
        for row in &rows[..w.len() - 1] {
            let (best, lead) = top_two(row);
            argmax.push(best as u32);
            margin.push(lead);
        }
        eprintln!("window {i}: perplexity {:.4}", (nll / (w.len() - 1) as f64).exp());
        window_nll.push(nll);
    }
    let scored = windows.len() * (args.window - 1);
    let result = PerplexityResult {
        engine: format!(
            "tandem (CPU engine, {} kernels, {} KV cache)",
            std::env::var("TANDEM_CPU_KERNELS").unwrap_or_else(|_| "default".into()),
            args.kv_dtype.as_str()
        ),
        model: files.name.clone(),
        window: args.window,
        windows: windows.len(),
        scored,
        perplexity: (window_nll.iter().sum::<f64>() / scored as f64).exp(),
        window_nll,
        argmax,
        margin,
        tokens: windows.concat(),
    };
    let json = serde_json::to_string_pretty(&result)?;
    if let Some(path) = &args.output {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}

/// The index of the largest logit (the first, on a tie) and its lead over the second largest.
fn top_two(row: &[f32]) -> (usize, f32) {
    let (mut best, mut first, mut second) = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > first {
            (second, first, best) = (first, x, i);
        } else if x > second {
            second = x;
        }
    }
    (best, first - second)
}

/// `log softmax(row)[at]`, in f64.
fn log_softmax_at(row: &[f32], at: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[at] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::{log_softmax_at, top_two};

    #[test]
    fn top_two_finds_the_leader_and_its_lead() {
        assert_eq!(top_two(&[0.5, 3.0, 2.5, -1.0]), (1, 0.5));
        assert_eq!(top_two(&[4.0, 1.0]), (0, 3.0));
        assert_eq!(top_two(&[2.0, 2.0, 1.0]), (0, 0.0), "a tie: the first, no lead");
    }

    #[test]
    fn log_softmax_of_a_uniform_row_is_minus_log_n() {
        assert!((log_softmax_at(&[3.0; 8], 5) + 8f64.ln()).abs() < 1e-12);
        // Shifting every logit changes nothing.
        let a = log_softmax_at(&[1.0, 2.0, 3.0], 2);
        let b = log_softmax_at(&[101.0, 102.0, 103.0], 2);
        assert!((a - b).abs() < 1e-9 && a < 0.0);
    }
}
