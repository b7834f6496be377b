//! Sockets as the services accept them, and the metrics endpoint every worker serves.

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
/// scrape, followed by the trace export's counts) until the service stops.
pub fn serve_metrics(listener: TcpListener, render: impl Fn() -> String + Clone + Send + Sync + 'static, shutdown: &Shutdown) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                let mut page = render();
                page.push_str(&crate::telemetry::render_metrics());
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], page)
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
}
