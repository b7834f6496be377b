//! An OpenAI-compatible endpoint with no model behind it, for measuring the load generator
//! itself: every completion streams `max_tokens` chunks of one token's text, the first after
//! `--ttft-ms` and then one every `--itl-ms`, then the usage and `[DONE]`. Pointed at it,
//! `tandem-loadtest` shows the load it can drive before it, not the server, is the limit.
//!
//!     cargo run --release -p tandem-loadtest --example fake_openai -- --port 8100 --itl-ms 1

use std::time::Duration;

use axum::body::Body;
use axum::http::Uri;
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Clone, Parser)]
struct Args {
    #[arg(long, default_value_t = 8100)]
    port: u16,
    #[arg(long, default_value_t = 10)]
    ttft_ms: u64,
    #[arg(long, default_value_t = 1)]
    itl_ms: u64,
    #[arg(long, default_value = "fake-model")]
    model: String,
}

fn event(v: &Value) -> axum::body::Bytes {
    axum::body::Bytes::from(format!("data: {v}\n\n"))
}

async fn complete(args: Args, uri: Uri, body: Value) -> Response {
    let chat = uri.path().contains("chat");
    let max_tokens = body.get("max_tokens").or(body.get("max_completion_tokens")).and_then(Value::as_u64).unwrap_or(16);
    let choice = if chat {
        json!({"index": 0, "delta": {"content": " the"}, "finish_reason": null})
    } else {
        json!({"index": 0, "text": " the", "finish_reason": null})
    };
    let token = event(&json!({"id": "fake", "model": args.model, "choices": [choice], "usage": null}));
    let usage = event(&json!({"id": "fake", "model": args.model, "choices": [],
        "usage": {"prompt_tokens": 1, "completion_tokens": max_tokens, "total_tokens": 1 + max_tokens}}));
    let start = tokio::time::Instant::now() + Duration::from_millis(args.ttft_ms);
    let itl = Duration::from_millis(args.itl_ms);
    let stream = futures::stream::unfold(0u64, move |k| {
        let (token, usage) = (token.clone(), usage.clone());
        async move {
            match k {
                k if k < max_tokens => {
                    tokio::time::sleep_until(start + itl * k as u32).await;
                    Some((Ok::<_, std::io::Error>(token), k + 1))
                }
                k if k == max_tokens => Some((Ok(usage), k + 1)),
                k if k == max_tokens + 1 => Some((Ok(axum::body::Bytes::from_static(b"data: [DONE]\n\n")), k + 1)),
                _ => None,
            }
        }
    });
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream)).expect("a valid response")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (a, b) = (args.clone(), args.clone());
    let model = args.model.clone();
    let app = Router::new()
        .route("/v1/completions", post(move |uri: Uri, Json(body): Json<Value>| complete(a.clone(), uri, body)))
        .route("/v1/chat/completions", post(move |uri: Uri, Json(body): Json<Value>| complete(b.clone(), uri, body)))
        .route("/v1/models", get(move || async move { Json(json!({"object": "list", "data": [{"id": model, "object": "model"}]})) }));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?.tap_io(|s| {
        let _ = s.set_nodelay(true);
    });
    println!("READY http://127.0.0.1:{}", args.port);
    axum::serve(listener, app).await?;
    Ok(())
}
