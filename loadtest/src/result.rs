//! The result file. Field names follow `vllm bench serve`'s, so tools written for its files
//! read ours; `max_in_flight` and `failures_by_kind` are our additions.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

use crate::{LoadtestError, Result};

/// What was run, known before it starts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunInfo {
    /// UTC, `YYYYMMDD-HHMMSS`.
    pub date: String,
    /// The backend again, under the name older vLLM result files use for it.
    pub endpoint_type: String,
    pub backend: String,
    /// `--label`; null when not given, as in vLLM.
    pub label: Option<String>,
    pub endpoint: String,
    pub model_id: String,
    pub tokenizer_id: String,
    pub dataset_name: String,
    /// Written as the string `"inf"` when infinite, as vLLM does.
    #[serde(serialize_with = "rate")]
    pub request_rate: f64,
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    pub seed: u64,
}

fn rate<S: Serializer>(r: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if r.is_finite() {
        s.serialize_f64(*r)
    } else {
        s.serialize_str("inf")
    }
}

/// The per-request lists written only with `--save-detailed`, as vLLM leaves them out without
/// it (`latencies` and `queue_times` it always writes).
pub const DETAILED_FIELDS: [&str; 7] = ["input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts", "errors"];

/// One run's result. Latencies in the summary are milliseconds; the per-request lists
/// (`start_times`, `ttfts`, `itls`, `latencies`, `queue_times`) are seconds, one entry per
/// request sent, in order, zero or empty for failed requests, whose `errors` entry says why
/// (empty for completed ones).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchResult {
    #[serde(flatten)]
    pub info: RunInfo,
    /// Requests sent.
    pub num_prompts: usize,
    /// Seconds from the first request sent to the last one finished.
    pub duration: f64,
    pub completed: usize,
    pub failed: usize,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    /// Completed requests per second meeting every `--goodput` objective; null without one.
    pub request_goodput: Option<f64>,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Most output tokens in one second of the run: tokens counted when their chunk arrived, in
    /// one-second buckets from the first send, completed requests only (as vLLM counts them).
    pub max_output_tokens_per_s: f64,
    /// Most completed requests active in one of those buckets; a request counts in every bucket
    /// from its send to its end (as vLLM counts them), so this is at least `max_in_flight`.
    pub max_concurrent_requests: usize,
    /// Most requests in flight at one instant, failed ones included.
    pub max_in_flight: usize,
    /// `mean_ttft_ms`, `median_ttft_ms`, `std_ttft_ms`, `p99_ttft_ms`, ... for each metric of
    /// `--percentile-metrics`.
    #[serde(flatten)]
    pub latency: BTreeMap<String, f64>,
    pub failures_by_kind: BTreeMap<String, usize>,
    pub input_lens: Vec<usize>,
    pub output_lens: Vec<usize>,
    /// Send times, seconds after the run's first send could go out.
    pub start_times: Vec<f64>,
    pub ttfts: Vec<f64>,
    pub itls: Vec<Vec<f64>>,
    /// End-to-end latency of each request: send to `[DONE]`.
    pub latencies: Vec<f64>,
    /// Time each request waited for a `--max-concurrency` slot after its arrival time.
    pub queue_times: Vec<f64>,
    pub generated_texts: Vec<String>,
    pub errors: Vec<String>,
    /// Whether the file gets the `DETAILED_FIELDS` (`--save-detailed`).
    #[serde(skip)]
    pub detailed: bool,
}

impl BenchResult {
    /// The result as written: without the `DETAILED_FIELDS` unless `detailed`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("a result always serializes");
        if !self.detailed {
            if let Some(fields) = v.as_object_mut() {
                for key in DETAILED_FIELDS {
                    fields.remove(key);
                }
            }
        }
        v
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| LoadtestError::io(dir, e))?;
        }
        let text = serde_json::to_string(&self.to_json()).expect("a result always serializes");
        std::fs::write(path, text).map_err(|e| LoadtestError::io(path, e))
    }

    /// `{label}-{rate}qps[-concurrency{n}]-{model}-{date}.json`, as vLLM names its files (the
    /// backend when there is no label).
    pub fn default_filename(&self) -> String {
        let i = &self.info;
        let label = i.label.as_deref().unwrap_or(&i.backend);
        let rate = if i.request_rate.is_finite() { format!("{}", i.request_rate) } else { "inf".into() };
        let concurrency = i.max_concurrency.map(|n| format!("-concurrency{n}")).unwrap_or_default();
        let model = i.model_id.rsplit('/').next().unwrap_or(&i.model_id);
        format!("{label}-{rate}qps{concurrency}-{model}-{}.json", i.date)
    }
}

/// Now in UTC as `YYYYMMDD-HHMMSS`.
pub fn utc_now_stamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    stamp(secs)
}

fn stamp(unix_secs: u64) -> String {
    let (days, rem) = (unix_secs / 86_400, unix_secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_civil_utc() {
        assert_eq!(stamp(0), "19700101-000000");
        assert_eq!(stamp(951_782_400), "20000229-000000");
        assert_eq!(stamp(1_767_225_599), "20251231-235959");
    }

    #[test]
    fn the_label_names_the_file_and_is_null_when_absent() {
        let info = RunInfo {
            date: "20250101-000000".into(),
            backend: "openai-chat".into(),
            endpoint_type: "openai-chat".into(),
            model_id: "org/m".into(),
            request_rate: 4.0,
            ..Default::default()
        };
        assert_eq!(serde_json::to_value(&info).unwrap()["label"], serde_json::Value::Null);
        assert_eq!(serde_json::to_value(&info).unwrap()["endpoint_type"], "openai-chat");
        let result = |info: RunInfo| BenchResult { info, ..Default::default() };
        assert_eq!(result(info.clone()).default_filename(), "openai-chat-4qps-m-20250101-000000.json");
        let labelled = RunInfo { label: Some("tandem-cpu".into()), ..info };
        assert_eq!(result(labelled.clone()).default_filename(), "tandem-cpu-4qps-m-20250101-000000.json");
        assert_eq!(result(labelled).to_json()["label"], "tandem-cpu");
    }

    #[test]
    fn per_request_lists_need_save_detailed() {
        let r = BenchResult { ttfts: vec![0.1], latencies: vec![0.5], errors: vec![String::new()], ..Default::default() };
        let plain = r.to_json();
        for key in DETAILED_FIELDS {
            assert!(plain.get(key).is_none(), "{key} without --save-detailed");
        }
        assert_eq!(plain["latencies"], serde_json::json!([0.5]), "latencies are always written, as vLLM does");
        assert!(plain.get("queue_times").is_some() && plain.get("e2els").is_none());
        let detailed = BenchResult { detailed: true, ..r }.to_json();
        for key in DETAILED_FIELDS {
            assert!(detailed.get(key).is_some(), "{key} with --save-detailed");
        }
        assert!(detailed.get("detailed").is_none());
    }

    #[test]
    fn infinite_rate_is_written_as_inf() {
        let info = RunInfo { request_rate: f64::INFINITY, ..Default::default() };
        assert_eq!(serde_json::to_value(&info).unwrap()["request_rate"], "inf");
        let info = RunInfo { request_rate: 2.5, ..Default::default() };
        assert_eq!(serde_json::to_value(&info).unwrap()["request_rate"], 2.5);
    }
}
