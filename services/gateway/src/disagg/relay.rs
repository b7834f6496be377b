//! The last step of a choice: the prefill's first token, then the decode worker's stream, turned
//! into text for the client until the sequence ends or a stop string matches.

use std::time::Instant;

use tandem_protocol::openai::StopReason;
use tandem_protocol::pb::{self, token_event};
use tandem_protocol::{ApiError, ErrorCode, FinishReason};
use tandem_tokenizer::{DecodeStream, StopMatcher, Tokenizer};
use tonic::codec::Streaming;

use super::{ChoiceEvent, ChoiceTx, ChoiceUsage, Ending, Progress, PromptTokenOut, TokenOut};
use crate::workers::Lease;
use crate::AppState;

/// One choice's tokens on their way to the client, across every decode worker that serves it.
pub(super) struct Relay<'a> {
    pub state: &'a AppState,
    pub tx: &'a ChoiceTx,
    pub progress: &'a mut Progress,
    pub detok: Detok<'a>,
    /// Prompt tokens the first prefill did not compute, reported in every usage of this choice.
    pub cached_tokens: usize,
    /// Every token the client has been sent, in order: where a resumed pass starts from.
    pub emitted: Vec<u32>,
    /// When the last decode worker was lost, until the resumed pass's first token.
    pub lost_at: Option<Instant>,
    /// The request's admission, given back with the first token.
    pub admission: Option<std::sync::Arc<crate::access::Ticket>>,
    /// The prompt, while its log-probabilities are asked for and not yet sent.
    pub scored_prompt: Option<Vec<u32>>,
    /// The choice is its prompt only: no token of the completion reaches the client.
    pub prompt_only: bool,
    /// The request's stop token ids: which one ended the choice is its `stop_reason`.
    pub stop_token_ids: Vec<u32>,
}

impl<'a> Relay<'a> {
    pub fn new(state: &'a AppState, tx: &'a ChoiceTx, detok: Detok<'a>, progress: &'a mut Progress) -> Self {
        Self {
            state,
            tx,
            progress,
            detok,
            cached_tokens: 0,
            emitted: Vec::new(),
            lost_at: None,
            admission: None,
            scored_prompt: None,
            prompt_only: false,
            stop_token_ids: Vec::new(),
        }
    }

    /// The choice's first token (of this pass) is here: the admission is given back, and the
    /// time to it observed (or, after a lost worker, the time the resume took).
    fn first_token(&mut self, started: Instant) {
        let metrics = &self.state.metrics;
        self.admission = None;
        match self.lost_at.take() {
            Some(lost) => {
                metrics.resume_time.observe(lost.elapsed().as_secs_f64());
                metrics.resumes.with_label_values(&["resumed"]).inc();
            }
            None => {
                let ttft = started.elapsed().as_secs_f64();
                metrics.ttft.observe(ttft);
                metrics.vllm.ttft.observe(ttft);
            }
        }
        metrics.generation_tokens.inc();
    }

