//! Text in and out of a model: tokenization (from `tokenizer.json` or GGUF metadata), chat
//! templates, incremental detokenization and stop strings. Shared by the gateway and the engine,
//! so the gateway never links the engine.
#![forbid(unsafe_code)]

pub mod default_model;
mod files;
mod from_gguf;
mod stream;
mod template;
mod tokenizer;

pub use files::{ModelFiles, ModelFormat};
pub use stream::{DecodeStream, StopMatcher};
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::Tokenizer;

/// Everything that can go wrong turning text into tokens and back.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("model not found: {0}")]
    ModelNotFound(String),
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid model files: {0}")]
    Invalid(String),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("model download failed: {0}")]
    Download(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// Reads a GGUF file's header and metadata (what `Content::read` reads). A header the reader
/// cannot take is an error, also where the reader panics instead of failing (candle 0.11 divides
/// by a `general.alignment` of 0): a model file comes from outside, and a bad one must be refused,
/// not bring the process down.
pub fn read_gguf<R: std::io::Read + std::io::Seek>(
    reader: &mut R,
) -> std::result::Result<candle_core::quantized::gguf_file::Content, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| candle_core::quantized::gguf_file::Content::read(reader)))
        .map_err(|_| "the GGUF reader failed on its header".to_string())?
        .map_err(|e| e.to_string())
}

impl From<tokenizers::Error> for TokenizerError {
    fn from(e: tokenizers::Error) -> Self {
        TokenizerError::Tokenizer(e.to_string())
    }
}
