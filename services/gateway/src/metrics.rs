//! Prometheus metrics served at `/metrics`: the request latencies and sizes under the names and
//! buckets vLLM's server uses (`vllm:*`, labelled `model_name`), so that dashboards and alerts
//! written for vLLM read the gateway unchanged; the rest is Tandem's own (`tandem_*`).

use prometheus::proto::{LabelPair, MetricFamily};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Request-level metrics under vLLM's names, types and buckets.
#[derive(Clone)]
pub struct VllmMetrics {
    registry: Registry,
    pub ttft: Histogram,
    /// vLLM observes every inter-token gap into both of these (the second is its older name).
    pub itl: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    pub success: IntCounterVec,
    pub prompt_tokens: Histogram,
    pub generation_tokens: Histogram,
}

/// vLLM's buckets for the time to the first token, inter-token gaps and whole requests (seconds).
const VLLM_TTFT: [f64; 22] =
    [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0];
const VLLM_ITL: [f64; 19] = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const VLLM_REQUEST: [f64; 21] =
    [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0];

/// 1, 2, 5, 10, 20, 50, … up to `max` (vLLM's token-count buckets; it stops at the model's
/// context length).
fn buckets_1_2_5(max: u64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1u64;
    loop {
        for m in [1, 2, 5] {
            let v = m * scale;
            if v > max {
                return out;
            }
            out.push(v as f64);
        }
        scale *= 10;
    }
}

impl VllmMetrics {
    /// Longest context the token-count buckets reach.
    const MAX_TOKENS: u64 = 1 << 20;

    fn new(model_name: &str) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model_name);
        let hist = |name: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::from(opts(name, help)).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", VLLM_TTFT.to_vec())?;
        let itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", VLLM_ITL.to_vec())?;
        let tpot = hist(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds (the same gaps as vllm:inter_token_latency_seconds).",
            VLLM_ITL.to_vec(),
        )?;
        let e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", VLLM_REQUEST.to_vec())?;
        let prompt_tokens = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", buckets_1_2_5(Self::MAX_TOKENS))?;
        let generation_tokens =
            hist("vllm:request_generation_tokens", "Number of generation tokens processed.", buckets_1_2_5(Self::MAX_TOKENS))?;
        let success =
            IntCounterVec::new(opts("vllm:request_success_total", "Count of successfully processed requests."), &["finished_reason"])?;
        registry.register(Box::new(success.clone()))?;
        Ok(Self { registry, ttft, itl, tpot, e2e, success, prompt_tokens, generation_tokens })
    }
}

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    model_name: String,
    pub vllm: VllmMetrics,
    pub running: IntGauge,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub cached_prompt_tokens: IntCounter,
    pub kv_transfer_bytes: IntCounterVec,
    pub handoff_failures: IntCounter,
    pub prefill_time: Histogram,
    pub prefill_queue_time: Histogram,
    pub prefill_compute_time: Histogram,
    pub export_time: Histogram,
    pub handoff_time: HistogramVec,
    pub decode_first_token_time: Histogram,
    pub requests: IntCounterVec,
    pub workers: IntGaugeVec,
    pub prefix_routed_blocks: IntCounter,
    pub store_pulled_blocks: IntCounter,
    pub store_offload_shed_blocks: IntCounter,
    pub state_errors: IntCounter,
    pub state_dropped_writes: IntCounter,
    pub retries: IntCounterVec,
    /// Requests refused at the door, by reason.
    pub refused: IntCounterVec,
    /// Admitted requests waiting for their first token.
    pub waiting: IntGauge,
    /// Choices whose decode worker was lost mid-stream, by outcome (`resumed`, `gave_up`).
    pub resumes: IntCounterVec,
    /// From losing a decode worker to the resumed pass's first token.
    pub resume_time: Histogram,
    /// Context tokens a resumed pass computed again (not found in any cache).
    pub resume_recomputed_tokens: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn buckets(min: f64, factor: f64, n: usize) -> Vec<f64> {
    prometheus::exponential_buckets(min, factor, n).unwrap_or_default()
}

