//! Several models behind one gateway, and the router in front of them (`--router-config`):
//! two served models (the default model under two names, each with pools of its own), an
//! external OpenAI-compatible backend (a small server in this test, which also judges), and a
//! backend that is down. Fusion panels ask the members in parallel, skip the dead one, hand the
//! judge every answer and sum the usage; `…/auto` runs the panel only when a keyword fires; a
//! request's own `plugins` runs a panel on any model; the judge's answer streams.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use common::*;
use serde_json::{json, Value};
use tandem_test_support::otlp::{OtlpSink, Span};

/// What the external backend answers a panel question, and a judge.
const EXTERNAL_ANSWER: &str = "The external panelist thinks the answer is forty-two.";
const FUSED: [&str; 3] = ["Fused", " answer", " from the judge."];
/// The usage the external backend reports for every call.
const EXTERNAL_USAGE: (u64, u64) = (11, 7);

/// One call the external backend received.
#[derive(Debug, Clone)]
struct Seen {
    body: Value,
    authorization: Option<String>,
    traceparent: Option<String>,
}

impl Seen {
    fn judged(&self) -> bool {
        self.body["messages"][0]["content"].as_str().is_some_and(|c| c.starts_with("You are the judge"))
    }
}

type Calls = Arc<Mutex<Vec<Seen>>>;

async fn external(State(calls): State<Calls>, headers: HeaderMap, body: axum::body::Bytes) -> axum::response::Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let seen = Seen { body: body.clone(), authorization: header("authorization"), traceparent: header("traceparent") };
    let judged = seen.judged();
    calls.lock().unwrap().push(seen);
    if header("authorization").as_deref() != Some("Bearer ext-key") {
        return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(json!({"error": {"message": "bad key"}}))).into_response();
    }
    let usage = json!({"prompt_tokens": EXTERNAL_USAGE.0, "completion_tokens": EXTERNAL_USAGE.1, "total_tokens": EXTERNAL_USAGE.0 + EXTERNAL_USAGE.1});
    let model = body["model"].clone();
    if body["stream"] == true {
        let mut out = String::new();
        let pieces: Vec<&str> = if judged { FUSED.to_vec() } else { vec![EXTERNAL_ANSWER] };
        for p in pieces {
            let chunk = json!({"id": "ext-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": null}]});
            // Framed with CRLF, as some servers write their events.
            out.push_str(&format!("data: {chunk}\r\n\r\n"));
        }
        let last = json!({"id": "ext-1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        out.push_str(&format!("data: {last}\n\n"));
        if body["stream_options"]["include_usage"] == true {
            let u = json!({"id": "ext-1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [], "usage": usage});
            out.push_str(&format!("data: {u}\n\n"));
        }
        out.push_str("data: [DONE]\n\n");
        return ([(axum::http::header::CONTENT_TYPE, "text/event-stream")], out).into_response();
    }
    let text = if judged { FUSED.concat() } else { EXTERNAL_ANSWER.to_string() };
    axum::Json(json!({
        "id": "ext-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": usage,
    }))
    .into_response()
}

struct Setup {
    _workers: Vec<Proc>,
    _gateway: Proc,
    base: String,
    calls: Calls,
    /// Receives the gateway's spans.
    sink: OtlpSink,
    _config: tempfile::NamedTempFile,
}

/// The external backend and an OTLP receiver, on a thread and runtime of their own (each test
/// has its own runtime, and these outlive them all); the backend's port and the receiver.
fn serve_external(calls: Calls) -> (u16, OtlpSink) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            tx.send(OtlpSink::start().await.unwrap()).unwrap();
            let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(external)).with_state(calls);
            axum::serve(tokio::net::TcpListener::from_std(listener).unwrap(), app).await.unwrap();
        });
    });
    (port, rx.recv().unwrap())
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let calls: Calls = Arc::default();
        let (port, sink) = serve_external(calls.clone());
        // A port nothing listens on: the backend that is down.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            config.path(),
            format!(
                r#"
router:
  models:
    - {{id: "vllm-sr/auto", description: "a panel for research questions, alpha otherwise"}}
    - {{id: "vllm-sr/fusion", description: "always the panel"}}
  backends:
    - {{id: alpha, type: tandem}}
    - {{id: beta, type: tandem}}
    - {{id: ext, type: openai, base_url: "http://127.0.0.1:{port}/v1", model: ext-model, api_key: ext-key}}
    - {{id: dead, type: vllm, base_url: "http://127.0.0.1:{dead}/v1", model: gone}}
  decisions:
    - id: research_fusion
      algorithm: {{type: fusion, analysis_models: [alpha, beta, ext, dead], judge_model: ext, max_concurrent: 3, on_error: skip}}
      signals: [{{type: keyword, keywords: ["research", "compare"]}}]
  default_backend: alpha
  timeout_s: 60
"#
            ),
        )
        .unwrap();
        // alpha: a prefill and a decode worker; beta: one aggregated worker.
        let engine = ["--kv-cache-mb", "64"];
        let workers = vec![
            start(&[&["prefill", "--served-model-name", "alpha"][..], &engine].concat()),
            start(&[&["decode", "--served-model-name", "alpha"][..], &engine].concat()),
            start(&[&["worker", "--served-model-name", "beta"][..], &engine].concat()),
        ];
        let path = config.path().display().to_string();
        let mut args = vec!["gateway", "--listen", "127.0.0.1:0", "--poll-interval-ms", "200"];
        args.extend(["--served-model-name", "alpha", "--served-model-name", "beta", "--router-config", &path]);
        let addrs: Vec<String> = workers.iter().map(|w| w.field("grpc")).collect();
        args.extend(["--prefill", &addrs[0], "--decode", &addrs[1], "--decode", &addrs[2]]);
        let otlp = format!("http://{}", sink.grpc);
        let gateway = start_env(&args, &[("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")]);
        let base = format!("http://{}", gateway.field("http"));
        wait_for("both models can serve", Duration::from_secs(60), || {
            let ready: Option<Value> = http_get(&base, "/ready").and_then(|b| serde_json::from_str(&b).ok());
            ready.and_then(|r| r["models"].as_array().map(|m| m.iter().all(|m| m["ready"] == true))).unwrap_or(false)
        });
        Setup { _workers: workers, _gateway: gateway, base, calls, sink, _config: config }
    })
}

