//! The `tandem` command line: one binary for local generation and for running the services.
#![forbid(unsafe_code)]

mod bench;
mod bench_cpu;
mod bench_gpu;
mod bench_store;
#[cfg(feature = "cuda")]
mod bench_engine;
pub mod default_model;
mod generate;
mod serve;
mod transports;
mod up;

use clap::{Parser, Subcommand};

pub use generate::GenerateArgs;

#[derive(Debug, Parser)]
#[command(name = "tandem", version, about = "Disaggregated LLM serving")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt on the CPU engine and print it.
    Generate(GenerateArgs),
    /// Fetch the default model (if missing) and print its path.
    FetchModel,
    /// Run the whole disaggregated cluster on this machine: gateway, prefill and decode workers
    /// and the KV store, each its own process.
    Up(up::UpArgs),
    /// Run the OpenAI-compatible HTTP gateway.
    Gateway(serve::GatewayArgs),
    /// Run a prefill worker.
    Prefill(serve::PrefillArgs),
    /// Run a decode worker.
    Decode(serve::DecodeArgs),
    /// Run the KV block store.
    KvTransfer(serve::KvTransferArgs),
    /// Measure parts of Tandem on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

impl Cli {
    /// Interactive commands stay quiet unless asked; services log progress.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Generate(_) | Command::FetchModel | Command::Bench(_) => "warn",
            Command::Up(_) => "warn",
            _ => "info",
        }
    }
}

/// Logs go to stderr, so stdout carries only a command's output (see
/// [`tandem_runtime::init_logging`]).
pub fn init_logging(default_level: &str) {
    tandem_runtime::init_logging(default_level);
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::FetchModel => {
            println!("{}", default_model::ensure_default()?.display());
            Ok(())
        }
        Command::Up(args) => runtime(2)?.block_on(up::run(args)),
        Command::Gateway(args) => runtime(2)?.block_on(serve::gateway(args)),
        Command::Prefill(args) => runtime(2)?.block_on(serve::prefill(args)),
        Command::Decode(args) => runtime(2)?.block_on(serve::decode(args)),
        // The block store has no engine thread beside it: every core it is given can serve puts.
        Command::KvTransfer(args) => runtime(store_threads())?.block_on(serve::kv_transfer(args)),
        Command::Bench(cmd) => bench::run(cmd),
    }
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
}

pub(crate) fn store_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}
