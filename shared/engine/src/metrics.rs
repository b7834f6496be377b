//! A worker's own metrics in the Prometheus text format, under the names vLLM exports for the
//! same things (`vllm:*`, labelled `model_name`), so that dashboards, alerts and autoscalers
//! written for vLLM read a Tandem worker unchanged; what is Tandem's own is `tandem_*`, labelled
//! with the worker's `role`.
//!
//! Rendered from the engine's load figures at each scrape: nothing is counted twice, and a
//! scrape costs nothing while nobody asks.

use prometheus::{Encoder, Gauge, IntCounter, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::EngineHandle;

/// The metrics page of a worker of `role` (`prefill`, `decode`) around `engine`.
pub fn render(engine: &EngineHandle, role: &str) -> String {
    let load = engine.load();
    let model = engine.info().model_name.as_str();
    let registry = Registry::new();
    let labelled = |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model);
    let gauge = |name: &str, help: &str, v: f64| {
        if let Ok(g) = Gauge::with_opts(labelled(name, help)) {
            g.set(v);
            let _ = registry.register(Box::new(g));
        }
    };
    let counter = |name: &str, help: &str, v: u64| {
        if let Ok(c) = IntCounter::with_opts(labelled(name, help)) {
            c.inc_by(v);
            let _ = registry.register(Box::new(c));
        }
    };
    let pool = load.pool;
    let usage = if pool.total_blocks == 0 { 0.0 } else { pool.used_blocks as f64 / pool.total_blocks as f64 };
    gauge("vllm:num_requests_running", "Sequences in this worker's running batch", load.running as f64);
    gauge("vllm:num_requests_waiting", "Sequences queued on this worker, not yet running", load.waiting as f64);
    gauge("vllm:kv_cache_usage_perc", "Fraction of this worker's KV blocks held by sequences (1 = full)", usage);
    gauge("vllm:gpu_cache_usage_perc", "The same as vllm:kv_cache_usage_perc, under its older name", usage);
    counter("vllm:num_preemptions_total", "Sequences whose KV was dropped for room and later recomputed", load.preemptions);
    counter("vllm:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache", load.prefix_queried_tokens);
    counter("vllm:prefix_cache_hits_total", "Prompt tokens found in the prefix cache", load.prefix_hit_tokens);
    if let Ok(c) = IntCounter::with_opts(
        Opts::new(
            "tandem_worker_finished_total",
            "Sequences this worker brought to their end: generated to a finish, or prefilled and handed over",
        )
        .const_label("role", role),
    ) {
        c.inc_by(load.finished);
        let _ = registry.register(Box::new(c));
    }
    if let Ok(requests) = IntGaugeVec::new(
        Opts::new("tandem_worker_requests", "This worker's sequences: running in its batch, waiting in its queue")
            .const_label("role", role),
        &["state"],
    ) {
        requests.with_label_values(&["running"]).set(load.running as i64);
        requests.with_label_values(&["waiting"]).set(load.waiting as i64);
        let _ = registry.register(Box::new(requests));
    }
    if let Ok(blocks) = IntGaugeVec::new(
        Opts::new("tandem_kv_blocks", "This worker's KV blocks by state: used by sequences, cached for reuse, free")
            .const_label("role", role),
        &["state"],
    ) {
        let free = pool.total_blocks.saturating_sub(pool.used_blocks + pool.cached_blocks);
        for (state, n) in [("used", pool.used_blocks), ("cached", pool.cached_blocks), ("free", free)] {
            blocks.with_label_values(&[state]).set(n as i64);
        }
        let _ = registry.register(Box::new(blocks));
    }
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