fn question(model: &str, content: &str, extra: Value) -> Value {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

async fn answer(base: &str, body: &Value) -> Value {
    let (status, v) = post(base, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v
}

fn text(v: &Value) -> String {
    v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

fn member<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["fusion_trace"]["panel_results"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("no {id} in {v}"))
}

/// The calls the external backend received about `question` (the tests run at once, each with
/// questions of its own), and among them the judge's.
fn calls_about(s: &Setup, question: &str) -> Vec<Seen> {
    s.calls.lock().unwrap().iter().filter(|c| c.body.to_string().contains(question)).cloned().collect()
}

fn judge_calls(s: &Setup, question: &str) -> Vec<Seen> {
    calls_about(s, question).into_iter().filter(Seen::judged).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_model_has_its_pools_and_unknown_models_are_named() {
    let s = setup();
    let models: Value = serde_json::from_str(&http_get(&s.base, "/v1/models").unwrap()).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alpha", "beta", "vllm-sr/auto", "vllm-sr/fusion"]);
    let ready: Value = serde_json::from_str(&http_get(&s.base, "/ready").unwrap()).unwrap();
    let pools: Vec<(String, u64, u64, u64)> = ready["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let n = |k: &str| m[k].as_u64().unwrap();
            (m["model"].as_str().unwrap().to_string(), n("prefill_workers"), n("decode_workers"), n("aggregated_workers"))
        })
        .collect();
    assert_eq!(pools, [("alpha".to_string(), 1, 1, 0), ("beta".to_string(), 0, 1, 1)], "each worker in its model's pools only");

    // The same model under two names: the same greedy text, each counted under its own name.
    let a = answer(&s.base, &question("alpha", "Name a colour.", json!({}))).await;
    let b = answer(&s.base, &question("beta", "Name a colour.", json!({}))).await;
    assert_eq!((a["model"].as_str(), b["model"].as_str()), (Some("alpha"), Some("beta")));
    assert!(!text(&a).is_empty());
    assert_eq!(text(&a), text(&b));
    let page = http_get(&s.base, "/metrics").unwrap();
    for m in ["alpha", "beta"] {
        let done: f64 = page
            .lines()
            .filter(|l| l.starts_with("vllm:request_success_total{") && l.contains(&format!("model_name=\"{m}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(done >= 1.0, "{m} counted its request");
    }

    let (status, e) = post(&s.base, "/v1/chat/completions", &question("gamma", "hi", json!({}))).await;
    assert_eq!(status, 404, "{e}");
    assert_eq!(e["error"]["code"], "model_not_found");
    let message = e["error"]["message"].as_str().unwrap();
    for name in ["gamma", "alpha", "beta", "vllm-sr/auto", "vllm-sr/fusion"] {
        assert!(message.contains(&format!("`{name}`")), "{message}");
    }
    let (status, e) = post(&s.base, "/v1/completions", &json!({"model": "vllm-sr/fusion", "prompt": "hi"})).await;
    assert_eq!(status, 400, "router models answer chat only: {e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fusion_panel_skips_the_dead_member_and_the_judge_reads_every_answer() {
    let s = setup();
    let alone = text(&answer(&s.base, &question("alpha", "Why is the sea salty?", json!({}))).await);
    let parent = Traceparent::new_root();
    let resp = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .header("traceparent", parent.header())
        .json(&question("vllm-sr/fusion", "Why is the sea salty?", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(text(&v), FUSED.concat(), "the judge's answer is the response");
    assert_eq!(v["model"], "vllm-sr/fusion");
    let trace = &v["fusion_trace"];
    assert_eq!(
        (trace["judge_model"].as_str(), trace["skipped"].as_u64(), trace["decision"].as_str()),
        (Some("ext"), Some(1), Some("research_fusion"))
    );
    assert_eq!(trace["panel_results"].as_array().unwrap().len(), 4);
    assert_eq!(member(&v, "alpha")["answer"].as_str(), Some(alone.as_str()), "a member answers as the model does alone");
    assert_eq!(member(&v, "beta")["answer"].as_str(), Some(alone.as_str()));
    assert_eq!(member(&v, "ext")["answer"].as_str(), Some(EXTERNAL_ANSWER));
    let dead = member(&v, "dead");
    assert!(dead["answer"].is_null() && dead["error"].as_str().is_some_and(|e| e.contains("cannot reach")), "{dead}");
    for id in ["alpha", "beta", "ext"] {
        assert!(member(&v, id)["error"].is_null() && member(&v, id)["latency_ms"].as_f64().unwrap() > 0.0);
    }

    // The judge got the question and every answer that came, with the backend's key and the
    // request's trace.
    let judged = judge_calls(s, "Why is the sea salty?");
    assert_eq!(judged.len(), 1);
    let prompt = judged[0].body["messages"][0]["content"].as_str().unwrap();
    assert!(prompt.contains("Why is the sea salty?") && prompt.contains(EXTERNAL_ANSWER) && prompt.contains(alone.trim()), "{prompt}");
    assert!(prompt.contains("[Answer 3 from ext]") && !prompt.contains("from dead"), "{prompt}");
    assert_eq!(judged[0].body["model"], "ext-model");
    assert_eq!(judged[0].authorization.as_deref(), Some("Bearer ext-key"));
    let carried = judged[0].traceparent.as_deref().and_then(Traceparent::parse).expect("the judge call carries a traceparent");
    assert_eq!(carried.trace_id, parent.trace_id, "external calls continue the request's trace");

    // Usage sums the panel and the judge.
    let tokens = |id: &str| (member(&v, id)["prompt_tokens"].as_u64().unwrap(), member(&v, id)["completion_tokens"].as_u64().unwrap());
    let (ap, ac) = tokens("alpha");
    let (bp, bc) = tokens("beta");
    let (ep, ec) = tokens("ext");
    assert!(ap > 0 && ac > 0);
    assert_eq!((ep, ec), EXTERNAL_USAGE);
    let want = (ap + bp + ep + EXTERNAL_USAGE.0, ac + bc + ec + EXTERNAL_USAGE.1);
    assert_eq!((v["usage"]["prompt_tokens"].as_u64().unwrap(), v["usage"]["completion_tokens"].as_u64().unwrap()), want);
    assert_eq!(v["usage"]["total_tokens"].as_u64(), Some(want.0 + want.1));

    // One span for the panel, its members side by side under it, the judge after them; each
    // served model's own request under its member's span.
    let names = |spans: &[Span]| spans.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let wanted =
        ["fusion panel", "fusion member alpha", "fusion member beta", "fusion member ext", "fusion member dead", "fusion judge ext"];
    eventually("the gateway exported the panel's spans", Duration::from_secs(20), || async {
        let have = names(&s.sink.trace(&parent.trace_id));
        wanted.iter().all(|w| have.iter().any(|h| h == w)) && have.iter().filter(|h| h.starts_with("chat ")).count() >= 2
    })
    .await;
    let spans = s.sink.trace(&parent.trace_id);
    let named = |n: &str| spans.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("no `{n}` in {:?}", names(&spans)));
    let panel = named("fusion panel");
    let members: Vec<&Span> = spans.iter().filter(|s| s.name.starts_with("fusion member ")).collect();
    assert_eq!(members.len(), 4);
    assert!(members.iter().all(|m| m.parent_span_id == panel.span_id));
    // max_concurrent is 3: three members start together, the fourth when one is done.
    let first_done = members.iter().map(|m| m.end_ns).min().unwrap();
    assert_eq!(members.iter().filter(|m| m.start_ns < first_done).count(), 3, "three members ran at once");
    let slowest = members.iter().max_by_key(|m| m.end_ns).unwrap();
    let judge = named("fusion judge ext");
    assert_eq!(judge.parent_span_id, panel.span_id);
    assert!(judge.start_ns >= slowest.end_ns, "the judge read every answer first");
    for id in ["alpha", "beta"] {
        let chat = named(&format!("chat {id}"));
        assert_eq!(chat.parent_span_id, named(&format!("fusion member {id}")).span_id, "{id}'s request sits under its member");
    }

    assert!(metric(&s.base, "tandem_fusion_members_skipped_total").is_some_and(|n| n >= 1.0));
    assert!(metric(&s.base, "tandem_router_backend_errors_total{backend=\"dead\"}").is_some_and(|n| n >= 1.0));
    assert!(metric(&s.base, "tandem_fusion_judge_seconds_count").is_some_and(|n| n >= 1.0));
    assert!(metric(&s.base, "tandem_router_backend_seconds_count{backend=\"alpha\"}").is_some_and(|n| n >= 1.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_runs_the_panel_only_when_a_keyword_fires() {
    let s = setup();
    let plain = question("vllm-sr/auto", "Say hello.", json!({}));
    let direct = answer(&s.base, &question("alpha", "Say hello.", json!({}))).await;
    let routed = answer(&s.base, &plain).await;
    assert!(routed.get("fusion_trace").is_none(), "no keyword, no panel: {routed}");
    assert_eq!((routed["model"].as_str(), text(&routed)), (Some("alpha"), text(&direct)), "the default backend answers");
    assert!(calls_about(s, "Say hello.").is_empty(), "the external backend was not asked");

    let fired = answer(&s.base, &question("vllm-sr/auto", "Please COMPARE tides and waves.", json!({}))).await;
    assert_eq!(fired["fusion_trace"]["decision"], "research_fusion", "{fired}");
    assert_eq!(text(&fired), FUSED.concat());
    assert_eq!(judge_calls(s, "Please COMPARE tides and waves.").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_runs_its_own_panel_through_plugins() {
    let s = setup();
    let panel = json!({"plugins": [{"id": "fusion", "analysis_models": ["alpha", "ext"], "judge_model": "ext"}]});
    let v = answer(&s.base, &question("beta", "What is rain?", panel)).await;
    assert_eq!(v["model"], "beta");
    assert_eq!(v["fusion_trace"]["decision"], "plugin");
    let ids: Vec<&str> = v["fusion_trace"]["panel_results"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alpha", "ext"]);
    assert_eq!(text(&v), FUSED.concat());

    // The OpenAI client's `extra_body`, sent as it is; the judge defaults to the request's model
    // (a served model, which writes its own answer).
    let nested = json!({"extra_body": {"plugins": [{"id": "fusion", "analysis_models": ["ext", "alpha"]}]}});
    let v = answer(&s.base, &question("alpha", "What is snow?", nested)).await;
    assert_eq!(v["fusion_trace"]["judge_model"], "alpha");
    assert!(!text(&v).is_empty() && text(&v) != FUSED.concat());

    // on_error: fail turns a dead member into the request's failure.
    let strict = json!({"plugins": [{"id": "fusion", "analysis_models": ["alpha", "dead"], "judge_model": "ext", "on_error": "fail"}]});
    let (status, e) = post(&s.base, "/v1/chat/completions", &question("alpha", "What is hail?", strict)).await;
    assert_eq!(status, 503, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("`dead`"), "{e}");
    // Every member refusing the request as it is: a 400 for the client, not a 503 to retry.
    let wrong = json!({"top_k": -5, "plugins": [{"id": "fusion", "analysis_models": ["alpha", "beta"], "judge_model": "alpha"}]});
    let (status, e) = post(&s.base, "/v1/chat/completions", &question("alpha", "What is sleet?", wrong)).await;
    assert_eq!((status, e["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{e}");
    let unknown = json!({"plugins": [{"id": "fusion", "analysis_models": ["alpha", "nobody"], "judge_model": "ext"}]});
    let (status, e) = post(&s.base, "/v1/chat/completions", &question("alpha", "What is fog?", unknown)).await;
    assert_eq!((status, e["error"]["code"].as_str()), (404, Some("model_not_found")), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_judges_answer_streams_with_the_trace_and_summed_usage() {
    let s = setup();
    let body = question("vllm-sr/fusion", "Why do leaves fall?", json!({"stream": true, "stream_options": {"include_usage": true}}));
    let resp = client().post(format!("{}/v1/chat/completions", s.base)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (events, done) = sse(resp).await;
    assert!(done, "ends with [DONE]");
    let streamed: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, FUSED.concat());
    assert!(events.iter().all(|e| e["model"] == "vllm-sr/fusion"));
    let last = events.last().unwrap();
    assert!(last["choices"].as_array().unwrap().is_empty());
    let trace = &last["fusion_trace"];
    assert_eq!(trace["panel_results"].as_array().unwrap().len(), 4, "{last}");
    let panel: u64 = trace["panel_results"].as_array().unwrap().iter().map(|m| m["completion_tokens"].as_u64().unwrap()).sum();
    assert_eq!(last["usage"]["completion_tokens"].as_u64(), Some(panel + EXTERNAL_USAGE.1), "the panel's and the judge's");

    // Without usage asked for, the trace still comes, on a chunk of its own, and no usage does.
    let body = question("vllm-sr/fusion", "Why do leaves fall?", json!({"stream": true}));
    let (events, done) = sse(client().post(format!("{}/v1/chat/completions", s.base)).json(&body).send().await.unwrap()).await;
    assert!(done);
    assert!(events.iter().all(|e| e.get("usage").is_none_or(Value::is_null)));
    assert_eq!(events.iter().filter(|e| e.get("fusion_trace").is_some()).count(), 1);

    // A served model judging, streamed through the gateway's own stream.
    let own = json!({"stream": true, "plugins": [{"id": "fusion", "analysis_models": ["ext", "beta"], "judge_model": "alpha"}]});
    let (events, done) = sse(client()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&question("alpha", "Why is ice slippery?", own))
        .send()
        .await
        .unwrap())
    .await;
    assert!(done);
    let streamed: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!streamed.is_empty());
    assert_eq!(events.last().unwrap()["fusion_trace"]["judge_model"], "alpha");
}
