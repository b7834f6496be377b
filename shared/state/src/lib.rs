//! Cluster state behind one [`StateStore`] trait: the worker registry (heartbeats with load), the
//! prefix-cache index (block hash → the workers and stores that hold the block) and request state
//! (phase, workers, tokens streamed so far). [`RedisStore`] shares it across machines;
//! [`EmbeddedStore`] keeps it in the process for a single-machine cluster without a Redis server.
#![forbid(unsafe_code)]

mod embedded;
mod membership;
mod redis_store;
pub mod testing;
mod types;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use embedded::EmbeddedStore;
pub use membership::{heartbeat, InFlight, InFlightGuard};
pub use redis_store::RedisStore;
pub use types::{now_ms, Phase, RequestState, WorkerRecord};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store could not be reached in time; callers carry on without it.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("state store returned bad data: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StateError>;

/// Shared cluster state. Every method is bounded in time: an unreachable store answers
/// [`StateError::Unavailable`] instead of hanging, so callers can route without it.
#[async_trait::async_trait]
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// "redis" or "embedded".
    fn kind(&self) -> &'static str;

    /// Writes a worker's record (a heartbeat), which lapses after `ttl` unless renewed. Returns
    /// true when no live record was there before: the first heartbeat, or the store lost its state
    /// (a restarted Redis), in which case the worker republishes what it holds.
    async fn register_worker(&self, w: &WorkerRecord, ttl: Duration) -> Result<bool>;
    async fn remove_worker(&self, id: &str) -> Result<()>;
    /// Live records: those whose heartbeat has not lapsed.
    async fn workers(&self) -> Result<Vec<WorkerRecord>>;

    /// Records that `holder` (a worker or store id) holds these blocks, for `ttl`.
    async fn publish_blocks(&self, holder: &str, hashes: &[u64], ttl: Duration) -> Result<()>;
    async fn withdraw_blocks(&self, holder: &str, hashes: &[u64]) -> Result<()>;
    /// For each hash, the holders whose entry has not expired.
    async fn block_holders(&self, hashes: &[u64]) -> Result<Vec<Vec<String>>>;

    /// Creates or replaces a request's state (its tokens are kept), live for `ttl`.
    async fn put_request(&self, r: &RequestState, ttl: Duration) -> Result<()>;
    /// Appends tokens streamed to the client.
    async fn append_tokens(&self, id: &str, tokens: &[u32], ttl: Duration) -> Result<()>;
    async fn request(&self, id: &str) -> Result<Option<RequestState>>;
}

/// The Redis store when a URL is given, otherwise the embedded one.
pub fn open(redis_url: Option<&str>) -> Result<Arc<dyn StateStore>> {
    Ok(match redis_url {
        Some(url) => Arc::new(RedisStore::open(url)?),
        None => Arc::new(EmbeddedStore::new()),
    })
}

/// How many leading blocks of a chain each holder has: a holder counts for block `i` only if it
/// also holds every block before it (a prefix is only useful unbroken).
pub fn prefix_overlap(holders: &[Vec<String>]) -> HashMap<String, usize> {
    let mut run: HashMap<String, usize> = HashMap::new();
    for (i, hs) in holders.iter().enumerate() {
        for h in hs {
            let n = run.entry(h.clone()).or_insert(0);
            if *n == i {
                *n = i + 1;
            }
        }
    }
    run.retain(|_, n| *n > 0);
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_counts_only_unbroken_leading_runs() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let holders = vec![s(&["a", "b"]), s(&["a", "c"]), s(&["b", "c"]), s(&["a"])];
        let o = prefix_overlap(&holders);
        assert_eq!(o.get("a"), Some(&2));
        assert_eq!(o.get("b"), Some(&1));
        assert_eq!(o.get("c"), None, "c lacks block 0");
    }
}
