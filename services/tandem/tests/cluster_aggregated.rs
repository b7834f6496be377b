//! The aggregated worker (`tandem worker`): prefill and decode in one engine behind the same
//! gateway. What it serves must be what the disaggregated cluster serves: the same greedy text,
//! the same prompt scores, the same usage, streamed or not, and with several requests at once
//! (their prompts then run in chunks mixed into the decode batches).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A gateway in front of one aggregated worker, and nothing else.
struct Aggregated {
    _worker: Proc,
    _gateway: Proc,
    base: String,
}

fn aggregated() -> Aggregated {
    // A small batch-token budget: a long prompt is computed in several chunks, beside the
    // decode steps of whatever else runs.
    let worker = start(&["worker", "--kv-cache-mb", "64", "--max-num-batched-tokens", "64"]);
    let args = ["gateway", "--listen", "127.0.0.1:0", "--poll-interval-ms", "200", "--decode", &worker.field("grpc")];
    let gateway = start(&args);
    let base = format!("http://{}", gateway.field("http"));
    wait_for("the aggregated cluster is ready", Duration::from_secs(60), || http_status(&base, "/ready") == Some(200));
    Aggregated { _worker: worker, _gateway: gateway, base }
}

fn prompts() -> Vec<String> {
    vec![
        "The capital of France is".to_string(),
        format!("Summarise this: {}", "The tide came in over the flats and the birds rose from the mud. ".repeat(10)),
        "def fibonacci(n):".to_string(),
    ]
}

fn completion(prompt: &str, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// The texts of the prompts' greedy completions, sent all at once.
async fn texts(base: &str) -> Vec<(String, Value)> {
    let calls = prompts().into_iter().map(|p| {
        let base = base.to_string();
        async move {
            let (status, v) = post(&base, "/v1/completions", &completion(&p, json!({}))).await;
            assert_eq!(status, 200, "{v}");
            (v["choices"][0]["text"].as_str().unwrap().to_string(), v["usage"].clone())
        }
    });
    futures::future::join_all(calls).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_aggregated_worker_serves_what_the_disaggregated_cluster_serves() {
    let disagg = Cluster::start(1, 1);
    let agg = aggregated();
    let ready: Value = serde_json::from_str(&http_get(&agg.base, "/ready").unwrap()).unwrap();
    assert_eq!((ready["aggregated_workers"].as_u64(), ready["prefill_workers"].as_u64()), (Some(1), Some(0)), "{ready}");

    // The same greedy text and prompt counts, the prompts all at once on each side.
    let want = texts(&disagg.base).await;
    let got = texts(&agg.base).await;
    for ((w, wu), (g, gu)) in want.iter().zip(&got) {
        assert!(!w.is_empty());
        assert_eq!(g, w);
        assert_eq!(
            (gu["prompt_tokens"].clone(), gu["completion_tokens"].clone()),
            (wu["prompt_tokens"].clone(), wu["completion_tokens"].clone())
        );
    }

    // Prompt scores come from whoever computed the prompt: here the aggregated worker.
    let scored = completion(&prompts()[0], json!({"max_tokens": 2, "prompt_logprobs": 2}));
    let (s1, a) = post(&disagg.base, "/v1/completions", &scored).await;
    let (s2, b) = post(&agg.base, "/v1/completions", &scored).await;
    assert_eq!((s1, s2), (200, 200), "{a} {b}");
    let (pa, pb) = (a["choices"][0]["prompt_logprobs"].as_array().unwrap(), b["choices"][0]["prompt_logprobs"].as_array().unwrap());
    assert_eq!(pa.len(), pb.len());
    assert!(pb[0].is_null() && pb.len() > 3, "{pb:?}");
    for (x, y) in pa.iter().zip(pb).skip(1) {
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(x), keys(y));
        for (k, v) in x.as_object().unwrap() {
            let (l1, l2) = (v["logprob"].as_f64().unwrap(), y[k]["logprob"].as_f64().unwrap());
            assert!((l1 - l2).abs() < 1e-3, "{k}: {l1} against {l2}");
        }
    }

    // A chat stream: the role, then the same text in deltas, then the finish.
    let body = chat_body("Name three colours.", json!({"max_tokens": 16, "temperature": 0, "stream": true}));
    let mut streamed = Vec::new();
    for base in [&disagg.base, &agg.base] {
        let resp = client().post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let (chunks, done) = sse(resp).await;
        assert!(done);
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        let finish = chunks.last().unwrap()["choices"][0]["finish_reason"].clone();
        streamed.push((text, finish));
    }
    assert!(!streamed[0].0.is_empty());
    assert_eq!(streamed[1], streamed[0]);
}
