//! Choices as OpenAI responses: each endpoint has a [`Renderer`] that shapes its choices and
//! chunks; a whole response is [`collect`]ed, a stream goes out as server-sent events ([`sse`]).
//! The wire types themselves live in `tandem_protocol::openai`.

mod chat;
mod completion;
mod sse;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use tandem_protocol::openai::{Choice, CompletionResponse, PromptLogprob, PromptLogprobs, Usage};
use tandem_protocol::{ApiError, ErrorCode, FinishReason};

use crate::disagg::{ChoiceEvent, ChoiceRx, ChoiceUsage, Ending, PromptTokenOut, TokenOut};

pub(crate) use chat::ChatRenderer;
pub(crate) use completion::CompletionRenderer;
pub(crate) use sse::sse;

/// One endpoint's shapes. A renderer lives as long as its request, so it may keep what a
/// stream needs between chunks.
pub(crate) trait Renderer: Send + 'static {
    /// How this endpoint's response ids begin (`chatcmpl-…`, `cmpl-…`).
    const ID_PREFIX: &'static str;
    type Choice: Choice;
    type Chunk: Choice;

    /// A renderer for one request; `logprobs`: whether the client asked for them, and how many
    /// alternatives per position.
    fn new(logprobs: Option<u32>) -> Self;

    /// Choice `index` whole, for a response that is not streamed.
    fn choice(&self, index: usize, text: String, tokens: &[TokenOut], ending: &Ending) -> Self::Choice;

    /// What a stream sends for choice `index` before its first token, if anything.
    fn opening(&self, index: usize) -> Option<Self::Chunk>;

    /// New text of choice `index`, with the tokens it came from.
    fn delta(&mut self, index: usize, text: String, tokens: &[TokenOut]) -> Self::Chunk;

    /// The end of choice `index`.
    fn finish(&mut self, index: usize, ending: &Ending) -> Self::Chunk;

    /// Choice `index`'s prompt as the prefill scored it (before any of its deltas).
    fn prompt(&mut self, index: usize, tokens: Vec<PromptTokenOut>);

    /// What the request asked of its prompts: `echo` (completions), and `prompt_logprobs` with
    /// how many alternatives.
    fn with_prompt(self, _echo: Option<Echo>, _prompt_logprobs: Option<u32>) -> Self
    where
        Self: Sized,
    {
        self
    }

    /// The prompt's log-probabilities for the whole response, where the endpoint has them there
    /// (chat) rather than per choice.
    fn response_prompt_logprobs(&self) -> Option<PromptLogprobs> {
        None
    }

    /// Reads tool calls out of the text (chat with `tools`); other endpoints have none.
    fn with_tools(self, _tools: std::sync::Arc<Vec<tandem_protocol::openai::tools::Tool>>) -> Self
    where
        Self: Sized,
    {
        self
    }
}

/// `echo`: the prompts' texts, choice `index` showing prompt `index / n`.
#[derive(Debug, Clone)]
pub(crate) struct Echo {
    pub texts: Vec<String>,
    pub n: usize,
}

impl Echo {
    fn text(&self, index: usize) -> &str {
        self.texts.get(index / self.n.max(1)).map(String::as_str).unwrap_or_default()
    }
}

/// vLLM's `prompt_logprobs` from a scored prompt: `null` for the first token, then per token a
/// map by token id of the prompt's own token (with its rank) and the `n` most likely ones (ranked
/// by their place).
pub(crate) fn prompt_logprobs(tokens: &[PromptTokenOut], n: usize) -> PromptLogprobs {
    tokens
        .iter()
        .map(|t| {
            let logprob = t.logprob?;
            let mut m = BTreeMap::new();
            for (i, (id, text, lp)) in t.top.iter().take(n).enumerate() {
                m.insert(id.to_string(), PromptLogprob { decoded_token: text.clone(), logprob: (*lp).into(), rank: i as u32 + 1 });
            }
            m.insert(t.id.to_string(), PromptLogprob { decoded_token: t.text.clone(), logprob: logprob.into(), rank: t.rank });
            Some(m)
        })
        .collect()
}

