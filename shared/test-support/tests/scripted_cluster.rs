//! The in-process cluster with a scripted engine: the whole disaggregated path (gateway, prefill,
//! KV handoff, decode) with known outputs, and the services' phased stop.

use std::time::Duration;

use serde_json::{json, Value};
use tandem_engine::testing::ScriptedEngine;
use tandem_test_support::{TestCluster, MODEL};

fn counting() -> TestCluster {
    TestCluster::builder().scripted(|vocab| ScriptedEngine::counting(MODEL, vocab, 256)).start()
}

async fn completion(base: &str, body: Value) -> Value {
    let r = client().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_count_on_from_the_prompt_through_the_handoff() {
    let c = counting();
    // Token ids in, logprobs out: each chosen token is the one after the last, and the decode
    // worker's cache holds exactly what the prefill worker computed (the scripted engine checks
    // every slot before each step).
    let body = json!({"model": MODEL, "prompt": [100, 200, 300], "max_tokens": 40, "temperature": 0, "logprobs": 1});
    let v = completion(&c.base, body).await;
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 40, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let files =
        tandem_tokenizer::ModelFiles::resolve(&tandem_tokenizer::default_model::ensure_default().unwrap().display().to_string()).unwrap();
    let tokenizer = tandem_tokenizer::Tokenizer::load(&files).unwrap();
    let want: Vec<String> = (301..341).map(|id| tokenizer.decode(&[id]).unwrap()).collect();
    let got: Vec<&str> = v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread")]
async fn prompts_longer_than_a_block_hand_over_every_block() {
    let c = counting();
    let prompt: Vec<u32> = (1000..1075).collect();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": true});
    let v = completion(&c.base, body).await;
    assert_eq!(v["usage"]["completion_tokens"], 20, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_the_cluster_lets_a_streaming_request_finish() {
    use futures::StreamExt;
    let c = TestCluster::builder()
        .scripted(|vocab| ScriptedEngine::counting(MODEL, vocab, 256).with_step_delay(Duration::from_millis(20)))
        .start();
    let body = json!({
        "model": MODEL, "prompt": [1000, 1001, 1002], "max_tokens": 60, "temperature": 0, "stream": true, "ignore_eos": true,
        "stream_options": {"include_usage": true},
    });
    let resp = client().post(format!("{}/v1/completions", c.base)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::from_utf8_lossy(&stream.next().await.unwrap().unwrap()).to_string();
    // A stop while the stream runs: the gateway turns not ready, the request drains to its end.
    let stopped = tokio::task::spawn_blocking({
        let c = std::sync::Arc::new(c);
        move || (c.stop_within(Duration::from_secs(20)), c)
    });
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let (all_stopped, c) = stopped.await.unwrap();
    assert!(all_stopped, "every service stops within the deadline");
    assert!(c.services().all(|s| s.is_finished()));
    let datas: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{text}");
    let usage =
        datas.iter().rev().find_map(|d| serde_json::from_str::<Value>(d).ok().filter(|v| v["usage"].is_object())).expect("a usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 60, "every token arrived:\n{text}");
}

/// An HTTP client (with the process's TLS provider set, which the workspace's HTTPS-capable
/// clients need even for plain HTTP).
fn client() -> reqwest::Client {
    tandem_runtime::grpc::default_tls_provider();
    reqwest::Client::new()
}

/// The gateway's `tandem_kv_transfer_bytes_total` for `transport`.
async fn transfer_bytes(base: &str, transport: &str) -> f64 {
    let text = client().get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let label = format!("transport=\"{transport}\"");
    text.lines()
        .filter(|l| l.starts_with("tandem_kv_transfer_bytes_total") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A cluster whose prefill and decode engines share pools the way GPU engines of one host do,
/// handing over with `cudaipc` first. `mappable` false: the decode side cannot map the prefill
/// side's pool.
fn device_cluster(mappable: bool) -> TestCluster {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static POOL: AtomicUsize = AtomicUsize::new(0);
    use tandem_transfer::TransportKind;
    TestCluster::builder()
        .transports(&[TransportKind::CudaIpc, TransportKind::Tcp])
        .scripted(move |vocab| {
            let e = ScriptedEngine::counting(MODEL, vocab, 256);
            let name = format!("cluster-pool-{}-{}", std::process::id(), POOL.fetch_add(1, Ordering::SeqCst));
            if mappable {
                e.with_shared_pool(&name)
            } else {
                e.with_unmappable_pool(&name)
            }
        })
        .start()
}

#[tokio::test(flavor = "multi_thread")]
async fn blocks_left_in_the_prefill_pool_are_copied_by_the_decode_engine() {
    let c = device_cluster(true);
    let prompt: Vec<u32> = (1000..1075).collect();
    for _ in 0..3 {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": true, "logprobs": 1});
        let v = completion(&c.base, body).await;
        assert_eq!(v["usage"]["completion_tokens"], 20, "{v}");
    }
    // Five blocks of 16 tokens a handoff, each block 2 × 16 f32, all of them device to device.
    assert_eq!(transfer_bytes(&c.base, "cudaipc").await, 3.0 * 5.0 * 128.0);
    assert_eq!(transfer_bytes(&c.base, "tcp").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_the_decode_side_cannot_map_goes_through_host_memory() {
    let c = device_cluster(false);
    let prompt: Vec<u32> = (1000..1040).collect();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "logprobs": 1});
    let v = completion(&c.base, body).await;
    assert_eq!(v["usage"]["completion_tokens"], 12, "{v}");
    let files =
        tandem_tokenizer::ModelFiles::resolve(&tandem_tokenizer::default_model::ensure_default().unwrap().display().to_string()).unwrap();
    let tokenizer = tandem_tokenizer::Tokenizer::load(&files).unwrap();
    let want: Vec<String> = (1040..1052).map(|id| tokenizer.decode(&[id]).unwrap()).collect();
    let got: Vec<&str> = v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(got, want, "the held blocks, read out after the refusal, are the prompt's");
    assert_eq!(transfer_bytes(&c.base, "cudaipc").await, 0.0);
    assert_eq!(transfer_bytes(&c.base, "tcp").await, 3.0 * 128.0);
}
