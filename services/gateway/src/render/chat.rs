//! `/v1/chat/completions`: a message per choice; a stream opens each choice with the
//! assistant's role and then sends content deltas. With `tools`, a choice's text is read for
//! tool calls: a message that is calls comes back as `tool_calls` with `finish_reason:
//! "tool_calls"`. A stream then holds the choice's text back until it ends (a call cannot be
//! told from prose before it is whole) and sends it as one delta: the calls, or the content.

use std::collections::HashMap;
use std::sync::Arc;

use tandem_protocol::openai::tools::{parse_calls, Tool, ToolCall};
use tandem_protocol::openai::{
    ChatChoice, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatMessage, ChatTokenLogprob, PromptLogprobs, Role, TopLogprob,
};
use tandem_protocol::FinishReason;

use super::{prompt_logprobs, Echo, Renderer};
use crate::disagg::{Ending, PromptTokenOut, TokenOut};

pub(crate) struct ChatRenderer {
    logprobs: bool,
    tools: Option<Arc<Vec<Tool>>>,
    /// With tools, each streamed choice's text so far.
    held: HashMap<usize, String>,
    /// `prompt_logprobs` asked, with this many alternatives; the (one) prompt as scored.
    prompt_logprobs: Option<u32>,
    scored: Option<Vec<PromptTokenOut>>,
}

impl ChatRenderer {
    fn logprobs(&self, tokens: &[TokenOut]) -> Option<ChatLogprobs> {
        self.logprobs.then(|| ChatLogprobs { content: tokens.iter().map(logprob).collect() })
    }

    /// The calls in `text`, with fresh ids, and the text around them; `None` when it holds none.
    fn calls(&self, text: &str) -> Option<(Option<String>, Vec<ToolCall>)> {
        let (rest, calls) = parse_calls(text, self.tools.as_ref()?)?;
        let calls = calls.into_iter().map(|c| ToolCall::new(format!("call_{:024x}", rand::random::<u128>() >> 32), c)).collect();
        Some((rest, calls))
    }
}

fn logprob(t: &TokenOut) -> ChatTokenLogprob {
    ChatTokenLogprob::new(&t.text, t.logprob, t.top.iter().map(|(text, lp)| TopLogprob::new(text, *lp)).collect())
}

impl Renderer for ChatRenderer {
    const ID_PREFIX: &'static str = "chatcmpl";
    type Choice = ChatChoice;
    type Chunk = ChatChunkChoice;

    fn new(logprobs: Option<u32>) -> Self {
        Self { logprobs: logprobs.is_some(), tools: None, held: HashMap::new(), prompt_logprobs: None, scored: None }
    }

    fn with_prompt(mut self, _echo: Option<Echo>, prompt_logprobs: Option<u32>) -> Self {
        self.prompt_logprobs = prompt_logprobs;
        self
    }

    fn prompt(&mut self, _index: usize, tokens: Vec<PromptTokenOut>) {
        // Every choice has the same prompt: the first scored one stands for all.
        self.scored.get_or_insert(tokens);
    }

    fn response_prompt_logprobs(&self) -> Option<PromptLogprobs> {
        Some(prompt_logprobs(self.scored.as_ref()?, self.prompt_logprobs? as usize))
    }

    fn with_tools(mut self, tools: Arc<Vec<Tool>>) -> Self {
        self.tools = Some(tools);
        self
    }

    fn choice(&self, index: usize, text: String, tokens: &[TokenOut], ending: &Ending) -> ChatChoice {
        let (message, finish_reason) = match self.calls(&text) {
            Some((content, calls)) => (ChatMessage { content, role: Role::Assistant, tool_calls: Some(calls) }, FinishReason::ToolCalls),
            None => (ChatMessage { content: Some(text), role: Role::Assistant, tool_calls: None }, ending.reason),
        };
        ChatChoice { finish_reason, index, logprobs: self.logprobs(tokens), message, stop_reason: ending.stop_reason.clone() }
    }

    fn opening(&self, index: usize) -> Option<ChatChunkChoice> {
        let delta = ChatDelta { content: Some(String::new()), role: Some(Role::Assistant), tool_calls: None };
        Some(ChatChunkChoice { delta, finish_reason: None, index, logprobs: None, stop_reason: None })
    }

    fn delta(&mut self, index: usize, text: String, tokens: &[TokenOut]) -> ChatChunkChoice {
        let content = if self.tools.is_some() {
            self.held.entry(index).or_default().push_str(&text);
            None
        } else {
            Some(text)
        };
        let delta = ChatDelta { content, role: None, tool_calls: None };
        ChatChunkChoice { delta, finish_reason: None, index, logprobs: self.logprobs(tokens), stop_reason: None }
    }

    fn finish(&mut self, index: usize, ending: &Ending) -> ChatChunkChoice {
        let reason = ending.reason;
        let held = self.held.remove(&index);
        let (delta, reason) = match held {
            None => (ChatDelta::default(), reason),
            Some(text) => match self.calls(&text) {
                Some((content, calls)) => {
                    let calls = calls.into_iter().enumerate().map(|(i, c)| c.delta(i)).collect();
                    (ChatDelta { content, role: None, tool_calls: Some(calls) }, FinishReason::ToolCalls)
                }
                None => (ChatDelta { content: Some(text), role: None, tool_calls: None }, reason),
            },
        };
        ChatChunkChoice { delta, finish_reason: Some(reason), index, logprobs: None, stop_reason: Some(ending.stop_reason.clone()) }
    }
}
