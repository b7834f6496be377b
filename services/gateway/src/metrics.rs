//! Prometheus metrics served at `/metrics`.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub cached_prompt_tokens: IntCounter,
    pub kv_blocks_in_use: IntGaugeVec,
    pub kv_transfer_bytes: IntCounterVec,
    pub handoff_failures: IntCounter,
    pub prefill_time: Histogram,
    pub prefill_queue_time: Histogram,
    pub prefill_compute_time: Histogram,
    pub export_time: Histogram,
    pub handoff_time: Histogram,
    pub decode_first_token_time: Histogram,
    pub requests: IntCounterVec,
    pub workers: IntGaugeVec,
    pub prefix_routed_blocks: IntCounter,
    pub store_pulled_blocks: IntCounter,
    pub store_offload_shed_blocks: IntCounter,
    pub state_errors: IntCounter,
    pub state_dropped_writes: IntCounter,
    pub retries: IntCounterVec,
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
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("tandem".into()), None)?;
        let running = IntGauge::new("requests_running", "Requests being served by the gateway")?;
        let waiting = IntGauge::new("requests_waiting", "Sequences queued in the workers, by their last report")?;
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
        let kv_blocks_in_use = IntGaugeVec::new(Opts::new("kv_blocks_in_use", "KV blocks held by sequences, by pool"), &["role"])?;
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
        let handoff_time = Histogram::with_opts(
            HistogramOpts::new("kv_handoff_seconds", "KV transfer from prefill to decode, verdict included")
                .buckets(buckets(0.0001, 2.0, 16)),
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
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(waiting.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(itl.clone()))?;
        registry.register(Box::new(e2e.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generation_tokens.clone()))?;
        registry.register(Box::new(cached_prompt_tokens.clone()))?;
        registry.register(Box::new(kv_blocks_in_use.clone()))?;
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
            running,
            waiting,
            ttft,
            itl,
            e2e,
            prompt_tokens,
            generation_tokens,
            cached_prompt_tokens,
            kv_blocks_in_use,
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
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
