//! `tandem up`: the whole disaggregated cluster on one machine, every service its own process on
//! loopback: kv-transfer, N prefill workers, M decode workers and the gateway.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::default_model;

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Gateway port (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// A .gguf file, a model folder or a hub id; defaults to the embedded SmolLM2-135M-Instruct.
    /// Repeat it to serve several models behind the one endpoint, each with pools of its own.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Vec<String>,
    /// The router's models, backends and decisions (YAML in vLLM Semantic Router's shape; see
    /// docs/router.md), given to the gateway.
    #[arg(long, env = "TANDEM_ROUTER_CONFIG")]
    pub router_config: Option<std::path::PathBuf>,
    /// Prefill workers (default 1, or 0 with `--aggregated`).
    #[arg(long)]
    pub prefill: Option<usize>,
    /// Decode workers (default 1, or 0 with `--aggregated`).
    #[arg(long)]
    pub decode: Option<usize>,
    /// Aggregated workers (`tandem worker`: prefill and decode in one engine, chunked prefill
    /// mixed into the decode batches). With no `--prefill`/`--decode` given, the cluster is
    /// these workers alone: `tandem up --aggregated 2`.
    #[arg(long, default_value_t = 0)]
    pub aggregated: usize,
    /// Tensor-parallel degree of every worker (each worker one group of this many ranks).
    #[arg(long, default_value_t = 1, visible_alias = "tensor-parallel-size")]
    pub tp: usize,
    /// Tensor-parallel degree of the prefill workers (default: `--tp`); it may differ from the
    /// decode workers', and the KV is re-sharded by head on the way.
    #[arg(long)]
    pub prefill_tp: Option<usize>,
    /// Tensor-parallel degree of the decode workers (default: `--tp`).
    #[arg(long)]
    pub decode_tp: Option<usize>,
    /// KV cache per worker, in MiB (on a GPU every worker shares the device, so give each its
    /// part).
    #[arg(long, env = "TANDEM_KV_CACHE_MB", default_value_t = crate::serve::DEFAULT_CPU_KV_CACHE_MB)]
    pub kv_cache_mb: usize,
    /// Longest a KV handoff may take before its request fails.
    #[arg(long, default_value_t = 10_000)]
    pub handoff_lease_ms: u64,
    /// Where the prefill and decode engines run: `cpu`, or `cuda:N` (all workers on that GPU,
    /// each with `--kv-cache-mb` of KV cache; a group of `--tp` ranks on GPUs N, N+1, …).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: tandem_runtime::Device,
    /// Where the prefill workers run (default: `--device`), e.g. `cuda:0` beside decode workers
    /// on `cuda:1`; a list (`cuda:0,cuda:1`) gives worker i the i-th entry, round the list.
    #[arg(long, value_delimiter = ',')]
    pub prefill_device: Vec<tandem_runtime::Device>,
    /// Where the decode workers run (default: `--device`); a list as for `--prefill-device`.
    #[arg(long, value_delimiter = ',')]
    pub decode_device: Vec<tandem_runtime::Device>,
    /// Where the aggregated workers run (default: `--device`); a list as for `--prefill-device`,
    /// e.g. `--aggregated 2 --aggregated-device cuda:0,cuda:1` for one worker per GPU.
    #[arg(long, value_delimiter = ',')]
    pub aggregated_device: Vec<tandem_runtime::Device>,
    /// KV transports between the workers, in the prefill workers' order of preference. GPU
    /// workers of one machine hand blocks device to device (`cudaipc`; CPU workers leave it
    /// out). After it TCP comes first: over loopback it moves a handoff on as many threads as
    /// there are handoffs, while UCX without RDMA hardware copies every handoff on its one
    /// progress thread (see docs/performance.md); `ucx` first suits workers on hosts with
    /// InfiniBand or RoCE.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cudaipc,tcp,ucx", env = "TANDEM_KV_TRANSPORT")]
    pub kv_transport: Vec<tandem_transfer::TransportKind>,
    /// Keep the cluster state in this Redis (the services register there, and more workers
    /// started elsewhere with the same URL join); without it the gateway keeps it in process.
    #[arg(long, env = "TANDEM_REDIS_URL")]
    pub redis: Option<String>,
    #[command(flatten)]
    pub engine: UpEngineArgs,
}

