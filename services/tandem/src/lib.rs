//! The `tandem` command line: one binary for local generation and for running the services.
#![forbid(unsafe_code)]

pub mod default_model;
mod generate;

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
}

impl Cli {
    /// Interactive commands stay quiet unless asked; services log progress.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Generate(_) | Command::FetchModel => "warn",
        }
    }
}

/// Logs go to stderr, so stdout carries only a command's output.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::FetchModel => {
            println!("{}", default_model::ensure_default()?.display());
            Ok(())
        }
    }
}
