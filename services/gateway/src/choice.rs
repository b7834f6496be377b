//! One choice of one request, start to finish: decode stream first (so the decode worker is
//! listening), then the prefill with its KV handoff, then tokens turned into text until the
//! sequence ends or a stop string matches. Dropping the receiver cancels it everywhere.

use std::sync::Arc;
use std::time::Instant;

use tandem_protocol::pb::decode_client::DecodeClient;
use tandem_protocol::pb::prefill_client::PrefillClient;
use tandem_protocol::pb::{self, token_event, GenerateRequest, PrefillRequest};
use tandem_protocol::{block_hashes, trace, ApiError, ErrorCode, FinishReason, SamplingParams, TraceContext};
use tandem_state::{now_ms, Phase, RequestState};
use tandem_tokenizer::{DecodeStream, StopMatcher, Tokenizer};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::AppState;

pub(crate) struct ChoiceSpec {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub seed: u64,
    /// The gateway's span of the request; every worker call carries it as `traceparent`.
    pub trace: TraceContext,
}

/// A token as the client sees it in `logprobs`.
#[derive(Debug, Clone)]
pub(crate) struct TokenOut {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

#[derive(Debug)]
pub(crate) enum ChoiceEvent {
    Delta { text: String, tokens: Vec<TokenOut> },
    Done { reason: FinishReason, usage: Usage },
}

pub(crate) type ChoiceRx = mpsc::Receiver<Result<ChoiceEvent, ApiError>>;

pub(crate) fn start(state: Arc<AppState>, spec: ChoiceSpec) -> ChoiceRx {
    let (tx, rx) = mpsc::channel(256);
    let span = tracing::info_span!("request", request_id = %spec.request_id, trace_id = %spec.trace.trace_id_hex());
    let tasks = state.shutdown.clone();
    tasks.spawn(async move {
        state.metrics.running.inc();
        let started = Instant::now();
        let params = serde_json::to_value(&spec.params).unwrap_or_default();
        let record = RequestState::new(&spec.request_id, &state.cfg.model_name, spec.prompt.clone(), spec.seed, params);
        let mut progress = Progress { record, unflushed: Vec::new() };
        state.cluster.put_request(&progress.record);
        let outcome = tokio::select! {
            // The client went away: returning drops the gRPC calls, which cancels both workers.
            _ = tx.closed() => Err(ApiError::new(ErrorCode::Cancelled, "client disconnected")),
            r = tokio::time::timeout(state.cfg.request_timeout, drive(&state, spec, &tx, started, &mut progress)) => {
                r.unwrap_or_else(|_| Err(ApiError::new(ErrorCode::Timeout, format!("request exceeded {:?}", state.cfg.request_timeout))))
            }
        };
        state.metrics.running.dec();
        let label = match &outcome {
            Ok(()) => "ok",
            Err(e) if e.code == ErrorCode::Cancelled => "cancelled",
            Err(_) => "error",
        };
        state.metrics.requests.with_label_values(&[label]).inc();
        progress.flush(&state);
        match &outcome {
            Ok(()) => progress.phase(&state, Phase::Done),
            Err(e) => {
                progress.record.error = Some(e.message.clone());
                progress.phase(&state, if e.code == ErrorCode::Cancelled { Phase::Cancelled } else { Phase::Failed });
            }
        }
        if let Err(e) = outcome {
            if e.code != ErrorCode::Cancelled {
                tracing::warn!(error = %e, "request failed");
            }
            let _ = tx.send(Err(e)).await;
        } else {
            state.metrics.e2e.observe(started.elapsed().as_secs_f64());
        }
    }.instrument(span));
    rx
}

/// The request's state as the cluster store sees it; tokens go out in batches.
struct Progress {
    record: RequestState,
    unflushed: Vec<u32>,
}

impl Progress {
    const BATCH: usize = 16;

    fn token(&mut self, state: &AppState, id: u32) {
        self.unflushed.push(id);
        if self.unflushed.len() >= Self::BATCH {
            self.flush(state);
        }
    }

    fn flush(&mut self, state: &AppState) {
        state.cluster.append_tokens(&self.record.id, std::mem::take(&mut self.unflushed));
    }

    fn phase(&mut self, state: &AppState, phase: Phase) {
        self.record.phase = phase;
        self.record.updated_ms = now_ms();
        state.cluster.put_request(&self.record);
    }
}

/// Text assembly for one choice: incremental detokenization, then stop strings.
struct Detok<'a> {
    tokenizer: &'a Tokenizer,
    stream: DecodeStream,
    stop: StopMatcher,
    want_logprobs: bool,
    tokens: usize,
}

