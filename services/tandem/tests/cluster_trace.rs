//! Trace context across processes: what the gateway receives in `traceparent` reaches the span
//! each worker process logs for the request, in text logs and in JSON lines.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn trace_context_reaches_every_worker() {
    use tandem_protocol::TraceContext;
    let c = shared();
    let incoming = TraceContext::new_root();
    let r = client()
        .post(format!("{}/v1/chat/completions", c.base))
        .header("traceparent", incoming.to_string())
        .json(&chat_body("Hello!", json!({"max_tokens": 3})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The trace id is kept; the span is the gateway's own.
    let back = TraceContext::parse(r.headers()["traceparent"].to_str().unwrap()).unwrap();
    assert_eq!((back.trace_id, back.flags), (incoming.trace_id, incoming.flags));
    assert_ne!(back.span_id, incoming.span_id);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], request_id);

    // Each worker put the trace id and the request id on its span for the request.
    let logged = |p: &Proc, trace: &TraceContext, choice: &str| {
        let (t, id) = (format!("trace_id={}", trace.trace_id_hex()), format!("request_id={choice}"));
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
        let t = TraceContext::parse(r.headers()["traceparent"].to_str().unwrap()).unwrap();
        assert_eq!(t.flags, TraceContext::SAMPLED);
        assert_ne!(t.trace_id, incoming.trace_id);
        let choice = format!("{}-0", r.headers()["x-request-id"].to_str().unwrap());
        eventually("the decode worker logs the new trace id", std::time::Duration::from_secs(10), || async {
            logged(&c.decode[0], &t, &choice)
        })
        .await;
        seen.push(t.trace_id);
    }
    assert_ne!(seen[0], seen[1], "each request starts its own trace");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_put_the_request_and_trace_ids_on_every_worker_line() {
    use tandem_protocol::TraceContext;
    let json = [("TANDEM_LOG_FORMAT", "json")];
    let engine = ["--kv-cache-mb", "64"];
    let prefill = start_env(&[&["prefill"][..], &engine].concat(), &json);
    let decode = start_env(&[&["decode"][..], &engine].concat(), &json);
    let (p, d) = (prefill.field("grpc"), decode.field("grpc"));
    let gateway = start_env(&["gateway", "--listen", "127.0.0.1:0", "--poll-interval-ms", "200", "--prefill", &p, "--decode", &d], &json);
    let base = format!("http://{}", gateway.field("http"));
    eventually("the gateway is ready", std::time::Duration::from_secs(60), || async { http_status(&base, "/ready") == Some(200) }).await;

    let incoming = TraceContext::new_root();
    let r = client()
        .post(format!("{base}/v1/completions"))
        .header("traceparent", incoming.to_string())
        .json(&json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let choice = format!("{}-0", r.headers()["x-request-id"].to_str().unwrap());
    let trace = incoming.trace_id_hex();
    for (role, p) in [("prefill", &prefill), ("decode", &decode)] {
        eventually(&format!("the {role} worker logs a JSON line for the request"), std::time::Duration::from_secs(10), || async {
            p.log_lines()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|v| v["trace_id"] == trace && v["request_id"] == choice)
        })
        .await;
        // Every line the service wrote is one JSON object.
        for line in p.log_lines() {
            assert!(serde_json::from_str::<Value>(&line).is_ok_and(|v| v.is_object()), "{role}: not a JSON line: {line}");
        }
    }
}
