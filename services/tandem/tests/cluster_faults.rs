//! Failure paths of the disaggregated request: cancellation, a killed decode worker, no workers,
//! and KV handoffs that never complete. Each must end definitely and free every block.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::json;
use tandem_protocol::pb::decode_client::DecodeClient;
use tandem_protocol::pb::prefill_client::PrefillClient;
use tandem_protocol::pb::{GenerateRequest, InfoRequest, PrefillRequest, SamplingParams, WorkerInfo};

async fn decode_info(p: &Proc) -> WorkerInfo {
    let mut c = DecodeClient::connect(format!("http://{}", p.field("grpc"))).await.unwrap();
    c.info(InfoRequest {}).await.unwrap().into_inner()
}

async fn prefill_info(p: &Proc) -> WorkerInfo {
    let mut c = PrefillClient::connect(format!("http://{}", p.field("grpc"))).await.unwrap();
    c.info(InfoRequest {}).await.unwrap().into_inner()
}

fn idle(i: &WorkerInfo) -> bool {
    i.running == 0 && i.waiting == 0 && i.free_blocks == i.total_blocks
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    // Generous: a cancelled sequence leaves at the end of the current step, and a 512-token
    // prefill step takes seconds on a loaded 2-core machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

fn long_completion(stream: bool) -> serde_json::Value {
    json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "stream": stream})
}

