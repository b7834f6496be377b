//! `tandem prefill | decode | kv-transfer | gateway`: one service per process.
//!
//! Each prints one `READY` line on stdout once it serves (model loaded), so `tandem up` and the
//! tests learn the addresses of services that bound port 0. With `--managed`, a service stops
//! when its stdin closes, so children never outlive the `tandem up` that started them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tandem_engine::{Batcher, BatcherConfig, CpuEngine, Engine, EngineConfig, EngineHandle};
use tandem_runtime::{stop_signal, Device, Shutdown};
use tandem_tokenizer::{ModelFiles, Tokenizer};
use tandem_transfer::TransportKind;
use tokio::net::TcpListener;

use crate::default_model;

#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// A .gguf file, a model folder or a hub id; defaults to the embedded SmolLM2-135M-Instruct.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,
    /// Name clients use for the model (and part of the KV layout, so all workers must agree).
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Memory for the KV cache, in MiB (default: 256 on the CPU, as `tandem up` gives; on a GPU, what 90% of its
    /// memory leaves after the weights).
    #[arg(long, env = "TANDEM_KV_CACHE_MB")]
    pub kv_cache_mb: Option<usize>,
    /// Where the engine runs: `cpu`, or `cuda:N` for an NVIDIA GPU (bf16).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: Device,
    #[arg(long, env = "TANDEM_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Most tokens in one forward pass; longer prompts are computed in chunks, and more prompts
    /// share a pass up to it (default: 512 on the CPU, 8192 on a GPU).
    #[arg(long, visible_alias = "max-num-batched-tokens")]
    pub max_batch_tokens: Option<usize>,
    /// Most sequences running at once, in one decode batch (default: 64 on the CPU, 256 on a
    /// GPU, the largest batch its decode graphs are captured for).
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// The longest context, prompt and output together, a request may have (default: the
    /// model's own, or less where the KV cache cannot hold it).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// On a GPU, the share of its memory the engine takes, weights, activations and KV cache
    /// together (the KV cache gets what is left; `--kv-cache-mb` overrides).
    #[arg(long, default_value_t = 0.9, value_parser = fraction)]
    pub gpu_memory_utilization: f64,
    /// Tensor-parallel degree: the engine runs as a group of this many ranks, each holding its
    /// share of the attention heads and FFN rows, their partial sums added by an all-reduce. On
    /// the CPU the ranks are threads of this process sharing memory; on `cuda:N` they are GPUs
    /// N, N+1, … of this machine, summed through NCCL.
    #[arg(long, env = "TANDEM_TP", default_value_t = 1, visible_alias = "tensor-parallel-size")]
    pub tp: usize,
    /// Element type of the KV cache. The CPU engine keeps `f16` (half the memory attention reads
    /// and a handoff carries) or `f32`; a GPU engine keeps `bf16` (also for `f16` and `f32`) or
    /// `fp8` (E4M3 with a scale per token and head: half of bf16's bytes; one GPU a worker).
    /// Prefill and decode pools must agree: a handoff between caches of two types is refused.
    #[arg(long, env = "TANDEM_KV_DTYPE", default_value = "f16")]
    pub kv_dtype: tandem_protocol::KvDtype,
}

/// A number in (0, 1].
fn fraction(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not in (0, 1]"))
    }
}

/// How an engine is sized: its KV blocks and cache, the longest context, and on a GPU the share
/// of the device it may take.
#[derive(Debug, Clone)]
pub(crate) struct Sizing {
    pub block_size: usize,
    pub kv_cache_mb: Option<usize>,
    pub max_context: Option<usize>,
    pub memory_fraction: f64,
    /// Tensor-parallel degree.
    pub tp: usize,
    /// The CPU engine's KV cache element type.
    pub kv_dtype: tandem_protocol::KvDtype,
}

impl Default for Sizing {
    fn default() -> Self {
        Self { block_size: 16, kv_cache_mb: None, max_context: None, memory_fraction: 0.9, tp: 1, kv_dtype: tandem_protocol::KvDtype::F16 }
    }
}

impl EngineArgs {
    pub(crate) fn sizing(&self) -> Sizing {
        Sizing {
            block_size: self.block_size,
            kv_cache_mb: self.kv_cache_mb,
            max_context: self.max_model_len,
            memory_fraction: self.gpu_memory_utilization,
            tp: self.tp,
            kv_dtype: self.kv_dtype,
        }
    }

