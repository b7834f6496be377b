//! The model engine: Llama-family decoders over a paged KV cache, sampling, KV export/import for
//! the prefill-to-decode handoff, and a continuous batcher that drives any [`Engine`].
#![forbid(unsafe_code)]

mod attention;
mod batcher;
mod config;
pub mod constraint;
mod cpu;
mod engine;
mod group;
pub mod grpc;
pub mod kv;
pub mod metrics;
mod model;
pub mod sampling;
pub mod testing;
pub mod weights;
mod worker;

pub use batcher::{Batcher, BatcherConfig, Event, Mode, NewRequest, PrefillTiming, Usage};
pub use config::{Family, Llama3Scaling, ModelConfig};
pub use constraint::{Constraints, Grammar};
pub use cpu::{CpuEngine, EngineConfig};
pub use engine::{Engine, EngineInfo, ForwardItem, MaskSource, PagedEngine, SeqId};
pub use sampling::{Sampled, TokenLogprobs};
pub use tandem_protocol::KvExport;
pub use worker::{EngineHandle, RequestEvents, WorkerLoad};

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model config: {0}")]
    Config(String),
    #[error("loading weights: {0}")]
    Load(String),
    #[error("tensor op: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("out of KV cache blocks: need {needed}, {available} available")]
    OutOfBlocks { needed: usize, available: usize },
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    #[error("sequence {0} already exists")]
    DuplicateSequence(SeqId),
    #[error("sequence of {len} tokens exceeds the model's context of {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error(transparent)]
    Layout(#[from] tandem_protocol::LayoutMismatch),
    #[error("kv import: {0}")]
    Import(String),
    #[error("device: {0}")]
    Device(String),
    #[error(transparent)]
    Tokenizer(#[from] tandem_tokenizer::TokenizerError),
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    /// What the failure means to a client and to the services routing around it.
    pub fn code(&self) -> tandem_protocol::ErrorCode {
        use tandem_protocol::ErrorCode;
        match self {
            Self::OutOfBlocks { .. } => ErrorCode::OutOfKvBlocks,
            Self::ContextOverflow { .. } => ErrorCode::ContextLengthExceeded,
            // Blocks that do not fit this engine: the handoff brought the wrong thing.
            Self::Layout(_) | Self::Import(_) => ErrorCode::KvHandoffFailed,
            Self::Tokenizer(_) => ErrorCode::InvalidRequest,
            Self::Config(_) | Self::Load(_) | Self::Tensor(_) | Self::UnknownSequence(_) | Self::DuplicateSequence(_) | Self::Device(_) => {
                ErrorCode::Internal
            }
        }
    }
}

impl From<&EngineError> for tandem_protocol::ApiError {
    fn from(e: &EngineError) -> Self {
        tandem_protocol::ApiError::new(e.code(), e.to_string())
    }
}
