//! Two result files side by side with the ratio of each number. Reads vLLM's result files as
//! well as ours, since the field names are the same.

use std::fmt::Write;
use std::path::Path;

use serde_json::Value;

use crate::{LoadtestError, Result};

const LABELS: [&str; 7] = ["backend", "label", "model_id", "dataset_name", "request_rate", "burstiness", "max_concurrency"];
const TOTALS: [&str; 11] = [
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
];
const METRICS: [&str; 4] = ["ttft", "tpot", "itl", "e2el"];

pub fn read_result(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadtestError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| LoadtestError::Json { path: path.display().to_string(), source })
}

/// The table for two result files.
pub fn compare_files(a: &Path, b: &Path) -> Result<String> {
    Ok(compare(&a.display().to_string(), &read_result(a)?, &b.display().to_string(), &read_result(b)?))
}

/// Every label, total and latency statistic present in either result, with `B / A`.
pub fn compare(a_name: &str, a: &Value, b_name: &str, b: &Value) -> String {
    let mut keys: Vec<String> = LABELS.iter().chain(TOTALS.iter()).map(|k| k.to_string()).collect();
    for metric in METRICS {
        let mut percentiles: Vec<(f64, String)> = [a, b]
            .iter()
            .filter_map(|v| v.as_object())
            .flat_map(|o| o.keys())
            .filter_map(|k| {
                let p = k.strip_prefix('p')?.strip_suffix(&format!("_{metric}_ms"))?;
                Some((p.parse::<f64>().ok()?, k.clone()))
            })
            .collect();
        percentiles.sort_by(|x, y| x.0.total_cmp(&y.0));
        percentiles.dedup_by(|x, y| x.1 == y.1);
        keys.extend(["mean", "median", "std"].map(|s| format!("{s}_{metric}_ms")));
        keys.extend(percentiles.into_iter().map(|(_, k)| k));
    }

    let mut rows = vec![["metric".to_string(), "A".to_string(), "B".to_string(), "B/A".to_string()]];
    for key in keys {
        let (x, y) = (a.get(&key), b.get(&key));
        if x.is_none_or(Value::is_null) && y.is_none_or(Value::is_null) {
            continue;
        }
        let ratio = match (x.and_then(Value::as_f64), y.and_then(Value::as_f64)) {
            (Some(x), Some(y)) if x != 0.0 => format!("{:.3}", y / x),
            _ => "-".into(),
        };
        rows.push([key, show(x), show(y), ratio]);
    }
    let width = |c: usize| rows.iter().map(|r| r[c].len()).max().unwrap_or(0);
    let widths = [width(0), width(1), width(2), width(3)];
    let mut out = format!("A: {a_name}\nB: {b_name}\n");
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
        if i == 0 {
            let _ = writeln!(out, "{}", "-".repeat(widths.iter().sum::<usize>() + 6));
        }
    }
    out
}

fn show(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
        Some(v) => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ratios_and_percentiles_from_either_side() {
        let a = json!({"backend": "vllm", "completed": 10, "mean_ttft_ms": 100.0, "p99_ttft_ms": 200.0, "request_goodput": null});
        let b = json!({"backend": "tandem", "completed": 10, "mean_ttft_ms": 50.0, "p99.9_ttft_ms": 300.0, "p99_ttft_ms": 100.0});
        let table = compare("a.json", &a, "b.json", &b);
        let line = |key: &str| {
            table
                .lines()
                .find(|l| l.split_whitespace().next() == Some(key))
                .unwrap_or_else(|| panic!("{key} missing:\n{table}"))
                .to_string()
        };
        assert!(line("mean_ttft_ms").ends_with("0.500"), "{table}");
        assert!(line("p99_ttft_ms").ends_with("0.500"));
        assert!(line("p99.9_ttft_ms").ends_with('-'));
        assert!(line("backend").contains("vllm") && line("backend").contains("tandem"));
        assert!(!table.contains("request_goodput"), "null on both sides is left out");
        let p99 = table.find("p99_ttft_ms").unwrap();
        assert!(p99 < table.find("p99.9_ttft_ms").unwrap(), "percentiles in numeric order");
    }
}
