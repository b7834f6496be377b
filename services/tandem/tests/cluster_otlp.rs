//! Traces exported over OTLP by real processes to a real receiver: one streamed request is one
//! trace with spans from the gateway, the prefill and the decode process, whose numbers agree
//! with the response and the metrics; and a collector that never answers costs the requests
//! nothing.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tandem_test_support::otlp::{OtlpSink, Span};

/// Starts a prefill, a decode and a gateway process exporting to `env`'s collector.
fn cluster(env: &[(&str, &str)], decode_env: &[(&str, &str)]) -> (Proc, Proc, Proc, String) {
    let engine = ["--kv-cache-mb", "64"];
    let prefill = start_env(&[&["prefill"][..], &engine].concat(), env);
    let decode = start_env(&[&["decode"][..], &engine].concat(), &[env, decode_env].concat());
    let (p, d) = (prefill.field("grpc"), decode.field("grpc"));
    let gateway = start_env(&["gateway", "--listen", "127.0.0.1:0", "--poll-interval-ms", "200", "--prefill", &p, "--decode", &d], env);
    let base = format!("http://{}", gateway.field("http"));
    (prefill, decode, gateway, base)
}

async fn ready(base: &str) {
    eventually("the gateway is ready", Duration::from_secs(60), || async { http_status(base, "/ready") == Some(200) }).await;
}

