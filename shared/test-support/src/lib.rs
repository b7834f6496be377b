//! A whole cluster inside one test process: the gateway, prefill and decode workers and, if
//! asked, a block store, each started through its service's own `run` function on a loopback
//! port, on a runtime the cluster owns (so one cluster can serve every test of a binary, whatever
//! runtime each test runs on). The workers run the real CPU engine over the default model unless
//! a scripted engine is asked for; KV blocks travel over real transports (UCX, then TCP, as the
//! services default to).
//!
//! What only separate processes prove (signals, a closed stdin, `tandem up` supervising its
//! children, a worker killed with SIGKILL) is tested with the `tandem` binary instead.
//!
//! [`otlp`] is a trace receiver that keeps what it is sent, for the tests that check spans.

pub mod otlp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tandem_engine::testing::ScriptedEngine;
use tandem_engine::{Batcher, BatcherConfig, CpuEngine, Engine, EngineConfig, EngineHandle};
use tandem_runtime::Shutdown;
use tandem_tokenizer::{default_model, ModelFiles, Tokenizer};
use tandem_transfer::{TransportKind, TransportSet};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The name the default model is served under.
pub const MODEL: &str = default_model::DEFAULT_MODEL;

/// Makes a worker's engine: called once per prefill and decode worker with the model's files, its
/// tokenizer's vocabulary size and the KV cache budget in MiB.
pub type EngineFactory = Arc<dyn Fn(&ModelFiles, usize, usize) -> Result<Box<dyn Engine>> + Send + Sync>;

/// What a cluster is made of; [`ClusterBuilder::start`] starts it.
pub struct ClusterBuilder {
    prefill: usize,
    decode: usize,
    block_store: bool,
    redis: Option<String>,
    engine: EngineFactory,
    transports: Vec<TransportKind>,
    kv_cache_mb: usize,
    handoff_lease: Duration,
    request_timeout: Duration,
    poll_interval: Duration,
    drain_timeout: Duration,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            prefill: 1,
            decode: 1,
            block_store: false,
            redis: None,
            engine: Arc::new(|files: &ModelFiles, _vocab: usize, kv_cache_mb: usize| -> Result<Box<dyn Engine>> {
                let cfg = EngineConfig { kv_cache_bytes: kv_cache_mb << 20, ..EngineConfig::default() };
                Ok(Box::new(CpuEngine::load(files, &cfg)?))
            }),
            transports: vec![TransportKind::Ucx, TransportKind::Tcp],
            kv_cache_mb: 64,
            handoff_lease: Duration::from_secs(5),
            request_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl ClusterBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn prefill(mut self, n: usize) -> Self {
        self.prefill = n;
        self
    }

    pub fn decode(mut self, n: usize) -> Self {
        self.decode = n;
        self
    }

    /// Adds a block store that prefill workers offload to and fetch from.
    pub fn block_store(mut self) -> Self {
        self.block_store = true;
        self
    }

    /// Keeps the cluster state in this Redis: every service registers there and the gateway
    /// finds the workers in the registry.
    pub fn redis(mut self, url: &str) -> Self {
        self.redis = Some(url.to_string());
        self
    }

    /// Workers run a scripted engine instead of the model (the gateway still tokenizes with the
    /// default model's tokenizer, so `make` gets its vocabulary size).
    pub fn scripted(mut self, make: impl Fn(usize) -> ScriptedEngine + Send + Sync + 'static) -> Self {
        self.engine = Arc::new(move |_: &ModelFiles, vocab: usize, _| -> Result<Box<dyn Engine>> { Ok(Box::new(make(vocab))) });
        self
    }

    /// The KV transports prefill workers send with and decode workers receive with.
    pub fn transports(mut self, kinds: &[TransportKind]) -> Self {
        self.transports = kinds.to_vec();
        self
    }

    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// Starts every service and waits until the gateway routes to all the workers. Tracing is
    /// installed as the `tandem` binary installs it (spans with trace ids, W3C propagation, no
    /// exporter), with warnings logged.
    pub fn start(self) -> TestCluster {
        let _ = tandem_runtime::telemetry::init("warn", tandem_runtime::LogFormat::Text, Default::default());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-cluster")
            .enable_all()
            .build()
            .expect("a runtime for the cluster");
        // Started from a thread of its own: the caller may itself be inside a runtime.
        let started = std::thread::scope(|s| s.spawn(|| runtime.block_on(self.start_services())).join());
        let services = started.expect("the cluster's start-up panicked").expect("starting the cluster");
        let mut cluster = services;
        cluster.runtime = Some(runtime);
        cluster.wait_ready(Duration::from_secs(60));
        cluster
    }

