//! The summary printed after a run, laid out as `vllm bench serve` prints its own.

use std::fmt::Write;

use crate::metrics::percentile_label;
use crate::BenchResult;

const WIDTH: usize = 50;

fn rule(title: &str, fill: char) -> String {
    let title = if title.is_empty() { String::new() } else { format!(" {title} ") };
    let side = WIDTH.saturating_sub(title.len());
    let left: String = std::iter::repeat_n(fill, side / 2).collect();
    let right: String = std::iter::repeat_n(fill, side - side / 2).collect();
    format!("{left}{title}{right}\n")
}

/// The summary of `r` with the statistics of `metrics`, ending with a line per kind of failure
/// that happened.
pub fn summary(r: &BenchResult, metrics: &[String], percentiles: &[f64]) -> String {
    let mut s = rule("Serving Benchmark Result", '=');
    let mut row = |label: &str, value: String| {
        let _ = writeln!(s, "{:<40} {value:>9}", format!("{label}:"));
    };
    row("Successful requests", r.completed.to_string());
    row("Failed requests", r.failed.to_string());
    if let Some(n) = r.info.max_concurrency {
        row("Maximum request concurrency", n.to_string());
    }
    let rate = r.info.request_rate;
    row("Request rate configured (RPS)", if rate.is_finite() { format!("{rate:.2}") } else { "inf".into() });
    row("Benchmark duration (s)", format!("{:.2}", r.duration));
    row("Total input tokens", r.total_input_tokens.to_string());
    row("Total generated tokens", r.total_output_tokens.to_string());
    row("Request throughput (req/s)", format!("{:.2}", r.request_throughput));
    if let Some(g) = r.request_goodput {
        row("Request goodput (req/s)", format!("{g:.2}"));
    }
    row("Output token throughput (tok/s)", format!("{:.2}", r.output_throughput));
    row("Peak output token throughput (tok/s)", format!("{:.2}", r.max_output_tokens_per_s));
    row("Peak concurrent requests", r.max_concurrent_requests.to_string());
    row("Total token throughput (tok/s)", format!("{:.2}", r.total_token_throughput));
    for (key, short, title) in [
        ("ttft", "TTFT", "Time to First Token"),
        ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
        ("itl", "ITL", "Inter-token Latency"),
        ("e2el", "E2EL", "End-to-end Latency"),
    ] {
        if !metrics.iter().any(|m| m == key) {
            continue;
        }
        s.push_str(&rule(title, '-'));
        let value = |name: String| format!("{:.2}", r.latency.get(&name).copied().unwrap_or(0.0));
        let mut row = |label: String, value: String| {
            let _ = writeln!(s, "{:<40} {value:>9}", format!("{label}:"));
        };
        row(format!("Mean {short} (ms)"), value(format!("mean_{key}_ms")));
        row(format!("Median {short} (ms)"), value(format!("median_{key}_ms")));
        row(format!("Std {short} (ms)"), value(format!("std_{key}_ms")));
        for p in percentiles {
            let label = percentile_label(*p);
            row(format!("P{label} {short} (ms)"), value(format!("p{label}_{key}_ms")));
        }
    }
    let happened: Vec<_> = r.failures_by_kind.iter().filter(|(_, n)| **n > 0).collect();
    if !happened.is_empty() {
        s.push_str(&rule("Failures", '-'));
        for (kind, n) in happened {
            let _ = writeln!(s, "{:<40} {n:>9}", format!("{kind}:"));
        }
    }
    s.push_str(&rule("", '='));
    s
}