fn cancelled_requests(c: &Cluster) -> f64 {
    metric(&c.base, "tandem_requests_total{outcome=\"cancelled\"}").unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_frees_blocks_in_both_pools() {
    let c = Cluster::start(1, 1);
    // Decode side: hang up mid-stream. Left alone, the request would run for 1,000 tokens.
    let body = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": true, "stream": true});
    let resp = client().post(format!("{}/v1/completions", c.base)).json(&body).send().await.unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    let count = |s: &str| s.matches("data: ").count();
    while count(&seen) < 3 {
        seen.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
    }
    // The pace of decoding here, to know how long finishing on its own would take.
    let (from, pace_start) = (count(&seen), Instant::now());
    while count(&seen) < from + 10 {
        seen.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
    }
    let per_token = pace_start.elapsed() / (count(&seen) - from) as u32;
    let remaining = per_token * (1000 - count(&seen)) as u32;
    let busy = decode_info(&c.decode[0]).await;
    assert_eq!(busy.running, 1);
    assert!(busy.free_blocks < busy.total_blocks);
    let hung_up = Instant::now();
    drop(body);
    wait_until("the decode worker is idle", || async { idle(&decode_info(&c.decode[0]).await) }).await;
    let freed_after = hung_up.elapsed();
    assert!(freed_after < remaining / 4, "blocks freed {freed_after:?} after the hang-up; finishing would have taken {remaining:?}");
    // Freed because the sequence was cancelled, not because it ended.
    wait_until("the gateway counts the request as cancelled", || async { cancelled_requests(&c) == 1.0 }).await;
    let d = decode_info(&c.decode[0]).await;
    assert_eq!((d.cancelled, d.completed), (1, 0), "{d:?}");

    // Prefill side: hang up while a long prompt is being computed.
    // About 1,200 tokens: within the 64 MiB test cache, and seconds of CPU work.
    let prompt = "The history of the world is long and full of surprises. ".repeat(100);
    let prefilled = prefill_info(&c.prefill[0]).await.completed;
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 4});
    let base = c.base.clone();
    let request = tokio::spawn(async move { client().post(format!("{base}/v1/completions")).json(&body).send().await });
    wait_until("the prefill worker is busy", || async { prefill_info(&c.prefill[0]).await.running == 1 }).await;
    request.abort();
    wait_until("the prefill worker is idle", || async { idle(&prefill_info(&c.prefill[0]).await) }).await;
    wait_until("the decode worker is idle", || async { idle(&decode_info(&c.decode[0]).await) }).await;
    wait_until("the gateway counts the second request as cancelled", || async { cancelled_requests(&c) == 2.0 }).await;
    // The prefill never finished it, and the decode stream waiting for its blocks was dropped.
    let p = prefill_info(&c.prefill[0]).await;
    assert_eq!((p.cancelled, p.completed), (1, prefilled), "{p:?}");
    wait_until("the decode worker counts the second cancellation", || async { decode_info(&c.decode[0]).await.cancelled == 2 }).await;
    assert_eq!(decode_info(&c.decode[0]).await.completed, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_decode_worker_with_no_other_to_resume_on_ends_its_requests_with_an_error() {
    let mut c = Cluster::start(1, 1);
    let resp = client().post(format!("{}/v1/completions", c.base)).json(&long_completion(true)).send().await.unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    c.decode[0].child.kill().unwrap();
    let started = Instant::now();
    let mut rest = String::new();
    let drained = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = body.next().await {
            rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(drained.is_ok(), "the stream hung after its decode worker died");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(rest.contains("\"error\""), "an error event must say what happened: {rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"));

    // New requests are refused cleanly, with a hint to retry.
    let r = client()
        .post(format!("{}/v1/completions", c.base))
        .json(&json!({"model": MODEL, "prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread")]
async fn no_reachable_workers_means_503_with_retry_after() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let gw = start(&["gateway", "--listen", "127.0.0.1:0", "--prefill", &dead, "--decode", &dead]);
    let base = format!("http://{}", gw.field("http"));
    assert_eq!(http_status(&base, "/ready"), Some(503));
    assert_eq!(http_status(&base, "/health"), Some(200));
    let r = client().post(format!("{base}/v1/chat/completions")).json(&chat_body("hi", json!({}))).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unavailable");
}

fn generate(id: &str, kv_wait_ms: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt: vec![1, 2, 3, 4, 5],
        params: Some(SamplingParams { temperature: 0.0, top_p: 1.0, repetition_penalty: 1.0, max_tokens: 8, ..Default::default() }),
        seed: 1,
        eos_ids: vec![2],
        kv_wait_ms,
        resumed: vec![],
        store_addr: String::new(),
        compute_prompt: false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handoff_that_never_arrives_fails_within_its_lease() {
    let d = start(&["decode", "--kv-cache-mb", "32"]);
    let mut client = DecodeClient::connect(format!("http://{}", d.field("grpc"))).await.unwrap();
    let started = Instant::now();
    let mut stream = client.generate(generate("lost-1", 400)).await.unwrap().into_inner();
    let err = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("no hang").unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(idle(&decode_info(&d).await));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_decode_peer_fails_the_prefill_within_its_lease() {
    let p = start(&["prefill", "--kv-cache-mb", "32", "--handoff-lease-ms", "700"]);
    // Accepts connections and never answers: a lost verdict.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || hole.incoming().take(1).map(|s| s.unwrap()).collect::<Vec<_>>());
    let mut client = PrefillClient::connect(format!("http://{}", p.field("grpc"))).await.unwrap();
    let started = Instant::now();
    let err = client
        .prefill(PrefillRequest { request: Some(generate("silent-1", 0)), decode_kv_addr: hole_addr, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert_eq!(
        tandem_protocol::ApiError::from_status(&err).code,
        tandem_protocol::ErrorCode::KvHandoffFailed,
        "classified where it happened"
    );
    assert!(err.message().contains("lease"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(idle(&prefill_info(&p).await), "the prefill frees its blocks on failure");
    drop(held);

    // And a decode peer that is not there at all.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let err = client
        .prefill(PrefillRequest { request: Some(generate("gone-1", 0)), decode_kv_addr: gone, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(idle(&prefill_info(&p).await));
}

fn signal(p: &Proc, sig: &str) {
    let status = std::process::Command::new("kill").args([sig, &p.child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill {sig}");
}

async fn store_blocks(store: &Proc) -> u32 {
    let mut c =
        tandem_protocol::pb::block_store_client::BlockStoreClient::connect(format!("http://{}", store.field("grpc"))).await.unwrap();
    c.info(InfoRequest {}).await.unwrap().into_inner().total_blocks
}

/// A block store that stops answering (here: SIGSTOP) while prompts keep coming: offloads time
/// out or are shed at the prefill worker's budget, fetches fall back to computing, and every
/// request still gets the answer it would have had.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_block_store_costs_offloads_never_a_request() {
    let store = start(&["kv-transfer"]);
    let prefill =
        start(&["prefill", "--kv-cache-mb", "64", "--handoff-lease-ms", "5000", "--store-timeout-ms", "300", "--offload-budget-mb", "1"]);
    let decode = start(&["decode", "--kv-cache-mb", "64", "--handoff-lease-ms", "5000"]);
    // The gateway polls once, at start: it would otherwise notice the stalled store within a
    // poll and stop offering it, and then nothing would be offloaded at all.
    let gw = start(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--poll-interval-ms",
        "600000",
        "--prefill",
        &prefill.field("grpc"),
        "--decode",
        &decode.field("grpc"),
        "--block-store",
        &store.field("grpc"),
    ]);
    let base = format!("http://{}", gw.field("http"));
    wait_for("the gateway routes to all three", Duration::from_secs(60), || {
        http_status(&base, "/ready") == Some(200) && metric(&base, "tandem_workers{role=\"kv-transfer\"}") == Some(1.0)
    });
    // Long enough for two full blocks of 16 tokens.
    let prompt = |i: usize| format!("Request {i}: list the planets of the solar system in order, with one fact about each of them.");
    let complete = |i: usize| {
        let base = base.clone();
        // Never ended by the first token, so every request hands its blocks over (and offloads them).
        let body = json!({"model": MODEL, "prompt": prompt(i), "max_tokens": 6, "temperature": 0, "ignore_eos": true});
        async move {
            let (status, v) = post(&base, "/v1/completions", &body).await;
            assert_eq!(status, 200, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };

    let reference = complete(0).await;
    eventually("the store holds the first prompt's blocks", Duration::from_secs(10), || async { store_blocks(&store).await > 0 }).await;

    signal(&store, "-STOP");
    assert_eq!(complete(0).await, reference);
    let answers = futures::future::join_all((1..7).map(complete)).await;
    assert!(answers.iter().all(|a| !a.is_empty()));
    let info = prefill_info(&prefill).await;
    assert!(info.offload_shed_blocks > 0, "a stalled offload holds the 1 MiB budget, so others are shed: {info:?}");
    wait_until("a stalled offload times out and is counted", || async { prefill_info(&prefill).await.offload_failed_blocks > 0 }).await;
    let shed = metric(&base, "tandem_kv_store_offload_shed_blocks_total").unwrap();
    assert_eq!(shed, prefill_info(&prefill).await.offload_shed_blocks as f64);

    signal(&store, "-CONT");
    let before = store_blocks(&store).await;
    complete(100).await;
    eventually("offloads land again once the store answers", Duration::from_secs(10), || async { store_blocks(&store).await > before })
        .await;
}

/// A prefill worker that crashes while its KV is on the way to the decode worker: the gateway
/// moves the request to the other prefill worker and the client gets the answer an undisturbed
/// cluster gives. Nothing is left held on the decode side.
#[tokio::test(flavor = "multi_thread")]
async fn a_prefill_worker_killed_during_its_handoff_leaves_the_request_to_another() {
    // The first worker aborts (SIGABRT) 2 ms into its first handoff: about 1,200 tokens of KV
    // are still on their way then.
    let mut c = Cluster::with_workers(&[&["--fault-exit-during-handoff", "1"], &[]], &[&[]], &[], &[]);
    let text = "The history of the world is long and full of surprises. ".repeat(100);
    let body =
        |i: usize| json!({"model": MODEL, "prompt": format!("Chapter {i}. {text}"), "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let complete = |i: usize| {
        let (base, body) = (c.base.clone(), body(i));
        async move {
            let (status, v) = post(&base, "/v1/completions", &body).await;
            assert_eq!(status, 200, "request {i} failed: {v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    // Routing decides which worker takes which prompt; new prompts go on until the faulty
    // worker has taken one (and died of it).
    let mut answers = Vec::new();
    for i in 0..6 {
        answers.push(complete(i).await);
        if c.prefill[0].exited() {
            break;
        }
    }
    let crashed = c.prefill[0].child.try_wait().unwrap().expect("the faulty worker never took a request");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(crashed.signal(), Some(6), "it died of the injected abort: {crashed:?}");
    assert!(metric(&c.base, "tandem_worker_retries_total{role=\"prefill\"}").unwrap_or(0.0) >= 1.0);
    // The same prompts again, on the surviving worker alone: the same greedy text.
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(&complete(i).await, answer, "request {i}");
    }
    wait_until("the decode worker is idle", || async { idle(&decode_info(&c.decode[0]).await) }).await;
    assert!(idle(&prefill_info(&c.prefill[1]).await));
}

/// A worker's own queue bound: with room for one request, concurrent long prompts beyond it are
/// refused by the worker as `overloaded` (503 with Retry-After once no other worker has room),
/// counted in its metrics, and the accepted ones complete.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_at_its_queue_bound_refuses_as_overloaded() {
    let one = ["--max-queued-requests", "1"];
    for (role, c) in
        [("prefill", Cluster::with_workers(&[&one], &[&[]], &[], &[])), ("decode", Cluster::with_workers(&[&[]], &[&one], &[], &[]))]
    {
        let prompt = "The history of the world is long and full of surprises. ".repeat(60);
        let requests = (0..4).map(|i| {
            let base = c.base.clone();
            let body = json!({"model": MODEL, "prompt": format!("{i}. {prompt}"), "max_tokens": 2});
            async move {
                let resp = client().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
                let (status, retry_after) = (resp.status().as_u16(), resp.headers().contains_key("retry-after"));
                (status, retry_after, resp.json::<serde_json::Value>().await.unwrap())
            }
        });
        let answers = futures::future::join_all(requests).await;
        let ok = answers.iter().filter(|(s, _, _)| *s == 200).count();
        let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
        assert!(ok >= 1, "{role}: {answers:?}");
        assert!(!refused.is_empty(), "{role}: four at once past a bound of one: {answers:?}");
        assert_eq!(ok + refused.len(), 4, "{role}: {answers:?}");
        for (_, retry_after, v) in &refused {
            assert!(*retry_after, "{role}: {v}");
            assert_eq!(v["error"]["code"], "overloaded", "{role}: {v}");
            assert!(v["error"]["message"].as_str().unwrap().contains("queue bound"), "{role}: {v}");
        }
        let worker = if role == "prefill" { &c.prefill[0] } else { &c.decode[0] };
        let refused_count = metric(&format!("http://{}", worker.field("metrics")), "tandem_worker_queue_refused_total").unwrap();
        assert!(refused_count >= refused.len() as f64, "{role}: {refused_count}");
        // Nothing stays queued.
        let queued = metric(&format!("http://{}", worker.field("metrics")), "tandem_worker_queued_requests").unwrap();
        assert_eq!(queued, 0.0, "{role}");
    }
}
