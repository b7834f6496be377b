//! The model's tokenizer plus the facts about special tokens the rest of the system needs.

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use serde_json::Value as Json;

use crate::files::{ModelFiles, ModelFormat};
use crate::from_gguf::vocab_from_gguf;
use crate::template::{ChatMessage, ChatTemplate};
use crate::{Result, TokenizerError};

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(String, u32)>,
    eos: Option<String>,
    /// Every id that ends a sequence (the EOS token and e.g. `<|eot_id|>`).
    eos_ids: Vec<u32>,
    add_bos: bool,
    template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| TokenizerError::Invalid(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io { path: path.display().to_string(), source }),
    }
}

/// `tokenizer_config.json` spells special tokens either as strings or as `{"content": ...}`.
fn token_text(v: &Json) -> Option<String> {
    v.as_str().map(str::to_string).or_else(|| v["content"].as_str().map(str::to_string))
}

fn id_list(v: &Json) -> Vec<u32> {
    match v {
        Json::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Json::Array(a) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => Vec::new(),
    }
}

impl Tokenizer {
    pub fn load(files: &ModelFiles) -> Result<Self> {
        match &files.format {
            ModelFormat::Gguf(path) => Self::from_gguf_file(path),
            ModelFormat::Folder(dir) => Self::from_folder(dir),
        }
    }

    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|source| TokenizerError::Io { path: path.display().to_string(), source })?;
        let content = crate::read_gguf(&mut file)
            .map_err(|e| TokenizerError::Invalid(format!("{}: not a readable GGUF file: {e}", path.display())))?;
        Self::from_gguf(&content)
    }

    pub fn from_gguf(content: &Content) -> Result<Self> {
        let v = vocab_from_gguf(content)?;
        let name = |id: u32| v.tokenizer.id_to_token(id);
        let bos = v.bos_id.and_then(|id| name(id).map(|t| (t, id)));
        let eos = v.eos_id.and_then(name);
        let mut eos_ids: Vec<u32> = v.eos_id.into_iter().collect();
        // Chat models often end a turn with a token other than the vocabulary's EOS.
        for end_of_turn in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"] {
            if let Some(id) = v.tokenizer.token_to_id(end_of_turn) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let template = v.chat_template.map(|t| ChatTemplate::new(&t)).transpose()?;
        Ok(Self { inner: v.tokenizer, bos, eos, eos_ids, add_bos: v.add_bos, template })
    }

    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Invalid(format!("{}: {e}", path.display())))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let model_config = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);

        let bos = token_text(&config["bos_token"]).and_then(|t| inner.token_to_id(&t).map(|id| (t, id)));
        let eos = token_text(&config["eos_token"]);
        let mut eos_ids: Vec<u32> = eos.iter().filter_map(|t| inner.token_to_id(t)).collect();
        for id in id_list(&generation["eos_token_id"]).into_iter().chain(id_list(&model_config["eos_token_id"])) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        // tokenizer.json's post-processor adds BOS itself when the model wants it.
        let template = config["chat_template"].as_str().map(ChatTemplate::new).transpose()?;
        Ok(Self { inner, bos, eos, eos_ids, add_bos: false, template })
    }

    /// The tokenizer in Hugging Face's `tokenizer.json` form (what grammar engines read the
    /// vocabulary's bytes from).
    pub fn to_json(&self) -> Result<String> {
        Ok(self.inner.to_string(false)?)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|(_, id)| *id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokenizes `text` as a prompt: special tokens written in the text are recognised, and BOS
    /// is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    fn encode_with(&self, text: &str, post_process: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, post_process)?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos {
            if let Some((_, bos)) = &self.bos {
                if ids.first() != Some(bos) {
                    ids.insert(0, *bos);
                }
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.inner.decode(ids, true)?)
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders the model's own chat template.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.apply_chat_template_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders the model's own chat template with the request's tools.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| TokenizerError::Template("this model has no chat template; use a raw completion".into()))?;
        template.render_with_tools(
            messages,
            tools,
            add_generation_prompt,
            self.bos.as_ref().map(|(t, _)| t.as_str()).unwrap_or(""),
            self.eos.as_deref().unwrap_or(""),
        )
    }

    /// Whether the model's chat template renders tool definitions.
    pub fn template_takes_tools(&self) -> bool {
        self.template.as_ref().is_some_and(ChatTemplate::takes_tools)
    }

    /// The template's output tokenized. The template writes its own special tokens, so the
    /// tokenizer's post-processor is skipped and BOS is never doubled.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode_chat_with_tools(messages, None)
    }

    /// As [`Self::encode_chat`], with the request's tools.
    pub fn encode_chat_with_tools(&self, messages: &[ChatMessage], tools: Option<&serde_json::Value>) -> Result<Vec<u32>> {
        self.encode_with(&self.apply_chat_template_with_tools(messages, tools, true)?, false)
    }
}
