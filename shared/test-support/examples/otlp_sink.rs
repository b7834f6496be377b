//! A stand-alone OTLP trace receiver that counts what it receives: what the tracing-overhead
//! benchmark exports to. Prints `READY grpc=ADDR http=ADDR`, then, when stdin closes, one JSON
//! line with the spans and export requests received.

use std::io::Read;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> std::io::Result<()> {
    let sink = tandem_test_support::otlp::OtlpSink::start().await?;
    println!("READY grpc={} http={}", sink.grpc, sink.http);
    tokio::task::spawn_blocking(|| {
        let mut rest = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut rest);
    })
    .await?;
    println!("{}", serde_json::json!({"spans": sink.spans().len(), "requests": sink.requests()}));
    Ok(())
}