impl Detok<'_> {
    /// Returns the text to send and whether a stop string ended the choice.
    fn push(&mut self, t: &pb::Token) -> Result<(ChoiceEvent, bool), ApiError> {
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
        Ok((ChoiceEvent::Delta { text: out.text, tokens }, out.stopped.is_some()))
    }

    /// Flushes held-back text; true if a stop string completed in it.
    fn finish(&mut self) -> (String, bool) {
        let tail = self.stream.finish(self.tokenizer).ok().flatten().unwrap_or_default();
        let out = self.stop.push(&tail);
        if out.stopped.is_some() {
            return (out.text, true);
        }
        (out.text + &self.stop.finish(), false)
    }
}

fn unavailable(what: &str) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("no {what} worker is available; retry shortly"))
}

/// Attempts per role when a worker turns out to be unreachable or draining before any token.
const ATTEMPTS: usize = 3;

/// After a worker refused, how long a retry waits for another one to become routable (a worker
/// joining while another drains, say) before the request fails.
const RETRY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Picks a worker; after a refusal (`retrying`), waits up to [`RETRY_WAIT`] for one to appear.
async fn pick_with_retry<T>(retrying: bool, mut pick: impl FnMut() -> Option<T>) -> Option<T> {
    if let Some(w) = pick() {
        return Some(w);
    }
    if !retrying {
        return None;
    }
    let deadline = tokio::time::Instant::now() + RETRY_WAIT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if let Some(w) = pick() {
            return Some(w);
        }
    }
    None
}

