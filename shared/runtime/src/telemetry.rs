//! Traces: every service's `tracing` spans become OpenTelemetry spans, exported over OTLP when an
//! endpoint is configured, with W3C `traceparent` propagation on every HTTP and gRPC hop.
//!
//! [`init`] runs first thing in `main`: it installs logging and the OpenTelemetry layer, the W3C
//! propagator and the sampler. Spans always get trace and span ids (log lines and `traceparent`
//! carry them), but nothing leaves the process until [`start_export`], which a service calls once
//! it knows who it is (its role, worker id and model make the OTLP resource). With no endpoint
//! configured there is no exporter at all.
//!
//! Export never holds up serving. Finished spans go to a bounded queue drained by the SDK's batch
//! processor on a thread of its own; when the queue is full (a slow or dead collector) a span is
//! dropped and counted, as is every span of a batch the collector refused or never received. The
//! counts are on every `/metrics` page ([`render_metrics`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::Context;
pub use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::logging::{JsonLines, LogFormat};

/// How OTLP is spoken to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (port 4317 by convention).
    #[default]
    Grpc,
    /// OTLP protobuf over HTTP (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

impl std::str::FromStr for OtlpProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => Err(format!("`{other}`: expected grpc or http/protobuf")),
        }
    }
}

impl std::fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        })
    }
}

