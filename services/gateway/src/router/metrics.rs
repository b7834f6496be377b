//! The router's metrics: decisions taken, panels run, members skipped, the judge's latency, and
//! every backend call's latency and errors.

use std::time::Duration;

use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub(crate) struct RouterMetrics {
    registry: Registry,
    /// Requests each decision took (`default` for `…/auto`'s fallback, `plugin` for a request's
    /// own panel).
    pub decisions: IntCounterVec,
    pub panel_size: Histogram,
    pub skipped: IntCounter,
    pub judge: Histogram,
    pub backend: HistogramVec,
    pub backend_errors: IntCounterVec,
}

impl RouterMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("tandem".into()), None)?;
        let decisions =
            IntCounterVec::new(Opts::new("router_decisions_total", "Router requests by the decision that took them"), &["decision"])?;
        let panel_size = Histogram::with_opts(
            HistogramOpts::new("fusion_panel_size", "Members asked in each fusion panel")
                .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]),
        )?;
        let skipped = IntCounter::new("fusion_members_skipped_total", "Panel members dropped for failing or timing out (on_error: skip)")?;
        let latency = prometheus::exponential_buckets(0.01, 2.0, 16).unwrap_or_default();
        let judge = Histogram::with_opts(
            HistogramOpts::new("fusion_judge_seconds", "The judge's call, to its whole answer (to its last event when streamed)")
                .buckets(latency.clone()),
        )?;
        let backend = HistogramVec::new(
            HistogramOpts::new("router_backend_seconds", "Calls to each router backend, panel members and judges included")
                .buckets(latency),
            &["backend"],
        )?;
        let backend_errors =
            IntCounterVec::new(Opts::new("router_backend_errors_total", "Router backend calls that failed or timed out"), &["backend"])?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(panel_size.clone()))?;
        registry.register(Box::new(skipped.clone()))?;
        registry.register(Box::new(judge.clone()))?;
        registry.register(Box::new(backend.clone()))?;
        registry.register(Box::new(backend_errors.clone()))?;
        Ok(Self { registry, decisions, panel_size, skipped, judge, backend, backend_errors })
    }

    /// One backend call: its latency, and an error if it failed.
    pub fn observe(&self, backend: &str, took: Duration, ok: bool) {
        self.backend.with_label_values(&[backend]).observe(took.as_secs_f64());
        if !ok {
            self.backend_errors.with_label_values(&[backend]).inc();
        }
    }

    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }
}
