//! What the store holds: worker records and request state.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl WorkerRecord {
    /// The record of a worker that reports `info` and is reached at `addr`.
    pub fn from_info(info: &tandem_protocol::pb::WorkerInfo, addr: &str) -> Self {
        Self {
            id: info.worker_id.clone(),
            role: info.role.clone(),
            addr: addr.to_string(),
            kv_addr: info.kv_addr.clone(),
            model: info.model.clone(),
            tp_size: info.tp_size,
            block_size: info.block_size,
            free_blocks: info.free_blocks,
            total_blocks: info.total_blocks,
            running: info.running,
            waiting: info.waiting,
            draining: info.draining,
            metrics_addr: info.metrics_addr.clone(),
            updated_ms: now_ms(),
        }
    }
}

/// One worker's registry entry, renewed by its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WorkerRecord {
    pub id: String,
    /// "prefill", "decode" or "kv-transfer".
    pub role: String,
    /// gRPC address (host:port).
    pub addr: String,
    /// Where KV blocks arrive (decode workers).
    #[serde(default)]
    pub kv_addr: String,
    pub model: String,
    pub tp_size: u32,
    #[serde(default)]
    pub block_size: u32,
    pub free_blocks: u32,
    pub total_blocks: u32,
    pub running: u32,
    pub waiting: u32,
    /// Finishing its work before it leaves: routing sends it nothing new.
    #[serde(default)]
    pub draining: bool,
    /// Where it serves Prometheus metrics (`host:port`, path `/metrics`); empty if it does not.
    #[serde(default)]
    pub metrics_addr: String,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Queued,
    Prefill,
    Decode,
    Done,
    Failed,
    Cancelled,
}

/// What the cluster knows of one request (one choice): enough to resume it elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestState {
    pub id: String,
    pub phase: Phase,
    pub model: String,
    pub prompt: Vec<u32>,
    pub seed: u64,
    /// The sampling parameters as JSON (the gateway's own type).
    pub params: serde_json::Value,
    #[serde(default)]
    pub prefill_worker: String,
    #[serde(default)]
    pub decode_worker: String,
    #[serde(default)]
    pub cached_tokens: usize,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// Tokens streamed to the client so far (kept apart from the record in the store).
    #[serde(skip)]
    pub tokens: Vec<u32>,
    pub updated_ms: u64,
}

impl RequestState {
    pub fn new(id: &str, model: &str, prompt: Vec<u32>, seed: u64, params: serde_json::Value) -> Self {
        Self {
            id: id.to_string(),
            phase: Phase::Queued,
            model: model.to_string(),
            prompt,
            seed,
            params,
            prefill_worker: String::new(),
            decode_worker: String::new(),
            cached_tokens: 0,
            finish_reason: None,
            error: None,
            tokens: Vec::new(),
            updated_ms: now_ms(),
        }
    }
}
