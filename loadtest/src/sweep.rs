//! The same workload at several request rates, one run after another.

use std::fmt::Write;
use std::sync::Arc;

use crate::{run_benchmark, BenchConfig, BenchResult, LoadtestError, Result, RunReport, SampleRequest, TokenCounter};

/// Parses `1,2,4.5,inf`.
pub fn parse_rates(text: &str) -> Result<Vec<f64>> {
    let rates = text
        .split(',')
        .map(|r| {
            let rate: f64 = r.trim().parse().map_err(|_| LoadtestError::Config(format!("--sweep: {r:?} is not a rate")))?;
            if rate.is_nan() || rate <= 0.0 {
                return Err(LoadtestError::Config(format!("--sweep: rate {r} must be positive")));
            }
            Ok(rate)
        })
        .collect::<Result<Vec<f64>>>()?;
    if rates.is_empty() {
        return Err(LoadtestError::Config("--sweep needs at least one rate".into()));
    }
    Ok(rates)
}

/// Runs `cfg` at each rate, calling `each` after every run (to print or save it). The i-th rate
/// sends `requests(i)`: each rate can draw its own prompts, so that a server's prefix cache
/// does not carry one rate's prompts into the next and flatter it.
pub async fn sweep(
    cfg: &BenchConfig,
    rates: &[f64],
    mut requests: impl FnMut(usize) -> Result<Vec<SampleRequest>>,
    counter: Arc<TokenCounter>,
    mut each: impl FnMut(&RunReport) -> Result<()>,
) -> Result<Vec<RunReport>> {
    let mut reports = Vec::with_capacity(rates.len());
    for (i, &rate) in rates.iter().enumerate() {
        let cfg = BenchConfig { request_rate: rate, ..cfg.clone() };
        let report = run_benchmark(&cfg, &requests(i)?, counter.clone()).await?;
        each(&report)?;
        reports.push(report);
    }
    Ok(reports)
}

/// One line per rate: throughputs, goodput, medians and failures.
pub fn table(results: &[BenchResult]) -> String {
    let mut s = format!(
        "{:>8} {:>9} {:>9} {:>10} {:>12} {:>12} {:>11} {:>11} {:>7}\n",
        "rate", "req/s", "goodput", "out tok/s", "median ttft", "median tpot", "median itl", "median e2e", "failed"
    );
    for r in results {
        let rate = if r.info.request_rate.is_finite() { format!("{:.2}", r.info.request_rate) } else { "inf".into() };
        let goodput = r.request_goodput.map(|g| format!("{g:.2}")).unwrap_or_else(|| "-".into());
        // A metric left out of --percentile-metrics shows as "-".
        let ms = |k: &str, digits: usize| r.latency.get(k).map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{rate:>8} {:>9.2} {goodput:>9} {:>10.1} {:>12} {:>12} {:>11} {:>11} {:>7}",
            r.request_throughput,
            r.output_throughput,
            ms("median_ttft_ms", 1),
            ms("median_tpot_ms", 2),
            ms("median_itl_ms", 2),
            ms("median_e2el_ms", 1),
            r.failed
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rates("1, 2.5,inf").unwrap(), vec![1.0, 2.5, f64::INFINITY]);
        assert!(parse_rates("1,x").is_err());
        assert!(parse_rates("0").is_err());
    }
}
