//! The OpenAI API through the whole disaggregated path: gateway → prefill → KV handoff → decode,
//! on the real model, with every service running in this test process (`tandem-test-support`).

mod common;

use std::sync::OnceLock;

use common::*;
use serde_json::{json, Value};
use tandem_test_support::TestCluster;

/// One cluster for every test here: a prefill and a decode worker handing KV over UCX or TCP.
fn cluster() -> &'static TestCluster {
    static C: OnceLock<TestCluster> = OnceLock::new();
    C.get_or_init(TestCluster::start)
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completion_with_usage() {
    let c = cluster();
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
    let c = cluster();
    let body =
        json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 3, "ignore_eos": true});
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
    let c = cluster();
    let body = chat_body(
        "Tell me a story.",
        json!({"max_tokens": 12, "stream": true, "stream_options": {"include_usage": true}, "temperature": 0}),
    );
    let resp = client().post(format!("{}/v1/chat/completions", c.base)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let (chunks, done) = sse(resp).await;
    assert!(done, "stream must end with [DONE]");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!text.is_empty());
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null() && c["choices"].as_array().is_some_and(|a| !a.is_empty()))
        .collect();
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
    let c = cluster();
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
    let c = cluster();
    let body = |seed: i64| chat_body("Write a word.", json!({"max_tokens": 8, "temperature": 1.0, "seed": seed, "n": 3}));
    let (status, a) = post(&c.base, "/v1/chat/completions", &body(42)).await;
    assert_eq!(status, 200, "{a}");
    let texts = |v: &Value| {
        v["choices"].as_array().unwrap().iter().map(|c| c["message"]["content"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
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
    let c = cluster();
    let http = client();
    let raw = http
        .post(format!("{}/v1/chat/completions", c.base))
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
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
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "top_k": -2}), 400, "top_k"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 5}), 400, "min_tokens"),
        ("/v1/completions", json!({"model": "gpt-9", "prompt": "x"}), 404, "model"),
        // Missing and mistyped fields are named, flattened sampling fields and nested ones too.
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}]}), 400, "model"),
        ("/v1/completions", json!({"prompt": "x"}), 400, "model"),
        ("/v1/chat/completions", chat_body("hi", json!({"max_tokens": "ten"})), 400, "max_tokens"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "max_tokens": -1}), 400, "max_tokens"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "temperature": "hot"}), 400, "temperature"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "stop_token_ids": ["a"]}), 400, "stop_token_ids[0]"),
        ("/v1/completions", json!({"model": MODEL, "prompt": {"text": "x"}}), 400, "prompt"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content"),
    ];
    for (path, body, status, param) in cases {
        let (got, v) = post(&c.base, path, &body).await;
        assert_eq!(got, status, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        let codes: &[&str] = if status == 404 { &["model_not_found"] } else { &["invalid_request", "context_length_exceeded"] };
        assert!(codes.contains(&v["error"]["code"].as_str().unwrap_or_default()), "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}: {v}");
    }
    // The server is still fine.
    let (status, _) = post(&c.base, "/v1/chat/completions", &chat_body("hi", json!({"max_tokens": 2}))).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn models_health_ready_metrics() {
    let c = cluster();
    let http = client();
    let models: Value = http.get(format!("{}/v1/models", c.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(http.get(format!("{}/health", c.base)).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{}/ready", c.base)).send().await.unwrap().status(), 200);
    post(&c.base, "/v1/completions", &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3})).await;
    let m = http.get(format!("{}/metrics", c.base)).send().await.unwrap().text().await.unwrap();
    for name in [
        "tandem_requests_running",
        "tandem_time_to_first_token_seconds_bucket",
        "tandem_inter_token_latency_seconds_bucket",
        "tandem_e2e_request_latency_seconds_bucket",
        "tandem_prompt_tokens_total",
        "tandem_generation_tokens_total",
        "tandem_trace_spans_dropped_total{reason=\"queue_full\"}",
        "tandem_kv_transfer_bytes_total{transport=\"ucx\"}",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }
    let bytes: f64 =
        m.lines().find(|l| l.starts_with("tandem_kv_transfer_bytes_total")).unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(bytes > 0.0, "the handoff moved bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_metrics_under_vllm_names_and_buckets() {
    let c = cluster();
    let (status, v) =
        post(&c.base, "/v1/completions", &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": true})).await;
    assert_eq!(status, 200, "{v}");
    let m = client().get(format!("{}/metrics", c.base)).send().await.unwrap().text().await.unwrap();
    let sample = |line: &str| -> f64 {
        let found = m.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("missing {line} in\n{m}"));
        found.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let model = format!("model_name=\"{MODEL}\"");
    // vLLM's bucket bounds, first and last, on each latency histogram.
    for (name, first, last) in [
        ("vllm:time_to_first_token_seconds", "0.001", "2560"),
        ("vllm:inter_token_latency_seconds", "0.01", "80"),
        ("vllm:time_per_output_token_seconds", "0.01", "80"),
        ("vllm:e2e_request_latency_seconds", "0.3", "7680"),
    ] {
        for le in [first, last, "+Inf"] {
            sample(&format!("{name}_bucket{{{model},le=\"{le}\"}}"));
        }
        assert!(sample(&format!("{name}_count{{{model}}}")) >= 1.0, "{name}");
    }
    // This request ran out of its budget: counted under that reason, with its token counts.
    assert!(sample(&format!("vllm:request_success_total{{finished_reason=\"length\",{model}}}")) >= 1.0);
    assert!(sample(&format!("vllm:request_generation_tokens_sum{{{model}}}")) >= 3.0);
    assert!(sample(&format!("vllm:request_prompt_tokens_bucket{{{model},le=\"1\"}}")) >= 0.0);
    assert!(sample(&format!("vllm:request_prompt_tokens_sum{{{model}}}")) >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn greedy_output_equals_tandem_generate() {
    let c = cluster();
    let prompt = "Give me three tips for staying healthy.";
    let out = tandem().args(["generate", "--prompt", prompt, "--max-tokens", "24"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let local = String::from_utf8(out.stdout).unwrap();
    let (_, v) = post(&c.base, "/v1/chat/completions", &chat_body(prompt, json!({"max_tokens": 24, "temperature": 0}))).await;
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), local, "the handoff must not change the output");
}

#[tokio::test(flavor = "multi_thread")]
async fn official_openai_python_client_works() {
    let c = cluster();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    // The interpreter `scripts/test.sh` made a virtual environment with the client for, if any.
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python).args([script, &format!("{}/v1", c.base), MODEL]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "openai client checks failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all openai client checks passed"), "{stdout}");
}

/// A raw HTTP/1.1 exchange: the status line's code and the body.
fn raw_http(base: &str, request: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    s.write_all(request.replace("{addr}", addr).as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_routes_wrong_methods_and_huge_bodies_get_openai_errors() {
    let c = cluster();
    let http = client();
    let check = |v: &Value, code: &str| {
        let e = &v["error"];
        assert_eq!(e["code"], code, "{v}");
        assert_eq!(e["type"], "invalid_request_error", "{v}");
        assert!(e["param"].is_null(), "{v}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    };
    // An unknown route is not an unknown model.
    let r = http.post(format!("{}/v1/embeddings", c.base)).json(&json!({"model": MODEL, "input": "x"})).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().contains_key("traceparent"));
    check(&r.json().await.unwrap(), "not_found");
    let r = http.get(format!("{}/nowhere", c.base)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    check(&r.json().await.unwrap(), "not_found");

    for (method, path, allowed) in [(reqwest::Method::GET, "/v1/chat/completions", "POST"), (reqwest::Method::POST, "/v1/models", "GET")] {
        let r = http.request(method, format!("{}{path}", c.base)).send().await.unwrap();
        assert_eq!(r.status(), 405, "{path}");
        assert!(r.headers()["allow"].to_str().unwrap().contains(allowed), "{path}");
        check(&r.json().await.unwrap(), "method_not_allowed");
    }

    // A body declared over the limit is refused before any of it is read.
    let (status, v) = raw_http(
        &c.base,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 413, "{v}");
    check(&v, "request_too_large");
}

fn completion_tokens(v: &Value) -> u64 {
    v["usage"]["completion_tokens"].as_u64().unwrap_or_else(|| panic!("no usage in {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn min_tokens_and_stop_token_ids() {
    let c = cluster();
    // Left alone, greedy decoding ends this answer early, on an end-of-sequence token.
    let ask = |extra: Value| chat_body("Reply with one word: yes or no?", extra);
    let probe = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 10, "temperature": 0, "ignore_eos": true, "logprobs": 0});
    // Requests that do not depend on each other go side by side (they share decode steps).
    let first = ask(json!({"max_tokens": 24, "temperature": 0}));
    let ((_, free), (_, full)) = tokio::join!(post(&c.base, "/v1/chat/completions", &first), post(&c.base, "/v1/completions", &probe));
    assert_eq!(free["choices"][0]["finish_reason"], "stop", "{free}");
    let natural = completion_tokens(&free);
    assert!(natural < 12, "{free}");
    let (min, max) = (natural + 6, natural + 10);

    // stop_token_ids: a token the greedy output has at position k ends it right there.
    let full_text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let tokens: Vec<String> =
        full["choices"][0]["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    assert_eq!(tokens.len(), 10, "{full}");
    // The first token, past the first two, that is its own single id and not seen before.
    let (k, id) = (2..tokens.len())
        .find_map(|k| {
            let t = &tokens[k];
            let ids = tokenizer().encode(t).ok()?;
            (ids.len() == 1 && !t.trim().is_empty() && !tokens[..k].contains(t) && tokenizer().decode(&ids).ok()? == *t)
                .then(|| (k, ids[0]))
        })
        .unwrap_or_else(|| panic!("no usable token in {tokens:?}"));
    let mut stop_at = probe.clone();
    stop_at["stop_token_ids"] = json!([id]);

    // min_tokens holds the end-of-sequence token back; so it does the stop token ids, here the
    // end-of-sequence tokens themselves (with EOS as such ignored).
    let eos = tokenizer().eos_ids().to_vec();
    let min_only = ask(json!({"max_tokens": max, "temperature": 0, "min_tokens": min}));
    let min_ids = ask(json!({"max_tokens": max, "temperature": 0, "min_tokens": min, "ignore_eos": true, "stop_token_ids": eos}));
    let ((s1, held), (s2, held_ids), (s3, stopped)) = tokio::join!(
        post(&c.base, "/v1/chat/completions", &min_only),
        post(&c.base, "/v1/chat/completions", &min_ids),
        post(&c.base, "/v1/completions", &stop_at),
    );
    assert_eq!((s1, s2, s3), (200, 200, 200), "{held} {held_ids} {stopped}");
    for v in [&held, &held_ids] {
        let n = completion_tokens(v);
        assert!(n >= min, "min_tokens {min} after a natural {natural}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"] == "stop", n < max, "{v}");
    }

    let text = stopped["choices"][0]["text"].as_str().unwrap();
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop", "{stopped}");
    assert_eq!(completion_tokens(&stopped), k as u64 + 1, "stopped at {:?} (id {id}, position {k}): {stopped}", tokens[k]);
    assert!(full_text.starts_with(text) && text.ends_with(tokens[k].as_str()), "{text:?} vs {full_text:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_logprobs_and_max_completion_tokens() {
    let c = cluster();
    // max_completion_tokens wins over max_tokens.
    let body = chat_body(
        "Name three colours.",
        json!({"max_tokens": 20, "max_completion_tokens": 5, "ignore_eos": true, "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    );
    let (status, v) = post(&c.base, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(completion_tokens(&v), 5);
    let content = choice["logprobs"]["content"].as_array().unwrap_or_else(|| panic!("no logprobs.content in {v}"));
    assert_eq!(content.len(), 5);
    let entry_ok = |e: &Value| {
        let token = e["token"].as_str().unwrap();
        let bytes: Vec<u8> = e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(bytes, token.as_bytes(), "{e}");
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0, "{e}");
        lp
    };
    let mut text = String::new();
    for e in content {
        let chosen = entry_ok(e);
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        let tops: Vec<f64> = top.iter().map(entry_ok).collect();
        assert!(tops.windows(2).all(|w| w[0] >= w[1]), "most likely first: {e}");
        // Greedy: the chosen token is the most likely one.
        assert!((chosen - tops[0]).abs() < 1e-5 && e["token"] == top[0]["token"], "{e}");
        text.push_str(e["token"].as_str().unwrap());
    }
    assert_eq!(text, choice["message"]["content"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn top_k_min_p_and_repetition_penalty_shape_the_sampling() {
    let c = cluster();
    let body = |extra: Value| {
        let mut b = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": true});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("no text in {v}")).to_string();
    let count = json!({"prompt": "Count: 1, 2, 3, 4, 5,", "temperature": 0});
    let mut penalised = count.clone();
    penalised["repetition_penalty"] = json!(1.8);
    let bodies = [
        body(json!({"temperature": 2.0, "top_k": 2, "seed": 11, "logprobs": 2})),
        body(json!({"temperature": 0})),
        body(json!({"temperature": 1.8, "min_p": 1.0, "seed": 5})),
        body(count),
        body(penalised),
    ];
    // All side by side: they share decode steps.
    let outs = futures::future::join_all(bodies.iter().map(|b| post(&c.base, "/v1/completions", b))).await;
    let [(status, v), (_, greedy), (_, min_p), (_, plain), (_, repeated)]: [(u16, Value); 5] = outs.try_into().unwrap();

    // top_k 2 at a high temperature: every drawn token is one of the two most likely.
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let floor = top.as_object().unwrap().values().map(|l| l.as_f64().unwrap()).fold(f64::INFINITY, f64::min);
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(chosen >= floor - 1e-5, "position {i}: {chosen} is outside the top 2 {top}");
    }

    // min_p 1 keeps only the most likely token, whatever the temperature and seed: greedy.
    assert_eq!(text(&min_p), text(&greedy), "min_p 1 at temperature 1.8");

    // repetition_penalty changes what greedy decoding picks once the text repeats itself.
    assert!(text(&plain).contains(" 6, 7"), "{plain}");
    assert_ne!(text(&repeated), text(&plain), "repetition_penalty had no effect");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokenize_detokenize_and_the_model_root() {
    let c = cluster();
    let (status, v) = post(&c.base, "/tokenize", &json!({"model": MODEL, "prompt": "The capital of France is"})).await;
    assert_eq!(status, 200, "{v}");
    let tokens: Vec<u32> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(v["count"], tokens.len());
    assert_eq!(tokens, tokenizer().encode("The capital of France is").unwrap());
    assert!(v["max_model_len"].as_u64().unwrap() > 0);
    let (status, v) = post(&c.base, "/detokenize", &json!({"model": MODEL, "tokens": tokens})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["prompt"], "The capital of France is");
    // A chat is counted as its template renders it, as /v1/chat/completions would.
    let (status, v) = post(&c.base, "/tokenize", &json!({"messages": [{"role": "user", "content": "Hi"}]})).await;
    assert_eq!(status, 200, "{v}");
    let (_, chat) = post(&c.base, "/v1/chat/completions", &chat_body("Hi", json!({"max_tokens": 1}))).await;
    assert_eq!(v["count"], chat["usage"]["prompt_tokens"]);
    let (status, v) = post(&c.base, "/detokenize", &json!({"tokens": [u32::MAX]})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("tokens")), "{v}");
    let (status, v) = post(&c.base, "/tokenize", &json!({"model": "other", "prompt": "x"})).await;
    assert_eq!(status, 404, "{v}");
    let models: Value = client().get(format!("{}/v1/models", c.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["root"], MODEL);
    let version: Value = client().get(format!("{}/version", c.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test(flavor = "multi_thread")]
async fn parameters_not_carried_out_are_refused_by_name() {
    let c = cluster();
    for (extra, param) in [
        (json!({"functions": [{"name": "get_weather", "parameters": {}}]}), "functions"),
        (json!({"function_call": {"name": "get_weather"}}), "function_call"),
    ] {
        let (status, v) = post(&c.base, "/v1/chat/completions", &chat_body("Hi", extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("not supported"), "{v}");
    }
    let (status, v) = post(&c.base, "/v1/completions", &json!({"model": MODEL, "prompt": "x", "best_of": 4})).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("best_of")), "{v}");
    // Their no-op values change nothing, so they pass.
    let noop = json!({"max_tokens": 2, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logit_bias": {}});
    let (status, v) = post(&c.base, "/v1/chat/completions", &chat_body("Hi", noop)).await;
    assert_eq!(status, 200, "{v}");
}

/// `logit_bias` moves the draw: a greedy first token banned (−100) gives way to another, and a
/// token favoured by +100 is drawn every time.
#[tokio::test(flavor = "multi_thread")]
async fn logit_bias_moves_the_draw() {
    let c = cluster();
    let first = |extra: Value| {
        let mut body = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logprobs": 0});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        async move {
            let (status, v) = post(&c.base, "/v1/completions", &body).await;
            assert_eq!(status, 200, "{v}");
            v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };
    let plain = first(json!({})).await;
    let greedy = tokenizer().encode(&plain[0]).unwrap();
    assert_eq!(greedy.len(), 1, "{plain:?}");
    let banned = first(json!({"logit_bias": {greedy[0].to_string(): -100}})).await;
    assert_ne!(banned[0], plain[0]);
    let forced = tokenizer().encode(" Paris").unwrap()[0];
    let favoured = first(json!({"logit_bias": {forced.to_string(): 100}, "temperature": 1, "seed": 3})).await;
    assert!(favoured.iter().all(|t| tokenizer().encode(t).unwrap() == vec![forced]), "{favoured:?}");
    for bias in [json!({"abc": 1}), json!({"1": 101}), json!({"999999999": 1})] {
        let (status, v) = post(&c.base, "/v1/completions", &json!({"model": MODEL, "prompt": "x", "logit_bias": bias})).await;
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some("logit_bias")), "{v}");
    }
}

/// Structured output through the disaggregated path: the first token is drawn on the prefill
/// worker and the rest on the decode worker, each under the same grammar, at temperature 1.
#[tokio::test(flavor = "multi_thread")]
async fn structured_output_always_fits_its_constraint() {
    let c = cluster();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "tags", "ok"],
        "additionalProperties": false
    });
    let format = json!({"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": true}});
    for seed in 0..4 {
        let body = chat_body("Describe a thing.", json!({"max_tokens": 120, "temperature": 1, "seed": seed, "response_format": format}));
        let (status, v) = post(&c.base, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let o: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        assert_eq!(o.as_object().unwrap().len(), 4, "{o}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 16, "{o}");
        assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{o}");
        assert!(o["ok"].is_boolean(), "{o}");
        assert!(o["tags"].as_array().unwrap().iter().all(|t| ["red", "green", "blue"].contains(&t.as_str().unwrap())), "{o}");
    }
    let body = chat_body("Pick one.", json!({"max_tokens": 8, "temperature": 1, "guided_choice": ["alpha", "beta", "gamma"]}));
    let (status, v) = post(&c.base, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert!(["alpha", "beta", "gamma"].contains(&v["choices"][0]["message"]["content"].as_str().unwrap()), "{v}");
    for (extra, param) in [
        (json!({"response_format": {"type": "yaml"}}), "response_format.type"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_regex": "a", "guided_choice": ["a"]}), "guided_choice"),
    ] {
        let (status, v) = post(&c.base, "/v1/chat/completions", &chat_body("Hi", extra.clone())).await;
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some(param)), "{extra}: {v}");
    }
    // A grammar that does not compile is the request's fault, found by the worker.
    let (status, v) = post(&c.base, "/v1/chat/completions", &chat_body("Hi", json!({"guided_grammar": "start: ("}))).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("does not compile"), "{v}");
}

/// Floats of a JSON list (`null`s as `None`).
fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().unwrap().iter().map(Value::as_f64).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_scores_the_prompt_as_log_likelihood_evaluations_ask() {
    let c = cluster();
    let prompt = "The capital of France is";
    // The model's own greedy continuation, with the log-probability of each token drawn.
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1, "ignore_eos": true});
    let (status, gen) = post(&c.base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{gen}");
    let continuation = gen["choices"][0]["text"].as_str().unwrap().to_string();
    let drawn = floats(&gen["choices"][0]["logprobs"]["token_logprobs"]);

    // lm-eval's shape: the text and its continuation echoed back, scored, nothing generated.
    let text = format!("{prompt}{continuation}");
    let body = json!({"model": MODEL, "prompt": text, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0});
    let (status, v) = post(&c.base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let ch = &v["choices"][0];
    assert_eq!(ch["text"], text.as_str(), "the prompt itself, nothing after it");
    assert_eq!((ch["finish_reason"].as_str(), v["usage"]["completion_tokens"].as_u64()), (Some("length"), Some(0)), "{v}");
    let ids = tokenizer().encode(&text).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    let lp = &ch["logprobs"];
    let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.len(), ids.len());
    assert_eq!(tokens.concat(), text);
    let scored = floats(&lp["token_logprobs"]);
    // Nothing precedes the first token: no log-probability, no alternatives.
    assert_eq!((scored[0], &lp["top_logprobs"][0]), (None, &Value::Null), "{lp}");
    assert!(scored[1..].iter().all(|l| l.is_some_and(|l| l <= 0.0)), "{scored:?}");
    // The continuation was the greedy one: each of its tokens is the most likely there, with the
    // log-probability it had when it was drawn (prefill and decode compute it apart, so within
    // float rounding), the test lm-eval's `is_greedy` makes.
    let n = drawn.len();
    let gen_tokens: Vec<&str> = gen["choices"][0]["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(&tokens[tokens.len() - n..], &gen_tokens[..], "the continuation tokenizes as it was drawn");
    for (i, want) in drawn.iter().enumerate() {
        let at = tokens.len() - n + i;
        let top = lp["top_logprobs"][at].as_object().unwrap();
        assert_eq!(top.keys().collect::<Vec<_>>(), vec![tokens[at]], "greedy at {at}: {top:?}");
        let (got, want) = (scored[at].unwrap(), want.unwrap());
        assert!((got - want).abs() < 2e-2, "token {i} of the continuation: scored {got}, drawn {want}");
    }

    // Echo while generating: the prompt, then the completion, in one stream too.
    let body =
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 4, "echo": true, "temperature": 0, "stream": true, "ignore_eos": true});
    let resp = client().post(format!("{}/v1/completions", c.base)).json(&body).send().await.unwrap();
    let (chunks, done) = sse(resp).await;
    assert!(done);
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap_or("")).collect();
    assert!(streamed.starts_with(prompt) && streamed.len() > prompt.len(), "{streamed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prompt_logprobs_as_vllm_reports_them() {
    let c = cluster();
    let prompt = "The capital of France is";
    let ids = tokenizer().encode(prompt).unwrap();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2});
    let (status, v) = post(&c.base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let scored = v["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert_eq!(scored.len(), ids.len());
    assert_eq!(scored[0], Value::Null);
    for (i, entry) in scored.iter().enumerate().skip(1) {
        let m = entry.as_object().unwrap();
        // The prompt's own token and the two most likely ones (fewer when it is one of them).
        assert!((2..=3).contains(&m.len()), "{m:?}");
        let own = &m[&ids[i].to_string()];
        assert!(own["rank"].as_u64().unwrap() >= 1 && own["logprob"].as_f64().unwrap() <= 0.0, "{own}");
        let best = m.values().map(|e| e["logprob"].as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert_eq!(own["rank"] == 1, (own["logprob"].as_f64().unwrap() - best).abs() < 1e-6, "{m:?}");
    }
    // The same for a chat, once for the request.
    let (status, chat) = post(&c.base, "/v1/chat/completions", &chat_body("Hi", json!({"max_tokens": 1, "prompt_logprobs": 0}))).await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["prompt_logprobs"].as_array().unwrap().len() as u64, chat["usage"]["prompt_tokens"].as_u64().unwrap());
    // Not streamed, as in vLLM: refused by name.
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "prompt_logprobs": 1, "stream": true});
    let (status, e) = post(&c.base, "/v1/completions", &body).await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("prompt_logprobs")), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_reason_names_the_stop_string_and_system_fingerprint_is_there() {
    let c = cluster();
    let body = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (_, free) = post(&c.base, "/v1/completions", &body).await;
    let text = free["choices"][0]["text"].as_str().unwrap();
    // Ended for length: no stop reason.
    assert_eq!((free["choices"][0]["finish_reason"].as_str(), &free["choices"][0]["stop_reason"]), (Some("length"), &Value::Null));
    assert!(free.as_object().unwrap().contains_key("system_fingerprint"), "{free}");
    // A word of the free text as the stop string: it ends the choice and is its reason.
    let word = text.split_whitespace().nth(1).expect("two words").to_string();
    let mut body = body;
    body["stop"] = json!([word.clone()]);
    let (status, v) = post(&c.base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["choices"][0]["finish_reason"].as_str(), v["choices"][0]["stop_reason"].as_str()),
        (Some("stop"), Some(word.as_str())),
        "{v}"
    );
}
