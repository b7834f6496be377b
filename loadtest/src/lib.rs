//! Load generator and benchmark harness for OpenAI-compatible endpoints: workloads, arrival
//! processes, streamed per-token timing, aggregate metrics, result files, sweeps, plots and
//! comparisons between runs.
#![forbid(unsafe_code)]

pub mod app;
pub mod arrivals;
pub mod cli;
pub mod client;
pub mod compare;
pub mod config;
pub mod dataset;
pub mod failure;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod result;
pub mod runner;
pub mod sse;
pub mod sweep;
pub mod tokens;

pub use config::{BenchConfig, Slo};
pub use dataset::{DatasetSpec, SampleRequest};
pub use failure::FailureKind;
pub use result::BenchResult;
pub use runner::{run_benchmark, wait_until_ready, RunReport};
pub use tokens::{load_tokenizer, resolve_tokenizer, TokenCounter};

/// Everything that can stop a benchmark before it starts or after it ends. Failures of single
/// requests are not errors: they are counted in the result.
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] tandem_tokenizer::TokenizerError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("dataset: {0}")]
    Dataset(String),
    #[error("cannot access {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("target: {0}")]
    Target(String),
    #[error("plot: {0}")]
    Plot(String),
}

pub type Result<T> = std::result::Result<T, LoadtestError>;

impl LoadtestError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        LoadtestError::Io { path: path.as_ref().display().to_string(), source }
    }
}