fn one<'a>(spans: &'a [Span], service: &str, name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.service == service && s.name == name).collect();
    assert_eq!(found.len(), 1, "one `{name}` span from {service}: {:#?}", spans.iter().map(|s| (&s.service, &s.name)).collect::<Vec<_>>());
    found[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn one_streamed_request_is_one_trace_across_processes() {
    let sink = OtlpSink::start().await.unwrap();
    let grpc = format!("http://{}", sink.grpc);
    let http = format!("http://{}", sink.http);
    // The gateway and prefill worker speak OTLP/gRPC, the decode worker OTLP/HTTP.
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", grpc.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let decode_env = [("OTEL_EXPORTER_OTLP_ENDPOINT", http.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")];
    let (_prefill, _decode, _gateway, base) = cluster(&env, &decode_env);
    ready(&base).await;
    // A first request warms the engines, so the traced one shows the steady state.
    let (status, _) = post(&base, "/v1/completions", &json!({"model": MODEL, "prompt": "Warm up", "max_tokens": 2})).await;
    assert_eq!(status, 200);
    let moved = |base: &str| {
        let page = http_get(base, "/metrics").unwrap();
        page.lines()
            .filter(|l| l.starts_with("tandem_kv_transfer_bytes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = moved(&base);

    let body = chat_body("Tell me about trains.", json!({"max_tokens": 40, "stream": true, "stream_options": {"include_usage": true}}));
    let r = client().post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let trace = Traceparent::parse(r.headers()["traceparent"].to_str().unwrap()).unwrap();
    let (chunks, done) = sse(r).await;
    assert!(done);
    let usage = chunks.last().unwrap()["usage"].clone();
    let response_id = chunks[0]["id"].as_str().unwrap().to_string();
    let finish: Vec<Value> =
        chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| c["finish_reason"].clone()).filter(|f| !f.is_null()).collect();

    // Everything arrives once each process's batch goes out.
    let wanted = [
        ("tandem-gateway", "POST /v1/chat/completions"),
        ("tandem-gateway", &*format!("chat {MODEL}")),
        ("tandem-gateway", "template and tokenize"),
        ("tandem-gateway", "route by prefix"),
        ("tandem-gateway", "tandem.v1.Prefill/Prefill"),
        ("tandem-gateway", "tandem.v1.Decode/Generate"),
        ("tandem-prefill", "tandem.v1.Prefill/Prefill"),
        ("tandem-prefill", "engine queue"),
        ("tandem-prefill", "engine prefill"),
        ("tandem-prefill", "kv export"),
        ("tandem-prefill", "kv transfer"),
        ("tandem-decode", "tandem.v1.Decode/Generate"),
        ("tandem-decode", "wait for kv blocks"),
        ("tandem-decode", "kv import"),
        ("tandem-decode", "generate"),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()));
    eventually("every process exported its spans of the request", Duration::from_secs(20), || async {
        let have: HashSet<(String, String)> = sink.trace(&trace.trace_id).into_iter().map(|s| (s.service, s.name)).collect();
        wanted.iter().all(|w| have.contains(w))
    })
    .await;
    let spans = sink.trace(&trace.trace_id);
    if let Ok(path) = std::env::var("TANDEM_TRACE_DUMP") {
        let all: Vec<Value> = spans.iter().map(Span::to_json).collect();
        std::fs::write(path, serde_json::to_string_pretty(&all).unwrap()).unwrap();
    }

    // One tree: one root (the HTTP server span, as no traceparent came in), and every other
    // span's parent is in the trace.
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    let http_span = one(&spans, "tandem-gateway", "POST /v1/chat/completions");
    assert_eq!(roots[0].span_id, http_span.span_id);
    assert_eq!(
        (http_span.kind, http_span.str("http.route"), http_span.int("http.response.status_code")),
        (2, Some("/v1/chat/completions"), Some(200))
    );
    assert_eq!(http_span.span_id, trace.span_id, "the response's traceparent names the server span");
    for s in &spans {
        assert!(s.parent_span_id.is_empty() || ids.contains(s.parent_span_id.as_str()), "orphan: {s:#?}");
        assert!(s.end_ns >= s.start_ns, "{s:#?}");
        assert_eq!(s.status_code, 0, "no span failed: {s:#?}");
    }
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent = |s: &Span| by_id[s.parent_span_id.as_str()].clone();

    // The workers' server spans hang under the gateway's client calls.
    for (service, name) in [("tandem-prefill", "tandem.v1.Prefill/Prefill"), ("tandem-decode", "tandem.v1.Decode/Generate")] {
        let server = one(&spans, service, name);
        let client = parent(server);
        assert_eq!((server.kind, client.kind, client.service.as_str(), client.name.as_str()), (2, 3, "tandem-gateway", name));
        assert_eq!(server.resource["tandem.model"], MODEL);
        assert!(server.resource["service.instance.id"].as_str().is_some_and(|i| !i.is_empty()));
        assert!(server.resource["service.version"].as_str().is_some());
        assert_eq!(server.resource["tandem.tp_size"], 1);
    }

    // The GenAI span says what the client was told.
    let gen_ai = one(&spans, "tandem-gateway", &format!("chat {MODEL}"));
    assert_eq!(gen_ai.str("gen_ai.operation.name"), Some("chat"));
    assert_eq!(gen_ai.str("gen_ai.request.model"), Some(MODEL));
    assert_eq!(gen_ai.int("gen_ai.request.max_tokens"), Some(40));
    assert_eq!(gen_ai.str("gen_ai.response.id"), Some(response_id.as_str()));
    assert_eq!(gen_ai.int("gen_ai.usage.input_tokens"), usage["prompt_tokens"].as_i64());
    assert_eq!(gen_ai.int("gen_ai.usage.output_tokens"), usage["completion_tokens"].as_i64());
    assert_eq!(gen_ai.attributes["gen_ai.response.finish_reasons"], Value::Array(finish));
    assert!(gen_ai.end_ns >= one(&spans, "tandem-gateway", "tandem.v1.Decode/Generate").end_ns, "the GenAI span lasts the whole stream");
    let routed = one(&spans, "tandem-gateway", "tandem.v1.Prefill/Prefill");
    assert_eq!(routed.int("tandem.route.candidates"), Some(1));
    assert!(routed.attributes.contains_key("tandem.route.score"));

    // The KV transfer: what the span says moved is what the gateway's metrics counted.
    let transfer = one(&spans, "tandem-prefill", "kv transfer");
    let transport = transfer.str("tandem.kv.transport").unwrap().to_string();
    let bytes = transfer.int("tandem.kv.bytes").unwrap();
    assert!(metric(&base, &format!("tandem_kv_transfer_bytes_total{{transport=\"{transport}\"}}")).is_some());
    assert_eq!(bytes as f64, moved(&base) - before);
    assert!(bytes > 0 && transfer.int("tandem.kv.blocks").unwrap() > 0);
    assert_eq!(transfer.str("tandem.kv.verdict"), Some("accepted"));
    assert!(transfer.attributes.contains_key("tandem.kv.checksum_ms") && transfer.attributes.contains_key("tandem.kv.gbps"));
    let import = one(&spans, "tandem-decode", "kv import");
    assert_eq!(import.int("tandem.kv.bytes"), Some(bytes));

    // The engine's stages sit inside the prefill server span, in order.
    let server = one(&spans, "tandem-prefill", "tandem.v1.Prefill/Prefill");
    let computed = one(&spans, "tandem-prefill", "engine prefill");
    assert_eq!(computed.parent_span_id, server.span_id);
    assert_eq!(
        computed.int("tandem.prefill.computed_tokens").unwrap() + computed.int("tandem.prefill.cached_tokens").unwrap(),
        usage["prompt_tokens"].as_i64().unwrap()
    );
    assert!(computed.int("tandem.prefill.chunks").unwrap() >= 1);
    let queued = one(&spans, "tandem-prefill", "engine queue");
    assert!(queued.end_ns <= computed.start_ns + 1_000 && computed.start_ns >= server.start_ns);

    // Decode: the tokens it generated (all but the prefill's first).
    let generate = one(&spans, "tandem-decode", "generate");
    assert_eq!(generate.int("gen_ai.usage.output_tokens"), usage["completion_tokens"].as_i64());
    assert!(generate.attributes.contains_key("tandem.decode.first_token_ms"));
    let decoded = one(&spans, "tandem-decode", "tandem.v1.Decode/Generate");
    assert_eq!(decoded.int("gen_ai.usage.output_tokens"), Some(usage["completion_tokens"].as_i64().unwrap() - 1));

    // Nothing was dropped on the way.
    for p in [&_prefill, &_decode] {
        let m = format!("http://{}", p.field("metrics"));
        assert_eq!(metric(&m, "tandem_trace_spans_dropped_total{reason=\"export_failed\"}"), Some(0.0));
        assert!(metric(&m, "tandem_trace_spans_exported_total").unwrap() > 0.0);
    }
}