    /// The batcher's limits: what was asked, else what suits the device.
    pub(crate) fn batcher_config(&self) -> BatcherConfig {
        let (tokens, seqs) = match self.device {
            Device::Cpu => (512, 64),
            Device::Cuda(_) => (8192, 256),
        };
        BatcherConfig { max_batch_tokens: self.max_batch_tokens.unwrap_or(tokens), max_running: self.max_num_seqs.unwrap_or(seqs) }
    }
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The address other services reach this one at (default: the bound address).
    #[arg(long)]
    pub advertise: Option<String>,
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Join the cluster through this Redis (registry heartbeats, prefix index); without it the
    /// service is reached only at the address given to the gateway.
    #[arg(long, env = "TANDEM_REDIS_URL")]
    pub redis: Option<String>,
    /// How often the worker heartbeats into the registry; it leaves routing after three missed.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// On stop, how long in-flight requests may take to finish before the process exits anyway.
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT_S", default_value_t = 120)]
    pub drain_timeout_s: u64,
    /// Stop when stdin closes (used by `tandem up`).
    #[arg(long, hide = true)]
    pub managed: bool,
    #[command(flatten)]
    pub grpc_tls: GrpcTlsArgs,
}

/// Mutual TLS on the cluster's gRPC (gateway, workers, block store): all or none of the three
/// files; every service of a cluster must be given the same CA.
#[derive(Debug, Clone, Args)]
pub struct GrpcTlsArgs {
    /// The cluster CA (PEM) that every peer's certificate must chain to.
    #[arg(long, env = "TANDEM_GRPC_TLS_CA", requires_all = ["grpc_tls_cert", "grpc_tls_key"])]
    pub grpc_tls_ca: Option<std::path::PathBuf>,
    /// This service's certificate chain (PEM), presented to servers and clients alike.
    #[arg(long, env = "TANDEM_GRPC_TLS_CERT", requires_all = ["grpc_tls_ca", "grpc_tls_key"])]
    pub grpc_tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of `--grpc-tls-cert`.
    #[arg(long, env = "TANDEM_GRPC_TLS_KEY", requires_all = ["grpc_tls_ca", "grpc_tls_cert"])]
    pub grpc_tls_key: Option<std::path::PathBuf>,
    /// The name a peer's certificate must carry, instead of the host it is reached at (for
    /// workers at addresses no certificate lists, such as pod IPs).
    #[arg(long, env = "TANDEM_GRPC_TLS_SERVER_NAME")]
    pub grpc_tls_server_name: Option<String>,
}

impl GrpcTlsArgs {
    /// Makes this process's gRPC servers and clients use mutual TLS, when configured.
    pub fn apply(&self) -> Result<()> {
        let (Some(ca), Some(cert), Some(key)) = (&self.grpc_tls_ca, &self.grpc_tls_cert, &self.grpc_tls_key) else {
            return Ok(());
        };
        let tls = tandem_runtime::grpc::MutualTls::load(ca, cert, key, self.grpc_tls_server_name.clone()).map_err(anyhow::Error::msg)?;
        tandem_runtime::grpc::use_mutual_tls(tls).map_err(anyhow::Error::msg)
    }
}

/// A worker's own queue bound (see docs/reliability.md): requests it has accepted and not yet
/// started to answer, and their prompt tokens.
#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// Most requests queued here at once; past it a request is refused (`overloaded`) and the
    /// gateway tries another worker.
    #[arg(long, env = "TANDEM_MAX_QUEUED_REQUESTS", default_value_t = 1024)]
    pub max_queued_requests: usize,
    /// Most prompt tokens (context tokens, on a decode worker) queued here at once.
    #[arg(long, env = "TANDEM_MAX_QUEUED_TOKENS", default_value_t = 1 << 20)]
    pub max_queued_tokens: usize,
}

impl QueueArgs {
    fn queue(&self) -> Arc<tandem_runtime::WorkQueue> {
        tandem_runtime::WorkQueue::new(self.max_queued_requests, self.max_queued_tokens)
    }
}

/// A worker's metrics endpoint.
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Where to serve Prometheus metrics over HTTP (`/metrics`); the bound address is in the
    /// registry record and the READY line.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_listen: String,
}