/// Engine settings every prefill and decode worker is given (each unset one keeps the worker's
/// own default).
#[derive(Debug, Clone, Default, Args)]
pub struct UpEngineArgs {
    /// The name clients use for the model (default: the model's); repeated, one per `--model`
    /// (or, with one model or none, the same model served under each name, pools and all).
    #[arg(long)]
    pub served_model_name: Vec<String>,
    /// Longest context, prompt and output together.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences a worker runs at once.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Most tokens in one forward pass.
    #[arg(long, visible_alias = "max-num-batched-tokens")]
    pub max_batch_tokens: Option<usize>,
    /// On a GPU, the share of its memory each worker takes (with several workers on one GPU,
    /// give each its part).
    #[arg(long)]
    pub gpu_memory_utilization: Option<f64>,
    /// The CPU workers' KV cache element type (`f16` or `f32`).
    #[arg(long)]
    pub kv_dtype: Option<tandem_protocol::KvDtype>,
}

impl UpEngineArgs {
    /// The flags that carry these settings to a worker.
    fn worker_flags(&self) -> Vec<String> {
        let mut a = Vec::new();
        let mut add = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                a.extend([flag.to_string(), v]);
            }
        };
        add("--max-model-len", self.max_model_len.map(|v| v.to_string()));
        add("--max-num-seqs", self.max_num_seqs.map(|v| v.to_string()));
        add("--max-batch-tokens", self.max_batch_tokens.map(|v| v.to_string()));
        add("--gpu-memory-utilization", self.gpu_memory_utilization.map(|v| v.to_string()));
        add("--kv-dtype", self.kv_dtype.map(|v| v.as_str().to_string()));
        a
    }
}

struct Service {
    name: String,
    child: Child,
    /// Held apart from `child`: waiting on a child closes the stdin it holds, and a managed
    /// service stops when its stdin closes.
    stdin: Option<tokio::process::ChildStdin>,
}

/// Starts `tandem <args>` and waits for its READY line; returns the line's `key=value` fields.
async fn spawn(name: &str, args: &[String]) -> Result<(Service, Vec<(String, String)>)> {
    let exe = std::env::current_exe().context("locating the tandem binary")?;
    let mut cmd = Command::new(exe);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    let mut child = cmd
        .args(args)
        .arg("--managed")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    // However long loading takes (a large model from a slow disk): a service that fails exits,
    // and meanwhile the wait says what it is for.
    let started = Instant::now();
    let line = {
        let ready = async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("READY ") {
                    return Ok::<_, std::io::Error>(Some(line));
                }
            }
            Ok(None)
        };
        tokio::pin!(ready);
        let mut note = tokio::time::interval_at(tokio::time::Instant::now() + STILL_WAITING, STILL_WAITING);
        loop {
            tokio::select! {
                line = &mut ready => break line,
                _ = note.tick() => eprintln!("{name}: still starting after {} s (loading the model)", started.elapsed().as_secs()),
            }
        }
    }
    .with_context(|| format!("{name} did not become ready"))?
    .with_context(|| format!("{name} exited before it was ready"))?;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let fields = line.split_whitespace().skip(2).filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let stdin = child.stdin.take();
    Ok((Service { name: name.to_string(), child, stdin }, fields))
}

/// How often a service that is still starting is reported.
const STILL_WAITING: Duration = Duration::from_secs(30);