    /// The prompt's log-probabilities from the prefill, for the client, before its first token.
    async fn prompt_logprobs(&mut self, scored: &[pb::Token]) -> Result<(), ApiError> {
        let Some(prompt) = self.scored_prompt.take() else { return Ok(()) };
        if scored.len() + 1 != prompt.len() {
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("the prefill scored {} prompt tokens of {}", scored.len(), prompt.len().saturating_sub(1)),
            ));
        }
        let text = |id: u32| self.detok.tokenizer.decode(&[id]).unwrap_or_default();
        let mut tokens = vec![PromptTokenOut { id: prompt[0], text: text(prompt[0]), logprob: None, rank: 0, top: Vec::new() }];
        for t in scored {
            let lp = t.logprobs.clone().unwrap_or_default();
            tokens.push(PromptTokenOut {
                id: t.id,
                text: text(t.id),
                logprob: Some(lp.logprob),
                rank: lp.rank,
                top: lp.top.iter().map(|a| (a.token, text(a.token), a.logprob)).collect(),
            });
        }
        self.send(ChoiceEvent::Prompt { tokens }).await
    }

    /// Sends the prefill's token, then every token of `stream` until the decode worker finishes.
    /// Without `prefilled` the worker computed the prompt itself (an aggregated worker), and the
    /// first token, with the prompt's scores, comes on the stream too.
    /// `decode` is held to the end, so the worker counts as busy with this choice meanwhile;
    /// returning early drops `stream`, which cancels the sequence on the decode worker.
    /// `Ok(Some(e))`: the worker was lost mid-stream, and the choice can resume elsewhere from
    /// [`Self::emitted`].
    pub async fn run(
        &mut self,
        decode: Lease,
        mut stream: Streaming<pb::TokenEvent>,
        prefilled: Option<pb::PrefillResponse>,
        started: Instant,
    ) -> Result<Option<ApiError>, ApiError> {
        let state = self.state;
        let metrics = &state.metrics;
        // The first token may already have ended the sequence; then no KV was handed over.
        let mut finished = None;
        let mut last = Instant::now();
        let own_prompt = prefilled.is_none();
        if let Some(prefilled) = prefilled {
            let first = prefilled.first_token.ok_or_else(|| ApiError::new(ErrorCode::Internal, "prefill returned no token"))?;
            self.first_token(started);
            self.prompt_logprobs(&prefilled.prompt_logprobs).await?;
            last = Instant::now();
            if self.token(&first).await? {
                return Ok(None);
            }
            finished = prefilled.finished;
        }
        let mut first_decoded = true;
        let mut first_of_pass = own_prompt;
        while finished.is_none() {
            let event = match next_event(state, &decode, &mut stream).await {
                Ok(e) => e,
                Err(Lost(e)) => return Ok(Some(e)),
            };
            match event {
                Ok(Some(token_event::Event::Prompt(scores))) => self.prompt_logprobs(&scores.tokens).await?,
                Ok(Some(token_event::Event::Token(t))) => {
                    let now = Instant::now();
                    if std::mem::take(&mut first_of_pass) {
                        // The worker's own first token: the prompt's time, not a decode step's.
                        self.first_token(started);
                        if self.scored_prompt.is_some() {
                            return Err(ApiError::new(ErrorCode::Internal, "the worker sent no prompt scores before its first token"));
                        }
                    } else {
                        if std::mem::take(&mut first_decoded) {
                            metrics.decode_first_token_time.observe((now - last).as_secs_f64());
                        }
                        let gap = (now - last).as_secs_f64();
                        metrics.itl.observe(gap);
                        metrics.vllm.itl.observe(gap);
                        metrics.vllm.tpot.observe(gap);
                        metrics.generation_tokens.inc();
                    }
                    last = now;
                    if self.token(&t).await? {
                        return Ok(None);
                    }
                }
                Ok(Some(token_event::Event::Finished(f))) => {
                    if own_prompt && self.cached_tokens == 0 {
                        self.cached_tokens = f.usage.as_ref().map_or(0, |u| u.cached_tokens as usize);
                    }
                    finished = Some(f);
                }
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        let f = finished.expect("loop ends when finished");
        let (text, stopped) = self.detok.finish();
        if !text.is_empty() {
            self.send(ChoiceEvent::Delta { text, tokens: Vec::new() }).await?;
        }
        let completion = f.usage.map(|u| u.completion_tokens as usize).unwrap_or(self.detok.tokens);
        let ending = match stopped {
            Some(s) => Ending { reason: FinishReason::Stop, stop_reason: Some(StopReason::Text(s)) },
            None if f.finish_reason == "length" => FinishReason::Length.into(),
            // The worker stopped at end-of-sequence, or at a stop token id (named as the reason).
            None => {
                let token = self.emitted.last().copied().filter(|t| self.stop_token_ids.contains(t));
                Ending { reason: FinishReason::Stop, stop_reason: token.map(StopReason::Token) }
            }
        };
        self.done(ending, completion).await?;
        Ok(None)
    }

    /// Records and sends one token's text; true when a stop string ended the choice there (its
    /// end already sent).
    async fn token(&mut self, t: &pb::Token) -> Result<bool, ApiError> {
        self.progress.token(self.state, t.id);
        self.emitted.push(t.id);
        let (delta, stopped) = self.detok.push(t)?;
        self.send(delta).await?;
        if let Some(s) = &stopped {
            let ending = Ending { reason: FinishReason::Stop, stop_reason: Some(StopReason::Text(s.clone())) };
            self.done(ending, self.detok.tokens).await?;
        }
        Ok(stopped.is_some())
    }

    async fn done(&mut self, ending: Ending, completion_tokens: usize) -> Result<(), ApiError> {
        // A prompt-only choice asked for no token: it ends for length, having generated none.
        let (ending, completion_tokens) = if self.prompt_only { (FinishReason::Length.into(), 0) } else { (ending, completion_tokens) };
        self.progress.record.finish_reason = Some(ending.reason.as_str().to_string());
        let usage = ChoiceUsage { completion_tokens, cached_tokens: self.cached_tokens };
        self.send(ChoiceEvent::Done { ending, usage }).await
    }

    async fn send(&self, e: ChoiceEvent) -> Result<(), ApiError> {
        if self.prompt_only && matches!(e, ChoiceEvent::Delta { .. }) {
            return Ok(());
        }
        self.tx.send(Ok(e)).await.map_err(|_| ApiError::new(ErrorCode::Cancelled, "client disconnected"))
    }
}

/// The decode worker was lost mid-stream: its process died, the connection broke or went
/// silent past the keepalive, or the stream ended without finishing. The choice can go on
/// elsewhere.
struct Lost(ApiError);

/// The decode stream's next event. A worker that vanished mid-stream leaves routing and the
/// stream counts as [`Lost`]; a refusal the worker answered with is the request's error.
async fn next_event(
    state: &AppState,
    decode: &Lease,
    stream: &mut Streaming<pb::TokenEvent>,
) -> Result<Result<Option<token_event::Event>, ApiError>, Lost> {
    match stream.message().await {
        Ok(Some(e)) => Ok(Ok(e.event)),
        Ok(None) => Err(Lost(ApiError::new(ErrorCode::Unavailable, "decode worker ended the stream early"))),
        Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled) => {
            state.workers.mark_down(decode);
            Err(Lost(ApiError::new(ErrorCode::Unavailable, format!("decode worker failed mid-request: {}", s.message()))))
        }
        Err(s) => Ok(Err(ApiError::from_status(&s))),
    }
}

