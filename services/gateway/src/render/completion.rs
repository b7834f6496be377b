//! `/v1/completions`: text per choice, streamed in the same shape; logprobs in the legacy
//! parallel lists, whose `text_offset` runs on across a stream's chunks. With `echo` a choice
//! starts with its prompt (and, with `logprobs`, the prompt's tokens lead the lists, the first
//! with `null`s); with `prompt_logprobs` each choice carries vLLM's map of them.

use std::collections::{BTreeMap, HashMap};

use tandem_protocol::openai::{CompletionChoice, CompletionLogprobs, PromptLogprobs};

use super::{prompt_logprobs, Echo, Renderer};
use crate::disagg::{Ending, PromptTokenOut, TokenOut};

pub(crate) struct CompletionRenderer {
    /// `Some(n)`: logprobs asked, `n` alternatives per position.
    logprobs: Option<u32>,
    /// Bytes of text each choice has streamed so far, where its next token's offset starts.
    sent: Vec<usize>,
    echo: Option<Echo>,
    /// `prompt_logprobs` asked, with this many alternatives.
    prompt_logprobs: Option<u32>,
    /// Each choice's scored prompt, as it arrived.
    prompts: HashMap<usize, Vec<PromptTokenOut>>,
}

/// The lists' entries for some tokens: `(text, logprob, alternatives)`, `None`s for a position
/// with nothing before it.
type Entry = (String, Option<f64>, Option<BTreeMap<String, f64>>);

fn sampled(t: &TokenOut) -> Entry {
    (t.text.clone(), Some(t.logprob.into()), Some(t.top.iter().map(|(text, lp)| (text.clone(), f64::from(*lp))).collect()))
}

fn prompt_entry(t: &PromptTokenOut, n: usize) -> Entry {
    let top = t.logprob.map(|_| t.top.iter().take(n).map(|(_, text, lp)| (text.clone(), f64::from(*lp))).collect());
    (t.text.clone(), t.logprob.map(f64::from), top)
}

/// `text_offset` counts each token's own text from `offset`: the tokens decoded one by one,
/// which can differ from the choice's text where a character spans tokens.
fn lists(entries: Vec<Entry>, offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut at = offset;
    for (text, logprob, top) in entries {
        out.text_offset.push(at);
        at += text.len();
        out.tokens.push(text);
        out.token_logprobs.push(logprob);
        out.top_logprobs.push(top);
    }
    out
}

impl CompletionRenderer {
    /// What goes before choice `index`'s first token: its prompt's text (with `echo`) and the
    /// prompt's entries in the lists (with `echo` and `logprobs`).
    fn lead(&self, index: usize) -> (String, Vec<Entry>) {
        let Some(echo) = &self.echo else { return (String::new(), Vec::new()) };
        let text = echo.text(index).to_string();
        let entries = match (self.logprobs, self.prompts.get(&index)) {
            (Some(n), Some(tokens)) => tokens.iter().map(|t| prompt_entry(t, n as usize)).collect(),
            _ => Vec::new(),
        };
        (text, entries)
    }

    fn scored(&self, index: usize) -> Option<PromptLogprobs> {
        let n = self.prompt_logprobs?;
        self.prompts.get(&index).map(|tokens| prompt_logprobs(tokens, n as usize))
    }

    /// A stream's chunk of `text` and `entries` for choice `index`, its lead first if this is
    /// the choice's first chunk.
    fn chunk(&mut self, index: usize, text: String, mut entries: Vec<Entry>) -> (String, Option<CompletionLogprobs>) {
        if self.sent.len() <= index {
            self.sent.resize(index + 1, usize::MAX);
        }
        let (text, entries) = if self.sent[index] == usize::MAX {
            self.sent[index] = 0;
            let (lead, mut lead_entries) = self.lead(index);
            lead_entries.append(&mut entries);
            (lead + &text, lead_entries)
        } else {
            (text, entries)
        };
        let logprobs = self.logprobs.map(|_| lists(entries, self.sent[index]));
        self.sent[index] += text.len();
        (text, logprobs)
    }
}

impl Renderer for CompletionRenderer {
    const ID_PREFIX: &'static str = "cmpl";
    type Choice = CompletionChoice;
    type Chunk = CompletionChoice;

    fn new(logprobs: Option<u32>) -> Self {
        Self { logprobs, sent: Vec::new(), echo: None, prompt_logprobs: None, prompts: HashMap::new() }
    }

    fn with_prompt(mut self, echo: Option<Echo>, prompt_logprobs: Option<u32>) -> Self {
        self.echo = echo;
        self.prompt_logprobs = prompt_logprobs;
        self
    }

    fn prompt(&mut self, index: usize, tokens: Vec<PromptTokenOut>) {
        self.prompts.insert(index, tokens);
    }

    fn choice(&self, index: usize, text: String, tokens: &[TokenOut], ending: &Ending) -> CompletionChoice {
        let (lead, mut entries) = self.lead(index);
        entries.extend(tokens.iter().map(sampled));
        CompletionChoice {
            finish_reason: Some(ending.reason),
            index,
            logprobs: self.logprobs.map(|_| lists(entries, 0)),
            prompt_logprobs: self.scored(index),
            stop_reason: Some(ending.stop_reason.clone()),
            text: lead + &text,
        }
    }

    fn opening(&self, _index: usize) -> Option<CompletionChoice> {
        None
    }

    fn delta(&mut self, index: usize, text: String, tokens: &[TokenOut]) -> CompletionChoice {
        let (text, logprobs) = self.chunk(index, text, tokens.iter().map(sampled).collect());
        CompletionChoice { finish_reason: None, index, logprobs, prompt_logprobs: None, stop_reason: None, text }
    }

    fn finish(&mut self, index: usize, ending: &Ending) -> CompletionChoice {
        // A choice with no token of its own (`echo` with `max_tokens: 0`) sends its lead here.
        let (text, logprobs) = self.chunk(index, String::new(), Vec::new());
        let logprobs = logprobs.filter(|l| !l.tokens.is_empty());
        CompletionChoice {
            finish_reason: Some(ending.reason),
            index,
            logprobs,
            prompt_logprobs: None,
            stop_reason: Some(ending.stop_reason.clone()),
            text,
        }
    }
}
