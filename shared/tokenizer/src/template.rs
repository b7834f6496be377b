//! Chat templates: the model's own Jinja template rendered with minijinja.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Result, TokenizerError};

/// One message of a conversation, content already flattened to text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's tool calls (OpenAI's shape), for templates that render them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: None, tool_call_id: None }
    }
}

/// A compiled chat template; cheap to clone.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<minijinja::Environment<'static>>,
    takes_tools: bool,
}

const NAME: &str = "chat";

/// Instructions one render may run. A chat template comes with the model, not from clients, but
/// a broken or hostile one (nested loops over `range(100000)`) must fail a request rather than
/// hold its thread: the fuel ends any render after a second or so. Real templates spend a few
/// dozen instructions a message, so this leaves room for conversations far larger than any
/// request body the gateway accepts.
const TEMPLATE_FUEL: u64 = 50_000_000;

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // The settings Hugging Face renders templates with.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        // minijinja's default (and ceiling) recursion limit, said here so it stays a decision:
        // a macro that calls itself fails at this depth instead of overflowing the stack.
        env.set_recursion_limit(500);
        // Python string methods (`.strip()`, `.startswith()`, ...) that templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_string()).map_err(|e| TokenizerError::Template(e.to_string()))?;
        // Templates that render tool definitions read a `tools` variable (as transformers passes
        // it); one that never mentions it would drop them.
        Ok(Self { env: Arc::new(env), takes_tools: source.contains("tools") })
    }

    /// Whether the template renders the `tools` it is given.
    pub fn takes_tools(&self) -> bool {
        self.takes_tools
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool, bos_token: &str, eos_token: &str) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt, bos_token, eos_token)
    }

    /// As [`Self::render`], with the request's tools (OpenAI's `tools` list) as `tools`.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let template = self.env.get_template(NAME).map_err(|e| TokenizerError::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
            .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_default_system_prompt() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let out = t.render(&[ChatMessage::new("user", " Hi ")], true, "", "").unwrap();
        assert_eq!(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let out = t.render(&[ChatMessage::new("system", "S"), ChatMessage::new("user", "U")], false, "", "").unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new("{% if messages[0]['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}ok").unwrap();
        let err = t.render(&[ChatMessage::new("tool", "x")], true, "", "").unwrap_err();
        assert!(err.to_string().contains("no tools"), "{err}");
        assert_eq!(t.render(&[ChatMessage::new("user", "x")], true, "", "").unwrap(), "ok");
    }
}