#[derive(Debug, Clone, Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Upper bound of one KV handoff, verdict included.
    #[arg(long, default_value_t = 10_000)]
    pub handoff_lease_ms: u64,
    /// Bound of one fetch from (or offload to) the block store.
    #[arg(long, default_value_t = 2_000)]
    pub store_timeout_ms: u64,
    /// Most MiB of offloads to the block store in flight at once; past it a prompt's blocks are
    /// not offloaded (counted as shed) rather than queued.
    #[arg(long, env = "TANDEM_OFFLOAD_BUDGET_MB", default_value_t = 256)]
    pub offload_budget_mb: usize,
    /// KV transports to hand blocks over with, in order of preference; the first one the decode
    /// worker also offers is used, and the next if it cannot connect.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cudaipc,ucx,tcp", env = "TANDEM_KV_TRANSPORT")]
    pub kv_transport: Vec<TransportKind>,
    #[command(flatten)]
    pub quic: crate::transports::QuicTrustArgs,
    /// How long a prefix-index entry this worker republishes lives (match the gateway's).
    #[arg(long, default_value_t = 600)]
    pub index_ttl_s: u64,
    /// Fault injection, for reliability tests only: corrupt every Nth KV handoff after its
    /// checksums are taken (0: never).
    #[arg(long, env = "TANDEM_FAULT_CORRUPT_KV_EVERY", default_value_t = 0, hide = true)]
    pub fault_corrupt_kv_every: u64,
    /// Fault injection, for reliability tests only: abort the process while its Nth KV handoff
    /// is being sent (0: never).
    #[arg(long, env = "TANDEM_FAULT_EXIT_DURING_HANDOFF", default_value_t = 0, hide = true)]
    pub fault_exit_during_handoff: u64,
    #[command(flatten)]
    pub queue: QueueArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Where KV blocks arrive over TCP; the other transports listen on the same host.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub kv_listen: String,
    /// The host prefill workers reach the KV receivers at, when `--kv-listen` is a wildcard
    /// address (`0.0.0.0:7000` in a container: give the pod's IP or the container's name); the
    /// ports stay those bound. Default: the bound address.
    #[arg(long)]
    pub kv_advertise_host: Option<String>,
    /// KV transports to receive blocks with (all are advertised; senders pick). `cudaipc` is
    /// offered only by a GPU engine whose pool other processes can map.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cudaipc,ucx,tcp", env = "TANDEM_KV_TRANSPORT")]
    pub kv_transport: Vec<TransportKind>,
    #[command(flatten)]
    pub quic: crate::transports::QuicCertArgs,
    /// Bound of one incoming KV transfer, from first byte to verdict.
    #[arg(long, default_value_t = 10_000)]
    pub handoff_lease_ms: u64,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// Compute prompts too: an aggregated worker, which the gateway sends whole requests
    /// (`tandem worker` is this).
    #[arg(long)]
    pub aggregated: bool,
}

