//! The gateway's door: API keys, per-key rate limits, and admission when the cluster is full.
//! Each refusal is in OpenAI's error shape, with the status and headers clients act on.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn get_with(base: &str, path: &str, key: Option<&str>) -> reqwest::Response {
    let mut r = client().get(format!("{base}{path}"));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap()
}

async fn error_code(resp: reqwest::Response) -> String {
    let v: Value = resp.json().await.unwrap();
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_and_the_request_rate_per_key() {
    let c = Cluster::start_with(1, 1, &["--api-key", "key-one", "--api-key", "key-two", "--rate-limit-rpm", "3"]);
    // No key, a wrong key, a key that is a prefix of a right one: 401, invalid_api_key.
    for key in [None, Some("nope"), Some("key-on")] {
        let r = get_with(&c.base, "/v1/models", key).await;
        assert_eq!(r.status(), 401, "{key:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        assert_eq!(error_code(r).await, "invalid_api_key");
    }
    // The probes and the metrics stay open.
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(get_with(&c.base, path, None).await.status(), 200, "{path}");
    }
    // Either key works; each has its own three requests a minute.
    for _ in 0..3 {
        assert_eq!(get_with(&c.base, "/v1/models", Some("key-two")).await.status(), 200);
    }
    let over = get_with(&c.base, "/v1/models", Some("key-two")).await;
    assert_eq!(over.status(), 429);
    let wait: u64 = over.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&wait), "a request comes back every 20 s: {wait}");
    assert_eq!(error_code(over).await, "rate_limit_exceeded");
    let (status, v) = post_with_key(&c.base, "key-one", &json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(metric(&c.base, "tandem_refused_requests_total{reason=\"invalid_api_key\"}"), Some(3.0));
    assert_eq!(metric(&c.base, "tandem_refused_requests_total{reason=\"requests\"}"), Some(1.0));
}

async fn post_with_key(base: &str, key: &str, body: &Value) -> (u16, Value) {
    let r = client().post(format!("{base}/v1/completions")).bearer_auth(key).json(body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_rate_counts_prompt_and_max_tokens() {
    let c = Cluster::start_with(1, 1, &["--rate-limit-tpm", "600"]);
    // About 500 tokens of budget (a short prompt and max_tokens 500): within 600 a minute.
    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 500, "temperature": 0, "stop": ["."]});
    let (status, v) = post(&c.base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    // The next one would pass 600 a minute.
    let r = client().post(format!("{}/v1/completions", c.base)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_code(r).await, "rate_limit_exceeded");
    assert_eq!(metric(&c.base, "tandem_refused_requests_total{reason=\"tokens\"}"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_cluster_refuses_with_503_and_serves_what_it_admitted() {
    let c = Cluster::start_with(1, 1, &["--max-waiting-requests", "1"]);
    // Long prompts take seconds of prefill each: with room for one waiting request, a burst of
    // four cannot all get in.
    let prompt = "The history of the world is long and full of surprises. ".repeat(60);
    let mut calls = Vec::new();
    for i in 0..4 {
        let body = json!({"model": MODEL, "prompt": format!("{i} {prompt}"), "max_tokens": 2, "temperature": 0});
        let base = c.base.clone();
        calls.push(tokio::spawn(async move {
            let r = client().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), retry, r.json::<Value>().await.unwrap())
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ok = 0;
    let mut refused = 0;
    for call in calls {
        let (status, retry, v) = call.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                refused += 1;
                assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|s| (1..=60).contains(&s))), "{v}");
                assert!(v["error"]["message"].as_str().unwrap().contains("at capacity"), "{v}");
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    assert_eq!(metric(&c.base, "tandem_refused_requests_total{reason=\"queue_full\"}"), Some(refused as f64));
    // Once the queue drained, requests get in again.
    let (status, v) = post(&c.base, "/v1/completions", &json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{v}");
}

/// One HTTP/1.1 GET over TLS, trusting only `ca`; returns the status line and body.
async fn https_get(addr: &str, ca: &rustls::pki_types::CertificateDer<'static>, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_serves_https_with_the_given_certificate() {
    let dir = std::env::temp_dir().join(format!("tandem-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let ca = certified.cert.der().clone();

    let engine = ["--kv-cache-mb", "64"];
    let prefill = start(&[&["prefill"][..], &engine].concat());
    let decode = start(&[&["decode"][..], &engine].concat());
    let (p, d) = (prefill.field("grpc"), decode.field("grpc"));
    let gateway = start(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--prefill",
        &p,
        "--decode",
        &d,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let addr = gateway.field("http");
    let models = https_get(&addr, &ca, "/v1/models").await.unwrap();
    assert!(models.starts_with("HTTP/1.1 200"), "{models}");
    assert!(models.contains(MODEL), "{models}");
    // Plain HTTP on the TLS port gets no answer it could read as HTTP.
    assert_eq!(http_status(&format!("http://{addr}"), "/health"), None);
    // A client that does not trust the certificate refuses it.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    assert!(https_get(&addr, other.cert.der(), "/health").await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
