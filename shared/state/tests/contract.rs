//! The store contract, run against both implementations: the embedded store and a real
//! `redis-server`.

use std::sync::Arc;
use std::time::Duration;

use tandem_state::testing::RedisServer;
use tandem_state::{prefix_overlap, EmbeddedStore, Phase, RedisStore, RequestState, StateError, StateStore, WorkerRecord};

fn worker(id: &str, role: &str) -> WorkerRecord {
    WorkerRecord {
        id: id.into(),
        role: role.into(),
        addr: format!("127.0.0.1:{}", id.len() + 9000),
        model: "m".into(),
        tp_size: 1,
        ..Default::default()
    }
}

const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(60);

async fn registry(s: &dyn StateStore) {
    assert!(s.register_worker(&worker("p1", "prefill"), LONG).await.unwrap(), "first heartbeat is new");
    assert!(!s.register_worker(&worker("p1", "prefill"), LONG).await.unwrap(), "a renewal is not");
    let mut d = worker("d1", "decode");
    d.free_blocks = 7;
    s.register_worker(&d, SHORT).await.unwrap();
    let ws = s.workers().await.unwrap();
    assert_eq!(ws.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["d1", "p1"]);
    assert_eq!(ws[0], d, "the record comes back as written");

    // d1 stops beating: it leaves the registry once its TTL lapses; p1 stays.
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    let ws = s.workers().await.unwrap();
    assert_eq!(ws.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["p1"]);
    assert!(s.register_worker(&d, LONG).await.unwrap(), "a lapsed worker's next beat is new again");

    s.remove_worker("p1").await.unwrap();
    assert_eq!(s.workers().await.unwrap().len(), 1);
}

async fn prefix_index(s: &dyn StateStore) {
    s.publish_blocks("p1", &[1, 2, 3], LONG).await.unwrap();
    s.publish_blocks("p2", &[1, 2], LONG).await.unwrap();
    s.publish_blocks("kv", &[1, 2, 3, 4], SHORT).await.unwrap();
    let h = s.block_holders(&[1, 2, 3, 4, 5]).await.unwrap();
    assert_eq!(h, vec![vec!["kv", "p1", "p2"], vec!["kv", "p1", "p2"], vec!["kv", "p1"], vec!["kv"], vec![]]);
    let o = prefix_overlap(&h);
    assert_eq!((o["p1"], o["p2"], o["kv"]), (3, 2, 4));

    // Eviction withdraws; the TTL drops entries nobody renewed.
    s.withdraw_blocks("p1", &[2]).await.unwrap();
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    let h = s.block_holders(&[1, 2, 3, 4]).await.unwrap();
    assert_eq!(h, vec![vec!["p1", "p2"], vec!["p2"], vec!["p1"], vec![]]);
    assert_eq!(prefix_overlap(&h).get("p1"), Some(&1), "p1's prefix stops at the withdrawn block");
}

async fn requests(s: &dyn StateStore) {
    let params = serde_json::json!({"temperature": 0.0, "max_tokens": 4});
    let mut r = RequestState::new("req-1", "m", vec![5, 6, 7], 42, params);
    assert!(s.request("req-1").await.unwrap().is_none());
    s.put_request(&r, LONG).await.unwrap();
    s.append_tokens("req-1", &[10, 11], LONG).await.unwrap();
    r.phase = Phase::Decode;
    r.prefill_worker = "p1".into();
    r.decode_worker = "d1".into();
    s.put_request(&r, LONG).await.unwrap();
    s.append_tokens("req-1", &[12], LONG).await.unwrap();
    let got = s.request("req-1").await.unwrap().expect("stored");
    assert_eq!(got.tokens, vec![10, 11, 12], "tokens survive a state update and arrive in order");
    assert_eq!((got.phase, got.prompt.as_slice(), got.seed), (Phase::Decode, &[5u32, 6, 7][..], 42));
    assert_eq!(got.decode_worker, "d1");
    // A finished request expires.
    r.phase = Phase::Done;
    s.put_request(&r, SHORT).await.unwrap();
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert!(s.request("req-1").await.unwrap().is_none());
}

#[tokio::test]
async fn embedded_store_keeps_the_contract() {
    let s = EmbeddedStore::new();
    registry(&s).await;
    prefix_index(&s).await;
    requests(&s).await;
}

#[tokio::test]
async fn redis_store_keeps_the_contract() {
    let server = RedisServer::start();
    let s = RedisStore::open(&server.url()).unwrap();
    registry(&s).await;
    prefix_index(&s).await;
    requests(&s).await;
    // The index lives in Redis under readable keys.
    s.publish_blocks("p9", &[0xabc], LONG).await.unwrap();
    assert_eq!(server.cli(&["ZRANGE", "tandem:prefix:0000000000000abc", "0", "-1"]), vec!["p9"]);
}

#[tokio::test]
async fn redis_restart_is_survived_and_noticed() {
    let mut server = RedisServer::start();
    let s: Arc<dyn StateStore> = Arc::new(RedisStore::open(&server.url()).unwrap());
    assert!(s.register_worker(&worker("p1", "prefill"), LONG).await.unwrap());
    server.stop();
    let started = std::time::Instant::now();
    let err = s.workers().await.unwrap_err();
    assert!(matches!(err, StateError::Unavailable(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "a dead Redis answers within the timeout, took {:?}", started.elapsed());
    server.restart();
    // The connection comes back on its own; the empty server makes the next beat "new".
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let fresh = loop {
        match s.register_worker(&worker("p1", "prefill"), LONG).await {
            Ok(fresh) => break fresh,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("redis did not come back: {e}"),
        }
    };
    assert!(fresh, "after a restart the worker learns it must republish");
    assert_eq!(s.workers().await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_unreachable_redis_fails_fast_instead_of_hanging() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s = RedisStore::open(&format!("redis://127.0.0.1:{port}/")).unwrap();
    let started = std::time::Instant::now();
    assert!(s.block_holders(&[1]).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
}
