//! The Redis store. Keys, under a namespace (`tandem` by default):
//!
//! - `{ns}:worker:{id}`: the worker's record as JSON, expiring with its heartbeat TTL;
//!   `{ns}:workers` is the set of ids, pruned of lapsed ones when read.
//! - `{ns}:prefix:{hash}` (hash as 16 hex digits): a sorted set of holders scored by the
//!   millisecond at which each entry expires; the key itself expires with its newest entry.
//! - `{ns}:request:{id}`: the request's state as JSON; `{ns}:request:{id}:tokens`: the list of
//!   tokens streamed so far.
//!
//! One multiplexed connection (the `redis` crate's `ConnectionManager`, which reconnects on its
//! own) serves every caller; each call is bounded by a timeout so a dead Redis costs callers a
//! bounded wait, never a hang.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use crate::{now_ms, RequestState, Result, StateError, StateStore, WorkerRecord};

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    ns: String,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("ns", &self.ns).finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Connects lazily: a worker starts even while Redis is down and catches up when it returns.
    pub fn open(url: &str) -> Result<Self> {
        Self::with_namespace(url, "tandem")
    }

    pub fn with_namespace(url: &str, ns: &str) -> Result<Self> {
        // `rediss://` is Redis over TLS, checked against the system's roots, or against the CA in
        // `TANDEM_REDIS_CA_FILE` (PEM) for a server with a private one.
        let ca = match std::env::var_os("TANDEM_REDIS_CA_FILE") {
            Some(path) if url.starts_with("rediss://") => Some(
                std::fs::read(&path)
                    .map_err(|e| StateError::Unavailable(format!("TANDEM_REDIS_CA_FILE {}: {e}", path.to_string_lossy())))?,
            ),
            _ => None,
        };
        Self::with_tls(url, ns, ca)
    }

    /// As [`Self::with_namespace`], trusting `ca` (PEM) for a `rediss://` server.
    pub fn with_tls(url: &str, ns: &str, ca: Option<Vec<u8>>) -> Result<Self> {
        if url.starts_with("rediss://") && rustls::crypto::CryptoProvider::get_default().is_none() {
            // The one provider Tandem builds rustls with; a lost race to install it is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = match ca {
            Some(root) => redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls: None, root_cert: Some(root) }),
            None => redis::Client::open(url),
        }
        .map_err(|e| StateError::Unavailable(format!("{}: {e}", redacted(url))))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(1000)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
        Ok(Self { conn, ns: ns.to_string(), timeout: Duration::from_millis(1500) })
    }

    fn key(&self, kind: &str, id: impl std::fmt::Display) -> String {
        format!("{}:{kind}:{id}", self.ns)
    }

    fn prefix_key(&self, hash: u64) -> String {
        self.key("prefix", format_args!("{hash:016x}"))
    }

    /// Runs one call under the store's timeout.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(StateError::Unavailable(format!("no answer within {:?}", self.timeout))),
        }
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    ttl.as_millis().max(1) as u64
}

