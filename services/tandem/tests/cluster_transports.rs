//! Each KV transport carrying real handoffs between real prefill and decode processes, and the
//! fallback to TCP when the preferred transport is not offered. The gateway's metrics name the
//! transport that carried each handoff.

mod common;

use common::*;
use serde_json::json;

/// A one-prefill, one-decode cluster whose workers use the given `--kv-transport` lists.
fn cluster(prefill_transports: &str, decode_transports: &str) -> (Proc, Proc, Proc, String) {
    let engine = ["--kv-cache-mb", "64", "--handoff-lease-ms", "5000"];
    let p = start(&[&["prefill", "--kv-transport", prefill_transports][..], &engine].concat());
    let d = start(&[&["decode", "--kv-transport", decode_transports][..], &engine].concat());
    let (pa, da) = (p.field("grpc"), d.field("grpc"));
    let g = start(&["gateway", "--listen", "127.0.0.1:0", "--poll-interval-ms", "200", "--prefill", &pa, "--decode", &da]);
    let base = format!("http://{}", g.field("http"));
    wait_for("the cluster is ready", std::time::Duration::from_secs(60), || http_status(&base, "/ready") == Some(200));
    (p, d, g, base)
}

async fn one_request(base: &str) -> serde_json::Value {
    let body = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0});
    let (status, v) = post(base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    v
}

fn carried(base: &str, transport: &str) -> f64 {
    metric(base, &format!("tandem_kv_transfer_bytes_total{{transport=\"{transport}\"}}")).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn quic_carries_the_handoff_between_processes() {
    let (_p, d, _g, base) = cluster("quic", "quic");
    assert!(d.field("kv").starts_with("quic://") && d.field("kv").contains("#sha256="), "advertised {}", d.field("kv"));
    let over_quic = one_request(&base).await;
    let (_p2, _d2, _g2, base_tcp) = cluster("tcp", "tcp");
    let over_tcp = one_request(&base_tcp).await;
    assert_eq!(over_quic["choices"][0]["text"], over_tcp["choices"][0]["text"], "same tokens whichever transport");
    assert!(carried(&base, "quic") > 0.0);
    assert_eq!(carried(&base, "tcp"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sender_falls_back_to_what_the_receiver_offers() {
    // The prefill prefers QUIC; the decode worker receives over TCP only.
    let (_p, d, _g, base) = cluster("quic,tcp", "tcp");
    assert!(d.field("kv").starts_with("tcp://"));
    one_request(&base).await;
    assert!(carried(&base, "tcp") > 0.0);
    assert_eq!(carried(&base, "quic"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn ucx_is_the_default_and_carries_the_handoff() {
    let (_p, d, _g, base) = cluster("ucx,tcp", "ucx,tcp");
    let kv = d.field("kv");
    assert!(kv.starts_with("ucx://") && kv.contains(",tcp://"), "advertised {kv}");
    let over_ucx = one_request(&base).await;
    let again = one_request(&base).await;
    assert_eq!(over_ucx["choices"][0]["text"], again["choices"][0]["text"]);
    assert!(carried(&base, "ucx") > 0.0, "the handoff went over UCX");
    assert_eq!(carried(&base, "tcp"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_decode_worker_on_a_wildcard_address_advertises_the_host_it_is_given() {
    // As in a container: listen on every interface, tell senders a name that leads here.
    let engine = ["--kv-cache-mb", "64", "--handoff-lease-ms", "5000"];
    let wildcard = ["--kv-listen", "0.0.0.0:0", "--kv-advertise-host", "localhost"];
    let p = start(&[&["prefill", "--kv-transport", "quic,tcp"][..], &engine].concat());
    let d = start(&[&["decode", "--kv-transport", "quic,tcp"][..], &wildcard, &engine].concat());
    let kv = d.field("kv");
    let entries: Vec<&str> = kv.split(',').collect();
    assert_eq!(entries.len(), 2, "both transports advertised: {kv}");
    assert!(entries[0].starts_with("quic://localhost:") && entries[1].starts_with("tcp://localhost:"), "advertised {kv}");
    assert!(!kv.contains("0.0.0.0"), "{kv}");
    let g = start(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--poll-interval-ms",
        "200",
        "--prefill",
        &p.field("grpc"),
        "--decode",
        &d.field("grpc"),
    ]);
    let base = format!("http://{}", g.field("http"));
    wait_for("the cluster is ready", std::time::Duration::from_secs(60), || http_status(&base, "/ready") == Some(200));
    one_request(&base).await;
    assert!(carried(&base, "quic") > 0.0, "the handoff reached the advertised host");
    // The worker's probes, on its metrics port.
    let m = format!("http://{}", d.field("metrics"));
    assert_eq!(http_status(&m, "/health"), Some(200));
    assert_eq!(http_status(&m, "/ready"), Some(200));
}
