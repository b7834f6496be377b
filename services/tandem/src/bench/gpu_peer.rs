//! `tandem bench gpu-peer`: a request's KV blocks produced on GPU 0 (the prefill side) moved to
//! GPU 1 (the decode side) by peer copy, against the same blocks staged through pinned host
//! memory (what a network transport does on one host) and a copy inside one GPU (the memory
//! system's own ceiling). Every moved block is read back and checked against its checksum.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use tandem_gpu::{CudaSlice, PeerLink, Staging};
use tandem_protocol::KvExport;

use super::{payload, row, Row};

#[derive(Debug, Clone, Args)]
pub struct GpuPeerArgs {
    /// Blocks per handoff.
    #[arg(long, default_value_t = 64)]
    pub blocks: usize,
    /// Model layers in the block layout (32: Llama-3.1-8B's 2 MiB bf16 block of 16 tokens).
    #[arg(long, default_value_t = 32)]
    pub layers: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Source and destination GPUs.
    #[arg(long, default_value_t = 0)]
    pub src: usize,
    #[arg(long, default_value_t = 1)]
    pub dst: usize,
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

fn timed(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let mut ms = Vec::with_capacity(iters + 2);
    for _ in 0..iters + 2 {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(ms.split_off(2))
}

pub fn run(args: &GpuPeerArgs) -> Result<Vec<Row>> {
    let n = tandem_gpu::device_count();
    if n < 2 {
        bail!("peer copy needs two GPUs; this machine shows {n}");
    }
    let link = PeerLink::open(args.src, args.dst).context("opening the peer link")?;
    let machine = format!(
        "{} -> {} ({}), peer access {}",
        link.src.name().unwrap_or_default(),
        link.dst.name().unwrap_or_default(),
        format_args!("GPU {} -> GPU {}", args.src, args.dst),
        if link.direct() { "on" } else { "unavailable: driver-staged" }
    );
    let h = payload(args.layers, args.blocks);
    let block_bytes = h.kv.layout.block_bytes();
    // The prefill side's blocks, on the source GPU.
    let src: Vec<CudaSlice<u8>> =
        h.kv.blocks.iter().map(|b| link.src_stream.clone_htod(&b[..])).collect::<Result<_, _>>().context("uploading the blocks")?;
    link.src_stream.synchronize()?;
    let mut dst: Vec<CudaSlice<u8>> = (0..args.blocks)
        .map(|_| link.dst_stream.alloc_zeros::<u8>(block_bytes))
        .collect::<Result<_, _>>()
        .context("allocating the destination")?;
    let mut rows = Vec::new();

    let peer = timed(args.iters, || Ok(link.copy(&src, &mut dst)?)).context("peer copy")?;
    verify(&link, &dst, &h.kv).context("after the peer copy")?;
    rows.push(row("cuda-peer", &h, peer, &machine));

    // Through pinned host memory, as a network transport would carry them (here without the
    // network: device to host on one side, host to device on the other).
    for d in dst.iter_mut() {
        link.dst_stream.memset_zeros(d)?;
    }
    let mut staging = Staging::new(&link.src, h.kv.total_bytes()).context("pinned staging buffer")?;
    let staged = timed(args.iters, || {
        staging.download(&src, &link.src_stream)?;
        staging.upload(&mut dst, &link.dst_stream)?;
        Ok(())
    })
    .context("host-staged copy")?;
    verify(&link, &dst, &h.kv).context("after the host-staged copy")?;
    rows.push(row("host-staged", &h, staged, &machine));

    // One GPU's own copy rate for the same bytes (read + write in its memory).
    let mut local: Vec<CudaSlice<u8>> =
        (0..args.blocks).map(|_| link.dst_stream.alloc_zeros::<u8>(block_bytes)).collect::<Result<_, _>>()?;
    let d2d = timed(args.iters, || {
        for (s, d) in dst.iter().zip(local.iter_mut()) {
            link.dst_stream.memcpy_dtod(s, d)?;
        }
        link.dst_stream.synchronize()?;
        Ok(())
    })?;
    verify(&link, &local, &h.kv).context("after the on-device copy")?;
    rows.push(row("device-copy", &h, d2d, &machine));
    Ok(rows)
}

/// Reads the blocks back and checks each against the checksum of what was sent.
fn verify(link: &PeerLink, blocks: &[CudaSlice<u8>], kv: &KvExport) -> Result<()> {
    for (i, (b, want)) in blocks.iter().zip(&kv.checksums).enumerate() {
        let bytes = link.dst_stream.clone_dtoh(b)?;
        ensure!(KvExport::checksum(&bytes) == *want, "block {i} arrived corrupted");
    }
    Ok(())
}
