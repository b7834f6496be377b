//! The workers the gateway routes to: where they come from (the command line, or the registry in
//! the state store), their gRPC channels, their last reported load and health, and the choice of
//! a worker for each request.
//!
//! Prefill workers are scored by the work a request would cost there (see `pick_prefill`),
//! decode workers by load and free KV blocks (see `pick_decode`). Aggregated workers (prefill and
//! decode in one engine) register as decode workers that compute prompts: they take a request
//! whole, and are the only candidates when no prefill worker is up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_protocol::pb::block_store_client::BlockStoreClient;
use tandem_protocol::pb::decode_client::DecodeClient;
use tandem_protocol::pb::prefill_client::PrefillClient;
use tandem_protocol::pb::{InfoRequest, WorkerInfo};
use tandem_state::WorkerRecord;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
    /// The block store (the `kv-transfer` service).
    BlockStore,
}

impl Role {
    const ALL: [Role; 3] = [Role::Prefill, Role::Decode, Role::BlockStore];

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }

    /// The name a worker registers its role under, and the `role` label of the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::BlockStore => "kv-transfer",
        }
    }
}

/// One worker as the gateway knows it.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    key: u64,
    pub role: Role,
    pub url: String,
    /// Found in the registry (and dropped when it leaves), rather than given on the command line.
    pub registered: bool,
    channel: Channel,
    /// Last report; `None` until the first successful poll or after a failed one.
    pub info: Option<WorkerInfo>,
    /// Requests this gateway has in flight on the worker.
    pub inflight: usize,
    /// The registry says it is draining.
    draining: bool,
    /// When the registry last listed it (registered workers only).
    last_listed: Instant,
}

impl WorkerSpec {
    fn routable(&self) -> bool {
        self.info.as_ref().is_some_and(|i| !i.draining) && !self.draining
    }

    /// A decode worker that computes prompts too: it takes whole requests, with no prefill.
    fn aggregated(&self) -> bool {
        self.info.as_ref().is_some_and(|i| i.aggregated)
    }

    fn id(&self) -> &str {
        self.info.as_ref().map(|i| i.worker_id.as_str()).unwrap_or("")
    }

    /// Sequences it reported plus requests this gateway sent since.
    fn pending(&self) -> usize {
        self.info.as_ref().map_or(0, |i| (i.running + i.waiting) as usize) + self.inflight
    }
}

#[derive(Debug, Clone)]
pub struct WorkerPool {
    workers: Arc<Mutex<Vec<WorkerSpec>>>,
    next_key: Arc<Mutex<u64>>,
    /// The one model this pool routes to, where the gateway serves several: a worker reporting
    /// another is not this pool's (block stores serve every model).
    model: Arc<std::sync::OnceLock<String>>,
}

/// A chosen worker; holding it counts as one request in flight there.
#[derive(Debug)]
pub struct Lease {
    pool: WorkerPool,
    key: u64,
    pub channel: Channel,
    pub info: WorkerInfo,
}

impl Lease {
    pub fn key(&self) -> u64 {
        self.key
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(w) = self.pool.lock().iter_mut().find(|w| w.key == self.key) {
            w.inflight = w.inflight.saturating_sub(1);
        }
    }
}

/// A prefill worker chosen for a prompt, with what the index says it holds.
#[derive(Debug)]
pub struct PrefillChoice {
    pub lease: Lease,
    /// Leading prompt blocks the worker holds, by the prefix index.
    pub cached_blocks: usize,
    /// Its cost, the lowest: prompt tokens left to compute plus the load weight times its queue.
    pub cost: f64,
    /// Prefill workers it was chosen among.
    pub candidates: usize,
}