#[derive(Debug, Clone, Args)]
pub struct KvTransferArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[arg(long, default_value_t = 1024)]
    pub memory_mb: usize,
    /// A disk tier below memory: blocks pushed out of memory go here (emptied at start).
    #[arg(long)]
    pub disk_dir: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 8192)]
    pub disk_mb: usize,
    /// How long a prefix-index entry lives unless renewed.
    #[arg(long, default_value_t = 600)]
    pub index_ttl_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrefixIndex {
    Shared,
    Local,
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// The model to serve (a .gguf file, a folder or a hub id; default: the embedded one);
    /// repeat it to serve several, each with its own `--served-model-name`.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Vec<String>,
    /// The name clients use for the model; repeated, one per `--model` (or, with one model or
    /// none, the same model under each name).
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME")]
    pub served_model_name: Vec<String>,
    /// The router's models, backends and decisions (YAML in vLLM Semantic Router's shape; see
    /// docs/router.md).
    #[arg(long, env = "TANDEM_ROUTER_CONFIG")]
    pub router_config: Option<std::path::PathBuf>,
    /// Prefill workers (host:port), repeatable; with several models, each worker serves the
    /// model it reports.
    #[arg(long)]
    pub prefill: Vec<String>,
    /// Decode workers (host:port), repeatable.
    #[arg(long)]
    pub decode: Vec<String>,
    /// Block stores (`tandem kv-transfer`, host:port), repeatable.
    #[arg(long, alias = "kv-store")]
    pub block_store: Vec<String>,
    /// Keep cluster state in this Redis and find workers in its registry; without it the state
    /// lives in this process and the workers are those given.
    #[arg(long, env = "TANDEM_REDIS_URL")]
    pub redis: Option<String>,
    /// How long prefix-index entries live unless renewed.
    #[arg(long, default_value_t = 600)]
    pub index_ttl_s: u64,
    /// Where the prefix index lives: `shared`, in the cluster state every gateway uses (Redis
    /// with `--redis`), or `local`, this gateway's own, which sees only the requests it routed
    /// (docs/deploy.md measures what that costs with several gateways).
    #[arg(long, value_enum, env = "TANDEM_PREFIX_INDEX", default_value = "shared")]
    pub prefix_index: PrefixIndex,
    /// How long a finished request's state is kept.
    #[arg(long, default_value_t = 3600)]
    pub request_ttl_s: u64,
    /// Routing: how many prompt tokens of recomputation one queued request on a prefill worker
    /// is worth (see docs/architecture.md).
    #[arg(long, default_value_t = 256.0)]
    pub route_load_weight: f64,
    /// Longest a request may take, queueing and prefill included.
    #[arg(long, default_value_t = 600_000)]
    pub request_timeout_ms: u64,
    #[arg(long, default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// On stop, how long the requests in flight may take to finish before the process exits
    /// anyway.
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT_S", default_value_t = 120)]
    pub drain_timeout_s: u64,
    #[command(flatten)]
    pub access: AccessArgs,
    /// Serve HTTPS: a PEM certificate chain (with `--tls-key`).
    #[arg(long, env = "TANDEM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env = "TANDEM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub grpc_tls: GrpcTlsArgs,
    #[arg(long, hide = true)]
    pub managed: bool,
}

/// Who may call the gateway, how fast, and how much it takes on at once.
#[derive(Debug, Clone, Args)]
pub struct AccessArgs {
    /// An accepted API key (repeatable; the variable takes a comma-separated list). With any key
    /// set, every route but `--public-paths` needs `Authorization: Bearer KEY`.
    #[arg(long = "api-key", env = "TANDEM_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// A file of accepted API keys, one a line (blank lines and `#` comments skipped).
    #[arg(long, env = "TANDEM_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Routes open without a key.
    #[arg(long, value_delimiter = ',', default_value = "/health,/ready,/metrics")]
    pub public_paths: Vec<String>,
    /// Requests a minute per API key (0: no limit); over it, 429 with Retry-After.
    #[arg(long, env = "TANDEM_RATE_LIMIT_RPM", default_value_t = 0)]
    pub rate_limit_rpm: u64,
    /// Tokens a minute per API key, prompt plus max_tokens (0: no limit); over it, 429.
    #[arg(long, env = "TANDEM_RATE_LIMIT_TPM", default_value_t = 0)]
    pub rate_limit_tpm: u64,
    /// Most requests waiting for their first token at once; past it, 503 with Retry-After.
    #[arg(long, env = "TANDEM_MAX_WAITING_REQUESTS", default_value_t = 1024)]
    pub max_waiting_requests: usize,
    /// Most prompt tokens waiting for their first token at once; past it, 503 with Retry-After.
    #[arg(long, env = "TANDEM_MAX_WAITING_PROMPT_TOKENS", default_value_t = 1 << 20)]
    pub max_waiting_prompt_tokens: usize,
    /// Refuse (503 with Retry-After) a request whose predicted wait for its first token (the
    /// requests waiting, itself included, at the pace they recently left the queue, with a
    /// margin for how much that pace varies) is longer than this (0: no bound). Set it to the
    /// TTFT objective.
    #[arg(long, env = "TANDEM_MAX_QUEUE_WAIT_MS", default_value_t = 0)]
    pub max_queue_wait_ms: u64,
}

