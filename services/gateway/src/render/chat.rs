//! `/v1/chat/completions`: a message per choice; a stream opens each choice with the
//! assistant's role and then sends content deltas. With `tools`, a choice's text is read for
//! tool calls: a message that is calls comes back as `tool_calls` with `finish_reason:
//! "tool_calls"`. A stream reads the text as it comes ([`CallStream`]): prose goes out as content
//! deltas, and a call as OpenAI streams one, its id and name in one chunk, then its arguments in
//! fragments as the model writes them.

use std::collections::HashMap;
use std::sync::Arc;

use tandem_protocol::openai::tools::{parse_calls, CallStream, Piece, Tool, ToolCall, ToolCallDelta};
use tandem_protocol::openai::{
    ChatChoice, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatMessage, ChatTokenLogprob, PromptLogprobs, Role, TopLogprob,
};
use tandem_protocol::FinishReason;

use super::{prompt_logprobs, Echo, Renderer};
use crate::disagg::{Ending, PromptTokenOut, TokenOut};

pub(crate) struct ChatRenderer {
    logprobs: bool,
    tools: Option<Arc<Vec<Tool>>>,
    /// With tools, each streamed choice's reading of its text so far.
    streams: HashMap<usize, CallStream>,
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
        let calls = calls.into_iter().map(|c| ToolCall::new(call_id(), c)).collect();
        Some((rest, calls))
    }

    /// A stream's delta from what its text was read as: content and call parts.
    fn streamed(pieces: Vec<Piece>) -> ChatDelta {
        let (mut content, mut calls) = (None::<String>, Vec::<ToolCallDelta>::new());
        for p in pieces {
            match p {
                Piece::Content(c) => content.get_or_insert_with(String::new).push_str(&c),
                Piece::Call { index, name } => calls.push(ToolCallDelta::opening(index, call_id(), name)),
                Piece::Arguments { index, fragment } => match calls.last_mut() {
                    Some(last) if last.index == index => last.function.arguments.push_str(&fragment),
                    _ => calls.push(ToolCallDelta::arguments(index, fragment)),
                },
            }
        }
        ChatDelta { content, role: None, tool_calls: (!calls.is_empty()).then_some(calls) }
    }
}

fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

fn logprob(t: &TokenOut) -> ChatTokenLogprob {
    ChatTokenLogprob::new(&t.text, t.logprob, t.top.iter().map(|(text, lp)| TopLogprob::new(text, *lp)).collect())
}

impl Renderer for ChatRenderer {
    const ID_PREFIX: &'static str = "chatcmpl";
    type Choice = ChatChoice;
    type Chunk = ChatChunkChoice;

    fn new(logprobs: Option<u32>) -> Self {
        Self { logprobs: logprobs.is_some(), tools: None, streams: HashMap::new(), prompt_logprobs: None, scored: None }
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
        let delta = match (&self.tools, self.streams.get_mut(&index)) {
            (None, _) => ChatDelta { content: Some(text), role: None, tool_calls: None },
            (Some(_), Some(stream)) => Self::streamed(stream.push(&text)),
            (Some(tools), None) => {
                let mut stream = CallStream::new(tools.iter().map(|t| t.function.name.clone()).collect());
                let pieces = stream.push(&text);
                self.streams.insert(index, stream);
                Self::streamed(pieces)
            }
        };
        ChatChunkChoice { delta, finish_reason: None, index, logprobs: self.logprobs(tokens), stop_reason: None }
    }

    fn finish(&mut self, index: usize, ending: &Ending) -> ChatChunkChoice {
        let (delta, reason) = match self.streams.remove(&index) {
            None => (ChatDelta::default(), ending.reason),
            Some(mut stream) => {
                let delta = Self::streamed(stream.finish());
                (delta, if stream.calls() > 0 { FinishReason::ToolCalls } else { ending.reason })
            }
        };
        ChatChunkChoice { delta, finish_reason: Some(reason), index, logprobs: None, stop_reason: Some(ending.stop_reason.clone()) }
    }
}
