//! `tandem`: parse the command line, start logging, run the chosen command.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    tandem_runtime::require_cpu_features();
    let cli = tandem::Cli::parse_args();
    tandem::init_telemetry(&cli)?;
    tandem::run(cli)
}