impl AccessArgs {
    pub fn config(&self) -> Result<tandem_gateway::AccessConfig> {
        let mut keys: Vec<String> = self.api_keys.iter().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading --api-key-file {}", path.display()))?;
            keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string));
            if keys.is_empty() {
                anyhow::bail!("--api-key-file {} holds no key", path.display());
            }
        }
        Ok(tandem_gateway::AccessConfig {
            api_keys: keys,
            public_paths: self.public_paths.clone(),
            requests_per_minute: self.rate_limit_rpm,
            tokens_per_minute: self.rate_limit_tpm,
            max_waiting_requests: self.max_waiting_requests.max(1),
            max_waiting_prompt_tokens: self.max_waiting_prompt_tokens.max(1),
            max_queue_wait: Duration::from_millis(self.max_queue_wait_ms),
        })
    }
}

/// A worker's shutdown: on Ctrl-C, SIGTERM or (managed) its stdin closing, under the drain
/// deadline.
fn shutdown(c: &Common) -> Shutdown {
    Shutdown::new(stop_signal(c.managed), Duration::from_secs(c.drain_timeout_s))
}

fn model_files(model: Option<&str>, served: Option<&str>) -> Result<ModelFiles> {
    let spec = default_model::resolve_spec(model)?;
    let mut files = ModelFiles::resolve(&spec)?;
    files.name = served.map(str::to_string).unwrap_or_else(|| default_model::served_name(model, &files.name));
    Ok(files)
}

fn load_engine(role: &str, args: &EngineArgs) -> Result<EngineHandle> {
    let files = model_files(args.model.as_deref(), args.served_model_name.as_deref())?;
    let limits = args.batcher_config();
    let engine = open_engine(&files, args.device, &args.sizing(), &limits)?;
    let vocab = engine.info().vocab_size;
    let batcher = Batcher::new(engine, limits);
    let handle = EngineHandle::spawn(&format!("{role}-engine"), batcher);
    Ok(match constraints(&files, vocab) {
        Ok(c) => {
            tracing::info!(vocab, "structured output ready");
            handle.with_constraints(Arc::new(c))
        }
        Err(e) => {
            tracing::warn!(error = %e, "structured output unavailable for this model");
            handle
        }
    })
}

/// The structured-output compiler for the model's vocabulary.
pub(crate) fn constraints(files: &ModelFiles, vocab: usize) -> Result<tandem_engine::Constraints> {
    let tokenizer = Tokenizer::load(files)?;
    tandem_engine::Constraints::new(&tokenizer.to_json()?, vocab, tokenizer.eos_ids()).map_err(anyhow::Error::msg)
}

/// KV cache of a CPU worker when none is given, in MiB (`tandem up` gives each worker the same).
pub(crate) const DEFAULT_CPU_KV_CACHE_MB: usize = 256;

/// The engine for `device`, sized for passes within `limits`.
pub(crate) fn open_engine(files: &ModelFiles, device: Device, sizing: &Sizing, limits: &BatcherConfig) -> Result<Box<dyn Engine>> {
    let Sizing { block_size, kv_cache_mb, max_context, memory_fraction, tp, kv_dtype } = sizing.clone();
    if tp == 0 {
        anyhow::bail!("--tp 0: a tensor-parallel group has at least one rank");
    }
    match device {
        Device::Cpu => {
            let _ = (limits, memory_fraction); // the CPU engine sizes its buffers per pass
            let cfg = EngineConfig {
                block_size,
                kv_cache_bytes: kv_cache_mb.unwrap_or(DEFAULT_CPU_KV_CACHE_MB) << 20,
                max_context,
                tp,
                kv_dtype,
            };
            let engine = CpuEngine::load(files, &cfg).with_context(|| format!("loading {}", files.name))?;
            Ok(Box::new(engine))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let kv_cache_bytes = kv_cache_mb.map(|mb| mb << 20);
            let cfg = tandem_cuda::CudaConfig {
                device: ordinal,
                tp,
                block_size,
                kv_cache_bytes,
                memory_fraction,
                max_context,
                max_batch: limits.max_running,
                max_step_tokens: limits.max_batch_tokens,
                // The GPU keeps bf16 or fp8; the CPU's f16 (the flag's default) and f32 leave
                // the choice to TANDEM_CUDA_KV.
                kv_dtype: matches!(kv_dtype, tandem_protocol::KvDtype::Bf16 | tandem_protocol::KvDtype::Fp8E4m3).then_some(kv_dtype),
                ..Default::default()
            };
            let engine = tandem_cuda::CudaEngine::load(files, &cfg).with_context(|| format!("loading {} onto {device}", files.name))?;
            Ok(Box::new(engine))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => anyhow::bail!("--device {device}: this build has no CUDA support"),
    }
}

fn worker_id(common: &Common, role: &str, addr: &std::net::SocketAddr) -> String {
    common.worker_id.clone().unwrap_or_else(|| format!("{role}-{}-{}", host_name(), addr.port()))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "local".into())
}

