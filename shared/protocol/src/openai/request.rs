//! OpenAI-compatible request bodies. Unknown fields are accepted and ignored, as OpenAI does;
//! every known field is checked by the gateway before any work starts.

use serde::Deserialize;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A message's content: text, or a list of parts of which only text parts are understood.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
    /// An assistant message's calls, as an earlier response gave them.
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// Sampling fields shared by both endpoints, including the extensions vLLM users expect.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    pub stop: Option<StopSpec>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<u32>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// OpenAI's `logit_bias`: token id (as a string key) to a bias from −100 to 100.
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    /// vLLM's `prompt_logprobs`: score the prompt, with this many alternatives per position.
    pub prompt_logprobs: Option<u32>,
    /// Structured output (`response_format`, vLLM's `guided_*` and `structured_outputs`).
    #[serde(flatten)]
    pub output_format: crate::constraint::OutputFormatFields,
    /// Parameters clients send that this server does not carry out yet. Read only to refuse
    /// them by name: ignoring them would answer with something the client did not ask for.
    #[serde(flatten)]
    pub unsupported: UnsupportedFields,
}

/// See [`SamplingFields::unsupported`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UnsupportedFields {
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub functions: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
    pub best_of: Option<serde_json::Value>,
}

impl UnsupportedFields {
    /// The first parameter set to something other than its no-op value, and why it is refused.
    /// `n` is the request's choices (a `best_of` equal to it asks for nothing more).
    pub fn first(&self, n: u32) -> Option<(&'static str, String)> {
        use serde_json::Value;
        let set = |v: &Option<Value>| match v {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        let not_yet = |what: &str| format!("{what} is not supported by this server yet; the answer would not follow it");
        // Chat reads `tools` and `tool_choice` itself; here they are a completion's.
        for (name, v) in [("tools", &self.tools), ("tool_choice", &self.tool_choice)] {
            if set(v) && !matches!(v.as_ref().and_then(Value::as_str), Some("none" | "auto")) {
                return Some((name, "tool calling is for /v1/chat/completions".to_string()));
            }
        }
        if set(&self.functions) {
            return Some(("functions", not_yet("the legacy `functions` API (use `tools`)")));
        }
        if set(&self.function_call) && !matches!(self.function_call.as_ref().and_then(Value::as_str), Some("none" | "auto")) {
            return Some(("function_call", not_yet("the legacy `function_call` API (use `tool_choice`)")));
        }
        if let Some(b) = &self.best_of {
            if !b.is_null() && b.as_u64() != Some(u64::from(n)) {
                return Some(("best_of", not_yet("`best_of` larger than `n`")));
            }
        }
        None
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    /// Functions the model may call (see [`super::tools`]).
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `prompt`: text, a list of texts, token ids, or a list of token-id lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptSpec,
    pub max_tokens: Option<u32>,
    /// 0 to 5 alternatives per position (OpenAI's legacy completions).
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_shapes_clients_send() {
        let r: ChatCompletionRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],
                "stop":"x","stream":true,"stream_options":{"include_usage":true},"top_k":-1,"user":"u"}"#,
        )
        .unwrap();
        assert!(matches!(r.sampling.stop, Some(StopSpec::One(_))));
        assert_eq!(r.sampling.top_k, Some(-1));
        let c: CompletionRequest = serde_json::from_str(r#"{"model":"m","prompt":[1,2,3],"logprobs":2}"#).unwrap();
        assert!(matches!(c.prompt, PromptSpec::Tokens(ref t) if t == &[1, 2, 3]));
    }

    #[test]
    fn parameters_not_carried_out_are_named_and_no_ops_pass() {
        let first = |body: &str| {
            let r: ChatCompletionRequest = serde_json::from_str(body).unwrap();
            r.sampling.unsupported.first(r.sampling.n.unwrap_or(1)).map(|(name, _)| name)
        };
        let base = r#""model":"m","messages":[]"#;
        for (extra, refused) in [
            (r#""response_format":{"type":"json_object"}"#, None),
            (r#""tools":[{"type":"function","function":{"name":"f"}}]"#, None),
            (r#""functions":[{"name":"f"}]"#, Some("functions")),
            (r#""logit_bias":{"50256":-100}"#, None),
            (r#""best_of":3"#, Some("best_of")),
            (r#""best_of":2,"n":2"#, None),
            (r#""guided_choice":["a","b"]"#, None),
        ] {
            assert_eq!(first(&format!("{{{base},{extra}}}")), refused, "{extra}");
        }
    }
}