#[async_trait::async_trait]
impl StateStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn register_worker(&self, w: &WorkerRecord, ttl: Duration) -> Result<bool> {
        let json = serde_json::to_string(w).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let mut c = self.conn.clone();
        let (old, _): (Option<String>, i64) = self
            .call(
                redis::pipe()
                    .cmd("SET")
                    .arg(self.key("worker", &w.id))
                    .arg(json)
                    .arg("PX")
                    .arg(ttl_ms(ttl))
                    .arg("GET")
                    .cmd("SADD")
                    .arg(format!("{}:workers", self.ns))
                    .arg(&w.id)
                    .query_async(&mut c),
            )
            .await?;
        Ok(old.is_none())
    }

    async fn remove_worker(&self, id: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: (i64, i64) = self
            .call(
                redis::pipe()
                    .cmd("DEL")
                    .arg(self.key("worker", id))
                    .cmd("SREM")
                    .arg(format!("{}:workers", self.ns))
                    .arg(id)
                    .query_async(&mut c),
            )
            .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerRecord>> {
        let mut c = self.conn.clone();
        let set = format!("{}:workers", self.ns);
        let mut ids: Vec<String> = self.call(c.smembers(&set)).await?;
        ids.sort();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key("worker", id)).collect();
        let values: Vec<Option<String>> = self.call(redis::cmd("MGET").arg(&keys).query_async(&mut c)).await?;
        let mut out = Vec::new();
        let mut lapsed = Vec::new();
        for (id, v) in ids.iter().zip(values) {
            match v.map(|s| serde_json::from_str::<WorkerRecord>(&s)) {
                Some(Ok(w)) => out.push(w),
                Some(Err(e)) => tracing::warn!(worker = %id, error = %e, "unreadable worker record"),
                None => lapsed.push(id.clone()),
            }
        }
        if !lapsed.is_empty() {
            let _: Result<i64> = self.call(c.srem(&set, &lapsed)).await;
        }
        Ok(out)
    }

    async fn publish_blocks(&self, holder: &str, hashes: &[u64], ttl: Duration) -> Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        let until = now_ms() + ttl_ms(ttl);
        let mut pipe = redis::pipe();
        for &h in hashes {
            let key = self.prefix_key(h);
            pipe.cmd("ZADD").arg(&key).arg(until).arg(holder).ignore();
            // GT: the key lives as long as its longest-lived entry.
            pipe.cmd("PEXPIREAT").arg(&key).arg(until).arg("GT").ignore();
            pipe.cmd("PEXPIREAT").arg(&key).arg(until).arg("NX").ignore();
        }
        let mut c = self.conn.clone();
        self.call(pipe.query_async::<()>(&mut c)).await
    }

    async fn withdraw_blocks(&self, holder: &str, hashes: &[u64]) -> Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for &h in hashes {
            pipe.cmd("ZREM").arg(self.prefix_key(h)).arg(holder).ignore();
        }
        let mut c = self.conn.clone();
        self.call(pipe.query_async::<()>(&mut c)).await
    }

    async fn block_holders(&self, hashes: &[u64]) -> Result<Vec<Vec<String>>> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for &h in hashes {
            pipe.cmd("ZRANGEBYSCORE").arg(self.prefix_key(h)).arg(now).arg("+inf");
        }
        let mut c = self.conn.clone();
        let mut out: Vec<Vec<String>> = self.call(pipe.query_async(&mut c)).await?;
        for v in &mut out {
            v.sort();
        }
        Ok(out)
    }

    async fn put_request(&self, r: &RequestState, ttl: Duration) -> Result<()> {
        let json = serde_json::to_string(r).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let key = self.key("request", &r.id);
        let mut c = self.conn.clone();
        let ms = ttl_ms(ttl);
        self.call(
            redis::pipe()
                .cmd("SET")
                .arg(&key)
                .arg(json)
                .arg("PX")
                .arg(ms)
                .ignore()
                .cmd("PEXPIRE")
                .arg(format!("{key}:tokens"))
                .arg(ms)
                .ignore()
                .query_async::<()>(&mut c),
        )
        .await
    }

    async fn append_tokens(&self, id: &str, tokens: &[u32], ttl: Duration) -> Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let key = format!("{}:tokens", self.key("request", id));
        let mut c = self.conn.clone();
        self.call(
            redis::pipe()
                .cmd("RPUSH")
                .arg(&key)
                .arg(tokens)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(ttl_ms(ttl))
                .ignore()
                .query_async::<()>(&mut c),
        )
        .await
    }

    async fn request(&self, id: &str) -> Result<Option<RequestState>> {
        let key = self.key("request", id);
        let mut c = self.conn.clone();
        let (json, tokens): (Option<String>, Vec<u32>) = self
            .call(redis::pipe().cmd("GET").arg(&key).cmd("LRANGE").arg(format!("{key}:tokens")).arg(0).arg(-1).query_async(&mut c))
            .await?;
        let Some(json) = json else { return Ok(None) };
        let mut r: RequestState = serde_json::from_str(&json).map_err(|e| StateError::Corrupt(e.to_string()))?;
        r.tokens = tokens;
        Ok(Some(r))
    }
}

/// `url` with its password, if any, replaced: for error messages and logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod redact_tests {
    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(super::redacted("rediss://:s3cret@host:6380/0"), "rediss://:***@host:6380/0");
        assert_eq!(super::redacted("redis://user:pw@h/"), "redis://user:***@h/");
        assert_eq!(super::redacted("redis://h:6379/"), "redis://h:6379/");
    }
}
