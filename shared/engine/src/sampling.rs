//! Choosing the next token from logits: penalties, greedy or stochastic sampling with
//! temperature / top-k / top-p / min-p, and log-probabilities.
//!
//! The random draw for the n-th generated token depends only on the request's seed and n, so a
//! request that moves between workers (prefill to decode) keeps drawing the same numbers.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tandem_protocol::SamplingParams;

/// Log-probability of the chosen token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// Most likely tokens first.
    pub top: Vec<(u32, f32)>,
    /// 1 + how many tokens were more likely than `token`; 0 where not computed (sampled
    /// tokens: OpenAI's shapes have no place for it).
    #[serde(default)]
    pub rank: u32,
}

/// What the sampler needs to know about the sequence so far.
#[derive(Debug, Clone, Copy)]
pub struct SampleContext<'a> {
    pub prompt: &'a [u32],
    pub output: &'a [u32],
    pub seed: u64,
    /// Tokens that must not be chosen yet (end-of-sequence before `min_tokens`).
    pub suppress: &'a [u32],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

fn apply_penalties(logits: &mut [f32], p: &SamplingParams, ctx: &SampleContext<'_>) {
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in ctx.prompt.iter().chain(ctx.output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
            *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in ctx.output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }
}

fn log_softmax_top(logits: &[f32], chosen: u32, n: usize) -> TokenLogprobs {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let top = top_n(logits, n).into_iter().map(|(t, l)| (t, l - lse)).collect();
    TokenLogprobs { token: chosen, logprob: logits[chosen as usize] - lse, top, rank: 0 }
}

/// A prompt token's log-probability under the raw logits of the position before it (no
/// penalties, no bias: how likely the model found the text), with its rank and the `n` most
/// likely alternatives.
pub fn prompt_logprob(logits: &[f32], token: u32, n: usize) -> TokenLogprobs {
    let mut lp = log_softmax_top(logits, token, n);
    let own = logits[token as usize];
    lp.rank = 1 + logits.iter().filter(|&&l| l > own).count() as u32;
    lp
}

/// The `n` largest entries, largest first; ties go to the lower id.
pub fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let by_value = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    if n < idx.len() && n > 0 {
        idx.select_nth_unstable_by(n - 1, by_value);
        idx.truncate(n);
    }
    idx.sort_by(by_value);
    idx.truncate(n);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

/// Candidates sorted at first when a draw over the whole vocabulary is cut by `top_p` or
/// `min_p` (grown eightfold while the cut reaches further).
const HEAD: usize = 256;

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

fn step_rng(seed: u64, step: usize) -> StdRng {
    // SplitMix64 finaliser: decorrelates neighbouring (seed, step) pairs.
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// Picks the next token. `logits` is consumed as scratch space.
pub fn sample(mut logits: Vec<f32>, p: &SamplingParams, ctx: &SampleContext<'_>) -> Sampled {
    apply_penalties(&mut logits, p, ctx);
    for &(t, bias) in &p.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += bias;
        }
    }
    for &t in ctx.suppress {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    let token = if p.is_greedy() { argmax(&logits) } else { draw(&logits, p, ctx) };
    // Log-probabilities are those of the model after penalties, before temperature and cuts.
    let logprobs = p.logprobs.map(|n| log_softmax_top(&logits, token, n as usize));
    Sampled { token, logprobs }
}

