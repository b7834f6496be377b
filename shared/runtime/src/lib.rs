//! What every Tandem service runs on: one [`Shutdown`] (not ready, drain, stop, under one
//! deadline, with the service's tasks tracked and joined), one [`Membership`] in the cluster
//! registry, the signals a process stops on, and logging.
#![forbid(unsafe_code)]

mod config;
mod cpu;
mod membership;
mod shutdown;
mod signals;

pub use config::Device;
pub use cpu::require_cpu_features;
pub use membership::Membership;
pub use shutdown::{Shutdown, ShutdownReport};
pub use signals::stop_signal;

/// Logs to stderr, filtered by `RUST_LOG` (else `default_level`); ANSI colours only on a terminal
/// (and not with `NO_COLOR`), so that lines piped into a file or a collector stay plain text.
pub fn init_logging(default_level: &str) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}
