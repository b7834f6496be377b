//! `tandem bench …`: benchmarks that print and save results (JSON), one module each, and what
//! they share: the result rows of the transfer benchmarks, the machine's description, payloads.

mod constraint;
mod cpu;
#[cfg(feature = "cuda")]
mod engine;
mod gpu_peer;
mod perplexity;
mod sample;
mod store;
mod transfer;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;
use tandem_protocol::{KvDtype, KvExport, KvLayout};
use tandem_transfer::Handoff;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// KV handoff throughput and latency per transport.
    Transfer(transfer::TransferArgs),
    /// KV blocks moved between two GPUs of this host by peer copy.
    GpuPeer(gpu_peer::GpuPeerArgs),
    /// How many offloads (puts of KV blocks) the block store takes per second.
    Store(store::StoreArgs),
    /// Prefill and decode speed of the CPU engine on a model (the default unless --model).
    Cpu(cpu::CpuArgs),
    /// Perplexity of the CPU engine over a text, in windows (compared with llama.cpp by
    /// `scripts/bench_perplexity.py`).
    Perplexity(perplexity::PerplexityArgs),
    /// What one sampled token costs on the host, against sorting the whole vocabulary.
    Sample(sample::SampleArgs),
    /// What structured output costs per token on the CPU engine (constrained against not).
    Constraint(constraint::ConstraintArgs),
    /// Decode and prefill speed of the CUDA engine on performance shapes (random weights).
    #[cfg(feature = "cuda")]
    Engine(engine::EngineArgs),
    /// Correctness checks of the CUDA engine: kernels, reference logits, GPU vs CPU greedy.
    #[cfg(feature = "cuda")]
    GpuCheck(engine::CheckArgs),
    /// The receiving side of `bench transfer` (started by it).
    #[command(hide = true)]
    TransferReceive(transfer::ReceiveArgs),
}

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
            rt.block_on(transfer::receive(args))
        }
        #[cfg(feature = "cuda")]
        BenchCommand::Engine(args) => engine::engine(&args),
        #[cfg(feature = "cuda")]
        BenchCommand::GpuCheck(args) => engine::check(&args),
        BenchCommand::Cpu(args) => cpu::run(&args),
        BenchCommand::Perplexity(args) => perplexity::run(&args),
        BenchCommand::Constraint(args) => constraint::run(&args),
        BenchCommand::Sample(args) => sample::run(&args),
        BenchCommand::Store(args) => store::run(&args),
        BenchCommand::GpuPeer(args) => {
            let rows = gpu_peer::run(&args)?;
            report(&rows, args.json, args.output.as_deref())
        }
        BenchCommand::Transfer(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let rows = rt.block_on(transfer::transfer(&args))?;
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
    Handoff {
        request_id: String::new(),
        first_token: 0,
        kv: KvExport { layout, tokens: vec![1; blocks.len() * 16], blocks, checksums, device: None },
    }
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

/// Reads `child`'s stdout until a line starting with `prefix` (a service's or a helper's READY
/// line) and returns the rest of it; fails if the child exits first or takes over 30 s. The
/// child's stdout is consumed by this.
pub(crate) async fn await_ready(child: &mut tokio::process::Child, prefix: &str, what: &str) -> Result<String> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("child stdout")?).lines();
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await? {
            if let Some(rest) = l.strip_prefix(prefix) {
                return Ok::<_, std::io::Error>(Some(rest.trim().to_string()));
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| format!("{what} did not start"))??
    .with_context(|| format!("{what} exited before it was ready"))
}
