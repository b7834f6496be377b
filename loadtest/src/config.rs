//! What one benchmark run does: the target, the arrival process, its bounds and the SLOs.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::{LoadtestError, Result};

/// The latencies a result can report statistics for, in the order they are printed.
pub const METRICS: [&str; 4] = ["ttft", "tpot", "itl", "e2el"];

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
    /// How long to wait for the target to serve a first request before the run; zero starts
    /// at once.
    pub ready_check_timeout: Duration,
    /// Headers sent with every request (and with `GET /v1/models`), after `Content-Type` and
    /// the `Authorization` that `OPENAI_API_KEY` gives, which they override.
    pub headers: Vec<(String, String)>,
    /// Accept any certificate of an `https://` target.
    pub insecure: bool,
    /// Send `ignore_eos: true`.
    pub ignore_eos: bool,
    /// Fields merged last into every request body: sampling parameters and `--extra-body`.
    pub extra_body: Map<String, Value>,
    pub goodput: Option<Slo>,
    /// Metrics whose mean, median, standard deviation and percentiles are reported, a subset
    /// of `METRICS`.
    pub percentile_metrics: Vec<String>,
    /// Percentiles reported for each of `percentile_metrics`, e.g. `[99.0]`.
    pub percentiles: Vec<f64>,
    /// Write the per-request lists to the result file.
    pub save_detailed: bool,
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
            ready_check_timeout: Duration::ZERO,
            headers: Vec::new(),
            insecure: false,
            ignore_eos: false,
            extra_body: Map::new(),
            goodput: None,
            percentile_metrics: ["ttft", "tpot", "itl"].map(String::from).to_vec(),
            percentiles: vec![99.0],
            save_detailed: false,
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
        if let Some(m) = self.percentile_metrics.iter().find(|m| !METRICS.contains(&m.as_str())) {
            return Err(LoadtestError::Config(format!("--percentile-metrics: {m:?} is not one of ttft, tpot, itl, e2el")));
        }
        Ok(())
    }

    /// Whether statistics of `metric` are reported.
    pub fn reports(&self, metric: &str) -> bool {
        self.percentile_metrics.iter().any(|m| m == metric)
    }
}

/// `http://HOST:PORT` unless a base URL is given, which wins, as in `vllm bench serve`; an IPv6
/// host is bracketed.
pub fn target_url(base_url: Option<&str>, host: &str, port: u16) -> String {
    match base_url {
        Some(url) => url.to_string(),
        None if host.contains(':') && !host.starts_with('[') => format!("http://[{host}]:{port}"),
        None => format!("http://{host}:{port}"),
    }
}

/// Parses `KEY=VALUE` headers; the key and value are trimmed, the value may hold `=`.
pub fn parse_headers(items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|item| {
            let (k, v) = item
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| LoadtestError::Config(format!("--header {item:?}: expected KEY=VALUE")))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The fields merged into every request body: the sampling parameters given, then
/// `--extra-body` (a JSON object), whose fields win.
pub fn request_extras(sampling: &[(&str, Option<Value>)], extra_body: Option<&str>) -> Result<Map<String, Value>> {
    let mut body: Map<String, Value> = sampling.iter().filter_map(|(k, v)| Some((k.to_string(), v.clone()?))).collect();
    if let Some(text) = extra_body {
        let bad = |m: String| LoadtestError::Config(format!("--extra-body: {m}"));
        match serde_json::from_str::<Value>(text).map_err(|e| bad(e.to_string()))? {
            Value::Object(fields) => body.extend(fields),
            other => return Err(bad(format!("expected a JSON object, got {other}"))),
        }
    }
    Ok(body)
}

/// Parses `ttft,tpot,itl`.
pub fn parse_metrics(text: &str) -> Result<Vec<String>> {
    let metrics: Vec<String> = text.split(',').map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
    if let Some(m) = metrics.iter().find(|m| !METRICS.contains(&m.as_str())) {
        return Err(LoadtestError::Config(format!("--percentile-metrics: {m:?} is not one of ttft, tpot, itl, e2el")));
    }
    Ok(metrics)
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
    fn host_and_port_unless_a_base_url_wins() {
        assert_eq!(target_url(None, "10.0.0.2", 9000), "http://10.0.0.2:9000");
        assert_eq!(target_url(None, "::1", 8000), "http://[::1]:8000");
        assert_eq!(target_url(Some("https://api.example.com/v1"), "10.0.0.2", 9000), "https://api.example.com/v1");
    }

    #[test]
    fn headers_and_extra_body_parse() {
        let h = parse_headers(&["x-a = 1".into(), "Authorization=Bearer a=b".into()]).unwrap();
        assert_eq!(h, vec![("x-a".into(), "1".into()), ("Authorization".into(), "Bearer a=b".into())]);
        assert!(parse_headers(&["novalue".into()]).is_err());
        assert!(parse_headers(&["=v".into()]).is_err());
        let sampling = [("temperature", Some(serde_json::json!(0.0))), ("top_p", None), ("top_k", Some(serde_json::json!(5)))];
        let body = request_extras(&sampling, Some(r#"{"top_k": 7, "chat_template_kwargs": {"enable_thinking": false}}"#)).unwrap();
        assert_eq!(
            Value::Object(body),
            serde_json::json!({"temperature": 0.0, "top_k": 7, "chat_template_kwargs": {"enable_thinking": false}})
        );
        assert!(request_extras(&[], Some("[1]")).is_err());
        assert!(request_extras(&[], Some("{")).is_err());
        assert!(request_extras(&[], None).unwrap().is_empty());
    }

    #[test]
    fn percentile_metrics_are_checked() {
        assert_eq!(parse_metrics("ttft, e2el").unwrap(), vec!["ttft", "e2el"]);
        assert!(parse_metrics("ttft,latency").is_err());
        let mut c = BenchConfig::new("http://h:1", "m");
        c.num_prompts = Some(1);
        assert!(c.reports("tpot") && !c.reports("e2el"));
        c.percentile_metrics = vec!["queue".into()];
        assert!(c.validate().is_err());
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
