//! `tandem`: parse the command line, start logging, run the chosen command.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    let cli = tandem::Cli::parse_args();
    tandem::init_logging(cli.default_log_level());
    tandem::run(cli)
}
