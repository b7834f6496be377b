//! Shared setup for the engine's black-box tests.
#![allow(dead_code)]

use std::path::PathBuf;

use tandem_engine::{Batcher, BatcherConfig, CpuEngine, EngineConfig, Event, Mode, NewRequest, PagedEngine};
use tandem_protocol::SamplingParams;
use tandem_tokenizer::{ModelFiles, Tokenizer};

pub const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The default model, where `tandem fetch-model` (run by scripts/test.sh) puts it. Missing is a
/// failure, not a skip.
pub fn default_model() -> ModelFiles {
    let dir = std::env::var_os("TANDEM_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/tandem/models"));
    let path = dir.join(GGUF_NAME);
    assert!(path.is_file(), "{} is missing: run `cargo run -p tandem -- fetch-model` (scripts/test.sh does)", path.display());
    ModelFiles::resolve(path.to_str().unwrap()).unwrap()
}

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

pub fn small_cache() -> EngineConfig {
    EngineConfig { kv_cache_bytes: 96 << 20, ..EngineConfig::default() }
}

/// The CPU engine with its sequence table, and the model's tokenizer.
pub fn load(files: &ModelFiles) -> (PagedEngine<CpuEngine>, Tokenizer) {
    (PagedEngine::new(CpuEngine::load(files, &small_cache()).unwrap()), Tokenizer::load(files).unwrap())
}

pub fn greedy_request(id: u64, prompt: Vec<u32>, max_tokens: usize, tok: &Tokenizer) -> NewRequest {
    NewRequest {
        id,
        prompt,
        params: SamplingParams::greedy(max_tokens),
        seed: 0,
        eos_ids: tok.eos_ids().to_vec(),
        mode: Mode::Full,
        resumed: Vec::new(),
        grammar: None,
    }
}

/// Runs the batcher to completion; returns the tokens of each request in id order.
pub fn run_all(batcher: &mut Batcher) -> std::collections::BTreeMap<u64, Vec<u32>> {
    let mut out = std::collections::BTreeMap::<u64, Vec<u32>>::new();
    while batcher.has_work() {
        for e in batcher.step() {
            match e {
                Event::Token { id, token, .. } => out.entry(id).or_default().push(token),
                Event::Failed { id, error } => panic!("request {id} failed: {error}"),
                _ => {}
            }
        }
    }
    out
}

/// Runs a prefill-only batcher to completion; returns the first token and the sealed KV export
/// of the one request it holds.
pub fn prefill_handoff(prefill: &mut Batcher) -> (u32, tandem_engine::KvExport) {
    let (mut first, mut kv) = (None, None);
    while prefill.has_work() {
        for e in prefill.step() {
            match e {
                Event::Token { token, .. } => first = Some(token),
                Event::Prefilled { kv: mut k, .. } => {
                    k.seal();
                    kv = Some(*k)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    (first.expect("a first token"), kv.expect("an export"))
}

pub fn batcher(engine: PagedEngine<CpuEngine>) -> Batcher {
    Batcher::from_paged(engine.into_dyn(), BatcherConfig::default())
}
