//! A stand-alone OTLP trace receiver that counts what it receives: what the tracing-overhead
//! benchmark exports to. Prints `READY grpc=ADDR http=ADDR`, then, when stdin closes, one JSON
//! line with the spans and export requests received. With an argument, it also writes every span
//! received to that file (JSON), for `scripts/trace_waterfall.py`.

use std::io::Read;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> std::io::Result<()> {
    let dump = std::env::args().nth(1);
    let sink = tandem_test_support::otlp::OtlpSink::start().await?;
    println!("READY grpc={} http={}", sink.grpc, sink.http);
    tokio::task::spawn_blocking(|| {
        let mut rest = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut rest);
    })
    .await?;
    let spans = sink.spans();
    if let Some(path) = dump {
        let all: Vec<serde_json::Value> = spans.iter().map(|s| s.to_json()).collect();
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
    }
    println!("{}", serde_json::json!({"spans": spans.len(), "requests": sink.requests()}));
    Ok(())
}
