//! `tandem-loadtest`: benchmark an OpenAI-compatible endpoint, or compare two result files.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use tandem_loadtest::cli::{Cli, Command};
use tandem_loadtest::{app, compare};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Compare { a, b }) => print!("{}", compare::compare_files(&a, &b)?),
        None => app::run(&cli.bench).await.context("benchmark failed")?,
    }
    Ok(())
}
