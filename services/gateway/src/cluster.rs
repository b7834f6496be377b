//! The gateway's use of the state store: prefix-index lookups on the request path (bounded, and
//! skipped for a while after a failure, so a dead store costs routing quality, not latency) and
//! every write (request state, index entries) on a background task, so the request path never
//! waits on a write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_state::{prefix_overlap, RequestState, StateStore};
use tokio::sync::mpsc;

use crate::Metrics;

/// How long lookups are skipped after the store failed one.
const BACKOFF: Duration = Duration::from_secs(1);
/// Most writes queued behind a slow store before new ones are dropped.
const QUEUE: usize = 4096;

#[derive(Debug)]
enum Write {
    Request(Box<RequestState>),
    Tokens(String, Vec<u32>),
    Publish(String, Vec<u64>),
}

#[derive(Clone)]
pub struct Cluster {
    store: Arc<dyn StateStore>,
    /// Where the prefix index lives: `store`, shared by every gateway, or this gateway's own.
    index: Arc<dyn StateStore>,
    down_until: Arc<Mutex<Option<Instant>>>,
    writes: mpsc::Sender<Write>,
    metrics: Metrics,
    pub index_ttl: Duration,
    pub request_ttl: Duration,
}

impl Cluster {
    /// `index`: a store of this gateway's own for the prefix index, instead of `store`.
    pub fn new(
        store: Arc<dyn StateStore>,
        index: Option<Arc<dyn StateStore>>,
        metrics: Metrics,
        index_ttl: Duration,
        request_ttl: Duration,
    ) -> Self {
        let (writes, rx) = mpsc::channel(QUEUE);
        let index = index.unwrap_or_else(|| store.clone());
        let c = Self { store, index, down_until: Arc::new(Mutex::new(None)), writes, metrics, index_ttl, request_ttl };
        tokio::spawn(c.clone().write_loop(rx));
        c
    }

    fn is_down(&self) -> bool {
        self.down_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| Instant::now() < t)
    }

    fn failed(&self, what: &str, e: &tandem_state::StateError) {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        if down.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(error = %e, "state store {what} failed; routing without the prefix index for {BACKOFF:?}");
        }
        *down = Some(Instant::now() + BACKOFF);
        self.metrics.state_errors.inc();
    }

    fn recovered(&self) {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        if down.take().is_some() {
            tracing::info!("state store answering again");
        }
    }

    /// Each holder's unbroken leading run of `hashes` in the prefix index; empty while the
    /// store is down.
    pub async fn overlap(&self, hashes: &[u64]) -> HashMap<String, usize> {
        if hashes.is_empty() || self.is_down() {
            return HashMap::new();
        }
        match tokio::time::timeout(Duration::from_millis(250), self.index.block_holders(hashes)).await {
            Ok(Ok(h)) => {
                self.recovered();
                prefix_overlap(&h)
            }
            Ok(Err(e)) => {
                self.failed("lookup", &e);
                HashMap::new()
            }
            Err(_) => {
                self.failed("lookup", &tandem_state::StateError::Unavailable("lookup timed out".into()));
                HashMap::new()
            }
        }
    }

    fn queue(&self, w: Write) {
        if self.writes.try_send(w).is_err() {
            self.metrics.state_dropped_writes.inc();
        }
    }

    pub fn put_request(&self, r: &RequestState) {
        self.queue(Write::Request(Box::new(r.clone())));
    }

    pub fn append_tokens(&self, id: &str, tokens: Vec<u32>) {
        if !tokens.is_empty() {
            self.queue(Write::Tokens(id.to_string(), tokens));
        }
    }

    pub fn publish(&self, holder: &str, hashes: Vec<u64>) {
        if !holder.is_empty() && !hashes.is_empty() {
            self.queue(Write::Publish(holder.to_string(), hashes));
        }
    }

    /// Applies writes in order. While the store is down they are dropped (and counted) rather
    /// than queued behind it; request state written meanwhile is lost, requests are not.
    async fn write_loop(self, mut rx: mpsc::Receiver<Write>) {
        while let Some(w) = rx.recv().await {
            if self.is_down() {
                self.metrics.state_dropped_writes.inc();
                continue;
            }
            let r = match &w {
                Write::Request(r) => self.store.put_request(r, self.request_ttl).await,
                Write::Tokens(id, t) => self.store.append_tokens(id, t, self.request_ttl).await,
                Write::Publish(holder, h) => self.index.publish_blocks(holder, h, self.index_ttl).await,
            };
            match r {
                Ok(()) => self.recovered(),
                Err(e) => self.failed("write", &e),
            }
        }
    }
}
