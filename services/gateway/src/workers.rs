//! The workers the gateway routes to: gRPC channels, their last reported load, and health.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_protocol::pb::decode_client::DecodeClient;
use tandem_protocol::pb::prefill_client::PrefillClient;
use tandem_protocol::pb::{InfoRequest, WorkerInfo};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
}

/// One worker as the gateway knows it.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub role: Role,
    pub url: String,
    channel: Channel,
    /// Last report; `None` until the first successful poll or after a failed one.
    pub info: Option<WorkerInfo>,
    /// Requests this gateway has in flight on the worker.
    pub inflight: usize,
}

#[derive(Debug, Clone)]
pub struct WorkerPool {
    workers: Arc<Mutex<Vec<WorkerSpec>>>,
}

/// A chosen worker; holding it counts as one request in flight there.
#[derive(Debug)]
pub struct Lease {
    pool: WorkerPool,
    index: usize,
    pub channel: Channel,
    pub info: WorkerInfo,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(w) = self.pool.lock().get_mut(self.index) {
            w.inflight = w.inflight.saturating_sub(1);
        }
    }
}

fn endpoint(url: &str) -> anyhow::Result<Channel> {
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    // Keepalive pings notice a peer that vanished without closing the connection.
    Ok(Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

impl WorkerPool {
    pub fn new(prefill: &[String], decode: &[String]) -> anyhow::Result<Self> {
        let mut workers = Vec::new();
        for (role, urls) in [(Role::Prefill, prefill), (Role::Decode, decode)] {
            for url in urls {
                workers.push(WorkerSpec { role, url: url.clone(), channel: endpoint(url)?, info: None, inflight: 0 });
            }
        }
        Ok(Self { workers: Arc::new(Mutex::new(workers)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<WorkerSpec>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Vec<WorkerSpec> {
        self.lock().clone()
    }

    pub fn healthy(&self, role: Role) -> usize {
        self.lock().iter().filter(|w| w.role == role && w.info.is_some()).count()
    }

    /// Smallest context any healthy worker accepts.
    pub fn max_context(&self) -> Option<usize> {
        self.lock().iter().filter_map(|w| w.info.as_ref()).map(|i| i.max_context as usize).filter(|c| *c > 0).min()
    }

    /// The healthy worker of `role` with the least work: sequences it reported plus requests
    /// this gateway sent since.
    pub fn pick(&self, role: Role) -> Option<Lease> {
        let mut ws = self.lock();
        let (index, w) = ws
            .iter_mut()
            .enumerate()
            .filter(|(_, w)| w.role == role && w.info.is_some())
            .min_by_key(|(_, w)| {
                let i = w.info.as_ref().expect("filtered");
                (i.running + i.waiting) as usize + w.inflight
            })?;
        w.inflight += 1;
        let lease = Lease { pool: self.clone(), index, channel: w.channel.clone(), info: w.info.clone().expect("filtered") };
        Some(lease)
    }

    /// Takes a worker out of routing until its next successful poll.
    pub fn mark_down(&self, index_of: &Lease) {
        if let Some(w) = self.lock().get_mut(index_of.index) {
            tracing::warn!(url = %w.url, "worker unreachable; out of routing until it answers again");
            w.info = None;
        }
    }

    async fn info(w: &WorkerSpec) -> Option<WorkerInfo> {
        let call = async {
            match w.role {
                Role::Prefill => PrefillClient::new(w.channel.clone()).info(InfoRequest {}).await,
                Role::Decode => DecodeClient::new(w.channel.clone()).info(InfoRequest {}).await,
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
        let (mut waiting, mut used) = (0i64, [0i64; 2]);
        for (w, info) in ws.iter_mut().zip(infos) {
            if let Some(i) = &info {
                waiting += i.waiting as i64;
                used[(w.role == Role::Decode) as usize] += (i.total_blocks - i.free_blocks) as i64;
            }
            if info.is_none() && w.info.is_some() {
                tracing::warn!(url = %w.url, "worker stopped answering");
            }
            w.info = info;
        }
        metrics.waiting.set(waiting);
        metrics.kv_blocks_in_use.with_label_values(&["prefill"]).set(used[0]);
        metrics.kv_blocks_in_use.with_label_values(&["decode"]).set(used[1]);
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
