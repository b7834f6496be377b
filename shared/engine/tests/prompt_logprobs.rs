//! Prompt log-probabilities (`prompt_logprobs`, and `echo` with `logprobs`) through the batcher:
//! one per prompt token after the first, each from the logits of the position before it, sent
//! before the first token; whole across chunked prefill and where the prompt's prefix is cached.

use tandem_engine::testing::ScriptedEngine;
use tandem_engine::{Batcher, BatcherConfig, Event, Mode, NewRequest, TokenLogprobs};
use tandem_protocol::SamplingParams;

const VOCAB: usize = 16;

fn request(id: u64, prompt: &[u32], prompt_logprobs: Option<u32>) -> NewRequest {
    NewRequest {
        id,
        prompt: prompt.to_vec(),
        params: SamplingParams { prompt_logprobs, ..SamplingParams::greedy(2) },
        seed: 0,
        eos_ids: Vec::new(),
        mode: Mode::Full,
        resumed: Vec::new(),
        grammar: None,
    }
}

/// Runs one request to its end: its prompt log-probabilities (checked to come before its first
/// token) and the prompt tokens its usage reports cached.
fn run(b: &mut Batcher, req: NewRequest) -> (Option<Vec<TokenLogprobs>>, usize) {
    let id = req.id;
    b.add(req);
    let (mut scored, mut tokens) = (None, 0);
    loop {
        for e in b.step() {
            match e {
                Event::PromptLogprobs { id: i, logprobs } if i == id => {
                    assert_eq!(tokens, 0, "prompt log-probabilities come before the first token");
                    assert!(scored.replace(logprobs).is_none(), "sent once");
                }
                Event::Token { id: i, .. } if i == id => tokens += 1,
                Event::Finished { id: i, usage, .. } if i == id => return (scored, usage.cached_tokens),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// The counting engine's odds: after token `p` the next is `p + 1` (logit 10, every other 0).
fn expected(prompt: &[u32], n: usize) -> Vec<TokenLogprobs> {
    let lse = (10f32.exp() + (VOCAB - 1) as f32).ln();
    prompt
        .windows(2)
        .map(|w| {
            let next = (w[0] + 1) % VOCAB as u32;
            let hit = w[1] == next;
            let runner_up = if next == 0 { 1 } else { 0 };
            let top = [(next, 10.0 - lse), (runner_up, -lse)].into_iter().take(n).collect();
            TokenLogprobs { token: w[1], logprob: if hit { 10.0 - lse } else { -lse }, top, rank: if hit { 1 } else { 2 } }
        })
        .collect()
}

fn assert_close(got: &[TokenLogprobs], want: &[TokenLogprobs]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!((g.token, g.rank), (w.token, w.rank), "position {}", i + 1);
        assert!((g.logprob - w.logprob).abs() < 1e-4, "position {}: {} vs {}", i + 1, g.logprob, w.logprob);
        assert_eq!(g.top.iter().map(|t| t.0).collect::<Vec<_>>(), w.top.iter().map(|t| t.0).collect::<Vec<_>>(), "position {}", i + 1);
    }
}

/// 40 tokens (over two blocks of 16), counting up but for a few surprises.
fn prompt() -> Vec<u32> {
    (0..40u32).map(|i| if i % 7 == 3 { (i * 5) % VOCAB as u32 } else { i % VOCAB as u32 }).collect()
}

#[test]
fn every_prompt_token_is_scored_across_chunks() {
    // Eight tokens a pass: the prompt takes five passes.
    let cfg = BatcherConfig { max_batch_tokens: 8, ..BatcherConfig::default() };
    let mut b = Batcher::new(Box::new(ScriptedEngine::counting("m", VOCAB, 64)), cfg);
    let p = prompt();
    let (scored, _) = run(&mut b, request(1, &p, Some(2)));
    let scored = scored.expect("prompt log-probabilities");
    assert_close(&scored, &expected(&p, 2));
    // The surprises are ranked below the expected token.
    assert!(scored.iter().any(|t| t.rank == 2) && scored.iter().any(|t| t.rank == 1));
    // Without the option, nothing is scored.
    let (none, _) = run(&mut b, request(2, &[1, 2, 3], None));
    assert!(none.is_none());
}

#[test]
fn a_cached_prefix_is_scored_too() {
    let mut b = Batcher::new(Box::new(ScriptedEngine::counting("m", VOCAB, 64)), BatcherConfig::default());
    let p = prompt();
    // The first run caches the prompt's two full blocks; the second finds them...
    let (_, cached) = run(&mut b, request(1, &p, None));
    assert_eq!(cached, 0);
    let (_, cached) = run(&mut b, request(2, &p, None));
    assert_eq!(cached, 32);
    // ...but one that scores the prompt computes all of it.
    let (scored, cached) = run(&mut b, request(3, &p, Some(0)));
    assert_eq!(cached, 0);
    let scored = scored.expect("prompt log-probabilities");
    assert_close(&scored, &expected(&p, 0));
    assert!(scored.iter().all(|t| t.top.is_empty()));
}