/// Median time of `n` short completions.
async fn median_latency(base: &str, n: usize) -> Duration {
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let (status, v) = post(base, "/v1/completions", &json!({"model": MODEL, "prompt": "Hello there", "max_tokens": 8})).await;
        assert_eq!(status, 200, "{v}");
        times.push(t.elapsed());
    }
    times.sort();
    times[n / 2]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_never_answers_costs_requests_nothing() {
    // It accepts connections and then says nothing: the slowest a collector can be.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "16"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "16"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
    ];
    let (_p, _d, _g, stalled) = cluster(&env, &[]);
    let (_p2, _d2, _g2, plain) = cluster(&[], &[]);
    ready(&stalled).await;
    ready(&plain).await;
    // Warm both, then alternate the measurements so both see the same machine.
    median_latency(&stalled, 2).await;
    median_latency(&plain, 2).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        a.push(median_latency(&stalled, 5).await);
        b.push(median_latency(&plain, 5).await);
    }
    a.sort();
    b.sort();
    let (with, without) = (a[1], b[1]);
    assert!(with < without * 2 + Duration::from_millis(100), "with a silent collector {with:?}, without {without:?}");
    // The spans it could not take were dropped and counted: the queue filled, and the batch on
    // its way timed out.
    let dropped = |reason: &'static str| {
        let base = stalled.clone();
        move || metric(&base, &format!("tandem_trace_spans_dropped_total{{reason=\"{reason}\"}}")).unwrap_or(0.0) > 0.0
    };
    let queue_full = dropped("queue_full");
    eventually("spans are dropped when the queue is full", Duration::from_secs(10), || async { queue_full() }).await;
    let failed = dropped("export_failed");
    eventually("a batch that timed out is counted", Duration::from_secs(20), || async { failed() }).await;
    assert_eq!(metric(&stalled, "tandem_trace_spans_exported_total"), Some(0.0));
}
