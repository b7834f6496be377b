//! `tandem bench transfer`: KV handoff throughput and latency of each transport on this machine,
//! through the same sender and receiver code the services use, between two processes.
//!
//! For each transport a receiving `tandem` process is started; each iteration hands one request's
//! worth of blocks (default: 64 blocks of the Llama-3.1-8B bf16 layout, 128 KiB per token and 16
//! tokens a block, so 2 MiB a block and 128 MiB a handoff) to it and waits for its verdict,
//! checksums verified on arrival. A single-threaded copy of the same bytes in this process is
//! measured alongside as the machine's own limit for moving them once.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use tandem_protocol::{KvDtype, KvExport, KvLayout};
use tandem_transfer::{Handoff, HandoffRegistry, TransportKind};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// KV handoff throughput and latency per transport.
    Transfer(TransferArgs),
    /// KV blocks moved between two GPUs of this host by peer copy.
    GpuPeer(crate::bench_gpu::GpuPeerArgs),
    /// How many offloads (puts of KV blocks) the block store takes per second.
    Store(crate::bench_store::StoreArgs),
    /// Prefill and decode speed of the CPU engine on a model (the default unless --model).
    Cpu(crate::bench_cpu::CpuArgs),
    /// Decode and prefill speed of the CUDA engine on performance shapes (random weights).
    #[cfg(feature = "cuda")]
    Engine(crate::bench_engine::EngineArgs),
    /// Correctness checks of the CUDA engine: kernels, reference logits, GPU vs CPU greedy.
    #[cfg(feature = "cuda")]
    GpuCheck(crate::bench_engine::CheckArgs),
    /// The receiving side of `bench transfer` (started by it).
    #[command(hide = true)]
    TransferReceive(ReceiveArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ReceiveArgs {
    #[arg(long, value_enum)]
    pub transport: TransportKind,
    /// Request ids `bench-0` .. `bench-{count-1}` are awaited, in any order.
    #[arg(long)]
    pub count: usize,
}

#[derive(Debug, Clone, Args)]
pub struct TransferArgs {
    /// Transports to measure, comma separated or repeated: tcp, quic, ucx.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tcp")]
    pub transport: Vec<TransportKind>,
    /// Blocks per handoff.
    #[arg(long, default_value_t = 64)]
    pub blocks: usize,
    /// Model layers in the block layout (with 8 KV heads of 128, bf16, 16 tokens a block: 32
    /// layers is Llama-3.1-8B's 2 MiB block, 16 layers Llama-3.2-1B's 512 KiB one).
    #[arg(long, default_value_t = 32)]
    pub layers: usize,
    /// Timed handoffs per transport (after two warm-up ones).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Print the rows as JSON (one array) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON rows to this file.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

/// One result row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub transport: String,
    pub block_bytes: usize,
    pub blocks: usize,
    /// Gigabytes (10^9 bytes) per second over the whole handoff (connect, payload, verdict),
    /// at the median handoff time.
    pub gbps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub iters: usize,
    pub machine: String,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::TransferReceive(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(receive(args))
        }
        #[cfg(feature = "cuda")]
        BenchCommand::Engine(args) => crate::bench_engine::engine(&args),
        #[cfg(feature = "cuda")]
        BenchCommand::GpuCheck(args) => crate::bench_engine::check(&args),
        BenchCommand::Cpu(args) => crate::bench_cpu::run(&args),
        BenchCommand::Store(args) => crate::bench_store::run(&args),
        BenchCommand::GpuPeer(args) => {
            let rows = crate::bench_gpu::run(&args)?;
            report(&rows, args.json, args.output.as_deref())
        }
        BenchCommand::Transfer(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let rows = rt.block_on(transfer(&args))?;
            report(&rows, args.json, args.output.as_deref())
        }
    }
}

