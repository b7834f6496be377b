//! The OpenAI API through the whole disaggregated path: gateway → prefill → KV handoff → decode,
//! every service its own process.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn chat_completion_with_usage() {
    let c = shared();
    let (status, v) = post(&c.base, "/v1/chat/completions", &chat_body("What is 2+2?", json!({"max_tokens": 20, "temperature": 0}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 10);
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=20).contains(&completion));
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + completion);
    // finish_reason is the truth: "length" exactly when the budget ran out.
    assert_eq!(choice["finish_reason"] == "length", completion == 20, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn completion_length_and_logprobs() {
    let c = shared();
    let body = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 3, "ignore_eos": true});
    let (status, v) = post(&c.base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let ch = &v["choices"][0];
    assert_eq!(ch["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    let lp = &ch["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect::<String>(), ch["text"].as_str().unwrap());
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 3);
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(chosen <= 0.0);
        // Greedy: the chosen token is the most likely one.
        assert!(top.values().all(|l| l.as_f64().unwrap() <= chosen + 1e-6));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_chat_ends_with_done_and_usage() {
    let c = shared();
    let body = chat_body("Tell me a story.", json!({"max_tokens": 12, "stream": true, "stream_options": {"include_usage": true}, "temperature": 0}));
    let resp = client().post(format!("{}/v1/chat/completions", c.base)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let (chunks, done) = sse(resp).await;
    assert!(done, "stream must end with [DONE]");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!text.is_empty());
    let finish: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null() && c["choices"].as_array().is_some_and(|a| !a.is_empty())).collect();
    assert_eq!(finish.len(), 1);
    let last = chunks.last().unwrap();
    assert!(last["choices"].as_array().unwrap().is_empty());
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() >= 1);

    // The same prompt without streaming gives the same text.
    let (_, v) = post(&c.base, "/v1/chat/completions", &chat_body("Tell me a story.", json!({"max_tokens": 12, "temperature": 0}))).await;
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), text);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_strings_cut_the_text() {
    let c = shared();
    let base = json!({"model": MODEL, "prompt": "Count: 1, 2, 3, 4, 5,", "max_tokens": 30, "temperature": 0, "ignore_eos": true});
    let (_, free) = post(&c.base, "/v1/completions", &base).await;
    let full = free["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(full.contains(" 8"), "expected the count to go on: {full:?}");
    let mut body = base.clone();
    body["stop"] = json!([" 8", "never appears"]);
    let (status, v) = post(&c.base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(text, &full[..full.find(" 8").unwrap()]);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn n_choices_and_seed_reproducibility() {
    let c = shared();
    let body = |seed: i64| chat_body("Write a word.", json!({"max_tokens": 8, "temperature": 1.0, "seed": seed, "n": 3}));
    let (status, a) = post(&c.base, "/v1/chat/completions", &body(42)).await;
    assert_eq!(status, 200, "{a}");
    let texts = |v: &Value| v["choices"].as_array().unwrap().iter().map(|c| c["message"]["content"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let ta = texts(&a);
    assert_eq!(ta.len(), 3);
    assert_eq!(a["choices"][2]["index"], 2);
    let (_, b) = post(&c.base, "/v1/chat/completions", &body(42)).await;
    assert_eq!(ta, texts(&b), "same seed, same tokens");
    let (_, d) = post(&c.base, "/v1/chat/completions", &body(7)).await;
    assert_ne!(ta, texts(&d), "another seed samples differently");
    // Each choice draws its own numbers.
    assert!(ta.iter().collect::<std::collections::HashSet<_>>().len() > 1, "{ta:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_openai_errors() {
    let c = shared();
    let http = client();
    let raw = http.post(format!("{}/v1/chat/completions", c.base)).body("{not json").header("content-type", "application/json").send().await.unwrap();
    assert_eq!(raw.status(), 400);
    let v: Value = raw.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("JSON"));

    let cases = [
        ("/v1/chat/completions", json!({"model": MODEL}), 400, "messages"),
        ("/v1/chat/completions", chat_body("hi", json!({"temperature": 5})), 400, "temperature"),
        ("/v1/chat/completions", chat_body("hi", json!({"top_p": 0})), 400, "top_p"),
        ("/v1/chat/completions", chat_body("hi", json!({"n": 0})), 400, "n"),
        ("/v1/chat/completions", chat_body("hi", json!({"max_tokens": 0})), 400, "max_tokens"),
        ("/v1/chat/completions", chat_body("hi", json!({"max_tokens": 100000})), 400, "max_tokens"),
        ("/v1/chat/completions", chat_body("hi", json!({"top_logprobs": 2})), 400, "top_logprobs"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": []}), 400, "messages"),
        ("/v1/chat/completions", json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404, "model"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "logprobs": 9}), 400, "logprobs"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "word ".repeat(6000)}), 400, "prompt"),
        ("/v1/completions", json!({"model": MODEL, "prompt": [999999]}), 400, "prompt"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "presence_penalty": 3}), 400, "presence_penalty"),
    ];
    for (path, body, status, param) in cases {
        let (got, v) = post(&c.base, path, &body).await;
        assert_eq!(got, status, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // The server is still fine.
    let (status, _) = post(&c.base, "/v1/chat/completions", &chat_body("hi", json!({"max_tokens": 2}))).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn models_health_ready_metrics() {
    let c = shared();
    let http = client();
    let models: Value = http.get(format!("{}/v1/models", c.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(http.get(format!("{}/health", c.base)).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{}/ready", c.base)).send().await.unwrap().status(), 200);
    post(&c.base, "/v1/completions", &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3})).await;
    let m = http.get(format!("{}/metrics", c.base)).send().await.unwrap().text().await.unwrap();
    for name in [
        "tandem_requests_running",
        "tandem_requests_waiting",
        "tandem_time_to_first_token_seconds_bucket",
        "tandem_inter_token_latency_seconds_bucket",
        "tandem_e2e_request_latency_seconds_bucket",
        "tandem_prompt_tokens_total",
        "tandem_generation_tokens_total",
        "tandem_kv_blocks_in_use",
        "tandem_kv_transfer_bytes_total{transport=\"ucx\"}",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }
    let bytes: f64 = m.lines().find(|l| l.starts_with("tandem_kv_transfer_bytes_total")).unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(bytes > 0.0, "the handoff moved bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn greedy_output_equals_tandem_generate() {
    let c = shared();
    let prompt = "Give me three tips for staying healthy.";
    let out = tandem().args(["generate", "--prompt", prompt, "--max-tokens", "24"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let local = String::from_utf8(out.stdout).unwrap();
    let (_, v) = post(&c.base, "/v1/chat/completions", &chat_body(prompt, json!({"max_tokens": 24, "temperature": 0}))).await;
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), local, "the handoff must not change the output");
}

#[tokio::test(flavor = "multi_thread")]
async fn official_openai_python_client_works() {
    let c = shared();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = std::process::Command::new("python3").args([script, &format!("{}/v1", c.base), MODEL]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "openai client checks failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all openai client checks passed"), "{stdout}");
}
