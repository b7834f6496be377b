//! Two workers in one process, talking over loopback.

use std::net::SocketAddr;
use std::sync::Once;
use std::time::{Duration, Instant};

use tandem_ucx::{Context, Endpoint, Error, Listener, Worker};

/// Unless the environment already chooses, pins UCX to TCP before the first context is created.
/// Loopback works without it (UCX's defaults pick shared memory between these two workers), but
/// pinning keeps the tests independent of the host's hardware, and TCP is the transport the
/// error cases are about. (Shared memory alone cannot work: connections to a socket address
/// need a network transport.)
fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("UCX_TLS").is_none() {
            std::env::set_var("UCX_TLS", "tcp");
        }
    });
}

fn worker() -> Worker {
    init();
    Worker::new(Context::new().unwrap()).unwrap()
}

async fn pair() -> (Worker, Listener, Worker, Endpoint, Endpoint) {
    let server = worker();
    let listener = server.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    assert_ne!(listener.local_addr().port(), 0);
    let client = worker();
    let ep = client.connect(listener.local_addr()).await.unwrap();
    // The server only learns of the connection once the client has something to say.
    ep.send(1, b"hello".to_vec()).await.unwrap();
    let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await.unwrap().unwrap();
    let hello = accepted.recv().await.unwrap();
    assert_eq!((hello.kind, hello.data.as_slice()), (1, &b"hello"[..]));
    (server, listener, client, ep, accepted)
}

#[tokio::test]
async fn active_messages_round_trip_small_and_large() {
    let (_server, _listener, _client, ep, accepted) = pair().await;
    ep.send(7, b"ping".to_vec()).await.unwrap();
    let ping = accepted.recv().await.unwrap();
    assert_eq!((ping.kind, ping.data.as_slice()), (7, &b"ping"[..]));
    accepted.send(8, Vec::new()).await.unwrap();
    let pong = ep.recv().await.unwrap();
    assert_eq!((pong.kind, pong.data.len()), (8, 0));
    // Large enough for the rendezvous protocol, fetched with ucp_am_recv_data_nbx.
    let big: Vec<u8> = (0..8usize << 20).map(|i| (i * 31 % 251) as u8).collect();
    let send = ep.send(9, big.clone());
    let (sent, got) = tokio::join!(send, accepted.recv());
    sent.unwrap();
    let got = got.unwrap();
    assert_eq!(got.kind, 9);
    assert!(got.data == big, "large payload corrupted");
}

#[tokio::test]
async fn put_into_a_registered_region_and_get_it_back() {
    let (server, _listener, client, ep, accepted) = pair().await;
    let target = server.register(1 << 20).await.unwrap();
    assert_eq!(server.registered_regions(), 1);
    // The server advertises its region; the client writes into it one-sidedly.
    let mut advert = target.address().to_le_bytes().to_vec();
    advert.extend_from_slice(target.rkey());
    accepted.send(2, advert).await.unwrap();
    let advert = ep.recv().await.unwrap().data;
    let addr = u64::from_le_bytes(advert[..8].try_into().unwrap());
    let rkey = ep.unpack_rkey(&advert[8..]).await.unwrap();

    let local = client.register(1 << 20).await.unwrap();
    let pattern: Vec<u8> = (0..256 * 1024usize).map(|i| (i % 253) as u8).collect();
    local.write(4096, &pattern).unwrap();
    ep.put(&local, 4096, pattern.len(), addr + 1000, &rkey).await.unwrap();
    ep.flush().await.unwrap();
    let mut seen = vec![0u8; pattern.len()];
    target.read(1000, &mut seen).unwrap();
    assert!(seen == pattern, "put did not land");
    let mut before = [1u8; 1000];
    target.read(0, &mut before).unwrap();
    assert!(before.iter().all(|b| *b == 0), "put wrote outside its range");

    // Read it back one-sidedly into another place of the local region.
    ep.get(&local, 512 * 1024, pattern.len(), addr + 1000, &rkey).await.unwrap();
    let mut back = vec![0u8; pattern.len()];
    local.read(512 * 1024, &mut back).unwrap();
    assert!(back == pattern, "get returned other bytes");

    // Misuse is refused before it reaches UCX.
    assert!(matches!(ep.put(&local, (1 << 20) - 10, 11, addr, &rkey).await, Err(Error::Invalid(_))));
    assert!(matches!(accepted.put(&local, 0, 1, addr, &rkey).await, Err(Error::Invalid(_))));
    assert!(local.write(1 << 20, b"x").is_err());

    drop((rkey, local, target));
    eventually(|| server.registered_regions() == 0 && client.registered_regions() == 0).await;
}

#[tokio::test]
async fn a_closed_peer_is_an_error_not_a_hang() {
    let (server, listener, _client, ep, accepted) = pair().await;
    let started = Instant::now();
    drop((accepted, listener, server));
    let err = tokio::time::timeout(Duration::from_secs(5), ep.recv()).await.expect("no error after the peer closed").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    // It stays failed, and sending fails too.
    assert_eq!(ep.recv().await.unwrap_err(), err);
    assert!(ep.send(1, b"late".to_vec()).await.is_err());
}

#[tokio::test]
async fn nobody_listening_is_an_error() {
    let closed: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let client = worker();
    let ep = client.connect(closed).await;
    let failed = match ep {
        Err(_) => true,
        Ok(ep) => {
            let sent = ep.send(1, b"anyone?".to_vec()).await;
            sent.is_err()
                || tokio::time::timeout(Duration::from_secs(10), ep.recv()).await.expect("no error from an unreachable peer").is_err()
        }
    };
    assert!(failed);
}

async fn eventually(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not reached");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
