//! Tensor-parallel workers (`--tp N`): a prefill group of one degree hands its KV to a decode
//! group of another, through the real processes, and the text is what single-rank workers write.

mod common;

use common::*;
use serde_json::{json, Value};

/// Prompts whose 16-token greedy continuations never have their top two logits closer than 0.38
/// on one rank: on this quantized model a group's sums round differently and can flip a near
/// tie (see the engine's tests/tensor_parallel.rs), which these leave no room for.
fn prompts() -> Vec<String> {
    ["1, 2, 3, 4, 5,", "A, B, C, D,", "The first five prime numbers are"].map(String::from).to_vec()
}

/// The greedy texts of the prompts, with their usage. One at a time: how many rows a pass
/// computes at once also moves the rounding, and the comparison is of degrees alone.
async fn texts(base: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for p in prompts() {
        let body = json!({"model": MODEL, "prompt": p, "max_tokens": 16, "temperature": 0});
        let (status, v) = post(base, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        out.push((v["choices"][0]["text"].as_str().unwrap().to_string(), v["usage"].clone()));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn prefill_at_tp2_hands_to_decode_at_tp3_and_writes_the_single_rank_text() {
    let single = Cluster::start(1, 1);
    let want = texts(&single.base).await;
    drop(single);

    // 2 ranks hold 1 and 2 of the model's 3 KV heads; 3 ranks hold one each.
    let groups = Cluster::with_workers(&[&["--tp", "2"]], &[&["--tp", "3"]], &[], &[]);
    let ready: Value = serde_json::from_str(&http_get(&groups.base, "/ready").unwrap()).unwrap();
    assert_eq!(ready["tp_sizes"], json!({"prefill": [2], "decode": [3]}), "{ready}");
    let got = texts(&groups.base).await;
    for ((w, wu), (g, gu)) in want.iter().zip(&got) {
        assert!(!w.is_empty());
        assert_eq!(g, w, "the text at TP 2 -> 3");
        assert_eq!(gu, wu);
    }

    // Streamed chat through the groups ends as the whole answer does.
    let body = chat_body("Count from one to ten.", json!({"max_tokens": 16, "temperature": 0}));
    let (status, whole) = post(&groups.base, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = client().post(format!("{}/v1/chat/completions", groups.base)).json(&streamed).send().await.unwrap();
    let (chunks, done) = sse(resp).await;
    assert!(done);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
}

#[test]
fn a_degree_the_model_cannot_take_stops_the_worker_with_the_reason() {
    // 9 query heads: a tenth rank would have none.
    let out = tandem()
        .args(["decode", "--tp", "10", "--kv-cache-mb", "16"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run tandem");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tensor-parallel degree 10 is too high"), "{err}");
}
