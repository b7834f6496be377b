//! A worker's life in the cluster: heartbeats into the registry and counting work in flight
//! (the phased shutdown around them is `tandem-runtime`'s).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{StateStore, WorkerRecord};

/// Counts requests in progress.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

/// One request in progress; dropping it ends it.
#[derive(Debug)]
pub struct InFlightGuard(Arc<AtomicUsize>);

impl InFlight {
    pub fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Renews the worker's registry record every `every` (it lapses after `ttl`) until `stop` fires,
/// then removes it. `on_new` runs whenever the store had no live record of this worker: at the
/// first heartbeat, and after the store lost its state (a restarted Redis), so the worker can
/// republish what it holds. A store that cannot be reached is retried at the next beat.
pub async fn heartbeat<R, F, Fut>(store: Arc<dyn StateStore>, every: Duration, ttl: Duration, record: R, on_new: F, stop: CancellationToken)
where
    R: Fn() -> WorkerRecord,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut reachable = true;
    let mut first = true;
    loop {
        let r = record();
        match store.register_worker(&r, ttl).await {
            Ok(fresh) => {
                if !reachable {
                    tracing::info!(worker = %r.id, "state store reachable again");
                }
                reachable = true;
                if fresh {
                    if !first {
                        tracing::info!(worker = %r.id, "state store had lost this worker; republishing");
                    }
                    on_new().await;
                }
                first = false;
            }
            Err(e) => {
                if reachable {
                    tracing::warn!(worker = %r.id, error = %e, "heartbeat failed; retrying");
                }
                reachable = false;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    let id = record().id;
    if let Err(e) = store.remove_worker(&id).await {
        tracing::warn!(worker = %id, error = %e, "could not leave the registry; the record lapses on its own");
    }
}