/// What every response and chunk of one request repeats.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub id: String,
    pub model: String,
    /// The request's GenAI span, told the outcome when the response is complete.
    pub span: tracing::Span,
}

impl Envelope {
    /// Puts the response's outcome on the request's span.
    fn report(&self, usage: &UsageTally, error: Option<&ApiError>) {
        crate::spans::gen_ai_response(&self.span, &self.id, &self.model, &usage.total(), usage.reasons(), error);
    }
}

/// Seconds since the Unix epoch, as OpenAI's `created`.
pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Usage of a whole request from each choice's, by choice index (prompt `p`, sample `j` is
/// choice `p * n + j`): each prompt counted once, with the cache hits of its first choice, and
/// every choice's completion counted.
#[derive(Debug, Clone)]
pub(crate) struct UsageTally {
    prompt_tokens: usize,
    n: usize,
    choices: Vec<Option<ChoiceUsage>>,
    reasons: Vec<Option<FinishReason>>,
}

impl UsageTally {
    pub fn new(prompts: &[Vec<u32>], n: usize) -> Self {
        let choices = prompts.len() * n;
        Self { prompt_tokens: prompts.iter().map(Vec::len).sum(), n, choices: vec![None; choices], reasons: vec![None; choices] }
    }

    /// How many choices the request has.
    pub fn choices(&self) -> usize {
        self.choices.len()
    }

    pub fn record(&mut self, index: usize, usage: ChoiceUsage, reason: FinishReason) {
        self.choices[index] = Some(usage);
        self.reasons[index] = Some(reason);
    }

    /// Each finished choice's finish reason, in choice order.
    pub fn reasons(&self) -> Vec<String> {
        self.reasons.iter().flatten().map(|r| r.as_str().to_string()).collect()
    }

    pub fn total(&self) -> Usage {
        let completion = self.choices.iter().flatten().map(|u| u.completion_tokens).sum();
        let cached = self.choices.iter().step_by(self.n.max(1)).flatten().map(|u| u.cached_tokens).sum();
        Usage::new(self.prompt_tokens, completion, cached)
    }
}

/// Waits for every choice, in order, and renders the whole response. The first error fails the
/// request; the receivers it drops cancel the choices still running.
pub(crate) async fn collect<R: Renderer>(
    renderer: &mut R,
    envelope: Envelope,
    mut usage: UsageTally,
    rxs: Vec<ChoiceRx>,
) -> Result<CompletionResponse<R::Choice>, ApiError> {
    let mut choices = Vec::with_capacity(rxs.len());
    let outcome = async {
        for (index, mut rx) in rxs.into_iter().enumerate() {
            let (mut text, mut tokens, mut finish) = (String::new(), Vec::new(), None);
            while let Some(event) = rx.recv().await {
                match event? {
                    ChoiceEvent::Prompt { tokens } => renderer.prompt(index, tokens),
                    ChoiceEvent::Delta { text: t, tokens: ts } => {
                        text.push_str(&t);
                        tokens.extend(ts);
                    }
                    ChoiceEvent::Done { ending, usage: u } => {
                        usage.record(index, u, ending.reason);
                        finish = Some(ending);
                    }
                }
            }
            let finish = finish.ok_or_else(|| ApiError::new(ErrorCode::Internal, "choice ended without a finish reason"))?;
            choices.push(renderer.choice(index, text, &tokens, &finish));
        }
        Ok(())
    }
    .await;
    envelope.report(&usage, outcome.as_ref().err());
    outcome?;
    let mut response = CompletionResponse::new(envelope.id, now(), envelope.model, choices, usage.total());
    response.prompt_logprobs = renderer.response_prompt_logprobs();
    Ok(response)
}
