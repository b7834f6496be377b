//! A streamed response as server-sent events: `data: {chunk}` per event, `data: [DONE]` last.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, BoxStream, SelectAll, Stream, StreamExt};
use serde::Serialize;
use tandem_protocol::openai::{CompletionChunk, Usage};
use tandem_protocol::{ApiError, ErrorCode};
use tokio_stream::wrappers::ReceiverStream;

use super::{now, Envelope, Renderer, UsageTally};
use crate::disagg::{ChoiceEvent, ChoiceRx};

/// The stream of a request's choices, interleaved as their events arrive.
pub(crate) fn sse<R: Renderer>(
    renderer: R,
    envelope: Envelope,
    include_usage: bool,
    usage: UsageTally,
    rxs: Vec<ChoiceRx>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let choices = stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| ReceiverStream::new(rx).map(move |e| (i, e)).boxed()));
    let events = EventStream { renderer, envelope, created: now(), include_usage, usage, choices, phase: Phase::Opening };
    let body = stream::unfold(events, |mut events| async move {
        let batch = events.next_batch().await?;
        Some((stream::iter(batch.into_iter().map(Ok)), events))
    });
    Sse::new(body.flatten()).keep_alive(KeepAlive::default())
}

/// Where a stream is: every choice opens before any token goes out, and nothing follows the
/// last `[DONE]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Opening,
    Relaying,
    Ended,
}

type Tagged = (usize, Result<ChoiceEvent, ApiError>);

struct EventStream<R> {
    renderer: R,
    envelope: Envelope,
    /// One timestamp for every chunk of the response, as OpenAI does.
    created: u64,
    include_usage: bool,
    usage: UsageTally,
    /// Every choice's events, tagged with its index.
    choices: SelectAll<BoxStream<'static, Tagged>>,
    phase: Phase,
}

impl<R: Renderer> EventStream<R> {
    /// The events of the stream's next step (possibly none), or `None` once it has ended.
    async fn next_batch(&mut self) -> Option<Vec<Event>> {
        match self.phase {
            Phase::Ended => None,
            Phase::Opening => {
                self.phase = Phase::Relaying;
                let opening = (0..self.usage.choices()).filter_map(|i| self.renderer.opening(i));
                Some(opening.map(|c| self.chunk(vec![c], None)).collect())
            }
            Phase::Relaying => Some(match self.choices.next().await {
                Some((i, Ok(ChoiceEvent::Prompt { tokens }))) => {
                    self.renderer.prompt(i, tokens);
                    Vec::new()
                }
                Some((_, Ok(ChoiceEvent::Delta { text, tokens }))) if text.is_empty() && tokens.is_empty() => Vec::new(),
                Some((i, Ok(ChoiceEvent::Delta { text, tokens }))) => {
                    let c = self.renderer.delta(i, text, &tokens);
                    vec![self.chunk(vec![c], None)]
                }
                Some((i, Ok(ChoiceEvent::Done { ending, usage }))) => {
                    self.usage.record(i, usage, ending.reason);
                    let c = self.renderer.finish(i, &ending);
                    vec![self.chunk(vec![c], None)]
                }
                Some((_, Err(e))) => {
                    // The HTTP status is already sent: report in-band, then end the stream.
                    self.phase = Phase::Ended;
                    self.envelope.report(&self.usage, Some(&e));
                    vec![Event::default().data(e.body().to_string()), done()]
                }
                None => {
                    self.phase = Phase::Ended;
                    self.envelope.report(&self.usage, None);
                    let mut out = Vec::new();
                    if self.include_usage {
                        out.push(self.chunk(Vec::new(), Some(self.usage.total())));
                    }
                    out.push(done());
                    out
                }
            }),
        }
    }

    /// A chunk of `choices`; with `include_usage` every chunk has a `usage`, `null` until the
    /// last one.
    fn chunk(&self, choices: Vec<R::Chunk>, usage: Option<Usage>) -> Event {
        let usage = self.include_usage.then_some(usage);
        data(&CompletionChunk::new(&self.envelope.id, self.created, &self.envelope.model, choices, usage))
    }
}

fn data(body: &impl Serialize) -> Event {
    match serde_json::to_string(body) {
        Ok(json) => Event::default().data(json),
        // Not reached: these types have string keys and plain fields only.
        Err(e) => Event::default().data(ApiError::new(ErrorCode::Internal, e.to_string()).body().to_string()),
    }
}

fn done() -> Event {
    Event::default().data("[DONE]")
}
