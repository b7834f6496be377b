//! `tandem bench store`: how many offloads the block store takes, as prefill workers send them.
//!
//! A `tandem kv-transfer` process is started on loopback; `--concurrency` clients then put
//! requests of `--blocks` fresh blocks each (the Llama-3.2-1B bf16 layout by default: 512 KiB a
//! block, so 4 blocks is a 64-token prompt's offload) as fast as the store answers, for
//! `--seconds`. Reported: puts, blocks and bytes per second, and put latency. A single-threaded
//! copy of the same bytes in this process is measured alongside as the floor of taking them in
//! once.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tandem_protocol::pb::block_store_client::BlockStoreClient;
use tandem_protocol::pb::PutBlocksRequest;
use tandem_protocol::Bytes;

#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Blocks per put (one prompt's offload).
    #[arg(long, default_value_t = 4)]
    pub blocks: usize,
    /// Model layers in the block layout (8 KV heads of 64, bf16, 16 tokens a block: 16 layers is
    /// Llama-3.2-1B's 512 KiB block).
    #[arg(long, default_value_t = 16)]
    pub layers: usize,
    /// Puts in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// HTTP/2 connections the puts are spread over (a prefill worker opens
    /// `tandem_prefill::STORE_CONNECTIONS` to each store).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// How long to load the store.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// The store's memory budget, in MiB (it evicts, as a full store does, once past it).
    #[arg(long, default_value_t = 1024)]
    pub memory_mb: usize,
    /// The `tandem` binary to run the store with (default: this one); another build's, to
    /// compare stores in one run on one machine.
    #[arg(long)]
    pub store_binary: Option<std::path::PathBuf>,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreResult {
    pub machine: String,
    /// The binary that ran the store.
    pub store_binary: String,
    /// Runtime threads of the store (this build's; unknown for another binary).
    pub store_threads: Option<usize>,
    pub block_bytes: usize,
    pub blocks_per_put: usize,
    pub concurrency: usize,
    pub connections: usize,
    pub seconds: f64,
    pub puts: usize,
    pub puts_per_s: f64,
    pub blocks_per_s: f64,
    /// Gigabytes (10^9 bytes) of blocks per second the store took.
    pub gbps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// One single-threaded copy of a put's bytes in this process, as GB/s: the floor of taking
    /// them in once.
    pub memcpy_gbps: f64,
}

pub fn run(args: &StoreArgs) -> Result<()> {
    if args.blocks == 0 || args.concurrency == 0 || args.layers == 0 {
        bail!("--blocks, --layers and --concurrency must be positive");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(measure(args))?;
    let json = serde_json::to_string_pretty(&result)?;
    if let Some(path) = &args.output {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}

fn block_bytes(layers: usize) -> usize {
    layers * 2 * 16 * 8 * 64 * 2
}

async fn measure(args: &StoreArgs) -> Result<StoreResult> {
    let len = block_bytes(args.layers);
    let binary = match &args.store_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()?,
    };
    let mut child = tokio::process::Command::new(&binary)
        .args(["kv-transfer", "--listen", "127.0.0.1:0", "--memory-mb", &args.memory_mb.to_string(), "--managed"])
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let addr = super::await_ready(&mut child, "READY kv-transfer grpc=", "the store").await?;
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true).connect().await?;
        clients.push(BlockStoreClient::new(channel).max_encoding_message_size(1 << 30).max_decoding_message_size(1 << 30));
    }

    // Non-constant bytes, made before the clock starts; every put names its blocks by fresh
    // hashes, so the store keeps (and, once full, evicts) each of them.
    let template: Vec<Bytes> = (0..args.blocks).map(|b| Bytes::from(super::noise(b as u64, len))).collect();
    let floor = {
        let mut dst = vec![0u8; len * args.blocks];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for (d, s) in dst.chunks_mut(len).zip(&template) {
                d.copy_from_slice(s);
            }
            std::hint::black_box(&dst);
            best = best.min(t.elapsed().as_secs_f64());
        }
        (len * args.blocks) as f64 / best / 1e9
    };

    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        let (mut client, blocks) = (clients[c % clients.len()].clone(), template.clone());
        tasks.push(tokio::spawn(async move {
            let mut ms = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                let base = ((c as u64) << 40) | (n << 8);
                let req = PutBlocksRequest {
                    layout_json: "bench".into(),
                    hashes: (0..blocks.len() as u64).map(|b| base | b).collect(),
                    blocks: blocks.clone(),
                };
                let t = Instant::now();
                client.put(req).await?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok::<_, tonic::Status>(ms)
        }));
    }
    let mut ms = Vec::new();
    for t in tasks {
        ms.extend(t.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(child.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    ms.sort_by(f64::total_cmp);
    let puts = ms.len();
    anyhow::ensure!(puts > 0, "no put finished");
    let pct = |q: f64| ms[((puts as f64 - 1.0) * q).round() as usize];
    Ok(StoreResult {
        machine: super::machine(),
        store_binary: binary.display().to_string(),
        store_threads: args.store_binary.is_none().then(crate::store_threads),
        block_bytes: len,
        blocks_per_put: args.blocks,
        concurrency: args.concurrency,
        connections: args.connections.max(1),
        seconds,
        puts,
        puts_per_s: puts as f64 / seconds,
        blocks_per_s: (puts * args.blocks) as f64 / seconds,
        gbps: (puts * args.blocks * len) as f64 / seconds / 1e9,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        memcpy_gbps: floor,
    })
}