    async fn start_services(self) -> Result<TestCluster> {
        let path = default_model::ensure_default()?;
        let mut files = ModelFiles::resolve(&path.display().to_string())?;
        files.name = MODEL.to_string();
        // Loaded once: the gateway tokenizes with it, and a scripted engine takes its vocabulary.
        let tokenizer = Tokenizer::load(&files)?;
        let vocab = tokenizer.vocab_size();
        let state = |url: &Option<String>| -> Result<Option<Arc<dyn tandem_state::StateStore>>> {
            url.as_deref().map(|u| tandem_state::open(Some(u)).context("opening Redis")).transpose()
        };
        let heartbeat = Duration::from_millis(300);
        let index_ttl = Duration::from_secs(600);

        let block_store = if self.block_store {
            let (listener, addr) = bind().await?;
            let cfg = tandem_kv_transfer::KvTransferConfig {
                worker_id: format!("block-store-{}", addr.port()),
                addr: addr.to_string(),
                memory_bytes: 256 << 20,
                disk: None,
                state: state(&self.redis)?,
                heartbeat,
                index_ttl,
                metrics: None,
            };
            Some(Service::spawn("block-store", addr, None, self.drain_timeout, |sd| tandem_kv_transfer::run(cfg, listener, sd)))
        } else {
            None
        };

        let mut prefill = Vec::new();
        for i in 0..self.prefill {
            let (listener, addr) = bind().await?;
            let engine = self.engine_handle(&files, vocab, &format!("prefill-{i}"))?;
            let senders = self.transports.iter().map(|&k| tandem_transfer::sender(k, None)).collect::<Result<Vec<_>, _>>()?;
            let cfg = tandem_prefill::PrefillConfig {
                worker_id: format!("prefill-{}", addr.port()),
                addr: addr.to_string(),
                transport: Arc::new(TransportSet::new(senders)),
                device_handoff: self.transports.contains(&tandem_transfer::TransportKind::CudaIpc),
                handoff_lease: self.handoff_lease,
                store_timeout: Duration::from_secs(2),
                offload_budget_bytes: 64 << 20,
                state: state(&self.redis)?,
                heartbeat,
                index_ttl,
                metrics_addr: String::new(),
                corrupt_kv_every: 0,
                exit_during_handoff: 0,
                queue: tandem_runtime::WorkQueue::new(1024, 1 << 20),
            };
            prefill.push(Service::spawn("prefill", addr, None, self.drain_timeout, |sd| tandem_prefill::run(engine, cfg, listener, sd)));
        }

        let mut decode = Vec::new();
        for i in 0..self.decode {
            let (listener, addr) = bind().await?;
            let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
            let mut kv = tandem_decode::KvReceivers::bind(&self.transports, loopback, None, self.handoff_lease, None).await?;
            let engine = self.engine_handle(&files, vocab, &format!("decode-{i}"))?;
            kv.use_engine(&engine)?;
            let kv_addr = kv.advertised();
            let cfg = tandem_decode::DecodeConfig {
                worker_id: format!("decode-{}", addr.port()),
                addr: addr.to_string(),
                state: state(&self.redis)?,
                heartbeat,
                handoff_lease: self.handoff_lease,
                default_kv_wait: self.request_timeout,
                metrics_addr: String::new(),
                queue: tandem_runtime::WorkQueue::new(1024, 1 << 20),
                aggregated: false,
            };
            decode.push(Service::spawn("decode", addr, Some(kv_addr), self.drain_timeout, |sd| {
                tandem_decode::run(engine, cfg, listener, kv, sd)
            }));
        }

        let (listener, addr) = bind().await?;
        let discover = self.redis.is_some();
        let cfg = tandem_gateway::GatewayConfig {
            model_name: MODEL.to_string(),
            prefill: if discover { Vec::new() } else { prefill.iter().map(|s| s.addr.clone()).collect() },
            decode: if discover { Vec::new() } else { decode.iter().map(|s| s.addr.clone()).collect() },
            block_stores: if discover { Vec::new() } else { block_store.iter().map(|s| s.addr.clone()).collect() },
            discover,
            state: tandem_state::open(self.redis.as_deref())?,
            local_index: None,
            index_ttl,
            request_ttl: Duration::from_secs(3600),
            route_load_weight: 256.0,
            request_timeout: self.request_timeout,
            poll_interval: self.poll_interval,
            access: tandem_gateway::AccessConfig::default(),
            tls: None,
            other_models: Vec::new(),
            router: None,
        };
        let gateway = Service::spawn("gateway", addr, None, self.drain_timeout, |sd| tandem_gateway::run(cfg, tokenizer, listener, sd));
        let base = format!("http://{addr}");
        Ok(TestCluster { base, prefill, decode, block_store, gateway, runtime: None })
    }

