//! Stopping and sampling options through the batcher, on an engine whose logits the test
//! scripts: min_tokens, stop_token_ids, ignore_eos, top_k and the frequency penalty.

use std::collections::{BTreeSet, HashMap};

use tandem_engine::testing::ScriptedEngine;
use tandem_engine::{Batcher, BatcherConfig, Event, Mode, NewRequest};
use tandem_protocol::{FinishReason, SamplingParams};

const VOCAB: usize = 16;
const EOS: u32 = 0;

/// An engine without a model: the logits after a sequence are whatever the function says.
fn scripted(logits: impl Fn(&[u32]) -> Vec<f32> + Send + Sync + 'static) -> ScriptedEngine {
    ScriptedEngine::new("scripted", VOCAB, 64, logits)
}

/// EOS is by far the most likely next token (p ≈ 0.99 at temperature 1), then 1, 2, 3, ...
fn eos_first(_: &[u32]) -> Vec<f32> {
    (0..VOCAB).map(|t| if t as u32 == EOS { 10.0 } else { 4.0 - 0.1 * t as f32 }).collect()
}

/// The token after `t` is `t + 1` (wrapping), with near certainty.
fn counting(seq: &[u32]) -> Vec<f32> {
    let next = (seq.last().copied().unwrap_or(0) as usize + 1) % VOCAB;
    (0..VOCAB).map(|t| if t == next { 10.0 } else { 0.0 }).collect()
}

struct Finished {
    tokens: Vec<u32>,
    reason: FinishReason,
    completion_tokens: usize,
}

