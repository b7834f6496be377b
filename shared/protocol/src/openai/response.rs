//! OpenAI-compatible response bodies and stream chunks, as the gateway writes them.
//!
//! Fields are declared in alphabetical order because that is the order they have always reached
//! the wire in (the gateway once built these bodies as `serde_json::Value`s, whose maps sort their
//! keys), and keeping it keeps every response byte for byte what clients have seen. Logprobs are
//! `f64` for the same reason: the engine's `f32` values went out widened (`-0.10000000149011612`,
//! not `-0.1`); a value that is not finite (an impossible alternative) is written as `null`. A
//! field OpenAI sends as `null` is an `Option` that serializes as `null`; only fields some
//! messages leave out altogether (a chat delta's `role`, a chunk's `usage`) skip serializing.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::FinishReason;

/// A choice type, and the `object` of the response or chunk that carries it.
pub trait Choice: Serialize {
    const OBJECT: &'static str;
}

/// Token counts of a whole request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub completion_tokens: usize,
    pub prompt_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from a cache (the prefill worker's, or the block store's)
    /// rather than being computed.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            completion_tokens,
            prompt_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A whole response (`stream: false`): `chat.completion` or `text_completion`.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse<C> {
    pub choices: Vec<C>,
    pub created: u64,
    pub id: String,
    pub model: String,
    pub object: &'static str,
    /// Chat with `prompt_logprobs` (vLLM's field): the prompt's log-probabilities, once for the
    /// request (a completion has them per choice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
    /// `null`, as vLLM leaves it: nothing here names a backend configuration.
    pub system_fingerprint: Option<String>,
    pub usage: Usage,
}

impl<C: Choice> CompletionResponse<C> {
    pub fn new(id: impl Into<String>, created: u64, model: impl Into<String>, choices: Vec<C>, usage: Usage) -> Self {
        Self {
            choices,
            created,
            id: id.into(),
            model: model.into(),
            object: C::OBJECT,
            prompt_logprobs: None,
            system_fingerprint: None,
            usage,
        }
    }
}

/// vLLM's `prompt_logprobs`: per prompt token, `null` for the first (nothing precedes it), then
/// a map from token id to its log-probability, rank and text: the prompt's own token and the
/// most likely alternatives.
pub type PromptLogprobs = Vec<Option<BTreeMap<String, PromptLogprob>>>;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptLogprob {
    pub decoded_token: String,
    pub logprob: f64,
    /// 1 + how many tokens were more likely.
    pub rank: u32,
}

/// vLLM's `stop_reason`: the stop string or stop token id that ended a choice; `null` when it
/// ended at end-of-sequence or for length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum StopReason {
    Text(String),
    Token(u32),
}

/// One event of a streamed response: `chat.completion.chunk` or `text_completion`.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChunk<C> {
    pub choices: Vec<C>,
    pub created: u64,
    pub id: String,
    pub model: String,
    pub object: &'static str,
    /// Absent unless the client asked for `stream_options.include_usage`; then `null` in every
    /// chunk but the last, which has no choices and carries the usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

impl<C: Choice> CompletionChunk<C> {
    pub fn new(id: impl Into<String>, created: u64, model: impl Into<String>, choices: Vec<C>, usage: Option<Option<Usage>>) -> Self {
        Self { choices, created, id: id.into(), model: model.into(), object: C::OBJECT, usage }
    }
}

pub type ChatCompletion = CompletionResponse<ChatChoice>;
pub type ChatCompletionChunk = CompletionChunk<ChatChunkChoice>;
pub type TextCompletion = CompletionResponse<CompletionChoice>;
pub type TextCompletionChunk = CompletionChunk<CompletionChoice>;

/// Who wrote a chat message; the gateway only ever writes as the assistant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Assistant,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub finish_reason: FinishReason,
    pub index: usize,
    pub logprobs: Option<ChatLogprobs>,
    pub message: ChatMessage,
    pub stop_reason: Option<StopReason>,
}

impl Choice for ChatChoice {
    const OBJECT: &'static str = "chat.completion";
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    /// `null` when the message is only tool calls.
    pub content: Option<String>,
    pub role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<super::tools::ToolCall>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub delta: ChatDelta,
    pub finish_reason: Option<FinishReason>,
    pub index: usize,
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the finishing chunk only (absent before it, as a stream's chunks go out before
    /// anything is known of how the choice ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Option<StopReason>>,
}

impl Choice for ChatChunkChoice {
    const OBJECT: &'static str = "chat.completion.chunk";
}

/// What a chunk adds to a chat message: the role once, when the choice opens, then content;
/// the finishing chunk's delta is empty (`{}`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<super::tools::ToolCallDelta>>,
}

/// Chat logprobs: one entry per sampled token.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub bytes: Vec<u8>,
    pub logprob: f64,
    pub token: String,
    /// The most likely alternatives at this position, the sampled token among them if it was.
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub bytes: Vec<u8>,
    pub logprob: f64,
    pub token: String,
}

