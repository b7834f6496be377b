//! The cluster with its state in a real Redis: prefix reuse and prefix-aware routing, the block
//! store standing in for a worker that never saw a prompt, workers joining, draining and dying
//! under load, and Redis itself restarting under load.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tandem_protocol::pb::block_store_client::BlockStoreClient;
use tandem_protocol::pb::decode_client::DecodeClient;
use tandem_protocol::pb::prefill_client::PrefillClient;
use tandem_protocol::pb::{InfoRequest, WorkerInfo};
use tandem_state::testing::RedisServer;

/// These tests time requests and count on workers being idle at given moments: one at a time.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

async fn info(p: &Proc) -> WorkerInfo {
    let url = format!("http://{}", p.field("grpc"));
    match p.fields.iter().any(|(k, _)| k == "kv") {
        true => DecodeClient::connect(url).await.unwrap().info(InfoRequest {}).await.unwrap().into_inner(),
        false => match PrefillClient::connect(url.clone()).await.unwrap().info(InfoRequest {}).await {
            Ok(i) => i.into_inner(),
            Err(_) => BlockStoreClient::connect(url).await.unwrap().info(InfoRequest {}).await.unwrap().into_inner(),
        },
    }
}

fn system_prompt() -> String {
    // About 400 tokens: seconds of CPU work to compute, a few milliseconds to reuse.
    "You are the ship's archivist. You answer questions about the history of sailing ships, \
     their rigging, their crews and the routes they sailed, citing the logbooks you keep. "
        .repeat(9)
}

fn chat(system: &str, user: &str, max_tokens: u32) -> Value {
    json!({"model": MODEL, "temperature": 0, "max_tokens": max_tokens,
           "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
}

/// Sends a chat request as a client that honours `Retry-After` would: a 503 (a worker that
/// missed one health poll on a loaded machine is out of routing until the next) is retried for a
/// few seconds. Returns the response body and the time the answered request took.
async fn timed(base: &str, body: &Value) -> (Value, Duration) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let started = Instant::now();
        let (status, v) = post(base, "/v1/chat/completions", body).await;
        if status == 503 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        assert_eq!(status, 200, "{v}");
        return (v, started.elapsed());
    }
}

fn cached_tokens(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap()
}

