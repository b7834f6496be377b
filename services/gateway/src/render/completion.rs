//! `/v1/completions`: text per choice, streamed in the same shape; logprobs in the legacy
//! parallel lists, whose `text_offset` runs on across a stream's chunks.

use tandem_protocol::openai::{CompletionChoice, CompletionLogprobs};
use tandem_protocol::FinishReason;

use super::Renderer;
use crate::disagg::TokenOut;

pub(crate) struct CompletionRenderer {
    logprobs: bool,
    /// Bytes of text each choice has streamed so far, where its next token's offset starts.
    sent: Vec<usize>,
}

impl CompletionRenderer {
    fn logprobs(&self, tokens: &[TokenOut], offset: usize) -> Option<CompletionLogprobs> {
        self.logprobs.then(|| logprobs(tokens, offset))
    }
}

/// `text_offset` counts each token's own text from `offset`: the tokens decoded one by one,
/// which can differ from the choice's text where a character spans tokens.
fn logprobs(tokens: &[TokenOut], offset: usize) -> CompletionLogprobs {
    let mut text_offset = Vec::with_capacity(tokens.len());
    let mut at = offset;
    for t in tokens {
        text_offset.push(at);
        at += t.text.len();
    }
    CompletionLogprobs {
        text_offset,
        token_logprobs: tokens.iter().map(|t| t.logprob.into()).collect(),
        tokens: tokens.iter().map(|t| t.text.clone()).collect(),
        top_logprobs: tokens.iter().map(|t| t.top.iter().map(|(text, lp)| (text.clone(), f64::from(*lp))).collect()).collect(),
    }
}

impl Renderer for CompletionRenderer {
    const ID_PREFIX: &'static str = "cmpl";
    type Choice = CompletionChoice;
    type Chunk = CompletionChoice;

    fn new(logprobs: bool) -> Self {
        Self { logprobs, sent: Vec::new() }
    }

    fn choice(&self, index: usize, text: String, tokens: &[TokenOut], finish: FinishReason) -> CompletionChoice {
        CompletionChoice { finish_reason: Some(finish), index, logprobs: self.logprobs(tokens, 0), text }
    }

    fn opening(&self, _index: usize) -> Option<CompletionChoice> {
        None
    }

    fn delta(&mut self, index: usize, text: String, tokens: &[TokenOut]) -> CompletionChoice {
        if self.sent.len() <= index {
            self.sent.resize(index + 1, 0);
        }
        let logprobs = self.logprobs(tokens, self.sent[index]);
        self.sent[index] += text.len();
        CompletionChoice { finish_reason: None, index, logprobs, text }
    }

    fn finish(&mut self, index: usize, reason: FinishReason) -> CompletionChoice {
        CompletionChoice { finish_reason: Some(reason), index, logprobs: None, text: String::new() }
    }
}
