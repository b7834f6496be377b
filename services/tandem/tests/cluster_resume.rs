//! A decode worker killed mid-request: every stream it served resumes on the other decode worker
//! from the last token its client received, and ends with the text an undisturbed run gives,
//! greedy and seeded alike.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use tandem_protocol::pb::decode_client::DecodeClient;
use tandem_protocol::pb::InfoRequest;

/// Tokens every stream has received when its decode worker is killed.
const WARM: usize = 40;

/// Four requests: three greedy, one sampled with a seed.
fn bodies() -> Vec<Value> {
    let base =
        |prompt: &str| json!({"model": MODEL, "prompt": prompt, "max_tokens": 80, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut b = vec![
        base("The old lighthouse keeper climbed the stairs and"),
        base("In the kitchen, the recipe called for"),
        base("The train left the station at dawn, carrying"),
        base("A list of reasons to learn a second language:"),
    ];
    b[3]["temperature"] = json!(0.9);
    b[3]["seed"] = json!(1234);
    b
}

/// One streamed completion: its text and finish reason. `started` counts streams that got
/// `warm` tokens; errors in the stream fail the test with the stream's content.
async fn stream(base: String, body: Value, started: Arc<AtomicUsize>, warm: usize) -> (String, String) {
    let resp = client().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut bytes = resp.bytes_stream();
    let (mut buf, mut counted) = (String::new(), false);
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("the stream broke")));
        if !counted && buf.matches("data: ").count() >= warm {
            counted = true;
            started.fetch_add(1, Ordering::SeqCst);
        }
    }
    let datas: Vec<&str> = buf.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{buf}");
    let (mut text, mut reason) = (String::new(), String::new());
    for d in datas.iter().filter(|d| **d != "[DONE]") {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("error").is_none(), "the stream carried an error: {v}");
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["text"].as_str().unwrap_or(""));
            if let Some(r) = c["finish_reason"].as_str() {
                reason = r.to_string();
            }
        }
    }
    (text, reason)
}

async fn run_all(base: &str, warm: usize, started: Arc<AtomicUsize>) -> Vec<tokio::task::JoinHandle<(String, String)>> {
    bodies().into_iter().map(|b| tokio::spawn(stream(base.to_string(), b, started.clone(), warm))).collect()
}

async fn running(addr: &str) -> u32 {
    let mut c = DecodeClient::connect(format!("http://{addr}")).await.unwrap();
    c.info(InfoRequest {}).await.unwrap().into_inner().running
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_survive_a_killed_decode_worker_with_the_same_text() {
    // With a block store: the decode workers send it each full block of generated tokens, so a
    // resume computes little more than the last partial block.
    let store = start(&["kv-transfer"]);
    let mut c = Cluster::start_with(1, 2, &["--block-store", &store.field("grpc")]);
    // Undisturbed, to compare with.
    let mut expected = Vec::new();
    for h in run_all(&c.base, 0, Arc::new(AtomicUsize::new(0))).await {
        expected.push(h.await.unwrap());
    }
    assert!(expected.iter().all(|(t, r)| !t.is_empty() && r == "length"), "{expected:?}");

    // Again, and kill one decode worker while every stream is under way.
    let started = Arc::new(AtomicUsize::new(0));
    let handles = run_all(&c.base, WARM, started.clone()).await;
    eventually("every stream is under way", Duration::from_secs(60), || {
        let started = started.clone();
        async move { started.load(Ordering::SeqCst) == 4 }
    })
    .await;
    // The worker serving the most streams (routing may have put them all on one).
    let mut load = Vec::new();
    for d in &c.decode {
        load.push(running(&d.field("grpc")).await);
    }
    let victim = (0..load.len()).max_by_key(|&i| load[i]).unwrap();
    let on_victim = load[victim];
    assert!(on_victim > 0, "no decode worker serves the streams: {load:?}");
    c.decode[victim].child.kill().unwrap();

    let mut got = Vec::new();
    for h in handles {
        got.push(tokio::time::timeout(Duration::from_secs(120), h).await.expect("a stream hung").unwrap());
    }
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "request {i}: the resumed text differs from the undisturbed run");
    }
    let resumed = metric(&c.base, "tandem_resumes_total{outcome=\"resumed\"}").unwrap_or(0.0);
    assert_eq!(resumed, on_victim as f64, "every stream on the killed worker resumed once");
    // Each resumed context held at least WARM tokens (prompts of about ten, and the WARM sent);
    // recomputing it all would cost that much. From the block store, at most the last two
    // blocks (the one still filling, and one whose send may not have landed) are computed again.
    let recomputed = metric(&c.base, "tandem_resume_recomputed_tokens_total").unwrap();
    assert!(recomputed / resumed <= 32.0, "{recomputed} tokens recomputed for {resumed} resumes");
    assert_eq!(metric(&c.base, "tandem_requests_total{outcome=\"error\"}").unwrap_or(0.0), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prefill_worker_killed_mid_prompt_hands_the_request_to_another() {
    use tandem_protocol::pb::prefill_client::PrefillClient;
    let mut c = Cluster::start(2, 1);
    // About 1,200 tokens: seconds of prefill on the CPU, time enough to kill its worker mid-way.
    let prompt = "The history of the world is long and full of surprises. ".repeat(100);
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0});
    let base = c.base.clone();
    let request = tokio::spawn(async move { post(&base, "/v1/completions", &body).await });
    let busy = |addr: String| async move {
        let mut p = PrefillClient::connect(format!("http://{addr}")).await.unwrap();
        p.info(InfoRequest {}).await.unwrap().into_inner().running > 0
    };
    let addrs: Vec<String> = c.prefill.iter().map(|p| p.field("grpc")).collect();
    let mut victim = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while victim.is_none() && std::time::Instant::now() < deadline {
        for (i, a) in addrs.iter().enumerate() {
            if busy(a.clone()).await {
                victim = Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = victim.expect("no prefill worker took the prompt");
    c.prefill[victim].child.kill().unwrap();
    let (status, v) = tokio::time::timeout(Duration::from_secs(120), request).await.expect("the request hung").unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    let retried = metric(&c.base, "tandem_worker_retries_total{role=\"prefill\"}").unwrap_or(0.0);
    assert_eq!(retried, 1.0, "the request moved to the other prefill worker once");
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_kv_is_caught_and_the_request_goes_on() {
    // Every second handoff of this prefill worker has a flipped byte after its checksums.
    let engine = ["--kv-cache-mb", "64"];
    let prefill = start(&[&["prefill", "--fault-corrupt-kv-every", "2"][..], &engine].concat());
    let decode = start(&[&["decode"][..], &engine].concat());
    let (p, d) = (prefill.field("grpc"), decode.field("grpc"));
    let gateway = start(&["gateway", "--listen", "127.0.0.1:0", "--prefill", &p, "--decode", &d]);
    let base = format!("http://{}", gateway.field("http"));
    eventually("the gateway routes", Duration::from_secs(60), || {
        let base = base.clone();
        async move { http_get(&base, "/ready").is_some_and(|r| r.contains("\"decode_workers\":1")) }
    })
    .await;
    let body = json!({"model": MODEL, "prompt": "The recipe for bread begins with", "max_tokens": 12, "temperature": 0});
    let mut texts = Vec::new();
    for _ in 0..4 {
        let (status, v) = post(&base, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        texts.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert!(texts.iter().all(|t| t == &texts[0]), "{texts:?}");
    // Handoffs 2, 4 and 6 (of the second to fourth requests) were refused by the decode worker,
    // and each request's pass was done again.
    assert_eq!(metric(&base, "tandem_kv_handoff_failures_total"), Some(3.0));
}