fn text(v: &Value) -> String {
    v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_system_prompt_is_served_from_cached_blocks() {
    let _serial = one_at_a_time().await;
    let redis = RedisServer::start();
    let c = RedisCluster::start(&redis.url(), 1, 1);
    let system = system_prompt();
    let (first, cold) = timed(&c.base, &chat(&system, "Which ship sailed first?", 4)).await;
    assert_eq!(cached_tokens(&first), 0);
    let hits_before = metric(&c.base, "tandem_prefix_cache_hit_tokens_total").unwrap();

    let (second, warm) = timed(&c.base, &chat(&system, "And which sailed last?", 4)).await;
    let prompt_tokens = second["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = cached_tokens(&second);
    assert!(cached >= prompt_tokens * 3 / 4, "{cached} of {prompt_tokens} prompt tokens came from the cache");
    assert!(metric(&c.base, "tandem_prefix_cache_hit_tokens_total").unwrap() >= hits_before + cached as f64);
    assert!(metric(&c.base, "tandem_prefix_index_hit_blocks_total").unwrap() > 0.0, "routing saw the prefix in the index");
    assert!(warm < cold / 2, "the cached prompt answered in {warm:?}, the cold one in {cold:?}");

    // The index and the request state are in Redis, under their documented keys.
    let prefix_keys = redis.cli(&["KEYS", "tandem:prefix:*"]);
    assert!(prefix_keys.len() as u64 >= prompt_tokens / 16 * 3 / 4, "{} index keys", prefix_keys.len());
    let holders = redis.cli(&["ZRANGE", &prefix_keys[0], "0", "-1"]);
    assert!(holders.iter().any(|h| h.starts_with("prefill-")), "holders {holders:?}");
    let request_key = format!("tandem:request:{}-0", second["id"].as_str().unwrap());
    wait_for("the request state is written", Duration::from_secs(5), || {
        redis.cli(&["GET", &request_key]).first().is_some_and(|s| s.contains("\"phase\":\"done\""))
    });
    let state: Value = serde_json::from_str(&redis.cli(&["GET", &request_key])[0]).unwrap();
    assert_eq!(state["prompt"].as_array().unwrap().len() as u64, prompt_tokens);
    assert_eq!(state["finish_reason"], "length");
    assert!(state["decode_worker"].as_str().unwrap().starts_with("decode-"));
    assert_eq!(redis.cli(&["LRANGE", &format!("{request_key}:tokens"), "0", "-1"]).len(), 4, "every streamed token recorded");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_prefill_worker_pulls_a_prefix_from_the_block_store() {
    let _serial = one_at_a_time().await;
    let redis = RedisServer::start();
    let mut c = RedisCluster::start(&redis.url(), 1, 1);
    let system = system_prompt();
    let (first, _) = timed(&c.base, &chat(&system, "Name a ship.", 8)).await;
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap();
    // The first worker offloaded the prompt's full blocks in the background.
    let full_blocks = (prompt_tokens / 16) as u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while info(&c.kv).await.total_blocks < full_blocks {
        assert!(Instant::now() < deadline, "the block store never received the prompt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A second prefill worker joins; the first drains and leaves. The newcomer never saw the prompt.
    c.prefill.push(start(&worker_args("prefill", &c.redis_url)));
    let status = c.prefill[0].stop_within(Duration::from_secs(30)).expect("the idle worker drains and exits");
    assert!(status.success(), "drained cleanly: {status}");
    let base = c.base.clone();
    wait_for("the gateway routes to the newcomer only", Duration::from_secs(20), || {
        metric(&base, "tandem_workers{role=\"prefill\"}") == Some(1.0)
            && redis_members(&redis).iter().filter(|m| m.starts_with("prefill-")).count() == 1
    });

    let (again, _) = timed(&c.base, &chat(&system, "Name a ship.", 8)).await;
    let newcomer = info(&c.prefill[1]).await;
    assert!(newcomer.pulled_blocks as u32 >= full_blocks - 1, "pulled {} of {full_blocks} blocks", newcomer.pulled_blocks);
    assert!(cached_tokens(&again) >= (full_blocks as u64 - 1) * 16, "usage: {}", again["usage"]);
    assert!(metric(&c.base, "tandem_kv_store_pulled_blocks_total").unwrap() >= (full_blocks - 1) as f64);
    assert_eq!(text(&again), text(&first), "greedy output over fetched blocks matches the computed one");

    // The store's own metrics saw the same: the offload arrive and the prefix go out.
    let store = format!("http://{}", c.kv.field("metrics"));
    let store_metric = |name: &str| metric(&store, &format!("{name}{{role=\"kv-transfer\"}}")).unwrap_or_else(|| panic!("no {name}"));
    assert!(store_metric("tandem_kv_store_stored_blocks_total") >= full_blocks as f64);
    assert!(store_metric("tandem_kv_store_served_blocks_total") >= (full_blocks - 1) as f64);
    assert!(store_metric("tandem_kv_store_blocks") >= full_blocks as f64);
    // Every worker advertises where its metrics are, in its registry record.
    for id in redis_members(&redis) {
        let record: serde_json::Value = serde_json::from_str(&redis.cli(&["GET", &format!("tandem:worker:{id}")]).join("")).unwrap();
        let at = record["metrics_addr"].as_str().unwrap_or_default().to_string();
        assert!(http_get(&format!("http://{at}"), "/metrics").is_some_and(|page| page.contains("tandem_")), "{id} advertises {at:?}");
    }
}

fn redis_members(redis: &RedisServer) -> Vec<String> {
    // Members whose record is still live (the set is pruned lazily).
    redis
        .cli(&["SMEMBERS", "tandem:workers"])
        .into_iter()
        .filter(|id| !redis.cli(&["GET", &format!("tandem:worker:{id}")]).is_empty())
        .collect()
}

/// Requests sent two at a time until `stop`; every one must succeed.
fn background_load(
    base: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..2)
        .map(|i| {
            let (base, stop, done, failed) = (base.clone(), stop.clone(), done.clone(), failed.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let body = chat("You are brief.", &format!("Count to {} please ({i}).", n % 7 + 2), 6);
                    let error = match client().post(format!("{base}/v1/chat/completions")).json(&body).send().await {
                        Ok(r) if r.status() == 200 => {
                            done.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                        Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                        Err(e) => e.to_string(),
                    };
                    failed.lock().unwrap().push(error);
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn decode_workers_join_drain_and_die_under_load() {
    let _serial = one_at_a_time().await;
    let redis = RedisServer::start();
    let mut c = RedisCluster::start(&redis.url(), 1, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = background_load(c.base.clone(), stop.clone(), done.clone(), failed.clone());

    // A decode worker started while the cluster serves gets requests within seconds.
    let joined = Instant::now();
    c.decode.push(start(&worker_args("decode", &c.redis_url)));
    let deadline = Instant::now() + Duration::from_secs(15);
    while info(&c.decode[1]).await.completed == 0 {
        assert!(Instant::now() < deadline, "the new decode worker got no request");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("new decode worker served its first request {:?} after it started", joined.elapsed());

    // Long streams on both workers; then the new one drains: its streams finish, then it leaves.
    let long = |i: usize| {
        let base = c.base.clone();
        tokio::spawn(async move {
            let body = json!({"model": MODEL, "prompt": format!("Story {i}: once upon a time"), "max_tokens": 60,
                              "ignore_eos": true, "temperature": 0, "stream": true});
            let resp = client().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            sse(resp).await
        })
    };
    let streams: Vec<_> = (0..4).map(long).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while info(&c.decode[1]).await.running == 0 {
        assert!(Instant::now() < deadline, "no long stream reached the new worker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let draining = c.decode[1].stop_within(Duration::from_millis(1));
    assert!(draining.is_none(), "a worker with streams in flight does not exit at once");
    for s in streams {
        let (events, finished) = s.await.unwrap();
        assert!(finished, "stream ended with [DONE]");
        let tokens = events.iter().filter(|e| e["choices"][0]["text"].is_string()).count();
        let last = events.iter().rev().find(|e| !e["choices"][0]["finish_reason"].is_null()).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
        assert!(tokens >= 50, "a drained stream still delivered all its tokens ({tokens} chunks)");
    }
    let status = c.decode[1].stop_within(Duration::from_secs(30)).expect("the drained worker exits");
    assert!(status.success(), "{status}");
    assert_eq!(redis_members(&redis).iter().filter(|m| m.starts_with("decode-")).count(), 1, "it left the registry");

    // A killed worker: out of routing once its heartbeat lapses; new requests avoid it.
    c.decode.push(start(&worker_args("decode", &c.redis_url)));
    let base = c.base.clone();
    wait_for("the third decode worker is routed to", Duration::from_secs(15), || {
        metric(&base, "tandem_workers{role=\"decode\"}") == Some(2.0)
    });
    stop.store(true, Ordering::SeqCst);
    for h in load {
        h.await.unwrap();
    }
    c.decode[2].child.kill().unwrap();
    c.decode[2].child.wait().unwrap();
    let killed = Instant::now();
    let mut results = Vec::new();
    for i in 0..6 {
        results.push(post(&c.base, "/v1/chat/completions", &chat("You are brief.", &format!("Say {i}."), 3)).await);
    }
    assert!(results.iter().all(|(s, _)| *s == 200), "requests after the kill: {:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    wait_for("the killed worker's record lapses", Duration::from_secs(10), || {
        redis_members(&redis).iter().filter(|m| m.starts_with("decode-")).count() == 1
    });
    eprintln!("killed worker left the registry {:?} after the kill", killed.elapsed());
    assert_eq!(metric(&c.base, "tandem_workers{role=\"decode\"}"), Some(1.0));

    let failed = failed.lock().unwrap();
    assert!(failed.is_empty(), "requests failed under load: {failed:?}");
    assert!(done.load(Ordering::SeqCst) > 5, "the load kept flowing");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_rides_out_a_redis_restart() {
    let _serial = one_at_a_time().await;
    let mut redis = RedisServer::start();
    let c = RedisCluster::start(&redis.url(), 1, 1);
    let system = system_prompt();
    timed(&c.base, &chat(&system, "Warm up.", 2)).await;
    assert!(!redis.cli(&["KEYS", "tandem:prefix:*"]).is_empty());

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = background_load(c.base.clone(), stop.clone(), done.clone(), failed.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    redis.stop();
    let before = done.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.load(Ordering::SeqCst) < before + 3 {
        assert!(Instant::now() < deadline, "requests stopped completing while Redis was down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.restart();

    // Heartbeats refill the registry; the prefill worker republishes its cache into the index.
    wait_for("the registry is repopulated", Duration::from_secs(10), || redis_members(&redis).len() == 3);
    wait_for("the prefix index is repopulated", Duration::from_secs(10), || redis.cli(&["KEYS", "tandem:prefix:*"]).len() >= 20);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for h in load {
        h.await.unwrap();
    }
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    assert!(failed.is_empty(), "requests failed across the restart: {failed:?}");
    // And routing uses the index again.
    let hits = metric(&c.base, "tandem_prefix_index_hit_blocks_total").unwrap();
    let (v, _) = timed(&c.base, &chat(&system, "After the restart.", 2)).await;
    assert!(cached_tokens(&v) > 0);
    assert!(metric(&c.base, "tandem_prefix_index_hit_blocks_total").unwrap() > hits);
}
