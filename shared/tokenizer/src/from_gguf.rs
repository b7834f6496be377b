//! Rebuilding a Hugging Face tokenizer from the vocabulary GGUF files carry in their metadata.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::{Result, TokenizerError};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

// Pre-tokenizer split patterns published with the Llama 3 and Qwen 2 tokenizers.
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What the GGUF metadata says about special tokens, beside the tokenizer itself.
pub(crate) struct GgufVocab {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

pub(crate) fn meta<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn meta_u32(content: &Content, key: &str) -> Option<u32> {
    meta(content, key).and_then(|v| v.to_u32().ok().or_else(|| v.to_i32().ok().map(|x| x as u32)))
}

fn string_array(content: &Content, key: &str) -> Result<Vec<String>> {
    let values = meta(content, key)
        .ok_or_else(|| TokenizerError::Invalid(format!("gguf has no {key}")))?
        .to_vec()
        .map_err(|e| TokenizerError::Invalid(format!("{key}: {e}")))?;
    values.iter().map(|v| v.to_string().cloned().map_err(|e| TokenizerError::Invalid(format!("{key}: {e}")))).collect()
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)?.into())
    };
    Ok(match pre {
        // SmolLM: every digit on its own, then GPT-2's byte-level split.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into(),
        "llama-bpe" | "llama3" | "smaug-bpe" => Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level(false).into()]).into(),
        "qwen2" => Sequence::new(vec![split(QWEN2_SPLIT)?, byte_level(false).into()]).into(),
        "gpt2" | "default" => byte_level(true).into(),
        other => {
            return Err(TokenizerError::Unsupported(format!("gguf pre-tokenizer `{other}` (supported: smollm, llama-bpe, qwen2, gpt2)")))
        }
    })
}

pub(crate) fn vocab_from_gguf(content: &Content) -> Result<GgufVocab> {
    let model = meta(content, "tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    if model != "gpt2" {
        return Err(TokenizerError::Unsupported(format!(
            "gguf tokenizer model `{model}`: only byte-level BPE (`gpt2`) vocabularies are read from GGUF; \
             use the safetensors folder with tokenizer.json for this model"
        )));
    }
    let tokens = string_array(content, "tokenizer.ggml.tokens")?;
    let merges = string_array(content, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TokenizerError::Invalid(format!("bad merge `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build()?;

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let pre = meta(content, "tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_else(|| "gpt2".into());
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    // Control and user-defined tokens are matched whole in the input, never split by BPE.
    if let Some(types) = meta(content, "tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        let special: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let t = t.to_i32().map(|x| x as u32).or_else(|_| t.to_u32()).ok()?;
                // `get`: the type list may be longer than the token list in a broken file.
                let token = tokens.get(i)?;
                (t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED).then(|| AddedToken::from(token.clone(), true))
            })
            .collect();
        tokenizer.add_special_tokens(special)?;
    }

    Ok(GgufVocab {
        tokenizer,
        bos_id: meta_u32(content, "tokenizer.ggml.bos_token_id"),
        eos_id: meta_u32(content, "tokenizer.ggml.eos_token_id"),
        add_bos: meta(content, "tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
        chat_template: meta(content, "tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
    })
}