fn report(rows: &[Row], json_out: bool, output: Option<&std::path::Path>) -> Result<()> {
    let json = serde_json::to_string_pretty(&rows)?;
    if let Some(path) = output {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    if json_out {
        println!("{json}");
        return Ok(());
    }
    println!("{:<12} {:>11} {:>7} {:>8} {:>9} {:>9}", "transport", "block_bytes", "blocks", "GB/s", "p50_ms", "p99_ms");
    for r in rows {
        println!("{:<12} {:>11} {:>7} {:>8.2} {:>9.2} {:>9.2}", r.transport, r.block_bytes, r.blocks, r.gbps, r.p50_ms, r.p99_ms);
    }
    println!("machine: {}", rows.first().map(|r| r.machine.as_str()).unwrap_or(""));
    Ok(())
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

pub(crate) fn payload(layers: usize, blocks: usize) -> Handoff {
    let layout = KvLayout {
        model_id: "bench".into(),
        num_layers: layers,
        kv_heads: 8,
        head_dim: 128,
        dtype: KvDtype::Bf16,
        block_size: 16,
        tp_rank: 0,
        tp_size: 1,
        token_count: blocks * 16,
    };
    let blocks: Vec<tandem_protocol::Bytes> = (0..blocks).map(|b| noise(b as u64, layout.block_bytes()).into()).collect();
    let checksums = blocks.iter().map(|b| KvExport::checksum(b)).collect();
    Handoff { request_id: String::new(), first_token: 0, kv: KvExport { layout, tokens: vec![1; blocks.len() * 16], blocks, checksums } }
}

/// `len` non-constant bytes from `seed` (xorshift), so nothing along the way can compress them
/// away.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut out: Vec<u8> = (0..len.div_ceil(8))
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    out.truncate(len);
    out
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn row(transport: &str, h: &Handoff, mut ms: Vec<f64>, machine: &str) -> Row {
    ms.sort_by(f64::total_cmp);
    let bytes = h.kv.total_bytes() as f64;
    let p50 = percentile(&ms, 0.5);
    Row {
        transport: transport.to_string(),
        block_bytes: h.kv.layout.block_bytes(),
        blocks: h.kv.blocks.len(),
        gbps: bytes / (p50 / 1e3) / 1e9,
        p50_ms: p50,
        p99_ms: percentile(&ms, 0.99),
        iters: ms.len(),
        machine: machine.to_string(),
    }
}

/// The receiving process: serves `transport` on loopback, prints `READY addr=…`, accepts the
/// awaited handoffs, and exits when they have all arrived or stdin closes.
async fn receive(args: ReceiveArgs) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let registry = HandoffRegistry::new();
    let stop = CancellationToken::new();
    let receiver = tandem_transfer::bind_receiver(args.transport, "127.0.0.1:0".parse()?, &registry, Duration::from_secs(120), None).await?;
    let addr = receiver.advertised()?;
    tokio::spawn(receiver.run(stop.clone()));
    let mut waiting = Vec::new();
    for i in 0..args.count {
        let mut pending = registry.register(&format!("bench-{i}")).context("fresh request id")?;
        waiting.push(tokio::spawn(async move {
            if let Some(incoming) = pending.arrived().await {
                let _ = incoming.verdict.send(Ok(()));
            }
        }));
    }
    println!("READY addr={addr}");
    let all = futures::future::join_all(waiting);
    let stdin_closed = async {
        let mut buf = [0u8; 16];
        let mut stdin = tokio::io::stdin();
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::select! {
        _ = all => {}
        _ = stdin_closed => {}
    }
    // Let the last verdict leave before the receiver goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    Ok(())
}

/// Starts the receiving process for `kind`; returns it and the address to send to.
async fn spawn_receiver(kind: TransportKind, count: usize) -> Result<(tokio::process::Child, String)> {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bench", "transfer-receive", "--transport", kind.name(), "--count", &count.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("child stdout")?).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await? {
            if let Some(a) = l.strip_prefix("READY addr=") {
                return Ok::<_, std::io::Error>(Some(a.to_string()));
            }
        }
        Ok(None)
    })
    .await
    .context("the receiver did not start")??
    .with_context(|| format!("the {kind} receiver exited before it was ready"))?;
    Ok((child, addr))
}

async fn transfer(args: &TransferArgs) -> Result<Vec<Row>> {
    if args.blocks == 0 || args.iters == 0 {
        bail!("--blocks and --iters must be positive");
    }
    let machine = machine();
    let mut h = payload(args.layers, args.blocks);
    let lease = Duration::from_secs(120);
    let mut rows = Vec::new();

    // The floor: one copy of the same bytes in memory.
    let mut ms = Vec::new();
    let mut dst: Vec<Vec<u8>> = h.kv.blocks.iter().map(|b| vec![0u8; b.len()]).collect();
    for _ in 0..args.iters + 2 {
        let t = Instant::now();
        for (d, s) in dst.iter_mut().zip(&h.kv.blocks) {
            d.copy_from_slice(s);
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(&dst);
    }
    rows.push(row("memcpy", &h, ms.split_off(2), &machine));
    drop(dst);

    for &kind in &args.transport {
        let sender = tandem_transfer::sender(kind, None)?;
        let n = args.iters + 2;
        let (mut child, entry) = spawn_receiver(kind, n).await?;
        let addr = tandem_transfer::parse_peer(&entry).pop().context("receiver address")?.addr;
        let mut ms = Vec::new();
        for i in 0..n {
            h.request_id = format!("bench-{i}");
            let t = Instant::now();
            let report = sender.send(&addr, &h, lease).await.with_context(|| format!("{kind} transfer"))?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(report.bytes as usize == h.kv.total_bytes(), "{kind} reported {} bytes", report.bytes);
        }
        drop(child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        rows.push(row(kind.name(), &h, ms.split_off(2), &machine));
    }
    Ok(rows)
}
