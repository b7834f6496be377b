//! Mutual TLS on the cluster's gRPC: a gateway, a prefill and a decode worker and a block store,
//! every one given the cluster CA and a certificate from it, serve a request end to end; a worker
//! refuses a caller in plain text, one without a certificate, and one whose certificate comes
//! from another CA.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::json;
use tandem_protocol::pb::block_store_client::BlockStoreClient;
use tandem_protocol::pb::prefill_client::PrefillClient;
use tandem_protocol::pb::InfoRequest;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A CA, and a certificate it signed for `localhost` and 127.0.0.1, as PEM files in `dir`:
/// (CA, certificate, key).
fn pki(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    let paths = (dir.join(format!("{name}-ca.pem")), dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

fn tls(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientTlsConfig {
    let mut t = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        t = t.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    t
}

async fn channel(addr: &str, tls: Option<ClientTlsConfig>) -> Result<tonic::transport::Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(t) = tls {
        e = e.tls_config(t).map_err(|e| e.to_string())?;
    }
    e.connect().await.map_err(|e| format!("{e:?}"))
}

/// The prefill worker's `Info`, asked over `tls` (plain without).
async fn prefill_info(addr: &str, tls: Option<ClientTlsConfig>) -> Result<u64, String> {
    let ch = channel(addr, tls).await?;
    PrefillClient::new(ch).info(InfoRequest {}).await.map(|r| r.into_inner().completed).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_speaks_mutual_tls_and_refuses_callers_without_its_certificates() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join(format!("tandem-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = pki(&dir, "cluster");
    let (_, other_cert, other_key) = pki(&dir, "other");
    let env = [
        ("TANDEM_GRPC_TLS_CA", ca.to_str().unwrap()),
        ("TANDEM_GRPC_TLS_CERT", cert.to_str().unwrap()),
        ("TANDEM_GRPC_TLS_KEY", key.to_str().unwrap()),
    ];
    let store = start_env(&["kv-transfer"], &env);
    let c = Cluster::with_workers(&[&[]], &[&[]], &["--block-store", &store.field("grpc")], &env);

    // End to end: gateway → decode and prefill, prefill → decode (KV, its own transport), and
    // prefill → block store, over mutual TLS.
    let body =
        json!({"model": MODEL, "prompt": "The planets of the solar system, in order from the sun, are", "max_tokens": 6, "temperature": 0});
    let (status, v) = post(&c.base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty());
    let store_addr = store.field("grpc");
    eventually("the block store holds the prompt's blocks, offloaded over TLS", Duration::from_secs(10), || {
        let (store_addr, ca, cert, key) = (store_addr.clone(), ca.clone(), cert.clone(), key.clone());
        async move {
            let Ok(ch) = channel(&store_addr, Some(tls(&ca, Some((&cert, &key))))).await else { return false };
            BlockStoreClient::new(ch).info(InfoRequest {}).await.map(|r| r.into_inner().total_blocks > 0).unwrap_or(false)
        }
    })
    .await;

    let prefill = c.prefill[0].field("grpc");
    assert_eq!(prefill_info(&prefill, Some(tls(&ca, Some((&cert, &key))))).await, Ok(1));
    let plain = prefill_info(&prefill, None).await;
    assert!(plain.is_err(), "a plain-text caller was answered: {plain:?}");
    let anonymous = prefill_info(&prefill, Some(tls(&ca, None))).await;
    assert!(anonymous.is_err(), "a caller without a certificate was answered: {anonymous:?}");
    let stranger = prefill_info(&prefill, Some(tls(&ca, Some((&other_cert, &other_key))))).await;
    assert!(stranger.is_err(), "a caller with another CA's certificate was answered: {stranger:?}");

    // A gateway without the cluster's certificate cannot use the workers.
    let outsider = start(&["gateway", "--listen", "127.0.0.1:0", "--prefill", &prefill, "--decode", &c.decode[0].field("grpc")]);
    let base = format!("http://{}", outsider.field("http"));
    let (status, v) = post(&base, "/v1/completions", &body).await;
    assert_eq!(status, 503, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
