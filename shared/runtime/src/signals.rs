//! The signals a service process stops on.

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// A token that fires on Ctrl-C or SIGTERM, and, for a `managed` service (one `tandem up`
/// started), when its stdin closes, so that children never outlive their parent.
pub fn stop_signal(managed: bool) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async move {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let stdin_closed = async {
            if managed {
                let mut buf = [0u8; 64];
                let mut stdin = tokio::io::stdin();
                while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
            } else {
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
            _ = stdin_closed => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}
