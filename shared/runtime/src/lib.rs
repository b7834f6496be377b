//! What every Tandem service runs on: one [`Shutdown`] (not ready, drain, stop, under one
//! deadline, with the service's tasks tracked and joined), one [`Membership`] in the cluster
//! registry, the signals a process stops on, the cluster's gRPC connections (mutual TLS included),
//! logging and traces.
#![forbid(unsafe_code)]

mod config;
mod cpu;
pub mod grpc;
mod logging;
mod membership;
mod net;
mod queue;
mod shutdown;
mod signals;
pub mod telemetry;

pub use config::Device;
pub use cpu::require_cpu_features;
pub use logging::{init_logging, LogFormat};
pub use membership::Membership;
pub use net::{no_delay, serve_metrics};
pub use queue::{QueueFull, Queued, WorkQueue};
pub use shutdown::{Shutdown, ShutdownReport};
pub use signals::stop_signal;