impl UpArgs {
    /// The tensor-parallel degree and device of worker `i` of `role` (`prefill`, `decode`, or
    /// `worker` for an aggregated one): its role's own settings where given, else the common ones.
    fn placement(&self, role: &str, i: usize) -> (usize, tandem_runtime::Device) {
        let (tp, list) = match role {
            "prefill" => (self.prefill_tp, &self.prefill_device),
            "decode" => (self.decode_tp, &self.decode_device),
            _ => (None, &self.aggregated_device),
        };
        let device = if list.is_empty() { self.device } else { list[i % list.len()] };
        (tp.unwrap_or(self.tp), device)
    }
}

fn field(fields: &[(String, String)], key: &str) -> Result<String> {
    fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).with_context(|| format!("READY line without {key}"))
}

pub async fn run(args: UpArgs) -> Result<()> {
    let pool = if args.aggregated > 0 { 0 } else { 1 };
    let (prefills, decodes) = (args.prefill.unwrap_or(pool), args.decode.unwrap_or(pool));
    if (prefills == 0 || decodes == 0) && args.aggregated == 0 {
        bail!("need at least one prefill and one decode worker, or an aggregated one");
    }
    if (prefills == 0) != (decodes == 0) {
        bail!("prefill workers need decode workers and the other way round (aggregated workers need neither)");
    }
    // Each model with the name it is served as; a model from the hub is fetched here, once,
    // with its progress on this terminal, and the workers then find it in the cache.
    let mut models: Vec<(String, String)> = Vec::new();
    for (given, name) in crate::serve::pair_models(&args.model, &args.engine.served_model_name)? {
        let spec = default_model::resolve_spec(given.as_deref())?;
        let fetch = spec.clone();
        tokio::task::spawn_blocking(move || tandem_tokenizer::ModelFiles::resolve(&fetch)).await.context("resolving the model")??;
        let served = name.unwrap_or_else(|| default_model::served_name(given.as_deref(), &spec));
        if models.iter().any(|(_, s)| *s == served) {
            bail!("two models are served as `{served}`: give each its own --served-model-name");
        }
        models.push((spec, served));
    }
    let model_args =
        |(spec, served): &(String, String)| vec!["--model".to_string(), spec.clone(), "--served-model-name".into(), served.clone()];
    let engine_args = |model: &(String, String), role: &str, i: usize| {
        let (tp, device) = args.placement(role, i);
        let mut a = vec![role.to_string()];
        a.extend(model_args(model));
        a.extend(["--tp".into(), tp.to_string()]);
        a.extend(args.engine.worker_flags());
        a.extend(["--kv-cache-mb".into(), args.kv_cache_mb.to_string(), "--handoff-lease-ms".into(), args.handoff_lease_ms.to_string()]);
        a.extend(["--device".into(), device.to_string()]);
        let transports: Vec<String> = args.kv_transport.iter().map(|t| t.to_string()).collect();
        a.extend(["--kv-transport".into(), transports.join(",")]);
        a
    };

    let redis: Vec<String> = args.redis.iter().flat_map(|u| ["--redis".to_string(), u.clone()]).collect();
    let engine_args = |model: &(String, String), role: &str, i: usize| {
        let mut a = engine_args(model, role, i);
        a.extend(redis.clone());
        a
    };
    // With several models, each worker's name says whose it is.
    let worker_name = |model: &(String, String), role: &str, i: usize| {
        if models.len() > 1 {
            format!("{}-{role}-{i}", model.1)
        } else {
            format!("{role}-{i}")
        }
    };
    // Each worker is started once here, then kept running by its own supervisor.
    let (stopping, stop_rx) = tokio::sync::watch::channel(false);
    let mut supervisors = Vec::new();
    let mut supervise = |s: Service, f: &[(String, String)], mut args: Vec<String>| -> Result<()> {
        // A restart binds the same addresses, so whoever was given them reaches it again.
        args.extend(["--listen".into(), field(f, "grpc")?, "--metrics-listen".into(), field(f, "metrics")?]);
        supervisors.push(tokio::spawn(supervise(s, args, stop_rx.clone())));
        Ok(())
    };
    let kv_args = [&["kv-transfer".to_string()][..], &redis].concat();
    let (kv, kv_fields) = spawn("kv-transfer", &kv_args).await?;
    let kv_addr = field(&kv_fields, "grpc")?;
    // Where each service serves its metrics, to print once all are up.
    let metrics_url = |s: &Service, f: &[(String, String)]| field(f, "metrics").map(|at| format!("{} http://{at}/metrics", s.name));
    let mut metrics = vec![metrics_url(&kv, &kv_fields)?];
    supervise(kv, &kv_fields, kv_args)?;
    let (mut prefill_addrs, mut decode_addrs) = (Vec::new(), Vec::new());
    for (m, model) in models.iter().enumerate() {
        // Aggregated workers are decode workers that compute prompts: the gateway knows them as
        // decode workers, and learns from each that it takes whole requests.
        for (role, count) in [("prefill", prefills), ("decode", decodes), ("worker", args.aggregated)] {
            for i in 0..count {
                // Device lists run on across the models: model B's first worker takes the entry
                // after model A's last.
                let a = engine_args(model, role, m * count + i);
                let (s, f) = spawn(&worker_name(model, role, i), &a).await?;
                let addrs = if role == "prefill" { &mut prefill_addrs } else { &mut decode_addrs };
                addrs.push(field(&f, "grpc")?);
                metrics.push(metrics_url(&s, &f)?);
                supervise(s, &f, a)?;
            }
        }
    }
    let mut gw = vec!["gateway".to_string(), "--listen".into(), format!("{}:{}", args.host, args.port)];
    for model in &models {
        gw.extend(model_args(model));
    }
    if let Some(path) = &args.router_config {
        gw.extend(["--router-config".into(), path.display().to_string()]);
    }
    if args.redis.is_some() {
        // The workers are in the registry.
        gw.extend(redis.clone());
    } else {
        // Every model's workers: each serves the pools of the model it reports.
        for a in &prefill_addrs {
            gw.extend(["--prefill".into(), a.clone()]);
        }
        for a in &decode_addrs {
            gw.extend(["--decode".into(), a.clone()]);
        }
        gw.extend(["--block-store".into(), kv_addr]);
    }
    let (mut gateway, f) = spawn("gateway", &gw).await?;
    let http = field(&f, "http")?;
    wait_ready(&http).await?;
    // Listening before the endpoint is out: a Ctrl-C right after it still stops the cluster.
    let (mut interrupt, mut term) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
    // The one line on stdout: where to point clients.
    let pools = match args.aggregated {
        0 => format!("prefill: {prefills}, decode: {decodes}"),
        n if prefills + decodes == 0 => format!("aggregated: {n}"),
        n => format!("prefill: {prefills}, decode: {decodes}, aggregated: {n}"),
    };
    let served: Vec<&str> = models.iter().map(|(_, name)| name.as_str()).collect();
    let each = if models.len() > 1 { " each" } else { "" };
    println!("tandem is serving {} at http://{http}/v1 ({pools}{each}); Ctrl-C stops it", served.join(", "));
    // Beside the logs, for whoever scrapes them: where each worker serves its metrics.
    eprintln!("metrics: gateway http://{http}/metrics, {}", metrics.join(", "));

    // A worker or the block store that dies is restarted by its supervisor while the rest go on
    // serving; only a signal, or the gateway (the cluster's one endpoint) exiting, stops it all.
    let outcome = tokio::select! {
        // Signals first: Ctrl-C reaches the children too, and one that exits on it is no failure.
        biased;
        _ = interrupt.recv() => Ok(()),
        _ = term.recv() => Ok(()),
        status = gateway.child.wait() => Err(anyhow::anyhow!("the gateway exited ({}); stopping the cluster", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()))),
    };
    let _ = stopping.send(true);
    stop_child(&mut gateway).await;
    for s in supervisors {
        let _ = s.await;
    }
    outcome
}