fn advertised(common: &Common, addr: &std::net::SocketAddr) -> String {
    common.advertise.clone().unwrap_or_else(|| addr.to_string())
}

fn state_store(url: Option<&str>) -> Result<Option<Arc<dyn tandem_state::StateStore>>> {
    url.map(|u| tandem_state::open(Some(u)).context("opening the state store (--redis)")).transpose()
}

/// Starts sending this process's spans to the OTLP collector, if one is configured.
fn export_traces(service_name: &'static str, instance_id: &str, engine: Option<&EngineHandle>) -> Result<()> {
    let id = tandem_runtime::telemetry::Identity {
        service_name,
        instance_id: instance_id.to_string(),
        model: engine.map(|e| e.info().model_name.clone()),
        tp_size: engine.map(|e| e.info().tp_size),
    };
    tandem_runtime::telemetry::start_export(id).map_err(anyhow::Error::msg)
}

/// Ends a service: its result, once the spans still queued are sent (a few seconds at most).
fn finish(result: Result<()>) -> Result<()> {
    tandem_runtime::telemetry::shutdown(Duration::from_secs(3));
    result
}

fn ready(role: &str, fields: &str) {
    // Printed, not logged: it is the contract with `tandem up`.
    println!("READY {role} {fields}");
}

/// The metrics endpoint's listener and its bound address.
async fn bind_metrics(args: &MetricsArgs) -> Result<(TcpListener, String)> {
    let listener =
        TcpListener::bind(&args.metrics_listen).await.with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
    let addr = listener.local_addr()?.to_string();
    Ok((listener, addr))
}

/// Binds the worker's metrics endpoint and serves its engine's metrics there, with its queue's;
/// returns the address.
async fn worker_metrics(
    args: &MetricsArgs,
    role: &'static str,
    engine: &EngineHandle,
    queue: &Arc<tandem_runtime::WorkQueue>,
    shutdown: &Shutdown,
) -> Result<String> {
    let (listener, addr) = bind_metrics(args).await?;
    let (engine, queue) = (engine.clone(), queue.clone());
    tandem_runtime::serve_metrics(listener, move || tandem_engine::metrics::render(&engine, role) + &queue_metrics(&queue), shutdown);
    Ok(addr)
}

/// The worker's queue bound in Prometheus' text format.
fn queue_metrics(queue: &tandem_runtime::WorkQueue) -> String {
    let (requests, tokens) = queue.len();
    format!(
        "# HELP tandem_worker_queued_requests Requests this worker accepted and has not started to answer\n\
         # TYPE tandem_worker_queued_requests gauge\ntandem_worker_queued_requests {requests}\n\
         # HELP tandem_worker_queued_tokens Their prompt (or context) tokens\n\
         # TYPE tandem_worker_queued_tokens gauge\ntandem_worker_queued_tokens {tokens}\n\
         # HELP tandem_worker_queue_refused_total Requests refused as overloaded: the queue was at its bound\n\
         # TYPE tandem_worker_queue_refused_total counter\ntandem_worker_queue_refused_total {}\n",
        queue.refused()
    )
}

