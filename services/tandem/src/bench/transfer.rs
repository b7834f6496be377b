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
use clap::Args;
use tandem_transfer::{HandoffRegistry, TransportKind};
use tokio_util::sync::CancellationToken;

use super::{machine, payload, row, Row};

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

/// The receiving process: serves `transport` on loopback, prints `READY addr=…`, accepts the
/// awaited handoffs, and exits when they have all arrived or stdin closes.
pub(super) async fn receive(args: ReceiveArgs) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let registry = HandoffRegistry::new();
    let stop = CancellationToken::new();
    let receiver =
        tandem_transfer::bind_receiver(args.transport, "127.0.0.1:0".parse()?, &registry, Duration::from_secs(120), None).await?;
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
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bench", "transfer-receive", "--transport", kind.name(), "--count", &count.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let addr = super::await_ready(&mut child, "READY addr=", &format!("the {kind} receiver")).await?;
    Ok((child, addr))
}

pub(super) async fn transfer(args: &TransferArgs) -> Result<Vec<Row>> {
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
