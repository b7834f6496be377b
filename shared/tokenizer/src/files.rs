//! Resolving what the user named (`--model PATH_OR_ID`) into files on disk.

use std::path::{Path, PathBuf};

use crate::{Result, TokenizerError};

/// How the weights are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// One `.gguf` file holding weights, tokenizer and chat template.
    Gguf(PathBuf),
    /// A folder with `config.json`, `*.safetensors`, `tokenizer.json` and optionally
    /// `tokenizer_config.json` / `generation_config.json`.
    Folder(PathBuf),
}

/// A model located on disk, plus the name clients will call it by.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub format: ModelFormat,
    /// Served model name: the file stem or folder name, or the hub id.
    pub name: String,
}

const FOLDER_FILES: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL_FILES: &[&str] = &["tokenizer_config.json", "generation_config.json"];

impl ModelFiles {
    /// A local `.gguf` file, a local folder, or a Hugging Face hub id (`org/name`), which is
    /// downloaded through the hub client into its usual cache. A missing local path (a model
    /// file name, `./x`, `/x`, or `dir/x` where `dir` exists) is reported missing, even when it
    /// has the shape of a hub id.
    pub fn resolve(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
                return Err(TokenizerError::Invalid(format!("{spec}: a model file must end in .gguf")));
            }
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or(spec).to_string();
            return Ok(Self { format: ModelFormat::Gguf(path.to_path_buf()), name });
        }
        if path.is_dir() {
            for f in FOLDER_FILES {
                if !path.join(f).is_file() {
                    return Err(TokenizerError::Invalid(format!("{spec}: missing {f}")));
                }
            }
            let name = path
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().and_then(|s| s.to_str()).map(str::to_string))
                .unwrap_or_else(|| spec.to_string());
            return Ok(Self { format: ModelFormat::Folder(path.to_path_buf()), name });
        }
        if looks_like_path(spec) {
            return Err(TokenizerError::ModelNotFound(format!("{spec}: no such file or folder")));
        }
        if looks_like_hub_id(spec) {
            return Self::from_hub(spec);
        }
        Err(TokenizerError::ModelNotFound(format!("{spec} is neither a .gguf file, a model folder nor a hub id (org/name)")))
    }

    fn from_hub(id: &str) -> Result<Self> {
        let dl = |e: hf_hub::api::sync::ApiError| TokenizerError::Download(format!("{id}: {e}"));
        let api = hub_api().build().map_err(dl)?;
        let repo = api.model(id.to_string());
        let config = repo.get("config.json").map_err(dl)?;
        for f in &FOLDER_FILES[1..] {
            repo.get(f).map_err(dl)?;
        }
        for f in OPTIONAL_FILES {
            // Optional: absent files are fine.
            let _ = repo.get(f);
        }
        let index = repo.get("model.safetensors.index.json");
        let shards: Vec<String> = match index {
            Ok(index) => {
                let text =
                    std::fs::read_to_string(&index).map_err(|source| TokenizerError::Io { path: index.display().to_string(), source })?;
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TokenizerError::Invalid(e.to_string()))?;
                let mut files: Vec<String> = v["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|f| f.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                files.sort();
                files.dedup();
                files
            }
            Err(_) => vec!["model.safetensors".to_string()],
        };
        for shard in &shards {
            repo.get(shard).map_err(dl)?;
        }
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self { format: ModelFormat::Folder(dir), name: id.to_string() })
    }
}

/// Whether `spec`, which names nothing on disk, was still meant as a local path: it ends like a
/// model file, is written as a path (`./`, `../`, `/`, `~`), or starts in a folder that exists
/// here (`models/x` with a `models` folder). Such a spec is reported missing, not downloaded.
fn looks_like_path(spec: &str) -> bool {
    let path = Path::new(spec);
    let model_file = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["gguf", "safetensors", "json", "bin"].iter().any(|x| e.eq_ignore_ascii_case(x)));
    let written_as_path = spec.starts_with(['.', '/', '~']) || spec.contains('\\') || path.is_absolute();
    let partly_there = path.ancestors().skip(1).any(|a| !a.as_os_str().is_empty() && a.exists());
    model_file || written_as_path || partly_there
}

fn looks_like_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() && !a.starts_with('.'))
}

/// The hub client as the Hugging Face tools configure it: the cache under `HF_HOME` (default
/// `~/.cache/huggingface`), the endpoint from `HF_ENDPOINT`, and the token from `HF_TOKEN`, else
/// the token file `huggingface-cli login` writes.
fn hub_api() -> hf_hub::api::sync::ApiBuilder {
    let api = hf_hub::api::sync::ApiBuilder::from_env();
    match std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        Some(token) => api.with_token(Some(token.trim().to_string())),
        None => api,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_path_is_a_clear_error() {
        let err = ModelFiles::resolve("/nonexistent/model.gguf").unwrap_err();
        assert!(matches!(err, TokenizerError::ModelNotFound(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/model.gguf: no such file or folder"), "{err}");
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_hub_id("./a/b"));
        assert!(!looks_like_hub_id("a/b/c"));
    }

    #[test]
    fn a_missing_relative_path_is_not_taken_for_a_hub_id() {
        // `org/name` in shape, but a model file name: reported missing, never downloaded.
        for spec in ["models/x.gguf", "org/model.safetensors", "models/X.GGUF"] {
            let err = ModelFiles::resolve(spec).unwrap_err();
            assert!(matches!(err, TokenizerError::ModelNotFound(_)), "{spec}: {err}");
            assert!(err.to_string().contains(&format!("{spec}: no such file or folder")), "{err}");
        }
        // A folder that does not exist inside one that does (tests run in the crate's folder).
        assert!(Path::new("src").is_dir());
        let err = ModelFiles::resolve("src/no-such-model").unwrap_err();
        assert!(err.to_string().contains("src/no-such-model: no such file or folder"), "{err}");
        for spec in ["./a/b", "../a/b", "/a/b", "~/models/m", "model.gguf", "src/x"] {
            assert!(looks_like_path(spec), "{spec} is a path");
        }
        // Genuine hub ids still go to the hub.
        for spec in ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B"] {
            assert!(!looks_like_path(spec), "{spec} is a hub id");
            assert!(looks_like_hub_id(spec), "{spec} is a hub id");
        }
    }
}
