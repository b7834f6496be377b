//! Workloads: what each request asks for, with token counts from the tokenizer.

mod prefix;
mod random;
mod sharegpt;

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{LoadtestError, Result, TokenCounter};

pub use random::random_text;

/// One request of a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    pub prompt: String,
    /// Prompt tokens as the tokenizer counts them (BOS included when the model adds one).
    pub prompt_len: usize,
    /// Tokens to generate (`max_tokens`; all of them with `--ignore-eos`).
    pub output_len: usize,
}

/// Which workload to build.
#[derive(Debug, Clone)]
pub enum DatasetSpec {
    /// Prompts of random tokens; lengths uniform in `len * (1 ± range_ratio)`.
    Random { input_len: usize, output_len: usize, range_ratio: f64 },
    /// A ShareGPT-format JSON file: the first human turn is the prompt, the gpt turn's length
    /// the output length (or `output_len` when given).
    ShareGpt { path: PathBuf, output_len: Option<usize> },
    /// `num_prefixes` long shared prompts of `prefix_len` tokens, each request one of them plus
    /// a random suffix of about `suffix_len` tokens.
    Prefix { prefix_len: usize, num_prefixes: usize, suffix_len: usize, output_len: usize, range_ratio: f64 },
}

impl DatasetSpec {
    /// The name written to result files, as `--dataset-name` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            DatasetSpec::Random { .. } => "random",
            DatasetSpec::ShareGpt { .. } => "sharegpt",
            DatasetSpec::Prefix { .. } => "prefix_repetition",
        }
    }
}

/// Builds `count` requests, the same ones for the same seed.
pub fn build(spec: &DatasetSpec, counter: &TokenCounter, count: usize, seed: u64) -> Result<Vec<SampleRequest>> {
    if count == 0 {
        return Err(LoadtestError::Dataset("no requests asked for".into()));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    match spec {
        DatasetSpec::Random { input_len, output_len, range_ratio } => {
            check_ratio(*range_ratio)?;
            (0..count)
                .map(|_| {
                    let input = uniform_len(*input_len, *range_ratio, &mut rng).max(counter.overhead() + 1);
                    let output = uniform_len(*output_len, *range_ratio, &mut rng).max(1);
                    let (prompt, prompt_len) = random_text(counter, &mut rng, input)?;
                    Ok(SampleRequest { prompt, prompt_len, output_len: output })
                })
                .collect()
        }
        DatasetSpec::ShareGpt { path, output_len } => sharegpt::load(path, counter, count, *output_len, &mut rng),
        DatasetSpec::Prefix { prefix_len, num_prefixes, suffix_len, output_len, range_ratio } => {
            check_ratio(*range_ratio)?;
            let shape = prefix::Shape {
                prefix_len: *prefix_len,
                num_prefixes: *num_prefixes,
                suffix_len: *suffix_len,
                output_len: *output_len,
                range_ratio: *range_ratio,
            };
            prefix::build(&shape, counter, count, &mut rng)
        }
    }
}

fn check_ratio(ratio: f64) -> Result<()> {
    if (0.0..1.0).contains(&ratio) {
        Ok(())
    } else {
        Err(LoadtestError::Config("--random-range-ratio must lie in [0, 1)".into()))
    }
}

/// A length drawn uniformly from `[len * (1 - ratio), len * (1 + ratio)]`, bounds included.
pub fn uniform_len(len: usize, ratio: f64, rng: &mut impl Rng) -> usize {
    let lo = (len as f64 * (1.0 - ratio)).floor() as usize;
    let hi = (len as f64 * (1.0 + ratio)).floor() as usize;
    if hi <= lo {
        lo
    } else {
        rng.random_range(lo..=hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_len_stays_in_bounds_and_covers_them() {
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<usize> = (0..2000).map(|_| uniform_len(100, 0.5, &mut rng)).collect();
        assert!(draws.iter().all(|&d| (50..=150).contains(&d)));
        assert_eq!(draws.iter().min(), Some(&50));
        assert_eq!(draws.iter().max(), Some(&150));
        assert_eq!(uniform_len(100, 0.0, &mut rng), 100);
    }
}
