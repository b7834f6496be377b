//! `tandem up`: the whole disaggregated cluster on one machine, every service its own process on
//! loopback: kv-transfer, N prefill workers, M decode workers and the gateway.

use std::process::Stdio;
use std::time::Duration;

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
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    #[arg(long, default_value_t = 1)]
    pub decode: usize,
    /// KV cache per worker, in MiB (on a GPU every worker shares the device, so give each its
    /// part).
    #[arg(long, env = "TANDEM_KV_CACHE_MB", default_value_t = crate::serve::DEFAULT_CPU_KV_CACHE_MB)]
    pub kv_cache_mb: usize,
    /// Longest a KV handoff may take before its request fails.
    #[arg(long, default_value_t = 10_000)]
    pub handoff_lease_ms: u64,
    /// Where the prefill and decode engines run: `cpu`, or `cuda:N` (all workers on that GPU,
    /// each with `--kv-cache-mb` of KV cache).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: tandem_runtime::Device,
    /// KV transports between the workers, in the prefill workers' order of preference. On one
    /// machine TCP comes first: over loopback it moves a handoff on as many threads as there are
    /// handoffs, while UCX without RDMA hardware copies every handoff on its one progress thread
    /// (see docs/performance.md); `ucx` first suits workers on hosts with InfiniBand or RoCE.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tcp,ucx", env = "TANDEM_KV_TRANSPORT")]
    pub kv_transport: Vec<tandem_transfer::TransportKind>,
    /// Keep the cluster state in this Redis (the services register there, and more workers
    /// started elsewhere with the same URL join); without it the gateway keeps it in process.
    #[arg(long, env = "TANDEM_REDIS_URL")]
    pub redis: Option<String>,
}

struct Service {
    name: String,
    child: Child,
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
    let line = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("READY ") {
                return Ok::<_, std::io::Error>(Some(line));
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| format!("{name} did not become ready"))??
    .with_context(|| format!("{name} exited before it was ready"))?;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let fields = line.split_whitespace().skip(2).filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Ok((Service { name: name.to_string(), child }, fields))
}

fn field(fields: &[(String, String)], key: &str) -> Result<String> {
    fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).with_context(|| format!("READY line without {key}"))
}

pub async fn run(args: UpArgs) -> Result<()> {
    if args.prefill == 0 || args.decode == 0 {
        bail!("need at least one prefill and one decode worker");
    }
    let model = default_model::resolve_spec(args.model.as_deref())?;
    let served = default_model::served_name(args.model.as_deref(), &model);
    let model_args = vec!["--model".to_string(), model.clone(), "--served-model-name".into(), served.clone()];
    let engine_args = |role: &str| {
        let mut a = vec![role.to_string()];
        a.extend(model_args.clone());
        a.extend(["--kv-cache-mb".into(), args.kv_cache_mb.to_string(), "--handoff-lease-ms".into(), args.handoff_lease_ms.to_string()]);
        a.extend(["--device".into(), args.device.to_string()]);
        let transports: Vec<String> = args.kv_transport.iter().map(|t| t.to_string()).collect();
        a.extend(["--kv-transport".into(), transports.join(",")]);
        a
    };

    let redis: Vec<String> = args.redis.iter().flat_map(|u| ["--redis".to_string(), u.clone()]).collect();
    let engine_args = |role: &str| {
        let mut a = engine_args(role);
        a.extend(redis.clone());
        a
    };
    let mut services = Vec::new();
    let (kv, kv_fields) = spawn("kv-transfer", &[&["kv-transfer".to_string()][..], &redis].concat()).await?;
    let kv_addr = field(&kv_fields, "grpc")?;
    // Where each service serves its metrics, to print once all are up.
    let metrics_url = |s: &Service, f: &[(String, String)]| field(f, "metrics").map(|at| format!("{} http://{at}/metrics", s.name));
    let kv_metrics = metrics_url(&kv, &kv_fields)?;
    services.push(kv);
    let (mut prefill_addrs, mut decode_addrs, mut metrics) = (Vec::new(), Vec::new(), vec![kv_metrics]);
    for i in 0..args.prefill {
        let (s, f) = spawn(&format!("prefill-{i}"), &engine_args("prefill")).await?;
        prefill_addrs.push(field(&f, "grpc")?);
        metrics.push(metrics_url(&s, &f)?);
        services.push(s);
    }
    for i in 0..args.decode {
        let (s, f) = spawn(&format!("decode-{i}"), &engine_args("decode")).await?;
        decode_addrs.push(field(&f, "grpc")?);
        metrics.push(metrics_url(&s, &f)?);
        services.push(s);
    }
    let mut gw = vec!["gateway".to_string(), "--listen".into(), format!("{}:{}", args.host, args.port)];
    gw.extend(model_args.clone());
    if args.redis.is_some() {
        // The workers are in the registry.
        gw.extend(redis.clone());
    } else {
        for a in &prefill_addrs {
            gw.extend(["--prefill".into(), a.clone()]);
        }
        for a in &decode_addrs {
            gw.extend(["--decode".into(), a.clone()]);
        }
        gw.extend(["--block-store".into(), kv_addr]);
    }
    let (gateway, f) = spawn("gateway", &gw).await?;
    services.push(gateway);
    let http = field(&f, "http")?;
    wait_ready(&http).await?;
    // Listening before the endpoint is out: a Ctrl-C right after it still stops the cluster.
    let (mut interrupt, mut term) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
    // The one line on stdout: where to point clients.
    println!("tandem is serving {served} at http://{http}/v1 (prefill: {}, decode: {}); Ctrl-C stops it", args.prefill, args.decode);
    // Beside the logs, for whoever scrapes them: where each worker serves its metrics.
    eprintln!("metrics: gateway http://{http}/metrics, {}", metrics.join(", "));

    let exited = async {
        loop {
            for s in services.iter_mut() {
                if let Ok(Some(status)) = s.child.try_wait() {
                    return (s.name.clone(), status);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let outcome = tokio::select! {
        // Signals first: Ctrl-C reaches the children too, and one that exits on it is no failure.
        biased;
        _ = interrupt.recv() => Ok(()),
        _ = term.recv() => Ok(()),
        (name, status) = exited => Err(anyhow::anyhow!("{name} exited ({status}); stopping the cluster")),
    };
    stop(services).await;
    outcome
}

/// Waits until the gateway's `/ready` answers 200: it has heard from a prefill and a decode worker.
async fn wait_ready(addr: &str) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let mut head = [0u8; 12];
            let ok = s.write_all(format!("GET /ready HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.is_ok()
                && s.read_exact(&mut head).await.is_ok()
                && &head[9..12] == b"200";
            if ok {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the gateway did not see its workers within 60 s")
}

/// Closes every child's stdin (they drain and exit), then kills what is left after a grace period.
async fn stop(mut services: Vec<Service>) {
    for s in services.iter_mut().rev() {
        drop(s.child.stdin.take());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for s in services.iter_mut().rev() {
        if tokio::time::timeout_at(deadline, s.child.wait()).await.is_err() {
            eprintln!("{} did not stop in time; killing it", s.name);
            let _ = s.child.kill().await;
        }
    }
}