/// Text assembly for one choice: incremental detokenization, then stop strings.
pub(super) struct Detok<'a> {
    tokenizer: &'a Tokenizer,
    stream: DecodeStream,
    stop: StopMatcher,
    /// The stop strings, to name the one that matched.
    stops: Vec<String>,
    want_logprobs: bool,
    /// Tokens pushed so far: the completion's length when the worker reports none.
    tokens: usize,
}

impl<'a> Detok<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stop: Vec<String>, want_logprobs: bool) -> Self {
        Self { tokenizer, stream: DecodeStream::new(), stop: StopMatcher::new(stop.clone()), stops: stop, want_logprobs, tokens: 0 }
    }

    fn stop_string(&self, i: usize) -> String {
        self.stops.get(i).cloned().unwrap_or_default()
    }

    /// Returns the text to send and the stop string that ended the choice, if one did.
    fn push(&mut self, t: &pb::Token) -> Result<(ChoiceEvent, Option<String>), ApiError> {
        self.tokens += 1;
        let internal = |e: tandem_tokenizer::TokenizerError| ApiError::new(ErrorCode::Internal, e.to_string());
        let piece = self.stream.step(self.tokenizer, t.id).map_err(internal)?.unwrap_or_default();
        let out = self.stop.push(&piece);
        let mut tokens = Vec::new();
        if self.want_logprobs {
            if let Some(lp) = &t.logprobs {
                let text = |id: u32| self.tokenizer.decode(&[id]).unwrap_or_default();
                tokens.push(TokenOut {
                    text: text(t.id),
                    logprob: lp.logprob,
                    top: lp.top.iter().map(|a| (text(a.token), a.logprob)).collect(),
                });
            }
        }
        Ok((ChoiceEvent::Delta { text: out.text, tokens }, out.stopped.map(|i| self.stop_string(i))))
    }

    /// Flushes held-back text, and names the stop string that completed in it, if one did.
    fn finish(&mut self) -> (String, Option<String>) {
        let tail = self.stream.finish(self.tokenizer).ok().flatten().unwrap_or_default();
        let out = self.stop.push(&tail);
        if let Some(i) = out.stopped {
            return (out.text, Some(self.stop_string(i)));
        }
        (out.text + &self.stop.finish(), None)
    }
}