pub async fn prefill(args: PrefillArgs) -> Result<()> {
    args.common.grpc_tls.apply()?;
    let shutdown = shutdown(&args.common);
    let listener = TcpListener::bind(&args.common.listen).await?;
    let addr = listener.local_addr()?;
    let engine = load_engine("prefill", &args.engine)?;
    let queue = args.queue.queue();
    let metrics_addr = worker_metrics(&args.metrics, "prefill", &engine, &queue, &shutdown).await?;
    let c = &args.common;
    let cfg = tandem_prefill::PrefillConfig {
        worker_id: worker_id(c, "prefill", &addr),
        addr: advertised(c, &addr),
        transport: Arc::new(crate::transports::sender_set(&args.kv_transport, &args.quic)?),
        device_handoff: args.kv_transport.contains(&TransportKind::CudaIpc),
        handoff_lease: Duration::from_millis(args.handoff_lease_ms),
        store_timeout: Duration::from_millis(args.store_timeout_ms),
        offload_budget_bytes: args.offload_budget_mb << 20,
        state: state_store(c.redis.as_deref())?,
        heartbeat: Duration::from_millis(c.heartbeat_ms),
        index_ttl: Duration::from_secs(args.index_ttl_s),
        metrics_addr: metrics_addr.clone(),
        corrupt_kv_every: args.fault_corrupt_kv_every,
        exit_during_handoff: args.fault_exit_during_handoff,
        queue,
    };
    export_traces("tandem-prefill", &cfg.worker_id, Some(&engine))?;
    ready("prefill", &format!("grpc={addr} metrics={metrics_addr}"));
    finish(tandem_prefill::run(engine, cfg, listener, shutdown).await)
}

pub async fn decode(args: DecodeArgs) -> Result<()> {
    args.common.grpc_tls.apply()?;
    let shutdown = shutdown(&args.common);
    let listener = TcpListener::bind(&args.common.listen).await?;
    let addr = listener.local_addr()?;
    let kv_listen: std::net::SocketAddr =
        tokio::net::lookup_host(&args.kv_listen).await?.next().context("--kv-listen resolves to nothing")?;
    let lease = Duration::from_millis(args.handoff_lease_ms);
    let advertise = args.kv_advertise_host.as_deref();
    let mut kv = tandem_decode::KvReceivers::bind(&args.kv_transport, kv_listen, advertise, lease, args.quic.identity()?.as_ref()).await?;
    let engine = load_engine("decode", &args.engine)?;
    kv.use_engine(&engine)?;
    let queue = args.queue.queue();
    let metrics_addr = worker_metrics(&args.metrics, "decode", &engine, &queue, &shutdown).await?;
    let c = &args.common;
    let role = if args.aggregated { "worker" } else { "decode" };
    let cfg = tandem_decode::DecodeConfig {
        worker_id: worker_id(c, role, &addr),
        addr: advertised(c, &addr),
        state: state_store(c.redis.as_deref())?,
        heartbeat: Duration::from_millis(c.heartbeat_ms),
        handoff_lease: Duration::from_millis(args.handoff_lease_ms),
        default_kv_wait: Duration::from_secs(600),
        metrics_addr: metrics_addr.clone(),
        queue,
        aggregated: args.aggregated,
    };
    export_traces(if args.aggregated { "tandem-worker" } else { "tandem-decode" }, &cfg.worker_id, Some(&engine))?;
    ready(role, &format!("grpc={addr} kv={} metrics={metrics_addr}", kv.advertised()));
    finish(tandem_decode::run(engine, cfg, listener, kv, shutdown).await)
}

pub async fn kv_transfer(args: KvTransferArgs) -> Result<()> {
    args.common.grpc_tls.apply()?;
    let shutdown = shutdown(&args.common);
    let listener = TcpListener::bind(&args.common.listen).await?;
    let addr = listener.local_addr()?;
    let c = &args.common;
    let (metrics, metrics_addr) = bind_metrics(&args.metrics).await?;
    let cfg = tandem_kv_transfer::KvTransferConfig {
        worker_id: worker_id(c, "kv-transfer", &addr),
        addr: advertised(c, &addr),
        memory_bytes: args.memory_mb << 20,
        disk: args.disk_dir.clone().map(|d| (d, args.disk_mb << 20)),
        state: state_store(c.redis.as_deref())?,
        heartbeat: Duration::from_millis(c.heartbeat_ms),
        index_ttl: Duration::from_secs(args.index_ttl_s),
        metrics: Some((metrics, metrics_addr.clone())),
    };
    export_traces("tandem-kv-store", &cfg.worker_id, None)?;
    ready("kv-transfer", &format!("grpc={addr} metrics={metrics_addr}"));
    finish(tandem_kv_transfer::run(cfg, listener, shutdown).await)
}