/// Trace settings, named after the OpenTelemetry environment variables they come from.
#[derive(Debug, Clone, Default)]
pub struct TraceConfig {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: where spans go. None: nowhere.
    pub endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub protocol: OtlpProtocol,
    /// `OTEL_SERVICE_NAME`: replaces the role's own name (`tandem-gateway`, ...).
    pub service_name: Option<String>,
    /// `OTEL_TRACES_SAMPLER`: `always_on`, `always_off`, `traceidratio`, or `parentbased_` and
    /// one of those (the default is `parentbased_always_on`).
    pub sampler: Option<String>,
    /// `OTEL_TRACES_SAMPLER_ARG`: the ratio of the `traceidratio` samplers.
    pub sampler_arg: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES`: `key=value,key=value`, added to every span's resource.
    pub resource_attributes: Option<String>,
}

impl TraceConfig {
    /// The sampler named by `sampler` and `sampler_arg`.
    pub fn sampler(&self) -> Result<Sampler, String> {
        let ratio = || -> Result<f64, String> {
            match self.sampler_arg.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("traces sampler argument `{a}`: expected a ratio between 0 and 1")),
            }
        };
        let name = self.sampler.as_deref().map(str::trim).filter(|s| !s.is_empty()).unwrap_or("parentbased_always_on");
        Ok(match name {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
            "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?))),
            other => {
                return Err(format!(
                    "traces sampler `{other}`: expected always_on, always_off, traceidratio, parentbased_always_on, \
                     parentbased_always_off or parentbased_traceidratio"
                ))
            }
        })
    }

    /// The extra resource attributes, parsed (`key=value` pairs, values percent-decoded).
    pub fn extra_attributes(&self) -> Result<Vec<KeyValue>, String> {
        let Some(s) = self.resource_attributes.as_deref() else { return Ok(Vec::new()) };
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').ok_or_else(|| format!("resource attribute `{p}`: expected key=value"))?;
                Ok(KeyValue::new(k.trim().to_string(), percent_decode(v.trim())))
            })
            .collect()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Who is exporting: what the OTLP resource says of this process.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise: `tandem-gateway`, ...
    pub service_name: &'static str,
    /// `service.instance.id`: the worker id.
    pub instance_id: String,
    /// The served model's name, when the process serves one.
    pub model: Option<String>,
    /// Ranks of the process's tensor-parallel group, when it runs an engine.
    pub tp_size: Option<usize>,
}

struct Telemetry {
    config: TraceConfig,
    gate: Option<Arc<Gate>>,
}

static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();

/// What the export counted, for `/metrics`.
static EXPORTED: AtomicU64 = AtomicU64::new(0);
static DROPPED_QUEUE_FULL: AtomicU64 = AtomicU64::new(0);
static DROPPED_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);

/// Finished spans waiting for export at most; more are dropped (`OTEL_BSP_MAX_QUEUE_SIZE`).
fn max_queue() -> usize {
    std::env::var("OTEL_BSP_MAX_QUEUE_SIZE").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(2048)
}

/// Installs logging (as [`crate::init_logging`]) and tracing: the OpenTelemetry layer, the W3C
/// propagator and the sampler. Fails on a malformed setting, before anything runs.
pub fn init(default_level: &str, format: LogFormat, config: TraceConfig) -> Result<(), String> {
    use std::io::IsTerminal;
    // Before any exporter builds its HTTP client.
    crate::grpc::default_tls_provider();
    let sampler = config.sampler()?;
    config.extra_attributes()?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let gate = config.endpoint.is_some().then(|| Arc::new(Gate { inner: OnceLock::new(), queued: AtomicUsize::new(0), max: max_queue() }));
    let mut builder = SdkTracerProvider::builder().with_sampler(sampler);
    if let Some(g) = &gate {
        builder = builder.with_span_processor(GateRef(g.clone()));
    }
    let provider = builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("tandem");

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let logs = match format {
        LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_filter(filter).boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .with_filter(filter)
            .boxed(),
    };
    // The project's own spans and events, whatever the log level: a quiet log must not cost the
    // trace its spans. Dependencies' spans (h2, tonic internals) stay out.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(Targets::new().with_target("tandem", tracing::Level::INFO));
    let _ = tracing_subscriber::registry().with(spans).with(logs).try_init();
    let _ = TELEMETRY.set(Telemetry { config, gate });
    Ok(())
}

/// Starts exporting this process's spans, if an endpoint is configured (else does nothing). Call
/// it inside the Tokio runtime, once the identity is known. Spans that ended before are dropped.
pub fn start_export(id: Identity) -> Result<(), String> {
    let Some(t) = TELEMETRY.get() else { return Ok(()) };
    let (Some(endpoint), Some(gate)) = (t.config.endpoint.as_deref(), t.gate.as_ref()) else { return Ok(()) };
    let mut exporter = build_exporter(endpoint, t.config.protocol)?;
    exporter.set_resource(&resource(&t.config, &id)?);
    let batch = BatchSpanProcessor::builder(Counted(exporter))
        .with_batch_config(BatchConfigBuilder::default().with_max_queue_size(gate.max).build())
        .build();
    if gate.inner.set(batch).is_err() {
        return Err("trace export started twice".into());
    }
    tracing::info!(%endpoint, protocol = %t.config.protocol, service = resource_name(&t.config, &id), "exporting traces over OTLP");
    Ok(())
}

fn build_exporter(endpoint: &str, protocol: OtlpProtocol) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::WithExportConfig;
    let built = match protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build(),
        OtlpProtocol::HttpProtobuf => {
            // The endpoint names the collector; traces go to its signal path.
            let base = endpoint.trim_end_matches('/');
            let url = if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .build()
        }
    };
    built.map_err(|e| format!("the OTLP exporter for {endpoint}: {e}"))
}

fn resource_name(config: &TraceConfig, id: &Identity) -> String {
    config.service_name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| id.service_name.to_string())
}

fn resource(config: &TraceConfig, id: &Identity) -> Result<Resource, String> {
    // Extra attributes first: the process's own facts win over them, except a service.name
    // given there, which stands unless OTEL_SERVICE_NAME is set.
    let extra = config.extra_attributes()?;
    let named_in_extra = extra.iter().find(|kv| kv.key.as_str() == "service.name").map(|kv| kv.value.to_string());
    let name = config.service_name.clone().filter(|s| !s.is_empty()).or(named_in_extra).unwrap_or_else(|| id.service_name.to_string());
    let mut attrs = extra;
    attrs.push(KeyValue::new("service.name", name));
    attrs.push(KeyValue::new("service.instance.id", id.instance_id.clone()));
    attrs.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    attrs.push(KeyValue::new("service.namespace", "tandem"));
    if let Some(m) = &id.model {
        attrs.push(KeyValue::new("gen_ai.request.model", m.clone()));
        attrs.push(KeyValue::new("tandem.model", m.clone()));
    }
    if let Some(tp) = id.tp_size {
        attrs.push(KeyValue::new("tandem.tp_size", tp as i64));
    }
    Ok(Resource::builder_empty().with_attributes(attrs).build())
}

/// Sends what is still queued, waiting at most `timeout`, and stops exporting. Call it last.
pub fn shutdown(timeout: Duration) {
    if let Some(t) = TELEMETRY.get() {
        if let Some(batch) = t.gate.as_ref().and_then(|g| g.inner.get()) {
            let _ = batch.force_flush();
            let _ = batch.shutdown_with_timeout(timeout);
        }
    }
}

/// Spans exported, and dropped by reason, as Prometheus text.
pub fn render_metrics() -> String {
    format!(
        "# HELP tandem_trace_spans_exported_total Spans delivered to the OTLP collector.\n\
         # TYPE tandem_trace_spans_exported_total counter\n\
         tandem_trace_spans_exported_total {}\n\
         # HELP tandem_trace_spans_dropped_total Spans dropped rather than delay serving: the export queue was full, or the collector refused or never received the batch.\n\
         # TYPE tandem_trace_spans_dropped_total counter\n\
         tandem_trace_spans_dropped_total{{reason=\"queue_full\"}} {}\n\
         tandem_trace_spans_dropped_total{{reason=\"export_failed\"}} {}\n",
        EXPORTED.load(Ordering::Relaxed),
        DROPPED_QUEUE_FULL.load(Ordering::Relaxed),
        DROPPED_EXPORT_FAILED.load(Ordering::Relaxed),
    )
}

/// In front of the batch processor: counts what is queued, and drops (and counts) a span the
/// queue has no room for, so the batch processor's own queue never overflows unseen.
#[derive(Debug)]
struct Gate {
    inner: OnceLock<BatchSpanProcessor>,
    queued: AtomicUsize,
    max: usize,
}

#[derive(Debug)]
struct GateRef(Arc<Gate>);

impl SpanProcessor for GateRef {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let Some(batch) = self.0.inner.get() else { return };
        if self.0.queued.fetch_add(1, Ordering::AcqRel) >= self.0.max {
            self.0.queued.fetch_sub(1, Ordering::AcqRel);
            DROPPED_QUEUE_FULL.fetch_add(1, Ordering::Relaxed);
            return;
        }
        batch.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.inner.get().map_or(Ok(()), |b| b.force_flush())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.inner.get().map_or(Ok(()), |b| b.shutdown_with_timeout(timeout))
    }
}

/// The exporter, counting each batch's spans as delivered or dropped (and out of the queue).
#[derive(Debug)]
struct Counted(opentelemetry_otlp::SpanExporter);

impl SpanExporter for Counted {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.0.export(batch).await;
        if let Some(t) = TELEMETRY.get() {
            if let Some(g) = &t.gate {
                g.queued.fetch_sub(n.min(g.queued.load(Ordering::Acquire)), Ordering::AcqRel);
            }
        }
        match &result {
            Ok(()) => EXPORTED.fetch_add(n as u64, Ordering::Relaxed),
            Err(_) => DROPPED_EXPORT_FAILED.fetch_add(n as u64, Ordering::Relaxed),
        };
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

// ---- propagation ----

/// The keys the W3C propagator reads and writes.
const TRACE_KEYS: [&str; 2] = ["traceparent", "tracestate"];

/// The trace context a carrier holds (`traceparent`, read by the W3C propagator; `get` looks a
/// key up). Empty when there is none or it is malformed: a new trace starts.
pub fn extract<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Context {
    let carrier: HashMap<String, String> = TRACE_KEYS
        .iter()
        .filter_map(|&k| get(k).map(|v| (k.to_string(), v.trim().to_string())))
        .filter(|(k, v)| k != "traceparent" || well_formed(v))
        .collect();
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier))
}

/// The field lengths and lower-case hex the W3C format requires, which the propagator's own
/// parsing does not check on its own (it would take a 31-digit trace id).
fn well_formed(traceparent: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let p: Vec<&str> = traceparent.split('-').collect();
    p.len() >= 4 && hex(p[0], 2) && hex(p[1], 32) && hex(p[2], 16) && hex(p[3], 2)
}

/// Writes `span`'s trace context (`traceparent`) for the next hop through `set`.
pub fn inject(span: &tracing::Span, mut set: impl FnMut(&str, String)) {
    let cx = span.context();
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    for (k, v) in carrier {
        set(&k, v);
    }
}

/// `msg` as a gRPC call that carries `span`'s trace context.
pub fn grpc_request<T>(msg: T, span: &tracing::Span) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let md = r.metadata_mut();
    inject(span, |k, v| {
        if let (Ok(k), Ok(v)) = (tonic::metadata::MetadataKey::from_bytes(k.as_bytes()), tonic::metadata::MetadataValue::try_from(v)) {
            md.insert(k, v);
        }
    });
    r
}

/// Places `span` under the remote parent the carrier holds (if any), and records its trace id as
/// the span's `trace_id` field, which log lines show. Call it before the span is first entered.
pub fn continue_trace<'a>(span: &tracing::Span, get: impl Fn(&str) -> Option<&'a str>) {
    let parent = extract(get);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span.record("trace_id", tracing::field::display(trace_id(span)));
}

/// `span`'s `traceparent`, as the next hop (or the client) receives it.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut out = None;
    inject(span, |k, v| {
        if k == "traceparent" {
            out = Some(v);
        }
    });
    out
}

/// `span`'s trace id as 32 lower-case hex digits (all zero when tracing is not installed).
pub fn trace_id(span: &tracing::Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

/// `span`'s own id as 16 lower-case hex digits.
pub fn span_id(span: &tracing::Span) -> String {
    span.context().span().span_context().span_id().to_string()
}

/// A span that already happened, from `start` to `end`, as a child of `parent`: for stages
/// timed elsewhere (an engine thread's queue wait and compute) and reported afterwards.
pub fn past_span(
    parent: &tracing::Span,
    name: impl Into<Cow<'static, str>>,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
) {
    let cx = parent.context();
    if !cx.span().span_context().is_sampled() {
        return;
    }
    let tracer = opentelemetry::global::tracer("tandem");
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(&tracer, &cx);
    span.end_with_timestamp(end.max(start));
}

/// Adds an event named `name` with `attributes` to `span`, now.
pub fn event(span: &tracing::Span, name: &'static str, attributes: Vec<KeyValue>) {
    span.add_event(name, attributes);
}

/// Sets a string-array attribute (which `tracing` fields cannot hold) on `span`.
pub fn set_strings(span: &tracing::Span, key: &'static str, values: Vec<String>) {
    let values = values.into_iter().map(opentelemetry::StringValue::from).collect();
    span.set_attribute(key, opentelemetry::Value::Array(opentelemetry::Array::String(values)));
}

/// Marks `span` failed with `code` (an error's stable code) and `message`.
pub fn fail(span: &tracing::Span, code: &str, message: impl Into<Cow<'static, str>>) {
    span.set_attribute("error.type", code.to_string());
    span.set_status(Status::error(message));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_parse_by_their_standard_names() {
        let cfg =
            |s: &str, a: Option<&str>| TraceConfig { sampler: Some(s.into()), sampler_arg: a.map(Into::into), ..TraceConfig::default() };
        assert!(matches!(TraceConfig::default().sampler().unwrap(), Sampler::ParentBased(_)));
        assert!(matches!(cfg("always_off", None).sampler().unwrap(), Sampler::AlwaysOff));
        assert!(matches!(cfg("traceidratio", Some("0.25")).sampler().unwrap(), Sampler::TraceIdRatioBased(r) if r == 0.25));
        assert!(matches!(cfg("traceidratio", None).sampler().unwrap(), Sampler::TraceIdRatioBased(r) if r == 1.0));
        assert!(cfg("traceidratio", Some("2")).sampler().is_err());
        assert!(cfg("sometimes", None).sampler().unwrap_err().contains("sometimes"));
    }

    #[test]
    fn resource_attributes_parse_and_the_service_name_rule_holds() {
        let mut cfg =
            TraceConfig { resource_attributes: Some("deployment.environment=prod, team=serving%20infra".into()), ..Default::default() };
        let attrs = cfg.extra_attributes().unwrap();
        assert_eq!(attrs[1], KeyValue::new("team", "serving infra"));
        let id = Identity { service_name: "tandem-decode", instance_id: "decode-0".into(), model: Some("m".into()), tp_size: Some(1) };
        let r = resource(&cfg, &id).unwrap();
        let get = |r: &Resource, k: &'static str| r.get(&opentelemetry::Key::from_static_str(k)).map(|v| v.to_string());
        assert_eq!(get(&r, "service.name").as_deref(), Some("tandem-decode"));
        assert_eq!(get(&r, "service.instance.id").as_deref(), Some("decode-0"));
        assert_eq!(get(&r, "deployment.environment").as_deref(), Some("prod"));
        assert_eq!(get(&r, "tandem.tp_size").as_deref(), Some("1"));
        cfg.resource_attributes = Some("service.name=from-attrs".into());
        assert_eq!(get(&resource(&cfg, &id).unwrap(), "service.name").as_deref(), Some("from-attrs"));
        cfg.service_name = Some("from-env".into());
        assert_eq!(get(&resource(&cfg, &id).unwrap(), "service.name").as_deref(), Some("from-env"));
        cfg.resource_attributes = Some("novalue".into());
        assert!(cfg.extra_attributes().is_err());
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn header<'a>(h: &'a str) -> impl Fn(&str) -> Option<&'a str> {
        move |k: &str| (k == "traceparent").then_some(h)
    }

    #[test]
    fn the_w3c_propagator_keeps_valid_contexts_and_refuses_malformed_ones() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let cx = extract(header(VALID));
        let sc = cx.span().span_context().clone();
        assert_eq!(
            (sc.trace_id().to_string().as_str(), sc.span_id().to_string().as_str()),
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
        );
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in [
            "",
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(!extract(header(bad)).span().span_context().is_valid(), "{bad:?}");
        }
        assert!(!extract(|_| None).span().span_context().is_valid());
    }

    #[test]
    fn a_span_continues_the_callers_trace_and_passes_its_own_position_on() {
        use tracing_subscriber::layer::SubscriberExt;
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("server", trace_id = tracing::field::Empty);
            continue_trace(&span, header(VALID));
            assert_eq!(trace_id(&span), "4bf92f3577b34da6a3ce929d0e0e4736");
            let next = traceparent(&span).unwrap();
            assert!(next.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && next.ends_with("-01"), "{next}");
            assert_ne!(span_id(&span), "00f067aa0ba902b7", "the next hop's parent is this span, not the caller's");
            assert!(next.contains(&span_id(&span)));
            // The gRPC metadata of a call made under it carries the same.
            let r = grpc_request((), &span);
            assert_eq!(r.metadata().get("traceparent").unwrap().to_str().unwrap(), next);
            // No incoming context: a new trace.
            let fresh = tracing::info_span!("server", trace_id = tracing::field::Empty);
            continue_trace(&fresh, |_| None);
            assert_ne!(trace_id(&fresh), trace_id(&span));
            assert_ne!(trace_id(&fresh), "00000000000000000000000000000000");
        });
    }

    #[test]
    fn protocols_parse_by_their_standard_names() {
        assert_eq!("grpc".parse::<OtlpProtocol>().unwrap(), OtlpProtocol::Grpc);
        assert_eq!("http/protobuf".parse::<OtlpProtocol>().unwrap(), OtlpProtocol::HttpProtobuf);
        assert!("http/json".parse::<OtlpProtocol>().is_err());
    }
}