fn draw(logits: &[f32], p: &SamplingParams, ctx: &SampleContext<'_>) -> u32 {
    let n = logits.len();
    let k = if p.top_k == 0 { n } else { (p.top_k as usize).min(n) };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |l: f32| ((l - max) / p.temperature).exp();
    if k == n && p.top_p >= 1.0 && p.min_p <= 0.0 {
        // Every token is a candidate (a client's usual temperature-only request): the draw
        // needs no order, so the vocabulary is walked as it is instead of sorted.
        let weights: Vec<f32> = logits.iter().map(|&l| weight(l)).collect();
        let total: f32 = weights.iter().sum();
        let mut r = step_rng(ctx.seed, ctx.output.len()).random::<f32>() * total;
        let mut last = argmax(logits);
        for (i, w) in weights.iter().enumerate() {
            if *w > 0.0 {
                if r < *w {
                    return i as u32;
                }
                r -= w;
                last = i as u32;
            }
        }
        return last;
    }
    let (mut cand, total) = if k < n {
        let cand = top_n(logits, k);
        let total: f32 = cand.iter().map(|&(_, l)| weight(l)).sum();
        (cand, total)
    } else {
        // The whole vocabulary's mass, but only the head that the cuts below can keep sorted:
        // grown until it reaches `top_p` of the mass, or ends below the `min_p` floor (the
        // best token's weight is 1).
        let total: f32 = logits.iter().map(|&l| weight(l)).sum();
        let mut m = HEAD.min(n);
        loop {
            let head = top_n(logits, m);
            let mass = head.iter().map(|&(_, l)| weight(l)).sum::<f32>() / total;
            let below_floor = p.min_p > 0.0 && weight(head[m - 1].1) < p.min_p;
            if m == n || (p.top_p < 1.0 && mass >= p.top_p) || below_floor {
                break (head, total);
            }
            m = (m * 8).min(n);
        }
    };
    let mut probs: Vec<f32> = cand.iter().map(|&(_, l)| weight(l) / total).collect();
    // top-p: the smallest head of the sorted list whose mass reaches top_p.
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    // min-p: drop tokens less likely than min_p × the most likely one.
    if p.min_p > 0.0 {
        let floor = p.min_p * probs[0];
        keep = keep.min(probs.iter().take_while(|q| **q >= floor).count().max(1));
    }
    cand.truncate(keep);
    probs.truncate(keep);
    let mass: f32 = probs.iter().sum();
    let mut r = step_rng(ctx.seed, ctx.output.len()).random::<f32>() * mass;
    for (i, q) in probs.iter().enumerate() {
        if r < *q {
            return cand[i].0;
        }
        r -= q;
    }
    cand[keep - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(output: &'a [u32], suppress: &'a [u32]) -> SampleContext<'a> {
        SampleContext { prompt: &[], output, seed: 7, suppress }
    }

    #[test]
    fn greedy_picks_the_max_and_respects_suppression() {
        let p = SamplingParams::greedy(4);
        assert_eq!(sample(vec![0.1, 3.0, 2.0], &p, &ctx(&[], &[])).token, 1);
        assert_eq!(sample(vec![0.1, 3.0, 2.0], &p, &ctx(&[], &[1])).token, 2);
    }

    #[test]
    fn penalties_change_the_choice() {
        let p = SamplingParams { presence_penalty: 1.5, ..SamplingParams::greedy(4) };
        assert_eq!(sample(vec![0.0, 3.0, 2.0], &p, &ctx(&[1], &[])).token, 2);
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy(4) };
        let c = SampleContext { prompt: &[1], output: &[], seed: 0, suppress: &[] };
        assert_eq!(sample(vec![0.0, 3.0, 2.0], &p, &c).token, 2);
    }

    #[test]
    fn same_seed_same_draws_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams { temperature: 1.0, ..Default::default() };
        let a: Vec<u32> = (0..20).map(|n| sample(logits.clone(), &p, &ctx(&vec![0; n], &[])).token).collect();
        let b: Vec<u32> = (0..20).map(|n| sample(logits.clone(), &p, &ctx(&vec![0; n], &[])).token).collect();
        assert_eq!(a, b);
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1, "sampling should vary by step");
        let p = SamplingParams { top_k: 1, temperature: 1.0, ..Default::default() };
        assert_eq!(sample(logits.clone(), &p, &ctx(&[], &[])).token, argmax(&logits));
    }

    #[test]
    fn frequency_penalty_is_in_proportion_to_the_count_and_presence_penalty_is_flat() {
        let logits = vec![1.0, 2.0, 3.0, 0.5, 1.5];
        // Token 2 three times, 1 once, 4 never; the prompt never counts.
        let output = [2, 1, 2, 2];
        let c = SampleContext { prompt: &[4, 4, 4, 4], output: &output, seed: 0, suppress: &[] };
        let penalised = |p: SamplingParams| -> Vec<f32> {
            // Log-probabilities are those after penalties: shifts show up as logit differences.
            let lp = sample(logits.clone(), &SamplingParams { logprobs: Some(5), ..p }, &c).logprobs.unwrap();
            let mut by_id = vec![0.0; logits.len()];
            for (t, l) in lp.top {
                by_id[t as usize] = l;
            }
            // Relative to token 0, which is never seen.
            (0..logits.len()).map(|t| (by_id[t] - by_id[0]) - (logits[t] - logits[0])).collect()
        };
        let counts = [0.0, 1.0, 3.0, 0.0, 0.0];
        for f in [0.5f32, -0.4] {
            let shift = penalised(SamplingParams { frequency_penalty: f, ..SamplingParams::greedy(4) });
            for t in 0..logits.len() {
                assert!((shift[t] + f * counts[t]).abs() < 1e-5, "frequency {f}: token {t} moved by {}", shift[t]);
            }
        }
        let shift = penalised(SamplingParams { presence_penalty: 0.5, ..SamplingParams::greedy(4) });
        for t in 0..logits.len() {
            let want = if counts[t] > 0.0 { -0.5 } else { 0.0 };
            assert!((shift[t] - want).abs() < 1e-5, "presence: token {t} moved by {}", shift[t]);
        }
        // Greedy: 2 leads the unseen 4 by 1.5. Three occurrences at 0.6 cost it 1.8 and put 4
        // first (1.5 against 1.4 for 1 and 1.2 for 2); presence costs 0.6 however many.
        let p = SamplingParams { frequency_penalty: 0.6, ..SamplingParams::greedy(4) };
        assert_eq!(sample(logits.clone(), &p, &c).token, 4);
        let p = SamplingParams { presence_penalty: 0.6, ..SamplingParams::greedy(4) };
        assert_eq!(sample(logits.clone(), &p, &c).token, 2);
    }

    #[test]
    fn top_k_draws_only_the_k_largest_logits() {
        // Distinct, close logits in scrambled order, so every token would be drawn without a cut.
        let logits: Vec<f32> = (0..32u32).map(|i| ((i * 7) % 32) as f32 * 0.05).collect();
        let mut ranked: Vec<u32> = (0..32).collect();
        ranked.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        for k in [2u32, 4, 8] {
            let p = SamplingParams { top_k: k, temperature: 1.0, ..Default::default() };
            let mut seen = std::collections::BTreeSet::new();
            for seed in 0..100u64 {
                let c = SampleContext { prompt: &[], output: &[], seed, suppress: &[] };
                seen.insert(sample(logits.clone(), &p, &c).token);
            }
            let want: std::collections::BTreeSet<u32> = ranked[..k as usize].iter().copied().collect();
            assert_eq!(seen, want, "top_k {k}");
        }
        let p = SamplingParams { temperature: 1.0, ..Default::default() };
        let seen: std::collections::HashSet<u32> = (0..100u64)
            .map(|seed| sample(logits.clone(), &p, &SampleContext { prompt: &[], output: &[], seed, suppress: &[] }).token)
            .collect();
        assert!(seen.len() > 16, "without top_k the draws spread: {seen:?}");
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // One dominant token (p ≈ 0.97): top_p 0.5 and min_p 0.5 must both always pick it.
        let logits = vec![5.0, 1.0, 1.0, 1.0];
        for n in 0..50 {
            let p = SamplingParams { top_p: 0.5, ..Default::default() };
            assert_eq!(sample(logits.clone(), &p, &ctx(&vec![9; n], &[])).token, 0);
            let p = SamplingParams { min_p: 0.5, ..Default::default() };
            assert_eq!(sample(logits.clone(), &p, &ctx(&vec![9; n], &[])).token, 0);
        }
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let p = SamplingParams { logprobs: Some(2), ..SamplingParams::greedy(1) };
        let s = sample(vec![1.0, 2.0, 3.0], &p, &ctx(&[], &[]));
        let lp = s.logprobs.unwrap();
        assert_eq!(lp.token, 2);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        let z: f32 = [1.0f32, 2.0, 3.0].iter().map(|l| (l - 3.0).exp()).sum();
        assert!((lp.logprob + z.ln()).abs() < 1e-6);
    }

    #[test]
    fn draws_over_the_whole_vocabulary_follow_the_softmax() {
        let logits = vec![0.5f32, 2.0, -1.0, 1.0, 0.0, 1.5, -0.5, 0.25];
        let p = SamplingParams { temperature: 0.8, ..Default::default() };
        let n = 20_000u64;
        let mut counts = vec![0u32; logits.len()];
        for seed in 0..n {
            counts[sample(logits.clone(), &p, &SampleContext { prompt: &[], output: &[], seed, suppress: &[] }).token as usize] += 1;
        }
        let z: f32 = logits.iter().map(|l| (l / 0.8).exp()).sum();
        for (t, &c) in counts.iter().enumerate() {
            let want = (logits[t] / 0.8).exp() / z;
            let got = c as f32 / n as f32;
            // Four standard deviations of a binomial proportion at this count.
            let sd = (want * (1.0 - want) / n as f32).sqrt();
            assert!((got - want).abs() < 4.0 * sd + 1e-4, "token {t}: drawn {got}, softmax {want}");
        }
        // A suppressed token is never drawn.
        for seed in 0..200 {
            let c = SampleContext { prompt: &[], output: &[], seed, suppress: &[1] };
            assert_ne!(sample(logits.clone(), &p, &c).token, 1);
        }
    }

    #[test]
    fn a_cut_reaching_past_the_first_head_keeps_what_a_full_sort_keeps() {
        // 5,000 nearly flat logits: top_p 0.9 keeps far more than the first sorted head.
        let logits: Vec<f32> = (0..5000u32).map(|i| ((i * 7919) % 5000) as f32 * 1e-4).collect();
        for p in [SamplingParams { top_p: 0.9, ..Default::default() }, SamplingParams { min_p: 0.9995, ..Default::default() }] {
            // The reference: every token sorted, the same cuts.
            let reference = |seed: u64| -> u32 {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let w = |l: f32| ((l - max) / p.temperature).exp();
                let total: f32 = logits.iter().map(|&l| w(l)).sum();
                let cand = top_n(&logits, logits.len());
                let probs: Vec<f32> = cand.iter().map(|&(_, l)| w(l) / total).collect();
                let mut keep = probs.len();
                if p.top_p < 1.0 {
                    let mut acc = 0.0;
                    keep = probs
                        .iter()
                        .position(|q| {
                            acc += q;
                            acc >= p.top_p
                        })
                        .map_or(keep, |i| i + 1);
                }
                if p.min_p > 0.0 {
                    keep = keep.min(probs.iter().take_while(|q| **q >= p.min_p * probs[0]).count().max(1));
                }
                let mass: f32 = probs[..keep].iter().sum();
                let mut r = step_rng(seed, 0).random::<f32>() * mass;
                for (i, q) in probs[..keep].iter().enumerate() {
                    if r < *q {
                        return cand[i].0;
                    }
                    r -= q;
                }
                cand[keep - 1].0
            };
            for seed in 0..200 {
                let c = SampleContext { prompt: &[], output: &[], seed, suppress: &[] };
                assert_eq!(sample(logits.clone(), &p, &c).token, reference(seed), "seed {seed}, {p:?}");
            }
        }
    }
}
