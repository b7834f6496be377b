//! The batcher's greedy fast path: when every sequence that gets a token wants plain argmax, it
//! asks the engine to pick tokens where the logits are (`Engine::forward_argmax`; the CUDA engine
//! does it on the GPU). Here a wrapper gives the CPU engine such a path, counting its use, and
//! the tokens must equal the ordinary host-sampled run.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use tandem_engine::kv::{BlockId, SeqTable};
use tandem_engine::{Batcher, BatcherConfig, CpuEngine, Engine, EngineInfo, ForwardItem};
use tandem_protocol::{Bytes, SamplingParams};

/// The CPU engine with an argmax path of its own (the first largest logit, as on the GPU).
struct ArgmaxEngine {
    inner: CpuEngine,
    used: Arc<AtomicUsize>,
}

impl Engine for ArgmaxEngine {
    fn info(&self) -> &EngineInfo {
        self.inner.info()
    }
    fn forward(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> tandem_engine::Result<Vec<Vec<Vec<f32>>>> {
        self.inner.forward(seqs, items)
    }
    fn forward_argmax(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> Option<tandem_engine::Result<Vec<u32>>> {
        self.used.fetch_add(1, Ordering::SeqCst);
        Some(self.inner.forward(seqs, items).map(|all| {
            all.iter()
                .map(|rows| {
                    rows.last().map_or(0, |row| {
                        let mut best = 0;
                        for (i, v) in row.iter().enumerate() {
                            if *v > row[best] {
                                best = i;
                            }
                        }
                        best as u32
                    })
                })
                .collect()
        }))
    }
    fn read_blocks(&self, blocks: &[BlockId]) -> tandem_engine::Result<Vec<Bytes>> {
        self.inner.read_blocks(blocks)
    }
    fn write_blocks(&mut self, writes: &[(BlockId, &[u8])]) -> tandem_engine::Result<()> {
        self.inner.write_blocks(writes)
    }
}

fn prompts(tok: &tandem_tokenizer::Tokenizer) -> Vec<Vec<u32>> {
    let long = "Tell me a story about the sea and the ships that cross it, ".repeat(12);
    ["The capital of France is", "def add(a, b):", long.as_str()].iter().map(|p| tok.encode(p).unwrap()).collect()
}

fn run(wrapped: bool, params: &[SamplingParams]) -> (std::collections::BTreeMap<u64, Vec<u32>>, usize) {
    let (files, used) = (default_model(), Arc::new(AtomicUsize::new(0)));
    let (engine, tok) = (CpuEngine::load(&files, &small_cache()).unwrap(), tandem_tokenizer::Tokenizer::load(&files).unwrap());
    let engine: Box<dyn Engine> = if wrapped { Box::new(ArgmaxEngine { inner: engine, used: used.clone() }) } else { Box::new(engine) };
    // A small token budget splits the long prompt into chunks that end mid-prompt.
    let mut b = Batcher::new(engine, BatcherConfig { max_batch_tokens: 64, ..BatcherConfig::default() });
    for (i, (prompt, p)) in prompts(&tok).into_iter().zip(params).enumerate() {
        let mut req = greedy_request(i as u64 + 1, prompt, 12, &tok);
        req.params = p.clone();
        b.add(req);
    }
    (run_all(&mut b), used.load(Ordering::SeqCst))
}

#[test]
fn plain_greedy_batches_take_the_engines_argmax_and_match_host_sampling() {
    let params = vec![SamplingParams::greedy(12); 3];
    let (host, _) = run(false, &params);
    let (device, used) = run(true, &params);
    assert!(used > 0, "the argmax path was never taken");
    assert_eq!(host, device);
    assert!(host.values().all(|t| t.len() == 12));
}

#[test]
fn logprobs_penalties_and_sampling_stay_on_the_host() {
    let mut with_logprobs = SamplingParams::greedy(12);
    with_logprobs.logprobs = Some(2);
    let mut penalised = SamplingParams::greedy(12);
    penalised.repetition_penalty = 1.3;
    let mut sampled = SamplingParams { max_tokens: 12, temperature: 0.8, ..SamplingParams::default() };
    sampled.seed = Some(3);
    for p in [with_logprobs, penalised, sampled] {
        let params = vec![SamplingParams::greedy(12), SamplingParams::greedy(12), p.clone()];
        let (host, _) = run(false, &params);
        let (device, _) = run(true, &params);
        assert_eq!(host, device, "{p:?}");
        // With that request alone, no step may pick its tokens on the engine.
        let (_, used) = run(true, &[p.clone(), p.clone(), p]);
        assert_eq!(used, 0);
    }
}