/// The models a command serves: each `--model` with its `--served-model-name`. One model (or
/// none, the default) may be served under several names; several models need a name each or
/// none.
pub(crate) fn pair_models(models: &[String], names: &[String]) -> Result<Vec<(Option<String>, Option<String>)>> {
    Ok(match (models.len(), names.len()) {
        (0 | 1, n) => (0..n.max(1)).map(|i| (models.first().cloned(), names.get(i).cloned())).collect(),
        (_, 0) => models.iter().map(|m| (Some(m.clone()), None)).collect(),
        (m, n) if m == n => models.iter().cloned().map(Some).zip(names.iter().cloned().map(Some)).collect(),
        (m, n) => anyhow::bail!("{m} models and {n} served names: give one --served-model-name per --model, or none"),
    })
}

/// Each model's files under the name it is served as; two models may not share a name.
fn served_models(models: &[String], names: &[String]) -> Result<Vec<ModelFiles>> {
    let mut out: Vec<ModelFiles> = Vec::new();
    for (model, name) in pair_models(models, names)? {
        let files = model_files(model.as_deref(), name.as_deref())?;
        if out.iter().any(|f| f.name == files.name) {
            anyhow::bail!("two models are served as `{}`: give each its own --served-model-name", files.name);
        }
        out.push(files);
    }
    Ok(out)
}

pub async fn gateway(args: GatewayArgs) -> Result<()> {
    args.grpc_tls.apply()?;
    let shutdown = Shutdown::new(stop_signal(args.managed), Duration::from_secs(args.drain_timeout_s));
    let mut models = Vec::new();
    for files in served_models(&args.model, &args.served_model_name)? {
        let tokenizer = Tokenizer::load(&files)?;
        models.push((files.name, tokenizer));
    }
    let (model_name, tokenizer) = models.remove(0);
    let router = args.router_config.as_deref().map(tandem_gateway::router::RouterConfig::load).transpose()?;
    let listener = TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    if args.redis.is_none() && args.decode.is_empty() {
        // Aggregated workers are given as decode workers, and need no prefill worker.
        anyhow::bail!("give at least one --decode worker (and --prefill workers unless the decode workers are aggregated), or --redis to find them in the registry");
    }
    let state = tandem_state::open(args.redis.as_deref()).context("opening the state store")?;
    let cfg = tandem_gateway::GatewayConfig {
        model_name,
        other_models: models,
        router,
        prefill: args.prefill,
        decode: args.decode,
        block_stores: args.block_store,
        discover: args.redis.is_some(),
        state,
        local_index: (args.prefix_index == PrefixIndex::Local).then(|| tandem_state::open(None)).transpose()?,
        index_ttl: Duration::from_secs(args.index_ttl_s),
        request_ttl: Duration::from_secs(args.request_ttl_s),
        route_load_weight: args.route_load_weight,
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        poll_interval: Duration::from_millis(args.poll_interval_ms),
        access: args.access.config()?,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(tandem_gateway::tls::server_config(cert, key)?),
            _ => None,
        },
    };
    let instance = format!("gateway-{}-{}", host_name(), addr.port());
    tandem_runtime::telemetry::start_export(tandem_runtime::telemetry::Identity {
        service_name: "tandem-gateway",
        instance_id: instance,
        model: Some(cfg.model_name.clone()),
        tp_size: None,
    })
    .map_err(anyhow::Error::msg)?;
    ready("gateway", &format!("http={addr}"));
    finish(tandem_gateway::run(cfg, tokenizer, listener, shutdown).await)
}

#[cfg(test)]
mod tests {
    use super::pair_models;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn models_pair_with_their_served_names() {
        let some = |x: &str| Some(x.to_string());
        assert_eq!(pair_models(&[], &[]).unwrap(), [(None, None)], "the default model, under its own name");
        assert_eq!(pair_models(&[], &s(&["a", "b"])).unwrap(), [(None, some("a")), (None, some("b"))], "the default twice");
        assert_eq!(pair_models(&s(&["m"]), &s(&["a", "b"])).unwrap(), [(some("m"), some("a")), (some("m"), some("b"))]);
        assert_eq!(pair_models(&s(&["m", "n"]), &[]).unwrap(), [(some("m"), None), (some("n"), None)]);
        assert_eq!(pair_models(&s(&["m", "n"]), &s(&["a", "b"])).unwrap(), [(some("m"), some("a")), (some("n"), some("b"))]);
        let e = pair_models(&s(&["m", "n", "o"]), &s(&["a", "b"])).unwrap_err().to_string();
        assert!(e.contains("3 models and 2 served names"), "{e}");
    }
}