impl TopLogprob {
    pub fn new(token: &str, logprob: f32) -> Self {
        Self { bytes: token.as_bytes().to_vec(), logprob: logprob.into(), token: token.to_string() }
    }
}

impl ChatTokenLogprob {
    pub fn new(token: &str, logprob: f32, top_logprobs: Vec<TopLogprob>) -> Self {
        Self { bytes: token.as_bytes().to_vec(), logprob: logprob.into(), token: token.to_string(), top_logprobs }
    }
}

/// A text completion's choice, whole or as a chunk (the legacy endpoint streams the same shape).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub finish_reason: Option<FinishReason>,
    pub index: usize,
    pub logprobs: Option<CompletionLogprobs>,
    /// With `prompt_logprobs` (vLLM's field; not streamed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
    /// Whole choices always carry it; a stream's chunks only the finishing one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Option<StopReason>>,
    pub text: String,
}

impl Choice for CompletionChoice {
    const OBJECT: &'static str = "text_completion";
}

/// Legacy completion logprobs: parallel lists, one position per token (with `echo`, the
/// prompt's tokens first, the very first of them with `null`s: nothing precedes it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Where each token's text starts in the choice's text.
    pub text_offset: Vec<usize>,
    pub token_logprobs: Vec<Option<f64>>,
    pub tokens: Vec<String>,
    /// Alternatives by their text; two that decode alike share one entry.
    pub top_logprobs: Vec<Option<BTreeMap<String, f64>>>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub data: Vec<Model>,
    pub object: &'static str,
}

impl ModelList {
    pub fn new(data: Vec<Model>) -> Self {
        Self { data, object: "list" }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Model {
    pub created: u64,
    pub id: String,
    /// The context length of the workers serving it; `null` while none answers.
    pub max_model_len: Option<usize>,
    pub object: &'static str,
    pub owned_by: String,
    /// The model this id serves (vLLM's field, which its benchmark reads for the tokenizer when
    /// no model is named); no parent, as no adapters are served.
    pub parent: Option<String>,
    pub root: String,
}

impl Model {
    pub fn new(id: impl Into<String>, created: u64, owned_by: impl Into<String>, max_model_len: Option<usize>) -> Self {
        let id = id.into();
        Self { created, root: id.clone(), id, max_model_len, object: "model", owned_by: owned_by.into(), parent: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(v: &impl Serialize) -> String {
        serde_json::to_string(v).unwrap()
    }

    fn chunk(usage: Option<Option<Usage>>) -> String {
        json(&ChatCompletionChunk::new("chatcmpl-1", 1700000000, "m", Vec::new(), usage))
    }

    #[test]
    fn a_chunk_has_usage_only_when_asked_and_null_until_the_last() {
        let head = r#"{"choices":[],"created":1700000000,"id":"chatcmpl-1","model":"m","object":"chat.completion.chunk""#;
        assert_eq!(chunk(None), format!("{head}}}"));
        assert_eq!(chunk(Some(None)), format!(r#"{head},"usage":null}}"#));
        assert_eq!(
            chunk(Some(Some(Usage::new(5, 2, 3)))),
            format!(
                r#"{head},"usage":{{"completion_tokens":2,"prompt_tokens":5,"prompt_tokens_details":{{"cached_tokens":3}},"total_tokens":7}}}}"#
            )
        );
    }

    #[test]
    fn a_chat_delta_leaves_out_what_it_does_not_add() {
        let role = ChatDelta { content: Some(String::new()), role: Some(Role::Assistant), tool_calls: None };
        assert_eq!(json(&role), r#"{"content":"","role":"assistant"}"#);
        assert_eq!(json(&ChatDelta { content: Some("Hi".into()), role: None, tool_calls: None }), r#"{"content":"Hi"}"#);
        assert_eq!(json(&ChatDelta::default()), "{}");
    }

    #[test]
    fn logprobs_keep_their_widened_digits_and_an_impossible_token_is_null() {
        let t = TopLogprob::new("Hi", -0.1);
        assert_eq!(json(&t), r#"{"bytes":[72,105],"logprob":-0.10000000149011612,"token":"Hi"}"#);
        assert_eq!(json(&TopLogprob::new(" é", f32::NEG_INFINITY)), r#"{"bytes":[32,195,169],"logprob":null,"token":" é"}"#);
    }

    #[test]
    fn the_model_list() {
        let list = ModelList::new(vec![Model::new("m", 1700000000, "tandem", Some(4096))]);
        assert_eq!(
            json(&list),
            r#"{"data":[{"created":1700000000,"id":"m","max_model_len":4096,"object":"model","owned_by":"tandem","parent":null,"root":"m"}],"object":"list"}"#
        );
        let list = ModelList::new(vec![Model::new("m", 1700000000, "tandem", None)]);
        assert!(json(&list).contains(r#""max_model_len":null"#));
    }
}