fn endpoint(url: &str) -> anyhow::Result<Channel> {
    // Keepalive pings notice a peer that vanished without closing the connection.
    Ok(tandem_runtime::grpc::endpoint(url)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

impl WorkerPool {
    /// Workers given on the command line.
    pub fn new(prefill: &[String], decode: &[String], stores: &[String]) -> anyhow::Result<Self> {
        let pool = Self { workers: Arc::new(Mutex::new(Vec::new())), next_key: Arc::new(Mutex::new(0)), model: Default::default() };
        for (role, urls) in [(Role::Prefill, prefill), (Role::Decode, decode), (Role::BlockStore, stores)] {
            for url in urls {
                pool.add(role, url, false)?;
            }
        }
        Ok(pool)
    }

    /// Routes only to workers that report serving `model`.
    pub fn serve_only(&self, model: &str) {
        let _ = self.model.set(model.to_string());
    }

    /// Whether a worker's report makes it one of this pool's.
    fn ours(&self, role: Role, info: &WorkerInfo) -> bool {
        role == Role::BlockStore || self.model.get().is_none_or(|m| *m == info.model)
    }

    fn add(&self, role: Role, url: &str, registered: bool) -> anyhow::Result<()> {
        let key = {
            let mut k = self.next_key.lock().unwrap_or_else(|e| e.into_inner());
            *k += 1;
            *k
        };
        let w = WorkerSpec {
            key,
            role,
            url: url.to_string(),
            registered,
            channel: endpoint(url)?,
            info: None,
            inflight: 0,
            draining: false,
            last_listed: Instant::now(),
        };
        self.lock().push(w);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<WorkerSpec>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Vec<WorkerSpec> {
        self.lock().clone()
    }

    /// Brings the registered workers in line with the registry: new ones join (routable after
    /// their first successful poll); ones it marks draining get nothing new; ones missing from it
    /// for longer than `grace` leave once nothing is in flight there. The grace rides out a state
    /// store that restarted empty and is being refilled by heartbeats.
    pub fn sync(&self, records: &[WorkerRecord], model: &str, grace: Duration) {
        let now = Instant::now();
        let mut added = Vec::new();
        {
            let mut ws = self.lock();
            for r in records.iter().filter(|r| r.model == model || r.role == "kv-transfer") {
                let Some(role) = Role::parse(&r.role) else { continue };
                match ws.iter_mut().find(|w| w.url == r.addr && w.role == role) {
                    Some(w) => {
                        w.last_listed = now;
                        w.draining = r.draining;
                    }
                    None => added.push((role, r.addr.clone(), r.id.clone())),
                }
            }
            ws.retain(|w| {
                let keep = !w.registered || w.inflight > 0 || now.duration_since(w.last_listed) < grace;
                if !keep {
                    tracing::info!(url = %w.url, role = ?w.role, "worker left the registry; out of routing");
                }
                keep
            });
        }
        for (role, url, id) in added {
            tracing::info!(%url, %id, ?role, "worker joined from the registry");
            if let Err(e) = self.add(role, &url, true) {
                tracing::warn!(%url, error = %e, "unusable worker address in the registry");
            }
        }
    }

    pub fn healthy(&self, role: Role) -> usize {
        self.lock().iter().filter(|w| w.role == role && w.routable()).count()
    }

    /// Healthy aggregated workers (decode workers that compute prompts too).
    pub fn healthy_aggregated(&self) -> usize {
        self.lock().iter().filter(|w| w.role == Role::Decode && w.routable() && w.aggregated()).count()
    }

    /// The tensor-parallel degrees the healthy workers of `role` run, each once, smallest first.
    /// Any prefill degree hands to any decode degree: the KV is re-sharded by head on the way.
    pub fn tp_sizes(&self, role: Role) -> Vec<u32> {
        let mut sizes: Vec<u32> = self
            .lock()
            .iter()
            .filter(|w| w.role == role && w.routable())
            .filter_map(|w| w.info.as_ref().map(|i| i.tp_size.max(1)))
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    /// Whether a request can be served now: by a prefill and a decode worker, or by an
    /// aggregated worker alone.
    pub fn can_serve(&self) -> bool {
        (self.healthy(Role::Prefill) > 0 && self.healthy(Role::Decode) > 0) || self.healthy_aggregated() > 0
    }

    /// Smallest context any healthy worker accepts.
    pub fn max_context(&self) -> Option<usize> {
        self.lock()
            .iter()
            .filter(|w| w.role != Role::BlockStore && w.routable())
            .filter_map(|w| w.info.as_ref())
            .map(|i| i.max_context as usize)
            .filter(|c| *c > 0)
            .min()
    }

    /// The KV block size the prefill workers use (they must agree for the prefix index).
    pub fn block_size(&self) -> Option<usize> {
        self.lock()
            .iter()
            .filter(|w| w.role == Role::Prefill)
            .filter_map(|w| w.info.as_ref())
            .map(|i| i.block_size as usize)
            .find(|b| *b > 0)
    }

    fn lease(&self, w: &mut WorkerSpec) -> Lease {
        w.inflight += 1;
        Lease { pool: self.clone(), key: w.key, channel: w.channel.clone(), info: w.info.clone().expect("routable workers have info") }
    }

    /// The prefill worker where this prompt costs least:
    /// `cost = (prompt_tokens − cached_tokens) + load_weight × pending`, where `cached_tokens` is
    /// the worker's unbroken leading run of the
    /// prompt's blocks in the prefix index and `pending` the sequences it runs and queues plus the
    /// requests this gateway sent since its last report. So a cached prefix draws requests until
    /// the queue there costs more than recomputing elsewhere. Ties go to the less loaded worker.
    pub fn pick_prefill(
        &self,
        overlap: &HashMap<String, usize>,
        prompt_tokens: usize,
        block_size: usize,
        load_weight: f64,
        exclude: &[u64],
    ) -> Option<PrefillChoice> {
        let mut ws = self.lock();
        let mut candidates = 0;
        let best = ws
            .iter_mut()
            .filter(|w| w.role == Role::Prefill && w.routable() && !exclude.contains(&w.key))
            .inspect(|_| candidates += 1)
            .map(|w| {
                let cached = overlap.get(w.id()).copied().unwrap_or(0);
                let cost = prompt_tokens.saturating_sub(cached * block_size) as f64 + load_weight * w.pending() as f64;
                (cost, w.pending(), cached, w)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))?;
        let (cost, _, cached_blocks, w) = best;
        let lease = self.lease(w);
        Some(PrefillChoice { lease, cached_blocks, cost, candidates })
    }

    /// The decode worker with the fewest sequences among those with room for `blocks` more KV
    /// blocks (if none has room, among all), ties going to the most free blocks.
    pub fn pick_decode(&self, blocks: usize, exclude: &[u64]) -> Option<Lease> {
        let mut ws = self.lock();
        // Without a prefill worker, only an aggregated worker can take a request.
        let prefill = ws.iter().any(|w| w.role == Role::Prefill && w.routable());
        let candidates: Vec<&mut WorkerSpec> = ws
            .iter_mut()
            .filter(|w| w.role == Role::Decode && w.routable() && !exclude.contains(&w.key) && (prefill || w.aggregated()))
            .collect();
        let free = |w: &WorkerSpec| w.info.as_ref().map_or(0, |i| i.free_blocks as usize);
        let any_room = candidates.iter().any(|w| free(w) >= blocks);
        let w = candidates
            .into_iter()
            .filter(|w| !any_room || free(w) >= blocks)
            .min_by(|a, b| a.pending().cmp(&b.pending()).then(free(b).cmp(&free(a))))?;
        Some(self.lease(w))
    }

    /// A healthy block store: its id and address.
    pub fn store(&self) -> Option<(String, String)> {
        self.lock().iter().find(|w| w.role == Role::BlockStore && w.routable()).map(|w| (w.id().to_string(), w.url.clone()))
    }

    /// Takes a worker out of routing until its next successful poll.
    pub fn mark_down(&self, lease: &Lease) {
        if let Some(w) = self.lock().iter_mut().find(|w| w.key == lease.key) {
            tracing::warn!(url = %w.url, "worker unreachable; out of routing until it answers again");
            w.info = None;
        }
    }

    async fn info(w: &WorkerSpec) -> Option<WorkerInfo> {
        let call = async {
            match w.role {
                Role::Prefill => PrefillClient::new(w.channel.clone()).info(InfoRequest {}).await,
                Role::Decode => DecodeClient::new(w.channel.clone()).info(InfoRequest {}).await,
                Role::BlockStore => BlockStoreClient::new(w.channel.clone()).info(InfoRequest {}).await,
            }
        };
        match tokio::time::timeout(Duration::from_secs(1), call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Polls every worker once.
    pub async fn refresh(&self, metrics: &Metrics) {
        let snapshot = self.snapshot();
        let infos = futures::future::join_all(snapshot.iter().map(Self::info)).await;
        let mut ws = self.lock();
        for (s, info) in snapshot.iter().zip(infos) {
            let Some(w) = ws.iter_mut().find(|w| w.key == s.key) else { continue };
            // Another model's worker answers, but is never routed to from here.
            let info = info.filter(|i| self.ours(w.role, i));
            if info.is_none() && w.info.is_some() {
                tracing::warn!(url = %w.url, "worker stopped answering");
            }
            w.info = info;
        }
        for role in Role::ALL {
            metrics.workers.with_label_values(&[role.name()]).set(ws.iter().filter(|w| w.role == role && w.routable()).count() as i64);
        }
    }

    pub async fn poll(self, every: Duration, metrics: Metrics, shutdown: CancellationToken) {
        loop {
            self.refresh(&metrics).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[cfg(test)]
impl WorkerPool {
    /// Every worker reports `info`, as if it had answered a poll.
    pub(crate) fn report(&self, info: &WorkerInfo) {
        for w in self.lock().iter_mut() {
            w.info = Some(info.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, running: u32, free: u32) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            running,
            free_blocks: free,
            total_blocks: 100,
            block_size: 16,
            max_context: 2048,
            ..Default::default()
        }
    }

    fn pool(prefill: &[(&str, u32)], decode: &[(&str, u32, u32)]) -> WorkerPool {
        let p: Vec<String> = prefill.iter().enumerate().map(|(i, _)| format!("127.0.0.1:{}", 1000 + i)).collect();
        let d: Vec<String> = decode.iter().enumerate().map(|(i, _)| format!("127.0.0.1:{}", 2000 + i)).collect();
        let pool = WorkerPool::new(&p, &d, &[]).unwrap();
        let mut ws = pool.lock();
        for (w, (id, running)) in ws.iter_mut().filter(|w| w.role == Role::Prefill).zip(prefill) {
            w.info = Some(info(id, *running, 100));
        }
        for (w, (id, running, free)) in ws.iter_mut().filter(|w| w.role == Role::Decode).zip(decode) {
            w.info = Some(info(id, *running, *free));
        }
        drop(ws);
        pool
    }

    #[tokio::test]
    async fn prefill_choice_weighs_cached_prefix_against_load() {
        let pool = pool(&[("a", 0), ("b", 2)], &[]);
        let overlap: HashMap<String, usize> = [("b".to_string(), 30)].into();
        // 500 cached tokens outweigh two queued requests at 128 tokens each...
        let c = pool.pick_prefill(&overlap, 520, 16, 128.0, &[]).unwrap();
        assert_eq!((c.lease.info.worker_id.as_str(), c.cached_blocks), ("b", 30));
        // ...but not at 512 each.
        let c = pool.pick_prefill(&overlap, 520, 16, 512.0, &[]).unwrap();
        assert_eq!(c.lease.info.worker_id, "a");
        // Without an index it is least loaded first; an excluded worker is skipped.
        let c = pool.pick_prefill(&HashMap::new(), 520, 16, 128.0, &[]).unwrap();
        assert_eq!(c.lease.info.worker_id, "a");
        let c2 = pool.pick_prefill(&HashMap::new(), 520, 16, 128.0, &[c.lease.key()]).unwrap();
        assert_eq!(c2.lease.info.worker_id, "b");
    }

    #[tokio::test]
    async fn decode_choice_needs_room_then_prefers_fewer_sequences() {
        let pool = pool(&[("p", 0)], &[("busy", 5, 90), ("idle-full", 0, 3), ("idle", 1, 50)]);
        assert_eq!(pool.pick_decode(10, &[]).unwrap().info.worker_id, "idle");
        // A held lease counts as load until it is dropped.
        let held = pool.pick_decode(10, &[]).unwrap();
        let held2 = pool.pick_decode(10, &[]).unwrap();
        assert_eq!(held2.info.worker_id, "idle", "1 + 1 in flight is still below 5");
        drop((held, held2));
        // Nobody has room for 95 blocks: the least loaded of all.
        assert_eq!(pool.pick_decode(95, &[]).unwrap().info.worker_id, "idle-full");
    }

    #[tokio::test]
    async fn without_a_prefill_worker_only_aggregated_workers_take_requests() {
        let plain = pool(&[], &[("plain", 0, 90), ("agg", 3, 90)]);
        assert!(!plain.can_serve(), "decode workers alone cannot serve");
        assert!(plain.pick_decode(10, &[]).is_none());
        let pool = pool_with_aggregated(&[], &[("plain", 0, 90), ("agg", 3, 90)], "agg");
        assert!(pool.can_serve());
        assert_eq!(pool.healthy_aggregated(), 1);
        // The less loaded plain decode worker has no prefill worker to feed it.
        assert_eq!(pool.pick_decode(10, &[]).unwrap().info.worker_id, "agg");
        // With a prefill worker up, both kinds are candidates, least loaded first.
        let mixed = pool_with_aggregated(&[("p", 0)], &[("plain", 0, 90), ("agg", 3, 90)], "agg");
        assert_eq!(mixed.pick_decode(10, &[]).unwrap().info.worker_id, "plain");
    }

    fn pool_with_aggregated(prefill: &[(&str, u32)], decode: &[(&str, u32, u32)], aggregated: &str) -> WorkerPool {
        let pool = pool(prefill, decode);
        for w in pool.lock().iter_mut().filter(|w| w.id() == aggregated) {
            w.info.as_mut().unwrap().aggregated = true;
        }
        pool
    }

    #[tokio::test]
    async fn registry_sync_adds_drains_and_drops_after_grace() {
        let pool = WorkerPool::new(&[], &[], &[]).unwrap();
        let rec = |id: &str, port: u16, draining: bool| WorkerRecord {
            id: id.into(),
            role: "decode".into(),
            addr: format!("127.0.0.1:{port}"),
            model: "m".into(),
            draining,
            ..Default::default()
        };
        pool.sync(&[rec("d1", 3001, false), rec("d2", 3002, false)], "m", Duration::from_millis(100));
        pool.sync(
            &[rec("other", 3003, false)].map(|mut r| {
                r.model = "another-model".into();
                r
            }),
            "m",
            Duration::from_secs(100),
        );
        assert_eq!(pool.snapshot().len(), 2, "workers of another model are not ours");
        for w in pool.lock().iter_mut() {
            w.info = Some(info(&format!("d{}", w.url.chars().last().unwrap()), 0, 100));
        }
        pool.sync(&[rec("d1", 3001, false), rec("d2", 3002, true)], "m", Duration::from_millis(100));
        assert_eq!(pool.healthy(Role::Decode), 1, "the draining one gets nothing new");
        // Missing from the registry: kept through the grace period, then dropped.
        pool.sync(&[rec("d2", 3002, true)], "m", Duration::from_millis(100));
        assert_eq!(pool.snapshot().len(), 2);
        tokio::time::sleep(Duration::from_millis(150)).await;
        pool.sync(&[rec("d2", 3002, true)], "m", Duration::from_millis(100));
        assert_eq!(pool.snapshot().iter().map(|w| w.url.as_str()).collect::<Vec<_>>(), ["127.0.0.1:3002"]);
    }
}
