//! Aggregates: mean, median, standard deviation and percentiles of each latency, throughputs
//! and goodput, computed as `vllm bench serve` computes them.

use std::collections::BTreeMap;

use crate::client::RequestOutcome;
use crate::failure::count_by_kind;
use crate::result::{BenchResult, RunInfo};
use crate::Slo;

/// Summary of one latency, in the unit of its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub median: f64,
    /// Population standard deviation.
    pub std: f64,
    /// `(p, value)` for each requested percentile.
    pub percentiles: Vec<(f64, f64)>,
}

/// Statistics of `values`; all zero when there are none (nothing completed).
pub fn stats(values: &[f64], percentiles: &[f64]) -> Stats {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len().max(1) as f64;
    let mean = sorted.iter().sum::<f64>() / n;
    let var = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    Stats {
        mean,
        median: percentile(&sorted, 50.0),
        std: var.sqrt(),
        percentiles: percentiles.iter().map(|&p| (p, percentile(&sorted, p))).collect(),
    }
}

/// The `p`-th percentile of sorted values, interpolating linearly between neighbours.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = p.clamp(0.0, 100.0) / 100.0 * (n - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// `99` → `"99"`, `99.9` → `"99.9"`, as result files name percentiles.
pub fn percentile_label(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as u64)
    } else {
        format!("{p}")
    }
}

/// vLLM's peak figures over completed requests: the most output tokens in one second, and the
/// most requests active in one second. Seconds are one-second buckets from the first send; a
/// token falls in the bucket of its chunk's arrival (send + TTFT + the ITLs before it), and a
/// request counts in every bucket from its send to its end.
pub fn peaks(outcomes: &[RequestOutcome]) -> (f64, usize) {
    let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.is_ok()).collect();
    let Some(start) = ok.iter().map(|o| o.sent_at).min_by(f64::total_cmp) else { return (0.0, 0) };
    let end = ok.iter().map(|o| o.sent_at + o.e2el).fold(start, f64::max);
    let buckets = (end - start).ceil() as usize + 1;
    let bucket = |t: f64| ((t - start).max(0.0) as usize).min(buckets - 1);
    let mut tokens = vec![0usize; buckets];
    let mut active = vec![0usize; buckets];
    for o in ok {
        let mut t = o.sent_at + o.ttft;
        tokens[bucket(t)] += 1;
        for gap in &o.itl {
            t += gap;
            tokens[bucket(t)] += 1;
        }
        for a in &mut active[bucket(o.sent_at)..=bucket(o.sent_at + o.e2el)] {
            *a += 1;
        }
    }
    (tokens.into_iter().max().unwrap_or(0) as f64, active.into_iter().max().unwrap_or(0))
}

/// The most requests in flight at once, from send to end, failed ones included.
pub fn max_in_flight(outcomes: &[RequestOutcome]) -> usize {
    // At equal times an end comes before a start: a slot handed on is not two in flight.
    let mut events: Vec<(f64, i32)> = outcomes.iter().flat_map(|o| [(o.sent_at, 1), (o.sent_at + o.e2el, -1)]).collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in events {
        now += step;
        most = most.max(now);
    }
    most as usize
}

