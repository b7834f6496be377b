//! The in-process store: the same contract as Redis, for a cluster whose gateway is the only
//! reader and writer (the single-machine quick start).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{RequestState, Result, StateStore, WorkerRecord};

#[derive(Debug, Default)]
struct Inner {
    workers: HashMap<String, (WorkerRecord, Instant)>,
    /// hash → holder → expiry.
    blocks: HashMap<u64, HashMap<String, Instant>>,
    requests: HashMap<String, (RequestState, Instant)>,
}

#[derive(Debug, Default)]
pub struct EmbeddedStore {
    inner: Mutex<Inner>,
}

impl EmbeddedStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl StateStore for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn register_worker(&self, w: &WorkerRecord, ttl: Duration) -> Result<bool> {
        let now = Instant::now();
        let old = self.lock().workers.insert(w.id.clone(), (w.clone(), now + ttl));
        Ok(old.is_none_or(|(_, until)| until <= now))
    }

    async fn remove_worker(&self, id: &str) -> Result<()> {
        self.lock().workers.remove(id);
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerRecord>> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.workers.retain(|_, (_, until)| *until > now);
        let mut out: Vec<_> = inner.workers.values().map(|(w, _)| w.clone()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn publish_blocks(&self, holder: &str, hashes: &[u64], ttl: Duration) -> Result<()> {
        let until = Instant::now() + ttl;
        let mut inner = self.lock();
        for h in hashes {
            inner.blocks.entry(*h).or_default().insert(holder.to_string(), until);
        }
        Ok(())
    }

    async fn withdraw_blocks(&self, holder: &str, hashes: &[u64]) -> Result<()> {
        let mut inner = self.lock();
        for h in hashes {
            if let Some(holders) = inner.blocks.get_mut(h) {
                holders.remove(holder);
                if holders.is_empty() {
                    inner.blocks.remove(h);
                }
            }
        }
        Ok(())
    }

    async fn block_holders(&self, hashes: &[u64]) -> Result<Vec<Vec<String>>> {
        let now = Instant::now();
        let mut inner = self.lock();
        Ok(hashes
            .iter()
            .map(|h| {
                let Some(holders) = inner.blocks.get_mut(h) else { return Vec::new() };
                holders.retain(|_, until| *until > now);
                let mut v: Vec<String> = holders.keys().cloned().collect();
                v.sort();
                v
            })
            .collect())
    }

    async fn put_request(&self, r: &RequestState, ttl: Duration) -> Result<()> {
        let until = Instant::now() + ttl;
        let mut inner = self.lock();
        let tokens = inner.requests.remove(&r.id).map(|(old, _)| old.tokens).unwrap_or_default();
        inner.requests.insert(r.id.clone(), (RequestState { tokens, ..r.clone() }, until));
        // Expired requests go when others are written, so the map stays bounded.
        let now = Instant::now();
        if inner.requests.len().is_multiple_of(256) {
            inner.requests.retain(|_, (_, until)| *until > now);
        }
        Ok(())
    }

    async fn append_tokens(&self, id: &str, tokens: &[u32], ttl: Duration) -> Result<()> {
        if let Some((r, until)) = self.lock().requests.get_mut(id) {
            r.tokens.extend_from_slice(tokens);
            *until = Instant::now() + ttl;
        }
        Ok(())
    }

    async fn request(&self, id: &str) -> Result<Option<RequestState>> {
        let now = Instant::now();
        Ok(self.lock().requests.get(id).filter(|(_, until)| *until > now).map(|(r, _)| r.clone()))
    }
}
