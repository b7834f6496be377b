//! The state store over TLS (`rediss://`) to a real `redis-server` with a private CA and a
//! password: it works when the CA is trusted, and refuses a server it cannot verify.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_state::{RedisStore, StateStore};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TLS-only `redis-server` with a password, and the PEM of the CA that signed its certificate.
fn tls_server(dir: &std::path::Path) -> (Server, u16, Vec<u8>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--tls-cert-file", cert.to_str().unwrap(), "--tls-key-file", key.to_str().unwrap()])
        .args(["--tls-ca-cert-file", cert.to_str().unwrap(), "--tls-auth-clients", "no", "--requirepass", "s3cret"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (apt-get install redis-server; .ci/run does it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not listen on its TLS port");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Server(child), port, certified.cert.pem().into_bytes())
}

#[tokio::test]
async fn rediss_with_a_private_ca_and_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, port, ca) = tls_server(dir.path());
    let url = format!("rediss://:s3cret@localhost:{port}/");
    let store = RedisStore::with_tls(&url, "tlstest", Some(ca.clone())).unwrap();
    store.publish_blocks("w1", &[1, 2, 3], Duration::from_secs(60)).await.unwrap();
    let holders = store.block_holders(&[1, 2, 3]).await.unwrap();
    assert!(holders.iter().all(|h| h == &vec!["w1".to_string()]), "{holders:?}");

    // The wrong password, or a CA that did not sign the server's certificate: refused.
    let wrong = RedisStore::with_tls(&format!("rediss://:nope@localhost:{port}/"), "tlstest", Some(ca)).unwrap();
    assert!(wrong.block_holders(&[1]).await.is_err());
    let other_ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap().cert.pem().into_bytes();
    let untrusted = RedisStore::with_tls(&url, "tlstest", Some(other_ca)).unwrap();
    assert!(untrusted.block_holders(&[1]).await.is_err());
}
