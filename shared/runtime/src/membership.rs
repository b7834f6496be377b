//! A service's membership in the cluster registry: registered (and renewed) while it runs,
//! marked draining as its shutdown begins, removed when it stops. Without a state store there is
//! no registry, and membership does nothing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tandem_state::{StateStore, WorkerRecord};

use crate::Shutdown;

/// See the module docs.
pub struct Membership {
    store: Option<Arc<dyn StateStore>>,
    record: Arc<dyn Fn() -> WorkerRecord + Send + Sync>,
    every: Duration,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("store", &self.store.as_ref().map(|s| s.kind())).field("every", &self.every).finish()
    }
}

impl Membership {
    /// Heartbeats `record()` into `store` every `every` (the record lapses after three missed)
    /// until `shutdown` stops, then leaves the registry; the heartbeat is one of `shutdown`'s
    /// tracked tasks. `on_new` runs whenever the store had no live record of this service (the
    /// first beat, and after the store lost its state), so it can republish what it holds.
    pub fn start<R, F, Fut>(shutdown: &Shutdown, store: Option<Arc<dyn StateStore>>, every: Duration, record: R, on_new: F) -> Self
    where
        R: Fn() -> WorkerRecord + Send + Sync + 'static,
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let record: Arc<dyn Fn() -> WorkerRecord + Send + Sync> = Arc::new(record);
        if let Some(s) = store.clone() {
            let r = record.clone();
            shutdown.spawn(tandem_state::heartbeat(s, every, every * 3, move || r(), on_new, shutdown.stopping()));
        }
        Self { store, record, every }
    }

    /// Writes the record now rather than at the next beat (a draining service tells routers at
    /// once).
    pub async fn announce(&self) {
        if let Some(s) = &self.store {
            if let Err(e) = s.register_worker(&(self.record)(), self.every * 3).await {
                tracing::debug!(error = %e, "registry not updated; the next heartbeat will");
            }
        }
    }
}
