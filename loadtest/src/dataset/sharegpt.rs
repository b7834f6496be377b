//! ShareGPT-format conversations: `[{"conversations": [{"from": "human", "value": ...},
//! {"from": "gpt", "value": ...}, ...]}, ...]`.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::Deserialize;

use super::SampleRequest;
use crate::{LoadtestError, Result, TokenCounter};

/// As in `vllm bench serve`: very short turns say nothing about serving, very long ones do
/// not fit small models.
const MIN_LEN: usize = 4;
const MAX_PROMPT_LEN: usize = 1024;
const MAX_TOTAL_LEN: usize = 2048;

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    conversations: Vec<Turn>,
}

#[derive(Deserialize)]
struct Turn {
    value: String,
}

/// `count` requests from the shuffled file; when it has fewer usable conversations, they are
/// used again in the same order.
pub(super) fn load(
    path: &Path,
    counter: &TokenCounter,
    count: usize,
    fixed_output: Option<usize>,
    rng: &mut impl Rng,
) -> Result<Vec<SampleRequest>> {
    let file = std::fs::File::open(path).map_err(|e| LoadtestError::io(path, e))?;
    let mut entries: Vec<Entry> = serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|source| LoadtestError::Json { path: path.display().to_string(), source })?;
    entries.retain(|e| e.conversations.len() >= 2);
    entries.shuffle(rng);

    let mut out = Vec::with_capacity(count);
    for entry in &entries {
        if out.len() == count {
            break;
        }
        let prompt = &entry.conversations[0].value;
        let prompt_len = counter.prompt_tokens(prompt)?;
        let output_len = match fixed_output {
            Some(n) => n,
            None => counter.completion_tokens(&entry.conversations[1].value)?,
        };
        let too_short = prompt_len < MIN_LEN || (fixed_output.is_none() && output_len < MIN_LEN);
        let too_long = prompt_len > MAX_PROMPT_LEN || prompt_len + output_len > MAX_TOTAL_LEN;
        if too_short || too_long || output_len == 0 {
            continue;
        }
        out.push(SampleRequest { prompt: prompt.clone(), prompt_len, output_len });
    }
    if out.is_empty() {
        return Err(LoadtestError::Dataset(format!(
            "{}: no conversation with two turns of {MIN_LEN}..={MAX_PROMPT_LEN} prompt tokens",
            path.display()
        )));
    }
    let usable = out.len();
    for i in usable..count {
        out.push(out[i % usable].clone());
    }
    Ok(out)
}