/// Runs one request per params on `engine`; returns each one's tokens and finish reason.
fn run(engine: ScriptedEngine, prompt: &[u32], params: &[SamplingParams]) -> Vec<Finished> {
    let mut b = Batcher::new(Box::new(engine), BatcherConfig::default());
    for (i, p) in params.iter().enumerate() {
        let seed = p.seed.unwrap_or(0);
        b.add(NewRequest {
            id: i as u64,
            prompt: prompt.to_vec(),
            params: p.clone(),
            seed,
            eos_ids: vec![EOS],
            mode: Mode::Full,
            resumed: Vec::new(),
            grammar: None,
        });
    }
    let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut done: HashMap<u64, (FinishReason, usize)> = HashMap::new();
    while b.has_work() {
        for e in b.step() {
            match e {
                Event::Token { id, token, .. } => tokens.entry(id).or_default().push(token),
                Event::Finished { id, reason, usage } => {
                    done.insert(id, (reason, usage.completion_tokens));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    (0..params.len() as u64)
        .map(|id| {
            let (reason, completion_tokens) = done[&id];
            Finished { tokens: tokens.remove(&id).unwrap_or_default(), reason, completion_tokens }
        })
        .collect()
}

fn sampled(max_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams { temperature: 1.0, max_tokens, seed: Some(seed), ..SamplingParams::default() }
}

#[test]
fn min_tokens_holds_back_eos_until_reached() {
    // Without min_tokens, EOS comes first.
    let r = run(scripted(eos_first), &[5, 6], &[SamplingParams::greedy(10)]);
    assert_eq!((r[0].tokens.clone(), r[0].reason), (vec![EOS], FinishReason::Stop));

    let greedy = SamplingParams { min_tokens: 5, ..SamplingParams::greedy(10) };
    let r = run(scripted(eos_first), &[5, 6], &[greedy]);
    assert_eq!(r[0].tokens, vec![1, 1, 1, 1, 1, EOS], "the next best token until min_tokens, then EOS");
    assert_eq!((r[0].reason, r[0].completion_tokens), (FinishReason::Stop, 6));

    // Sampled: EOS is drawn almost every time it is allowed, and never before min_tokens.
    let params: Vec<_> = (0..40).map(|seed| SamplingParams { min_tokens: 4, ..sampled(10, seed) }).collect();
    let runs = run(scripted(eos_first), &[5, 6], &params);
    for (seed, f) in runs.iter().enumerate() {
        assert!(!f.tokens[..4].contains(&EOS), "seed {seed}: EOS before min_tokens: {:?}", f.tokens);
        assert!(f.tokens.len() > 4, "seed {seed}: {:?}", f.tokens);
    }
    let stopped_at_five = runs.iter().filter(|f| f.tokens.len() == 5 && f.reason == FinishReason::Stop).count();
    assert!(stopped_at_five >= 35, "EOS should follow min_tokens at once in most runs: {stopped_at_five} of 40");
}

#[test]
fn min_tokens_holds_back_stop_token_ids_too() {
    // Counting from 1: 2, 3, 4, ... with 4 a stop token.
    let p = SamplingParams { stop_token_ids: vec![4], min_tokens: 4, ..SamplingParams::greedy(12) };
    let r = run(scripted(counting), &[1], &[p]);
    let stop_at = r[0].tokens.iter().position(|&t| t == 4).expect("4 comes once allowed");
    assert!(stop_at >= 4, "stop token before min_tokens: {:?}", r[0].tokens);
    assert_eq!((stop_at + 1, r[0].reason), (r[0].tokens.len(), FinishReason::Stop), "{:?}", r[0].tokens);
}

#[test]
fn stop_token_ids_end_at_the_first_one() {
    let stops = SamplingParams { stop_token_ids: vec![9, 5, 7], ..SamplingParams::greedy(20) };
    let r = run(scripted(counting), &[1], &[SamplingParams::greedy(6), stops.clone()]);
    // Without stop tokens the count runs to max_tokens.
    assert_eq!((r[0].tokens.clone(), r[0].reason), (vec![2, 3, 4, 5, 6, 7], FinishReason::Length));
    // With them it ends on the first one reached (5), which is the last token sent.
    assert_eq!((r[1].tokens.clone(), r[1].reason, r[1].completion_tokens), (vec![2, 3, 4, 5], FinishReason::Stop, 4));

    // ignore_eos concerns EOS only: stop tokens still stop.
    let r = run(scripted(counting), &[1], &[SamplingParams { ignore_eos: true, ..stops }]);
    assert_eq!((r[0].tokens.clone(), r[0].reason), (vec![2, 3, 4, 5], FinishReason::Stop));
}

#[test]
fn ignore_eos_runs_to_max_tokens_past_eos() {
    // Counting from 13 wraps through EOS (0) after 14 and 15.
    let r = run(scripted(counting), &[13], &[SamplingParams::greedy(8)]);
    assert_eq!((r[0].tokens.clone(), r[0].reason), (vec![14, 15, EOS], FinishReason::Stop));

    let p = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(8) };
    let r = run(scripted(counting), &[13], std::slice::from_ref(&p));
    assert_eq!(r[0].tokens, vec![14, 15, EOS, 1, 2, 3, 4, 5]);
    assert_eq!((r[0].reason, r[0].completion_tokens), (FinishReason::Length, 8));

    // EOS the most likely token at every step: all of max_tokens still come.
    let r = run(scripted(eos_first), &[5], &[SamplingParams { max_tokens: 7, ..p }]);
    assert_eq!((r[0].tokens.clone(), r[0].reason), (vec![EOS; 7], FinishReason::Length));
}

#[test]
fn top_k_draws_only_the_k_most_likely_tokens() {
    // Close logits, so that every token would turn up without a cut; 15 is the most likely,
    // then 14, 13, ...; EOS is far behind and never drawn.
    let flat = |_: &[u32]| -> Vec<f32> { (0..VOCAB).map(|t| if t as u32 == EOS { -50.0 } else { 0.1 * t as f32 }).collect() };
    let by_rank: Vec<u32> = (1..VOCAB as u32).rev().collect();
    for k in [2usize, 3, 5] {
        let params: Vec<_> = (0..40).map(|seed| SamplingParams { top_k: k as u32, ..sampled(10, seed) }).collect();
        let seen: BTreeSet<u32> = run(scripted(flat), &[1], &params).into_iter().flat_map(|f| f.tokens).collect();
        let want: BTreeSet<u32> = by_rank[..k].iter().copied().collect();
        assert_eq!(seen, want, "top_k {k} over 400 draws");
    }
    let params: Vec<_> = (0..40).map(|seed| sampled(10, seed)).collect();
    let seen: BTreeSet<u32> = run(scripted(flat), &[1], &params).into_iter().flat_map(|f| f.tokens).collect();
    assert!(seen.len() > 10, "without top_k most tokens turn up: {seen:?}");
}

#[test]
fn frequency_penalty_grows_with_the_count_and_presence_penalty_does_not() {
    // Token 1 leads token 2 by 0.5; everything else is out of the running.
    let two = |_: &[u32]| -> Vec<f32> {
        (0..VOCAB)
            .map(|t| match t {
                1 => 3.0,
                2 => 2.5,
                _ => -50.0,
            })
            .collect()
    };
    let n = 12;
    let presence = SamplingParams { presence_penalty: 0.3, ..SamplingParams::greedy(n) };
    let frequency = SamplingParams { frequency_penalty: 0.3, ..SamplingParams::greedy(n) };
    let r = run(scripted(two), &[1, 1, 1, 1], &[SamplingParams::greedy(n), presence, frequency]);

    assert_eq!(r[0].tokens, vec![1; n], "no penalty: always the leader");
    // Presence: a flat 0.3 once seen, less than the lead, whatever the count.
    assert_eq!(r[1].tokens, vec![1; n], "presence penalty");
    // Frequency: 0.3 per occurrence in the output (the prompt's 1s do not count), so each step
    // takes the larger of 3.0 − 0.3·count(1) and 2.5 − 0.3·count(2), the leader on a tie.
    let f = &r[2].tokens;
    let (mut c1, mut c2) = (0.0f32, 0.0f32);
    for (i, &t) in f.iter().enumerate() {
        let want = if 3.0 - 0.3 * c1 >= 2.5 - 0.3 * c2 { 1 } else { 2 };
        assert_eq!(t, want, "step {i} of {f:?}");
        if t == 1 {
            c1 += 1.0
        } else {
            c2 += 1.0
        }
    }
    // Which keeps the counts 0.5 / 0.3 ≈ 1.7 apart: the penalty is in proportion to the count.
    assert!((1.0..=2.0).contains(&(c1 - c2)), "counts {c1} and {c2}: {f:?}");
    assert_eq!(&f[..3], &[1, 1, 2], "the first 2 comes once 1 has been penalised twice");
}