/// Restarts a worker's process whenever it exits, after a pause that doubles from one second up
/// to [`MAX_BACKOFF`]; after [`MAX_RESTARTS`] restarts within [`RESTART_WINDOW`] it reports and
/// leaves the worker down (a crash loop helps no one, and the others keep serving). Ends, with
/// the process stopped, when `stop` turns true.
async fn supervise(mut current: Service, args: Vec<String>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let name = current.name.clone();
    let mut restarts: Vec<Instant> = Vec::new();
    loop {
        let status = tokio::select! {
            _ = stopped(&mut stop) => {
                stop_child(&mut current).await;
                return;
            }
            status = current.child.wait() => status.map(|st| st.to_string()).unwrap_or_else(|e| e.to_string()),
        };
        eprintln!("{name} exited ({status})");
        // Until a restart takes (a failed one counts, and makes the next pause longer).
        current = loop {
            restarts.retain(|t| t.elapsed() < RESTART_WINDOW);
            if restarts.len() >= MAX_RESTARTS {
                eprintln!("{name}: {MAX_RESTARTS} restarts within {RESTART_WINDOW:?}; leaving it down");
                stopped(&mut stop).await;
                return;
            }
            let pause = (Duration::from_secs(1) * 2u32.pow(restarts.len() as u32)).min(MAX_BACKOFF);
            eprintln!("{name}: restarting in {pause:?}");
            restarts.push(Instant::now());
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = tokio::time::sleep(pause) => {}
            }
            match spawn(&name, &args).await {
                Ok((s, _)) => {
                    eprintln!("{name} restarted");
                    break s;
                }
                Err(e) => eprintln!("{name} did not restart: {e:#}"),
            }
        };
    }
}

