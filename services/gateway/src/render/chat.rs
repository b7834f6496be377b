//! `/v1/chat/completions`: a message per choice; a stream opens each choice with the
//! assistant's role and then sends content deltas.

use tandem_protocol::openai::{ChatChoice, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatMessage, ChatTokenLogprob, Role, TopLogprob};
use tandem_protocol::FinishReason;

use super::Renderer;
use crate::disagg::TokenOut;

pub(crate) struct ChatRenderer {
    logprobs: bool,
}

impl ChatRenderer {
    fn logprobs(&self, tokens: &[TokenOut]) -> Option<ChatLogprobs> {
        self.logprobs.then(|| ChatLogprobs { content: tokens.iter().map(logprob).collect() })
    }
}

fn logprob(t: &TokenOut) -> ChatTokenLogprob {
    ChatTokenLogprob::new(&t.text, t.logprob, t.top.iter().map(|(text, lp)| TopLogprob::new(text, *lp)).collect())
}

impl Renderer for ChatRenderer {
    const ID_PREFIX: &'static str = "chatcmpl";
    type Choice = ChatChoice;
    type Chunk = ChatChunkChoice;

    fn new(logprobs: bool) -> Self {
        Self { logprobs }
    }

    fn choice(&self, index: usize, text: String, tokens: &[TokenOut], finish: FinishReason) -> ChatChoice {
        ChatChoice {
            finish_reason: finish,
            index,
            logprobs: self.logprobs(tokens),
            message: ChatMessage { content: text, role: Role::Assistant },
        }
    }

    fn opening(&self, index: usize) -> Option<ChatChunkChoice> {
        let delta = ChatDelta { content: Some(String::new()), role: Some(Role::Assistant) };
        Some(ChatChunkChoice { delta, finish_reason: None, index, logprobs: None })
    }

    fn delta(&mut self, index: usize, text: String, tokens: &[TokenOut]) -> ChatChunkChoice {
        let delta = ChatDelta { content: Some(text), role: None };
        ChatChunkChoice { delta, finish_reason: None, index, logprobs: self.logprobs(tokens) }
    }

    fn finish(&self, index: usize, reason: FinishReason) -> ChatChunkChoice {
        ChatChunkChoice { delta: ChatDelta::default(), finish_reason: Some(reason), index, logprobs: None }
    }
}
