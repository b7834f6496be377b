//! Generates the gRPC code from `proto/` at build time, with a vendored `protoc`, so a fresh
//! clone builds with cargo alone.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not when it was compiled: a compiled script may be reused for
    // another checkout of the same sources.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("tandem/v1/tandem.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    // Build scripts are single-threaded, so setting a variable here races with nothing.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    // KV blocks travel as shared `Bytes`: a prefill worker offloads the blocks it exported without
    // copying them, and the block store keeps what it decoded without copying it again.
    tonic_prost_build::configure()
        .bytes(".tandem.v1.PutBlocksRequest.blocks")
        .bytes(".tandem.v1.GetBlocksResponse.blocks")
        .compile_protos(&[proto], &[root])?;
    Ok(())
}