    fn engine_handle(&self, files: &ModelFiles, vocab: usize, name: &str) -> Result<EngineHandle> {
        let engine = (self.engine)(files, vocab, self.kv_cache_mb)?;
        let logits = engine.info().vocab_size;
        let handle = EngineHandle::spawn(name, Batcher::new(engine, BatcherConfig::default()));
        // Structured output, as the `tandem` workers serve it.
        let tokenizer = tandem_tokenizer::Tokenizer::load(files)?;
        let constraints =
            tandem_engine::Constraints::new(&tokenizer.to_json()?, logits, tokenizer.eos_ids()).map_err(anyhow::Error::msg)?;
        Ok(handle.with_constraints(Arc::new(constraints)))
    }
}

async fn bind() -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// One service of the cluster, running on the cluster's runtime.
pub struct Service {
    pub role: &'static str,
    /// Where it serves gRPC (HTTP for the gateway).
    pub addr: String,
    /// A decode worker's advertised KV receivers.
    pub kv_addr: Option<String>,
    stop: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl Service {
    fn spawn<F, Fut>(role: &'static str, addr: SocketAddr, kv_addr: Option<String>, drain: Duration, run: F) -> Self
    where
        F: FnOnce(Shutdown) -> Fut,
        Fut: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Shutdown::new(stop.clone(), drain)));
        Self { role, addr: addr.to_string(), kv_addr, stop, task }
    }

    /// Asks the service to stop, as SIGTERM would: it turns not ready, drains, then stops.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Whether its `run` has returned.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops it at once, in-flight work and all (a crash, as far as its peers can tell).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// A running cluster; every service stops when it is dropped.
pub struct TestCluster {
    /// The gateway's base URL, `http://127.0.0.1:PORT`.
    pub base: String,
    pub prefill: Vec<Service>,
    pub decode: Vec<Service>,
    pub block_store: Option<Service>,
    pub gateway: Service,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestCluster {
    /// One prefill and one decode worker on the default model.
    pub fn start() -> Self {
        ClusterBuilder::new().start()
    }

    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::new()
    }

    /// Every service, gateway last.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.prefill.iter().chain(&self.decode).chain(&self.block_store).chain(std::iter::once(&self.gateway))
    }

    /// Waits until the gateway answers `/ready` with 200 (it polled every worker healthy).
    pub fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if http_status(&self.base, "/ready") == Some(200) {
                return;
            }
            assert!(!self.gateway.is_finished(), "the gateway stopped during start-up");
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the cluster at {} was not ready within {limit:?}", self.base);
    }

    /// Stops every service (gateway first, so nothing new arrives) and waits up to `limit` for
    /// all of them to finish; returns whether they did.
    pub fn stop_within(&self, limit: Duration) -> bool {
        self.gateway.stop();
        for s in self.services() {
            s.stop();
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.services().all(Service::is_finished) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for s in self.services() {
            s.stop();
            s.abort();
        }
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime may block, which is not allowed inside another runtime.
            rt.shutdown_background();
        }
    }
}

/// Status code of a GET, over a plain blocking socket (callable from sync and async tests).
pub fn http_status(base: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