/// The result of a run from its outcomes (in request order) and its wall time in seconds, with
/// statistics of the named `metrics` (of ttft, tpot, itl, e2el) only, as vLLM writes them.
pub fn aggregate(
    info: RunInfo,
    outcomes: &[RequestOutcome],
    duration: f64,
    slo: Option<&Slo>,
    metrics: &[String],
    percentiles: &[f64],
) -> BenchResult {
    let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.is_ok()).collect();
    let ms = |f: &dyn Fn(&RequestOutcome) -> f64| ok.iter().map(|o| f(o) * 1000.0).collect::<Vec<f64>>();
    let ttft = ms(&|o| o.ttft);
    // TPOT is defined only where there is a second token.
    let tpot: Vec<f64> = ok.iter().filter(|o| o.output_len > 1).map(|o| o.tpot() * 1000.0).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|o| o.itl.iter().map(|x| x * 1000.0)).collect();
    let e2el = ms(&|o| o.e2el);

    let mut latency = BTreeMap::new();
    for (name, values) in [("ttft", &ttft), ("tpot", &tpot), ("itl", &itl), ("e2el", &e2el)] {
        if !metrics.iter().any(|m| m == name) {
            continue;
        }
        let s = stats(values, percentiles);
        latency.insert(format!("mean_{name}_ms"), s.mean);
        latency.insert(format!("median_{name}_ms"), s.median);
        latency.insert(format!("std_{name}_ms"), s.std);
        for (p, v) in s.percentiles {
            latency.insert(format!("p{}_{name}_ms", percentile_label(p)), v);
        }
    }

    let completed = ok.len();
    let total_input: usize = ok.iter().map(|o| o.prompt_len).sum();
    let total_output: usize = ok.iter().map(|o| o.output_len).sum();
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    let good = slo.map(|slo| ok.iter().filter(|o| slo.is_met(o.ttft * 1e3, o.tpot() * 1e3, o.e2el * 1e3)).count());
    let (max_output_tokens_per_s, max_concurrent_requests) = peaks(outcomes);

    BenchResult {
        info,
        num_prompts: outcomes.len(),
        duration,
        completed,
        failed: outcomes.len() - completed,
        total_input_tokens: total_input,
        total_output_tokens: total_output,
        request_throughput: per_s(completed as f64),
        request_goodput: good.map(|g| per_s(g as f64)),
        output_throughput: per_s(total_output as f64),
        total_token_throughput: per_s((total_input + total_output) as f64),
        max_output_tokens_per_s,
        max_concurrent_requests,
        max_in_flight: max_in_flight(outcomes),
        latency,
        failures_by_kind: count_by_kind(outcomes.iter().filter_map(|o| o.error.as_ref())),
        input_lens: outcomes.iter().map(|o| o.prompt_len).collect(),
        output_lens: outcomes.iter().map(|o| if o.is_ok() { o.output_len } else { 0 }).collect(),
        start_times: outcomes.iter().map(|o| o.sent_at).collect(),
        ttfts: outcomes.iter().map(|o| if o.is_ok() { o.ttft } else { 0.0 }).collect(),
        itls: outcomes.iter().map(|o| if o.is_ok() { o.itl.clone() } else { Vec::new() }).collect(),
        latencies: outcomes.iter().map(|o| if o.is_ok() { o.e2el } else { 0.0 }).collect(),
        queue_times: outcomes.iter().map(|o| o.queue_time).collect(),
        generated_texts: outcomes.iter().map(|o| if o.is_ok() { o.generated_text.clone() } else { String::new() }).collect(),
        errors: outcomes.iter().map(|o| o.error.as_ref().map(|f| format!("{}: {}", f.kind, f.message)).unwrap_or_default()).collect(),
        detailed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        let s = stats(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0], &[99.0]);
        assert_eq!((s.mean, s.median, s.std), (5.0, 4.5, 2.0));
        assert_eq!(percentile_label(99.0), "99");
        assert_eq!(percentile_label(99.9), "99.9");
    }

    fn ok(ttft: f64, e2el: f64, output_len: usize) -> RequestOutcome {
        RequestOutcome {
            prompt_len: 10,
            output_len,
            ttft,
            e2el,
            itl: vec![(e2el - ttft) / (output_len - 1) as f64; output_len - 1],
            ..Default::default()
        }
    }

    #[test]
    fn aggregates_count_only_completed_requests() {
        let failed = RequestOutcome {
            prompt_len: 10,
            error: Some(crate::failure::Failure::new(crate::FailureKind::Overloaded, "HTTP 429")),
            ..Default::default()
        };
        let outcomes = [ok(0.1, 1.1, 11), ok(0.3, 1.3, 11), failed];
        let slo = Slo { ttft_ms: Some(200.0), ..Default::default() };
        let all: Vec<String> = crate::config::METRICS.map(String::from).to_vec();
        let r = aggregate(RunInfo::default(), &outcomes, 2.0, Some(&slo), &all, &[99.0]);
        assert_eq!((r.completed, r.failed, r.num_prompts), (2, 1, 3));
        assert_eq!((r.total_input_tokens, r.total_output_tokens), (20, 22));
        assert_eq!(r.request_throughput, 1.0);
        assert_eq!(r.request_goodput, Some(0.5));
        assert_eq!(r.output_throughput, 11.0);
        assert!((r.latency["mean_ttft_ms"] - 200.0).abs() < 1e-9);
        assert!((r.latency["mean_tpot_ms"] - 100.0).abs() < 1e-9);
        assert!((r.latency["median_itl_ms"] - 100.0).abs() < 1e-9);
        assert_eq!(r.failures_by_kind["overloaded"], 1);
        assert_eq!(r.output_lens, vec![11, 11, 0]);
        assert!(r.errors[2].starts_with("overloaded"));
        assert_eq!(r.latencies, vec![1.1, 1.3, 0.0]);
    }

    #[test]
    fn only_the_chosen_metrics_and_percentiles_are_written() {
        let outcomes = [ok(0.1, 1.1, 11), ok(0.3, 1.3, 11)];
        let metrics = vec!["ttft".to_string(), "e2el".to_string()];
        let r = aggregate(RunInfo::default(), &outcomes, 2.0, None, &metrics, &[50.0, 99.9]);
        let mut keys: Vec<&str> = r.latency.keys().map(String::as_str).collect();
        keys.sort();
        let mut want = vec![
            "mean_ttft_ms",
            "median_ttft_ms",
            "std_ttft_ms",
            "p50_ttft_ms",
            "p99.9_ttft_ms",
            "mean_e2el_ms",
            "median_e2el_ms",
            "std_e2el_ms",
            "p50_e2el_ms",
            "p99.9_e2el_ms",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert!((r.latency["p50_ttft_ms"] - 200.0).abs() < 1e-9);
    }

    fn at(sent_at: f64, ttft: f64, itl: &[f64]) -> RequestOutcome {
        let e2el = ttft + itl.iter().sum::<f64>() + 0.01;
        RequestOutcome { sent_at, ttft, itl: itl.to_vec(), e2el, output_len: itl.len() + 1, ..Default::default() }
    }

    #[test]
    fn peaks_count_per_second_as_vllm_does() {
        // Tokens at 0.1, 0.3, 0.5 (ends 0.51); at 1.1, 1.4, 1.7, 2.05 (ends 2.06); at 1.3, 1.4
        // (ends 1.41). Seconds: [0, 1) holds 3 tokens, [1, 2) holds 5, [2, 3) holds 1.
        let a = at(0.0, 0.1, &[0.2, 0.2]);
        let b = at(0.5, 0.6, &[0.3, 0.3, 0.35]);
        let c = at(1.2, 0.1, &[0.1]);
        let failed = RequestOutcome {
            sent_at: 1.0,
            e2el: 0.5,
            error: Some(crate::failure::Failure::new(crate::FailureKind::StreamCut, "cut")),
            ..Default::default()
        };
        let (tokens, concurrent) = peaks(&[a.clone(), b.clone(), c.clone(), failed.clone()]);
        assert_eq!(tokens, 5.0);
        // Second 0: a and b; second 1: b and c (a failed request is not counted); second 2: b.
        assert_eq!(concurrent, 2);
        // Buckets start at the first send, not at zero.
        let shifted: Vec<RequestOutcome> = [a, b, c].iter().map(|o| RequestOutcome { sent_at: o.sent_at + 0.7, ..o.clone() }).collect();
        assert_eq!(peaks(&shifted), (5.0, 2));
        assert_eq!(peaks(&[failed]), (0.0, 0));
        assert_eq!(peaks(&[]), (0.0, 0));
    }

    #[test]
    fn in_flight_is_counted_at_each_instant() {
        // Two overlapping, then one that starts as the first ends, then a failed one inside.
        let span = |sent_at: f64, e2el: f64| RequestOutcome { sent_at, e2el, ..Default::default() };
        assert_eq!(max_in_flight(&[span(0.0, 1.0), span(0.5, 1.0), span(1.0, 1.0)]), 2);
        let failed = RequestOutcome { error: Some(crate::failure::Failure::new(crate::FailureKind::Timeout, "slow")), ..span(0.6, 0.2) };
        assert_eq!(max_in_flight(&[span(0.0, 1.0), span(0.5, 1.0), span(1.0, 1.0), failed]), 3);
        // The per-second count of vLLM sees all three of these in second 0; only one runs at once.
        let serial = [span(0.0, 0.2), span(0.3, 0.2), span(0.6, 0.2)].map(|o| RequestOutcome { ttft: 0.1, ..o });
        assert_eq!((max_in_flight(&serial), peaks(&serial).1), (1, 3));
    }
}