async fn drive(
    state: &AppState,
    spec: ChoiceSpec,
    tx: &mpsc::Sender<Result<ChoiceEvent, ApiError>>,
    started: Instant,
    progress: &mut Progress,
) -> Result<(), ApiError> {
    let g = GenerateRequest {
        request_id: spec.request_id.clone(),
        prompt: spec.prompt.clone(),
        params: Some((&spec.params).into()),
        seed: spec.seed,
        eos_ids: state.tokenizer.eos_ids().to_vec(),
        kv_wait_ms: state.cfg.request_timeout.as_millis().min(u32::MAX as u128) as u32,
    };
    let grpc_error = |s: tonic::Status| ApiError::from_status(&s);
    let bs = state.workers.block_size().unwrap_or(16);
    // What the prefill may reuse (its last token is always computed) and what it will hold after.
    let reusable = block_hashes(&spec.prompt[..spec.prompt.len() - 1], bs);
    let overlap = state.cluster.overlap(&reusable).await;
    let store = state.workers.store();
    let store_blocks = store.as_ref().and_then(|(id, _)| overlap.get(id)).copied().unwrap_or(0);

    // The decode worker registers the request before answering, so the KV can't arrive early.
    let need_blocks = (spec.prompt.len() + spec.params.max_tokens).div_ceil(bs);
    let mut tried = Vec::new();
    let (decode, mut stream) = loop {
        let decode = pick_with_retry(!tried.is_empty(), || state.workers.pick_decode(need_blocks, &tried))
            .await
            .ok_or_else(|| unavailable("decode"))?;
        match DecodeClient::new(decode.channel.clone()).generate(trace::request(g.clone(), &spec.request_id, &spec.trace)).await {
            Ok(s) => break (decode, s.into_inner()),
            Err(s) => {
                let e = ApiError::from_status(&s);
                if e.code.worker_down() {
                    state.workers.mark_down(&decode);
                }
                if e.code.retryable() && tried.len() + 1 < ATTEMPTS {
                    tracing::info!(error = %e, code = e.code.name(), "decode worker refused; trying another");
                    state.metrics.retries.with_label_values(&["decode"]).inc();
                    tried.push(decode.key());
                    continue;
                }
                return Err(e);
            }
        }
    };
    progress.record.decode_worker = decode.info.worker_id.clone();

    let mut tried = Vec::new();
    let (prefill, resp) = loop {
        let choice = pick_with_retry(!tried.is_empty(), || {
            state.workers.pick_prefill(&overlap, spec.prompt.len(), bs, state.cfg.route_load_weight, &tried)
        })
        .await
        .ok_or_else(|| unavailable("prefill"))?;
        progress.record.prefill_worker = choice.lease.info.worker_id.clone();
        progress.phase(state, Phase::Prefill);
        let prefill_req = PrefillRequest {
            request: Some(g.clone()),
            decode_kv_addr: decode.info.kv_addr.clone(),
            store_addr: store.as_ref().map(|(_, url)| url.clone()).unwrap_or_default(),
            store_prefix_blocks: store_blocks as u32,
        };
        match PrefillClient::new(choice.lease.channel.clone()).prefill(trace::request(prefill_req, &spec.request_id, &spec.trace)).await {
            Ok(r) => break (choice, r.into_inner()),
            Err(s) => {
                let e = ApiError::from_status(&s);
                if e.code == ErrorCode::KvHandoffFailed {
                    state.metrics.handoff_failures.inc();
                }
                if e.code.worker_down() {
                    state.workers.mark_down(&choice.lease);
                }
                if e.code.retryable() && tried.len() + 1 < ATTEMPTS {
                    tracing::info!(error = %e, code = e.code.name(), "prefill worker refused; trying another");
                    state.metrics.retries.with_label_values(&["prefill"]).inc();
                    tried.push(choice.lease.key());
                    continue;
                }
                return Err(e);
            }
        }
    };
    state.metrics.prefix_routed_blocks.inc_by(prefill.cached_blocks as u64);
    state.metrics.store_pulled_blocks.inc_by(resp.pulled_blocks as u64);
    state.metrics.store_offload_shed_blocks.inc_by(resp.offload_shed_blocks as u64);
    // The prefill worker now caches the prompt's full blocks; the store will hold the leading
    // ones it was sent. The index is a hint: a stale entry costs a worse route or a short fetch.
    let full = block_hashes(&spec.prompt, bs);
    state.cluster.publish(&prefill.lease.info.worker_id, full.clone());
    if let Some((store_id, _)) = &store {
        let n = (resp.offloaded_blocks as usize).min(full.len());
        state.cluster.publish(store_id, full[..n].to_vec());
    }
    progress.record.cached_tokens = resp.cached_tokens as usize;
    progress.phase(state, Phase::Decode);
    let prefill = prefill.lease;
    drop(prefill);
    state.metrics.prefill_time.observe(resp.prefill_millis / 1e3);
    if let Some(t) = &resp.transfer {
        state.metrics.kv_transfer_bytes.with_label_values(&[t.transport.as_str()]).inc_by(t.bytes);
        state.metrics.handoff_time.observe(t.millis / 1e3);
    }
    state.metrics.prompt_tokens.inc_by(spec.prompt.len() as u64);
    state.metrics.cached_prompt_tokens.inc_by(resp.cached_tokens as u64);
    let usage_for = |completion: usize| Usage { completion_tokens: completion, cached_tokens: resp.cached_tokens as usize };

    let mut detok = Detok {
        tokenizer: &state.tokenizer,
        stream: DecodeStream::new(),
        stop: StopMatcher::new(spec.params.stop.clone()),
        want_logprobs: spec.params.logprobs.is_some(),
        tokens: 0,
    };
    let first = resp.first_token.ok_or_else(|| ApiError::new(ErrorCode::Internal, "prefill returned no token"))?;
    state.metrics.ttft.observe(started.elapsed().as_secs_f64());
    state.metrics.generation_tokens.inc();
    let mut last = Instant::now();
    let send = |e: ChoiceEvent| async { tx.send(Ok(e)).await.map_err(|_| ApiError::new(ErrorCode::Cancelled, "client disconnected")) };

    progress.token(state, first.id);
    let (delta, stopped) = detok.push(&first)?;
    send(delta).await?;
    let mut finished = resp.finished.clone();
    if stopped {
        progress.record.finish_reason = Some("stop".into());
        send(ChoiceEvent::Done { reason: FinishReason::Stop, usage: usage_for(detok.tokens) }).await?;
        return Ok(());
    }
    while finished.is_none() {
        let event = match stream.message().await {
            Ok(Some(e)) => e.event,
            Ok(None) => return Err(ApiError::new(ErrorCode::Internal, "decode worker ended the stream early")),
            Err(s) => {
                if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown {
                    state.workers.mark_down(&decode);
                    return Err(ApiError::new(ErrorCode::Unavailable, format!("decode worker failed mid-request: {}", s.message())));
                }
                return Err(grpc_error(s));
            }
        };
        match event {
            Some(token_event::Event::Token(t)) => {
                let now = Instant::now();
                state.metrics.itl.observe((now - last).as_secs_f64());
                state.metrics.generation_tokens.inc();
                last = now;
                progress.token(state, t.id);
                let (delta, stopped) = detok.push(&t)?;
                send(delta).await?;
                if stopped {
                    // Dropping the stream on return cancels the rest on the decode worker.
                    progress.record.finish_reason = Some("stop".into());
                    send(ChoiceEvent::Done { reason: FinishReason::Stop, usage: usage_for(detok.tokens) }).await?;
                    return Ok(());
                }
            }
            Some(token_event::Event::Finished(f)) => finished = Some(f),
            None => {}
        }
    }
    let f = finished.expect("loop ends when finished");
    let (text, stopped) = detok.finish();
    if !text.is_empty() {
        send(ChoiceEvent::Delta { text, tokens: Vec::new() }).await?;
    }
    let reason = if f.finish_reason == "length" && !stopped { FinishReason::Length } else { FinishReason::Stop };
    let completion = f.usage.map(|u| u.completion_tokens as usize).unwrap_or(detok.tokens);
    progress.record.finish_reason = Some(reason.as_str().to_string());
    send(ChoiceEvent::Done { reason, usage: usage_for(completion) }).await?;
    Ok(())
}
