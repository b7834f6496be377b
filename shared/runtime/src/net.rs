//! Sockets as the services accept them, and the metrics and probe endpoint every worker serves.

use tokio::net::{TcpListener, TcpStream};

use crate::Shutdown;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};

/// The connections `listener` accepts, with Nagle's algorithm off: a server that streams small
/// messages (a token each) must send each when it is written, not hold it back until the peer
/// acknowledges the one before (with delayed acknowledgements, tens of milliseconds).
pub fn no_delay(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// Serves `GET /metrics` on `listener` (the Prometheus text format, `render` called at each
/// scrape, followed by the trace export's counts) until the service stops, beside the probes an
/// orchestrator asks: `GET /health` (200 while the process serves) and `GET /ready` (200 until
/// the service starts draining, then 503, so that no new work is routed to it). A service binds
/// this endpoint once its engine is loaded, so `/ready` answering at all means it is.
pub fn serve_metrics(listener: TcpListener, render: impl Fn() -> String + Clone + Send + Sync + 'static, shutdown: &Shutdown) {
    let draining = shutdown.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let render = render.clone();
                async move {
                    let mut page = render();
                    page.push_str(&crate::telemetry::render_metrics());
                    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], page)
                }
            }),
        )
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route(
            "/ready",
            axum::routing::get(move || {
                let draining = draining.is_draining();
                async move {
                    if draining {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "draining")
                    } else {
                        (axum::http::StatusCode::OK, "ready")
                    }
                }
            }),
        );
    let stopping = shutdown.stopping();
    shutdown.spawn(async move {
        let listener = axum::serve::ListenerExt::tap_io(listener, |s| {
            let _ = s.set_nodelay(true);
        });
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopping.cancelled_owned()).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let mut incoming = std::pin::pin!(no_delay(listener));
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
        // A plain accept leaves it on, which is what the wrapper is for.
        assert!(!client.await.unwrap().nodelay().unwrap());
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_health_and_readiness_until_draining() {
        let requested = tokio_util::sync::CancellationToken::new();
        let shutdown = Shutdown::new(requested.clone(), std::time::Duration::from_secs(5));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve_metrics(listener, || "my_metric 1\n".to_string(), &shutdown);
        let (status, page) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(page.starts_with("my_metric 1\n") && page.contains("tandem_trace_spans_dropped_total"), "{page}");
        assert_eq!(get(addr, "/health").await.0, 200);
        assert_eq!(get(addr, "/ready").await.0, 200);
        // Asked to stop: draining, so not ready, but alive until the service stops.
        requested.cancel();
        let run = {
            let s = shutdown.clone();
            tokio::spawn(async move { s.run(|| async {}, || false).await })
        };
        for _ in 0..100 {
            if shutdown.is_draining() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(get(addr, "/ready").await.0, 503);
        assert_eq!(get(addr, "/health").await.0, 200);
        run.abort();
    }
}
