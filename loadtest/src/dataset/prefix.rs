//! Shared-prefix prompts: a few long system prompts reused by many requests, so a server with
//! prefix caching skips most of each prompt.

use rand::Rng;

use super::{random_text, uniform_len, SampleRequest};
use crate::{LoadtestError, Result, TokenCounter};

pub(super) struct Shape {
    pub prefix_len: usize,
    pub num_prefixes: usize,
    pub suffix_len: usize,
    pub output_len: usize,
    pub range_ratio: f64,
}

/// Request `i` uses prefix `i % num_prefixes`, so every prefix is used about equally often.
pub(super) fn build(shape: &Shape, counter: &TokenCounter, count: usize, rng: &mut impl Rng) -> Result<Vec<SampleRequest>> {
    if shape.num_prefixes == 0 || shape.prefix_len == 0 {
        return Err(LoadtestError::Config("--prefix-repetition-num-prefixes and --prefix-repetition-prefix-len must be at least 1".into()));
    }
    let prefixes: Vec<String> =
        (0..shape.num_prefixes).map(|_| random_text(counter, rng, shape.prefix_len).map(|(text, _)| text)).collect::<Result<_>>()?;
    (0..count)
        .map(|i| {
            let suffix_len = uniform_len(shape.suffix_len, shape.range_ratio, rng).max(1);
            // The suffix is generated on its own (no BOS of its own), then joined after a
            // newline so the prefix's tokens stay the same in every request.
            let (suffix, _) = random_text(counter, rng, suffix_len + counter.overhead())?;
            let prompt = format!("{}\n{}", prefixes[i % prefixes.len()], suffix.trim_start());
            let prompt_len = counter.prompt_tokens(&prompt)?;
            let output_len = uniform_len(shape.output_len, shape.range_ratio, rng).max(1);
            Ok(SampleRequest { prompt, prompt_len, output_len })
        })
        .collect()
}
