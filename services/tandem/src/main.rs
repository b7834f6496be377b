//! `tandem`: parse the command line, start logging, run the chosen command.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = tandem::Cli::parse();
    tandem::init_logging(cli.default_log_level());
    tandem::run(cli)
}
