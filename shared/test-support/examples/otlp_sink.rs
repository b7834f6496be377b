//! A stand-alone OTLP trace receiver: what the tracing-overhead benchmark exports to, and the
//! stand-in for Jaeger in the compose stack where no Jaeger image can be had.
//!
//! `otlp_sink [--grpc ADDR] [--http ADDR] [--query ADDR] [--stdin] [--dump FILE]`
//!
//! Receives OTLP/gRPC on `--grpc` and OTLP/HTTP on `--http` (default: free ports on 127.0.0.1),
//! answers Jaeger's query API (`/api/services`, `/api/traces/{id}`) on `--query` if given, and
//! prints `READY grpc=ADDR http=ADDR`. It runs until SIGTERM or Ctrl-C, or with `--stdin` until
//! its stdin closes; then it prints one JSON line with the spans and export requests received
//! and, with `--dump`, writes every span received to FILE (JSON, for
//! `scripts/trace_waterfall.py`).

use std::io::Read;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> std::io::Result<()> {
    let (mut grpc, mut http, mut query, mut dump, mut stdin) = ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string(), None, None, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| std::io::Error::other(format!("{a} needs a value")));
        match a.as_str() {
            "--grpc" => grpc = value()?,
            "--http" => http = value()?,
            "--query" => query = Some(value()?),
            "--dump" => dump = Some(value()?),
            "--stdin" => stdin = true,
            other => return Err(std::io::Error::other(format!("unknown argument {other}"))),
        }
    }
    let sink = tandem_test_support::otlp::OtlpSink::start_on(&grpc, &http).await?;
    if let Some(q) = query {
        sink.serve_query(tokio::net::TcpListener::bind(&q).await?);
    }
    println!("READY grpc={} http={}", sink.grpc, sink.http);
    if stdin {
        tokio::task::spawn_blocking(|| {
            let mut rest = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut rest);
        })
        .await?;
    } else {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    let spans = sink.spans();
    if let Some(path) = dump {
        let all: Vec<serde_json::Value> = spans.iter().map(|s| s.to_json()).collect();
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
    }
    println!("{}", serde_json::json!({"spans": spans.len(), "requests": sink.requests()}));
    Ok(())
}