/// Until the cluster is asked to stop (or the one asking is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.is_ok();
}

/// Restarts a supervisor allows within [`RESTART_WINDOW`] before it leaves a worker down.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(600);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Waits until the gateway's `/ready` answers 200 with every model ready: each has heard from a
/// prefill and a decode worker (or an aggregated one).
async fn wait_ready(addr: &str) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let mut answer = Vec::new();
            let read = s.write_all(format!("GET /ready HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.is_ok()
                && tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer)).await.is_ok_and(|r| r.is_ok());
            let answer = String::from_utf8_lossy(&answer);
            // With several models the body says which are ready; the gateway is ready once any is.
            if read && answer.get(9..12) == Some("200") && !answer.contains("\"ready\":false") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the gateway did not see its workers within 60 s")
}

/// Closes the child's stdin (it drains and exits), then kills it if it is still there after a
/// grace period.
async fn stop_child(s: &mut Service) {
    drop(s.stdin.take());
    if tokio::time::timeout(Duration::from_secs(10), s.child.wait()).await.is_err() {
        eprintln!("{} did not stop in time; killing it", s.name);
        let _ = s.child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tandem_runtime::Device;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        up: UpArgs,
    }

    fn up(args: &[&str]) -> UpArgs {
        Cli::try_parse_from([&["up"][..], args].concat()).expect("valid flags").up
    }

    #[test]
    fn each_pool_takes_its_own_devices_and_degree() {
        let a = up(&["--device", "cuda:0", "--prefill-device", "cuda:0", "--decode-device", "cuda:1", "--decode-tp", "2"]);
        assert_eq!(a.placement("prefill", 0), (1, Device::Cuda(0)));
        assert_eq!(a.placement("decode", 0), (2, Device::Cuda(1)));
        assert_eq!(a.placement("decode", 3), (2, Device::Cuda(1)), "a single device is every worker's");
        assert_eq!(a.placement("worker", 0), (1, Device::Cuda(0)), "aggregated workers keep --device");

        let a = up(&["--aggregated", "3", "--aggregated-device", "cuda:0,cuda:1", "--tp", "2"]);
        let placed: Vec<_> = (0..3).map(|i| a.placement("worker", i)).collect();
        assert_eq!(placed, [(2, Device::Cuda(0)), (2, Device::Cuda(1)), (2, Device::Cuda(0))], "round the list");
        assert_eq!(a.placement("prefill", 0), (2, Device::Cpu), "the default device");
    }
}
