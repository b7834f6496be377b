//! What one benchmark run does: the target, the arrival process, its bounds and the SLOs.

use std::time::Duration;

use crate::{LoadtestError, Result};

/// One run against one target. Built from flags by `cli`, or directly by tests.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Scheme, host and port, e.g. `http://127.0.0.1:8000` (a trailing `/v1` is accepted).
    pub base_url: String,
    /// `/v1/completions` or `/v1/chat/completions`.
    pub endpoint: String,
    /// The `model` field sent with every request.
    pub model: String,
    /// Written to the result file (`openai`, `openai-chat`, `tandem`, `vllm`, ...), as
    /// `backend` and as vLLM's `endpoint_type`.
    pub backend: String,
    /// The result's `label` and its file name's prefix (`backend` when absent).
    pub label: Option<String>,
    /// Requests per second; `f64::INFINITY` sends everything at once.
    pub request_rate: f64,
    /// Gamma shape of the inter-arrival times: 1 is Poisson, below 1 burstier, above 1 smoother.
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    /// Stop after this many requests.
    pub num_prompts: Option<usize>,
    /// Requests sent before the timed run (under the same concurrency cap) and not counted.
    pub num_warmups: usize,
    /// Stop sending new requests after this long; requests in flight finish.
    pub duration: Option<Duration>,
    pub seed: u64,
    /// Bound on one request, connect to `[DONE]`.
    pub request_timeout: Duration,
    pub goodput: Option<Slo>,
    /// Percentiles reported for every latency metric, e.g. `[90.0, 99.0]`.
    pub percentiles: Vec<f64>,
    pub show_progress: bool,
    /// Labels for the result file.
    pub tokenizer_id: String,
    pub dataset_name: String,
}

impl BenchConfig {
    /// Defaults as in `vllm bench serve`: infinite rate, Poisson, no concurrency cap.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            endpoint: "/v1/completions".into(),
            model: model.into(),
            backend: "openai".into(),
            label: None,
            request_rate: f64::INFINITY,
            burstiness: 1.0,
            max_concurrency: None,
            num_prompts: None,
            num_warmups: 0,
            duration: None,
            seed: 0,
            request_timeout: Duration::from_secs(600),
            goodput: None,
            percentiles: vec![90.0, 99.0],
            show_progress: false,
            tokenizer_id: String::new(),
            dataset_name: "random".into(),
        }
    }

    pub fn is_chat(&self) -> bool {
        self.endpoint.trim_end_matches('/').ends_with("chat/completions")
    }

    /// The full URL of `path` on the target; a `/v1` written in both halves is kept once.
    pub fn url(&self, path: &str) -> String {
        let base = self.base_url.trim_end_matches('/');
        match (base.strip_suffix("/v1"), path.starts_with("/v1/")) {
            (Some(root), true) => format!("{root}{path}"),
            _ => format!("{base}{path}"),
        }
    }

    /// Rejects runs that could not end or make no sense.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(LoadtestError::Config(m.into()));
        if !self.endpoint.ends_with("/completions") {
            return bad("--endpoint must be /v1/completions or /v1/chat/completions");
        }
        if self.request_rate.is_nan() || self.request_rate <= 0.0 {
            return bad("--request-rate must be positive (or inf)");
        }
        if !(self.burstiness.is_finite() && self.burstiness > 0.0) {
            return bad("--burstiness must be a positive number");
        }
        if self.max_concurrency == Some(0) || self.num_prompts == Some(0) {
            return bad("--max-concurrency and --num-prompts must be at least 1");
        }
        if self.num_prompts.is_none() && self.duration.is_none() {
            return bad("give --num-prompts, --duration or both");
        }
        if self.num_prompts.is_none() && self.request_rate.is_infinite() && self.max_concurrency.is_none() {
            return bad("--duration with an infinite --request-rate needs --max-concurrency or --num-prompts");
        }
        if self.percentiles.iter().any(|p| !(0.0..=100.0).contains(p)) {
            return bad("--metric-percentiles must lie in 0..=100");
        }
        Ok(())
    }
}

/// Service-level objectives in milliseconds; a request is good when it meets every one given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

impl Slo {
    /// Parses `["ttft:500", "tpot:50", "e2el:3000"]`, the form `--goodput` takes.
    pub fn parse(items: &[String]) -> Result<Self> {
        let mut slo = Slo::default();
        for item in items {
            let bad = || LoadtestError::Config(format!("--goodput {item:?}: expected ttft:MS, tpot:MS or e2el:MS"));
            let (name, value) = item.split_once(':').ok_or_else(bad)?;
            let ms: f64 = value.trim().parse().map_err(|_| bad())?;
            if !(ms.is_finite() && ms >= 0.0) {
                return Err(bad());
            }
            match name.trim() {
                "ttft" => slo.ttft_ms = Some(ms),
                "tpot" => slo.tpot_ms = Some(ms),
                "e2el" => slo.e2el_ms = Some(ms),
                _ => return Err(bad()),
            }
        }
        Ok(slo)
    }

    /// Whether a request with these latencies (milliseconds) meets every objective.
    pub fn is_met(&self, ttft_ms: f64, tpot_ms: f64, e2el_ms: f64) -> bool {
        let ok = |limit: Option<f64>, v: f64| limit.is_none_or(|l| v <= l);
        ok(self.ttft_ms, ttft_ms) && ok(self.tpot_ms, tpot_ms) && ok(self.e2el_ms, e2el_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slo_parses_and_judges() {
        let slo = Slo::parse(&["ttft:200".into(), "e2el:1000".into()]).unwrap();
        assert_eq!(slo, Slo { ttft_ms: Some(200.0), tpot_ms: None, e2el_ms: Some(1000.0) });
        assert!(slo.is_met(200.0, 1e9, 999.0));
        assert!(!slo.is_met(201.0, 0.0, 10.0));
        assert!(Slo::parse(&["itl:5".into()]).is_err());
        assert!(Slo::parse(&["ttft".into()]).is_err());
    }

    #[test]
    fn url_joins_v1_once() {
        let mut c = BenchConfig::new("http://h:1/v1/", "m");
        assert_eq!(c.url("/v1/completions"), "http://h:1/v1/completions");
        c.base_url = "http://h:1".into();
        assert_eq!(c.url("/v1/models"), "http://h:1/v1/models");
    }

    #[test]
    fn unbounded_runs_are_refused() {
        let mut c = BenchConfig::new("http://h:1", "m");
        assert!(c.validate().is_err());
        c.duration = Some(Duration::from_secs(1));
        assert!(c.validate().is_err(), "infinite rate for a duration needs a cap");
        c.max_concurrency = Some(4);
        assert!(c.validate().is_ok());
    }
}
