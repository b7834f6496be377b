//! Trace context across processes: what the gateway receives in `traceparent` reaches the span
//! each worker process logs for the request, in text logs and in JSON lines.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn trace_context_reaches_every_worker() {
    let c = shared();
    let incoming = Traceparent::new_root();
    let r = client()
        .post(format!("{}/v1/chat/completions", c.base))
        .header("traceparent", incoming.header())
        .json(&chat_body("Hello!", json!({"max_tokens": 3})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The trace id is kept; the span is the gateway's own.
    let back = Traceparent::parse(r.headers()["traceparent"].to_str().unwrap()).unwrap();
    assert_eq!((&back.trace_id, &back.flags), (&incoming.trace_id, &incoming.flags));
    assert_ne!(back.span_id, incoming.span_id);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], request_id);

    // Each worker put the trace id and the request id on its span for the request.
    let logged = |p: &Proc, trace: &Traceparent, choice: &str| {
        let (t, id) = (format!("trace_id={}", trace.trace_id), format!("request_id={choice}"));
        p.log_lines().iter().any(|l| l.contains(&t) && l.contains(&id))
    };
    let choice = format!("{request_id}-0");
    for (role, p) in [("prefill", &c.prefill[0]), ("decode", &c.decode[0])] {
        eventually(&format!("the {role} worker logs the request under its trace id"), std::time::Duration::from_secs(10), || async {
            logged(p, &incoming, &choice)
        })
        .await;
    }

    // Without a traceparent, or with a malformed one, the gateway starts a trace: new ids,
    // sampled, and the workers see that one.
    let zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    let mut seen = Vec::new();
    for header in [None, Some(zero)] {
        let mut req = client().post(format!("{}/v1/completions", c.base)).json(&json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}));
        if let Some(h) = header {
            req = req.header("traceparent", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        let t = Traceparent::parse(r.headers()["traceparent"].to_str().unwrap()).unwrap();
        assert_eq!(t.flags, "01");
        assert_ne!(t.trace_id, incoming.trace_id);
        let choice = format!("{}-0", r.headers()["x-request-id"].to_str().unwrap());
        eventually("the decode worker logs the new trace id", std::time::Duration::from_secs(10), || async {
            logged(&c.decode[0], &t, &choice)
        })
        .await;
        seen.push(t.trace_id.clone());
    }
    assert_ne!(seen[0], seen[1], "each request starts its own trace");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_put_the_request_and_trace_ids_on_every_worker_line() {
    let json = [("TANDEM_LOG_FORMAT", "json")];
    let engine = ["--kv-cache-mb", "64"];
    let prefill = start_env(&[&["prefill"][..], &engine].concat(), &json);
    let decode = start_env(&[&["decode"][..], &engine].concat(), &json);
    let (p, d) = (prefill.field("grpc"), decode.field("grpc"));
    let gateway = start_env(&["gateway", "--listen", "127.0.0.1:0", "--poll-interval-ms", "200", "--prefill", &p, "--decode", &d], &json);
    let base = format!("http://{}", gateway.field("http"));
    eventually("the gateway is ready", std::time::Duration::from_secs(60), || async { http_status(&base, "/ready") == Some(200) }).await;

    let incoming = Traceparent::new_root();
    let r = client()
        .post(format!("{base}/v1/completions"))
        .header("traceparent", incoming.header())
        .json(&json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let choice = format!("{}-0", r.headers()["x-request-id"].to_str().unwrap());
    let trace = incoming.trace_id.clone();
    for (role, p) in [("prefill", &prefill), ("decode", &decode)] {
        eventually(&format!("the {role} worker logs a JSON line for the request"), std::time::Duration::from_secs(10), || async {
            p.log_lines().iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|v| {
                // The line names its own span in the trace too.
                let span_id = v["span_id"].as_str().unwrap_or("");
                v["trace_id"] == trace && v["request_id"] == choice && span_id.len() == 16 && span_id != "0000000000000000"
            })
        })
        .await;
        // Every line the service wrote is one JSON object.
        for line in p.log_lines() {
            assert!(serde_json::from_str::<Value>(&line).is_ok_and(|v| v.is_object()), "{role}: not a JSON line: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_worker_serves_its_metrics_under_vllm_names() {
    let c = shared();
    // The same system prompt twice: the second prefill finds its leading blocks cached.
    for _ in 0..2 {
        let r = client()
            .post(format!("{}/v1/chat/completions", c.base))
            .json(&chat_body("Hello!", json!({"max_tokens": 3})))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let model = format!("{{model_name=\"{MODEL}\"}}");
    for (role, p) in [("prefill", &c.prefill[0]), ("decode", &c.decode[0])] {
        let base = format!("http://{}", p.field("metrics"));
        let page = http_get(&base, "/metrics").unwrap_or_else(|| panic!("the {role} worker serves /metrics"));
        let value = |name: &str| {
            let full = format!("{name}{model}");
            metric(&base, &full).unwrap_or_else(|| panic!("{role}: no {full} in\n{page}"))
        };
        for gauge in ["vllm:num_requests_running", "vllm:num_requests_waiting"] {
            assert!(value(gauge) >= 0.0);
        }
        let usage = value("vllm:kv_cache_usage_perc");
        assert!((0.0..=1.0).contains(&usage), "{role}: usage {usage}");
        assert_eq!(value("vllm:gpu_cache_usage_perc"), usage);
        assert!(value("vllm:num_preemptions_total") >= 0.0);
        assert!(page.contains(&format!("tandem_kv_blocks{{role=\"{role}\",state=\"free\"}}")), "{page}");
        let finished = metric(&base, &format!("tandem_worker_finished_total{{role=\"{role}\"}}")).unwrap_or(0.0);
        assert!(finished >= 2.0, "{role}: both requests counted as finished, got {finished}");
    }
    // The prefill worker looked up both prompts in its prefix cache and found the second's
    // leading blocks; the decode worker imports its sequences and looks up nothing.
    let prefill = format!("http://{}", c.prefill[0].field("metrics"));
    let queried = metric(&prefill, &format!("vllm:prefix_cache_queries_total{model}")).unwrap();
    let hits = metric(&prefill, &format!("vllm:prefix_cache_hits_total{model}")).unwrap();
    assert!(queried > 0.0 && hits > 0.0 && hits < queried, "queried {queried}, hits {hits}");
    let decode = format!("http://{}", c.decode[0].field("metrics"));
    assert_eq!(metric(&decode, &format!("vllm:prefix_cache_queries_total{model}")), Some(0.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_grafana_dashboard_queries_is_exported() {
    let c = shared();
    let r = client()
        .post(format!("{}/v1/chat/completions", c.base))
        .json(&chat_body("Hi there", json!({"max_tokens": 2})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Every family the gateway and each worker export, with its type.
    let mut exported = std::collections::HashMap::new();
    let bases = [c.base.clone(), format!("http://{}", c.prefill[0].field("metrics")), format!("http://{}", c.decode[0].field("metrics"))];
    for base in &bases {
        let page = http_get(base, "/metrics").unwrap_or_else(|| panic!("{base}/metrics"));
        for line in page.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = line.split_once(' ').unwrap();
            exported.insert(name.to_string(), kind.to_string());
        }
    }
    let dashboard: Value = serde_json::from_str(include_str!("../../../compose/grafana/tandem-dashboard.json")).unwrap();
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    queries.extend(dashboard["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["query"].as_str().map(str::to_string)));
    let mut checked = 0;
    for q in &queries {
        // Metric names are the identifiers of ours in the query: `vllm:…` or `tandem_…`.
        let names = q
            .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_' || ch == ':'))
            .filter(|w| w.starts_with("vllm:") || w.starts_with("tandem_"));
        for name in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|base| exported.get(*base).is_some_and(|k| k == "histogram")))
                .unwrap_or(name);
            assert!(exported.contains_key(family), "the dashboard queries {name}, which nothing exports (in `{q}`)");
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} metric references found: is the dashboard parsed right?");
}
