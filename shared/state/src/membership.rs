//! A worker's life in the cluster: heartbeats into the registry, counting work in flight, and
//! draining before it leaves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Waits until `busy` turns false, at most `limit`. Returns whether the work finished.
pub async fn drain(busy: impl Fn() -> bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while busy() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// A worker's membership from start to exit: heartbeats (with a store) until `shutdown` fires;
/// then it raises `draining` (and tells the registry at once, so routing stops sending work),
/// waits until `busy` turns false or `drain_limit` passes, and leaves the registry. The caller
/// stops its server when this returns.
#[allow(clippy::too_many_arguments)]
pub async fn lifecycle<R, F, Fut, B>(
    state: Option<Arc<dyn StateStore>>,
    every: Duration,
    record: R,
    on_new: F,
    draining: Arc<std::sync::atomic::AtomicBool>,
    busy: B,
    drain_limit: Duration,
    shutdown: CancellationToken,
) where
    R: Fn() -> WorkerRecord + Send + Sync + 'static,
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
    B: Fn() -> bool,
{
    let record = Arc::new(record);
    let beat_stop = CancellationToken::new();
    let beat = state.clone().map(|s| {
        let r = record.clone();
        tokio::spawn(heartbeat(s, every, every * 3, move || r(), on_new, beat_stop.clone()))
    });
    shutdown.cancelled().await;
    draining.store(true, Ordering::SeqCst);
    if let Some(s) = &state {
        let _ = s.register_worker(&record(), every * 3).await;
    }
    tracing::info!("draining: no new work; finishing what is in flight");
    if !drain(busy, drain_limit).await {
        tracing::warn!(limit = ?drain_limit, "drain limit reached; stopping with work in flight");
    }
    beat_stop.cancel();
    if let Some(b) = beat {
        let _ = b.await;
    }
}