impl Metrics {
    pub fn new(model_name: &str) -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("tandem".into()), None)?;
        let running = IntGauge::new("requests_running", "Requests being served by the gateway")?;
        let ttft = Histogram::with_opts(
            HistogramOpts::new("time_to_first_token_seconds", "Time to first token").buckets(buckets(0.005, 2.0, 14)),
        )?;
        let itl = Histogram::with_opts(
            HistogramOpts::new("inter_token_latency_seconds", "Time between tokens").buckets(buckets(0.001, 2.0, 14)),
        )?;
        let e2e = Histogram::with_opts(
            HistogramOpts::new("e2e_request_latency_seconds", "Whole request latency").buckets(buckets(0.01, 2.0, 14)),
        )?;
        let prompt_tokens = IntCounter::new("prompt_tokens_total", "Prompt tokens processed")?;
        let generation_tokens = IntCounter::new("generation_tokens_total", "Tokens generated")?;
        let cached_prompt_tokens = IntCounter::new("prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache")?;
        let kv_transfer_bytes =
            IntCounterVec::new(Opts::new("kv_transfer_bytes_total", "KV bytes handed from prefill to decode"), &["transport"])?;
        let handoff_failures = IntCounter::new("kv_handoff_failures_total", "KV handoffs that failed or timed out")?;
        let prefill_time = Histogram::with_opts(
            HistogramOpts::new("prefill_seconds", "Prompt computation on the prefill worker, first token included")
                .buckets(buckets(0.005, 2.0, 14)),
        )?;
        let stage = |name: &str, help: &str| Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets(0.0001, 2.0, 18)));
        let prefill_queue_time = stage("prefill_queue_seconds", "Wait on the prefill worker before the prompt's first forward pass")?;
        let prefill_compute_time =
            stage("prefill_compute_seconds", "Forward passes on the prefill worker, from the prompt's first to its first token")?;
        let export_time = stage("kv_export_seconds", "Reading a prompt's KV blocks out of the prefill worker's cache")?;
        let decode_first_token_time = stage(
            "decode_first_token_seconds",
            "From the prefill's answer to the decode worker's first token (KV import, then a decode step)",
        )?;
        let handoff_time = HistogramVec::new(
            HistogramOpts::new("kv_handoff_seconds", "KV transfer from prefill to decode, verdict included, by transport")
                .buckets(buckets(0.0001, 2.0, 16)),
            &["transport"],
        )?;
        let requests = IntCounterVec::new(Opts::new("requests_total", "Finished requests by outcome"), &["outcome"])?;
        let workers = IntGaugeVec::new(Opts::new("workers", "Workers in routing, by role"), &["role"])?;
        let prefix_routed_blocks =
            IntCounter::new("prefix_index_hit_blocks_total", "Prompt blocks the chosen prefill worker held, by the prefix index")?;
        let store_pulled_blocks = IntCounter::new(
            "kv_store_pulled_blocks_total",
            "Prompt blocks prefill workers fetched from the block store instead of computing",
        )?;
        let store_offload_shed_blocks = IntCounter::new(
            "kv_store_offload_shed_blocks_total",
            "Prompt blocks prefill workers did not offload to the block store because their offloads in flight filled the budget",
        )?;
        let state_errors = IntCounter::new("state_store_errors_total", "State store calls that failed or timed out")?;
        let state_dropped_writes =
            IntCounter::new("state_store_dropped_writes_total", "State writes dropped while the store was down or behind")?;
        let retries = IntCounterVec::new(
            Opts::new("worker_retries_total", "Requests moved to another worker before any token was sent, by role"),
            &["role"],
        )?;
        let resumes = IntCounterVec::new(
            Opts::new("resumes_total", "Choices whose decode worker was lost mid-stream, by outcome (resumed, gave_up)"),
            &["outcome"],
        )?;
        let resume_time = stage("resume_seconds", "From losing a decode worker mid-stream to the next token, from another one")?;
        let resume_recomputed_tokens =
            IntCounter::new("resume_recomputed_tokens_total", "Context tokens computed again to resume a choice on another decode worker")?;
        let refused = IntCounterVec::new(
            Opts::new(
                "refused_requests_total",
                "Requests refused before any work, by reason (invalid_api_key, requests, tokens, queue_full, queued_tokens_full, queue_wait)",
            ),
            &["reason"],
        )?;
        let waiting = IntGauge::new("admission_waiting_requests", "Admitted requests waiting for their first token")?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(waiting.clone()))?;
        registry.register(Box::new(resumes.clone()))?;
        registry.register(Box::new(resume_time.clone()))?;
        registry.register(Box::new(resume_recomputed_tokens.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(itl.clone()))?;
        registry.register(Box::new(e2e.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generation_tokens.clone()))?;
        registry.register(Box::new(cached_prompt_tokens.clone()))?;
        registry.register(Box::new(kv_transfer_bytes.clone()))?;
        registry.register(Box::new(handoff_failures.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(prefill_time.clone()))?;
        registry.register(Box::new(handoff_time.clone()))?;
        registry.register(Box::new(prefill_queue_time.clone()))?;
        registry.register(Box::new(prefill_compute_time.clone()))?;
        registry.register(Box::new(export_time.clone()))?;
        registry.register(Box::new(decode_first_token_time.clone()))?;
        registry.register(Box::new(workers.clone()))?;
        registry.register(Box::new(prefix_routed_blocks.clone()))?;
        registry.register(Box::new(store_pulled_blocks.clone()))?;
        registry.register(Box::new(store_offload_shed_blocks.clone()))?;
        registry.register(Box::new(state_errors.clone()))?;
        registry.register(Box::new(state_dropped_writes.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        Ok(Self {
            registry,
            model_name: model_name.to_string(),
            vllm: VllmMetrics::new(model_name)?,
            running,
            ttft,
            itl,
            e2e,
            prompt_tokens,
            generation_tokens,
            cached_prompt_tokens,
            kv_transfer_bytes,
            handoff_failures,
            prefill_time,
            prefill_queue_time,
            prefill_compute_time,
            export_time,
            handoff_time,
            decode_first_token_time,
            requests,
            workers,
            prefix_routed_blocks,
            store_pulled_blocks,
            store_offload_shed_blocks,
            state_errors,
            state_dropped_writes,
            retries,
            refused,
            waiting,
            resumes,
            resume_time,
            resume_recomputed_tokens,
        })
    }

    pub fn render(&self) -> String {
        render(&[self], Vec::new())
    }

    /// Its families: vLLM's, then Tandem's.
    fn gather(&self) -> Vec<MetricFamily> {
        let mut families = self.vllm.registry.gather();
        families.extend(self.registry.gather());
        families
    }
}

/// The `/metrics` page of a gateway serving `models` (each one's metrics), plus `extra`
/// families (the router's). With several models, each of Tandem's own series gains the
/// `model_name` label that vLLM's already carry, and each family is written once with every
/// model's series in it.
pub(crate) fn render(models: &[&Metrics], extra: Vec<MetricFamily>) -> String {
    let mut families: Vec<MetricFamily> = Vec::new();
    for m in models {
        let name = m.model_name.as_str();
        for mut f in m.gather() {
            if models.len() > 1 {
                for metric in f.mut_metric() {
                    if !metric.get_label().iter().any(|l| l.name() == "model_name") {
                        let mut labels = metric.take_label();
                        let mut l = LabelPair::default();
                        l.set_name("model_name".into());
                        l.set_value(name.into());
                        labels.insert(0, l);
                        metric.set_label(labels);
                    }
                }
            }
            match families.iter_mut().find(|g| g.name() == f.name()) {
                Some(g) => g.mut_metric().extend(f.take_metric()),
                None => families.push(f),
            }
        }
    }
    families.extend(extra);
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&families, &mut buf);
    let mut page = String::from_utf8(buf).unwrap_or_default();
    page.push_str(&tandem_runtime::telemetry::render_metrics());
    page
}
