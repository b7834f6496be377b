//! Token counts from the model's own tokenizer, never from characters.

use std::path::{Path, PathBuf};

use tandem_tokenizer::{ModelFiles, Tokenizer};

use crate::{LoadtestError, Result};

/// Where `tandem up` keeps its default model; its tokenizer is ours by default.
pub fn default_tokenizer_path() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Loads a `.gguf` file, a `tokenizer.json` (its folder's `tokenizer_config.json` is read when
/// present), or a model folder.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(LoadtestError::Config(format!("tokenizer {} does not exist", path.display())));
    }
    if path.is_file() && path.extension().is_some_and(|e| e == "json") {
        if path.file_name().is_some_and(|n| n != "tokenizer.json") {
            return Err(LoadtestError::Config(format!("{}: a tokenizer file must be named tokenizer.json", path.display())));
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        return Ok(Tokenizer::from_folder(dir)?);
    }
    let spec = path.to_str().ok_or_else(|| LoadtestError::Config(format!("{}: path is not UTF-8", path.display())))?;
    Ok(Tokenizer::load(&ModelFiles::resolve(spec)?)?)
}

/// Counts tokens of prompts and of generated text.
#[derive(Debug, Clone)]
pub struct TokenCounter {
    tokenizer: Tokenizer,
    /// Tokens the tokenizer adds to any text (BOS); a prompt carries them, a completion does not.
    overhead: usize,
}

impl TokenCounter {
    pub fn new(tokenizer: Tokenizer) -> Result<Self> {
        let overhead = tokenizer.encode("")?.len();
        Ok(Self { tokenizer, overhead })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokens of the text as a prompt, BOS included when the model adds one.
    pub fn prompt_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.tokenizer.encode(text)?.len())
    }

    /// Tokens of generated text, without the prompt-only BOS.
    pub fn completion_tokens(&self, text: &str) -> Result<usize> {
        if text.is_empty() {
            return Ok(0);
        }
        Ok(self.tokenizer.encode(text)?.len().saturating_sub(self.overhead))
    }

    /// Prompt ids without the tokens the tokenizer adds itself.
    pub fn body_ids(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode(text)?;
        Ok(ids[self.overhead.min(ids.len())..].to_vec())
    }

    pub fn overhead(&self) -> usize {
        self.overhead
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.tokenizer.decode(ids)?)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }
}
