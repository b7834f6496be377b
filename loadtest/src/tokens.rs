//! Token counts from the model's own tokenizer, never from characters.

use std::path::{Path, PathBuf};

use tandem_tokenizer::default_model::{model_dir, DEFAULT_MODEL};
use tandem_tokenizer::{ModelFiles, Tokenizer};

use crate::{LoadtestError, Result};

/// The tokenizer files fetched from the hub: `tokenizer.json` is needed, the rest are read
/// when present (special tokens, BOS and EOS).
const HUB_FILES: [&str; 3] = ["tokenizer_config.json", "config.json", "generation_config.json"];

/// The file of `tandem up`'s default model, in its model folder.
pub fn default_tokenizer_path() -> PathBuf {
    model_dir().join(format!("{DEFAULT_MODEL}.Q4_1.gguf"))
}

/// Loads the tokenizer `spec` names: a local `.gguf`, `tokenizer.json` or model folder; a
/// Hugging Face hub id (`org/name`), whose tokenizer files are read from the hub's cache or
/// fetched into it (`HF_HOME`, `HF_ENDPOINT` and `HF_TOKEN` apply); or the name a model in
/// Tandem's model folder is served under (`SmolLM2-135M-Instruct`). Blocks while it downloads.
pub fn resolve_tokenizer(spec: &str) -> Result<Tokenizer> {
    let path = Path::new(spec);
    if path.exists() {
        return load_tokenizer(path);
    }
    if let Some(local) = in_model_dir(spec) {
        return load_tokenizer(&local);
    }
    if is_hub_id(spec) {
        return from_hub(spec);
    }
    Err(LoadtestError::Config(format!(
        "tokenizer {spec} does not exist (neither a file, a folder, a hub id nor a model in {})",
        model_dir().display()
    )))
}

/// `org/name`, and not written as a path or a file name.
fn is_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let shaped = matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty());
    let file =
        Path::new(spec).extension().is_some_and(|e| ["gguf", "json", "safetensors", "bin"].iter().any(|x| e.eq_ignore_ascii_case(x)));
    shaped && !file && !spec.starts_with(['.', '/', '~']) && !spec.contains('\\') && !spec.chars().any(char::is_whitespace)
}

/// A model of Tandem's model folder served as `name`: the folder `name`, the file `name.gguf`,
/// or `name.<quantization>.gguf` (`tandem up` serves a file under its stem, its default model
/// under its short name).
fn in_model_dir(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return None;
    }
    let dir = model_dir();
    let folder = dir.join(name);
    if folder.join("tokenizer.json").is_file() {
        return Some(folder);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "gguf"))
        .filter(|p| {
            p.file_stem().and_then(|s| s.to_str()).is_some_and(|s| s == name || s.strip_prefix(name).is_some_and(|r| r.starts_with('.')))
        })
        .collect();
    files.sort();
    files.into_iter().next()
}

/// The tokenizer of a hub model, from the hub's cache when it is there, else fetched.
fn from_hub(id: &str) -> Result<Tokenizer> {
    let cached = hf_hub::Cache::from_env().model(id.to_string());
    let dir = match cached.get("tokenizer.json") {
        Some(file) => file.parent().map(Path::to_path_buf),
        None => {
            let fail = |e: hf_hub::api::sync::ApiError| LoadtestError::Config(format!("tokenizer {id} from the Hugging Face hub: {e}"));
            let mut api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(false);
            if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
                api = api.with_token(Some(token.trim().to_string()));
            }
            let repo = api.build().map_err(fail)?.model(id.to_string());
            let file = repo.get("tokenizer.json").map_err(fail)?;
            for optional in HUB_FILES {
                // Absent files are fine: not every model has them.
                let _ = repo.get(optional);
            }
            file.parent().map(Path::to_path_buf)
        }
    };
    let dir = dir.ok_or_else(|| LoadtestError::Config(format!("tokenizer {id}: no folder for its files")))?;
    Ok(Tokenizer::from_folder(&dir)?)
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

#[cfg(test)]
mod resolve_tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        for id in ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"] {
            assert!(is_hub_id(id), "{id}");
        }
        for not in ["./a/b", "/a/b", "~/m/x", "a/b/c", "models/x.gguf", "org/tokenizer.json", "SmolLM2", "a/"] {
            assert!(!is_hub_id(not), "{not}");
        }
    }

    #[test]
    fn a_missing_spec_names_itself() {
        let err = resolve_tokenizer("/nonexistent/model.gguf").expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/model.gguf does not exist"), "{err}");
        let err = resolve_tokenizer("no-such-served-model").expect_err("missing");
        assert!(err.to_string().contains("no-such-served-model does not exist"), "{err}");
    }
}
