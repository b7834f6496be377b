//! The batcher's greedy fast path: when every sequence that gets a token wants plain argmax, it
//! asks the engine to pick tokens where the logits are (`Engine::forward_argmax`; the CUDA engine
//! does it on the GPU). Here a wrapper gives an engine such a path, counting its use, and the
//! tokens must equal the ordinary host-sampled run: on the real model for plain greedy requests,
//! and on a scripted engine with pseudo-random logits for the requests that must stay on the host.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use tandem_engine::kv::{BlockId, SeqTable};
use tandem_engine::testing::ScriptedEngine;
use tandem_engine::{Batcher, BatcherConfig, CpuEngine, Engine, EngineInfo, ForwardItem, MaskSource, Mode, NewRequest};
use tandem_protocol::{Bytes, SamplingParams};

/// An engine with an argmax path of its own (the first largest logit, as on the GPU), masked
/// by structured output's bitmasks where given.
struct ArgmaxEngine<E> {
    inner: E,
    used: Arc<AtomicUsize>,
    masked: Arc<AtomicUsize>,
}

/// The first largest logit of `row` among the tokens `mask` allows (all, without one).
fn argmax(row: &[f32], mask: Option<&[u32]>) -> u32 {
    let allowed = |t: usize| mask.is_none_or(|m| m[t / 32] >> (t % 32) & 1 == 1);
    let mut best: Option<usize> = None;
    for (i, v) in row.iter().enumerate() {
        if allowed(i) && best.is_none_or(|b| *v > row[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

impl<E: Engine> Engine for ArgmaxEngine<E> {
    fn info(&self) -> &EngineInfo {
        self.inner.info()
    }
    fn forward(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> tandem_engine::Result<Vec<Vec<Vec<f32>>>> {
        self.inner.forward(seqs, items)
    }
    fn forward_argmax(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> Option<tandem_engine::Result<Vec<u32>>> {
        self.used.fetch_add(1, Ordering::SeqCst);
        Some(self.inner.forward(seqs, items).map(|all| all.iter().map(|rows| rows.last().map_or(0, |row| argmax(row, None))).collect()))
    }
    fn forward_argmax_masked(
        &mut self,
        seqs: &mut SeqTable,
        items: &[ForwardItem],
        masks: MaskSource<'_>,
    ) -> Option<tandem_engine::Result<Vec<u32>>> {
        self.masked.fetch_add(1, Ordering::SeqCst);
        // As on a device: the pass first, the masks asked for while it "runs".
        let all = match self.inner.forward(seqs, items) {
            Ok(all) => all,
            Err(e) => return Some(Err(e)),
        };
        let masks = masks();
        Some(Ok(all.iter().zip(&masks).map(|(rows, m)| rows.last().map_or(0, |row| argmax(row, m.as_deref()))).collect()))
    }
    fn masks_on_device(&self) -> bool {
        true
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

/// Runs one request per params on `engine` (wrapped with an argmax path or not); returns each
/// request's tokens and how many passes took the argmax path.
fn run_on<E: Engine + 'static>(
    engine: E,
    wrapped: bool,
    prompts: Vec<Vec<u32>>,
    eos: &[u32],
    params: &[SamplingParams],
) -> (std::collections::BTreeMap<u64, Vec<u32>>, usize) {
    let used = Arc::new(AtomicUsize::new(0));
    let masked = Arc::new(AtomicUsize::new(0));
    let engine: Box<dyn Engine> =
        if wrapped { Box::new(ArgmaxEngine { inner: engine, used: used.clone(), masked }) } else { Box::new(engine) };
    // A small token budget splits the long prompt into chunks that end mid-prompt.
    let mut b = Batcher::new(engine, BatcherConfig { max_batch_tokens: 64, ..BatcherConfig::default() });
    for (i, (prompt, p)) in prompts.into_iter().zip(params).enumerate() {
        b.add(NewRequest {
            id: i as u64 + 1,
            prompt,
            params: p.clone(),
            seed: p.seed.unwrap_or(0),
            eos_ids: eos.to_vec(),
            mode: Mode::Full,
            resumed: Vec::new(),
            grammar: None,
        });
    }
    (run_all(&mut b), used.load(Ordering::SeqCst))
}

fn run(wrapped: bool, params: &[SamplingParams]) -> (std::collections::BTreeMap<u64, Vec<u32>>, usize) {
    let files = default_model();
    let (engine, tok) = (CpuEngine::load(&files, &small_cache()).unwrap(), tandem_tokenizer::Tokenizer::load(&files).unwrap());
    run_on(engine, wrapped, prompts(&tok), tok.eos_ids(), params)
}

/// Logits that look random but depend only on the sequence: sampling, penalties and logprobs
/// all have something to work with.
fn hashed_logits(seq: &[u32]) -> Vec<f32> {
    let mut h = seq.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| (h ^ u64::from(t)).wrapping_mul(0x0100_0000_01b3));
    (0..VOCAB)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            (h % 1000) as f32 / 100.0
        })
        .collect()
}

const VOCAB: usize = 256;

fn run_scripted(wrapped: bool, params: &[SamplingParams]) -> (std::collections::BTreeMap<u64, Vec<u32>>, usize) {
    let engine = ScriptedEngine::new("scripted", VOCAB, 256, hashed_logits);
    let prompts = vec![vec![1, 2, 3, 4, 5], vec![7, 8, 9], (10..190).collect()];
    run_on(engine, wrapped, prompts, &[], params)
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
        let (host, _) = run_scripted(false, &params);
        let (device, _) = run_scripted(true, &params);
        assert_eq!(host, device, "{p:?}");
        // With that request alone, no step may pick its tokens on the engine.
        let (_, used) = run_scripted(true, &[p.clone(), p.clone(), p]);
        assert_eq!(used, 0);
    }
}

#[test]
fn constrained_greedy_sequences_are_masked_by_the_engine_beside_plain_ones() {
    use tandem_engine::Constraints;
    use tandem_protocol::Constraint;
    let files = default_model();
    let tok = tandem_tokenizer::Tokenizer::load(&files).unwrap();
    let constraints = Constraints::new(&tok.to_json().unwrap(), tok.vocab_size(), tok.eos_ids()).unwrap();
    let grammar = || {
        let c = Constraint::Regex { pattern: "(yes|no), because [a-z ]{1,40}\\.".into() };
        Some(constraints.compile(&c, &[]).unwrap())
    };
    let run = |wrapped: bool| {
        let engine = CpuEngine::load(&files, &small_cache()).unwrap();
        let (used, masked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let engine: Box<dyn Engine> =
            if wrapped { Box::new(ArgmaxEngine { inner: engine, used: used.clone(), masked: masked.clone() }) } else { Box::new(engine) };
        let mut b = Batcher::new(engine, BatcherConfig { max_batch_tokens: 64, ..BatcherConfig::default() });
        for (i, prompt) in prompts(&tok).into_iter().enumerate() {
            // The first two requests are constrained (their masks computed side by side); the
            // third is plain greedy, in the same batches.
            b.add(NewRequest {
                id: i as u64 + 1,
                prompt,
                params: SamplingParams::greedy(16),
                seed: 0,
                eos_ids: tok.eos_ids().to_vec(),
                mode: Mode::Full,
                resumed: Vec::new(),
                grammar: if i < 2 { grammar() } else { None },
            });
        }
        (run_all(&mut b), used.load(Ordering::SeqCst), masked.load(Ordering::SeqCst))
    };
    let (host, ..) = run(false);
    let (device, _, masked) = run(true);
    assert!(masked > 0, "the masked argmax path was never taken");
    assert_eq!(host, device, "masks applied by the engine draw what the host's masking draws");
    for id in [1, 2] {
        let text = tok.decode(&host[&id]).unwrap();
        assert!(text.starts_with("yes, because ") || text.starts_with("no, because "), "{text:?}");
    }
}
