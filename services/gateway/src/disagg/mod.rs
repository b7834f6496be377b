//! Disaggregated serving of one choice, start to finish. The prompt's KV is computed on one
//! worker and the tokens on another, so every choice runs three steps: open the decode stream
//! (the decode worker then expects the KV), run the prefill, which computes the prompt and hands
//! its KV to that decode worker, then relay the tokens as text until the sequence ends or a stop
//! string matches. This is the one place that splits a request across the two pools and stitches
//! the halves back together, the disaggregation the module is named for. An aggregated worker
//! (prefill and decode in one engine) takes the whole choice instead: its stream carries the
//! first token too. Dropping the receiver cancels the choice everywhere.
//!
//! [`retry`] holds the rule both pools share for a worker that refuses; [`relay`] the last step.

mod relay;
mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tandem_protocol::openai::StopReason;
use tandem_protocol::pb::decode_client::DecodeClient;
use tandem_protocol::pb::prefill_client::PrefillClient;
use tandem_protocol::pb::{self, GenerateRequest, PrefillRequest};
use tandem_protocol::{block_hashes, ApiError, ErrorCode, FinishReason, SamplingParams};
use tandem_runtime::telemetry;
use tandem_state::{now_ms, Phase, RequestState};
use tokio::sync::mpsc;
use tonic::codec::Streaming;
use tracing::Instrument;

use crate::spans;
use crate::workers::{Lease, PrefillChoice, Role};
use crate::AppState;
use relay::{Detok, Relay};

pub(crate) struct ChoiceSpec {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub seed: u64,
    /// The request's place among those waiting for a first token, held until this choice has
    /// its own (or ends).
    pub admission: Option<Arc<crate::access::Ticket>>,
    /// Runs for its prompt only (`echo` with `max_tokens: 0`): the one token the workers must
    /// produce is not the client's.
    pub prompt_only: bool,
}

/// A token as the client sees it in `logprobs`.
#[derive(Debug, Clone)]
pub(crate) struct TokenOut {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// A prompt token as the client sees it in `prompt_logprobs` (or, with `echo`, in `logprobs`):
/// its log-probability given the tokens before it (`None` for the first token) and rank, and
/// the most likely alternatives there.
#[derive(Debug, Clone)]
pub(crate) struct PromptTokenOut {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
    pub rank: u32,
    pub top: Vec<(u32, String, f32)>,
}

/// How a choice ended: OpenAI's reason, and vLLM's `stop_reason` (the stop string or stop token
/// id, when one of them ended it).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ending {
    pub reason: FinishReason,
    pub stop_reason: Option<StopReason>,
}

impl From<FinishReason> for Ending {
    fn from(reason: FinishReason) -> Self {
        Self { reason, stop_reason: None }
    }
}

/// What one choice used: its completion, and the prompt tokens its prefill found cached.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ChoiceUsage {
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

#[derive(Debug)]
pub(crate) enum ChoiceEvent {
    /// The prompt's log-probabilities (asked for with `prompt_logprobs`), before any delta.
    Prompt {
        tokens: Vec<PromptTokenOut>,
    },
    Delta {
        text: String,
        tokens: Vec<TokenOut>,
    },
    Done {
        ending: Ending,
        usage: ChoiceUsage,
    },
}

pub(crate) type ChoiceRx = mpsc::Receiver<Result<ChoiceEvent, ApiError>>;
type ChoiceTx = mpsc::Sender<Result<ChoiceEvent, ApiError>>;

/// Starts a choice on its own task; its text, its end and any error arrive on the receiver.
pub(crate) fn start(state: Arc<AppState>, spec: ChoiceSpec) -> ChoiceRx {
    let (tx, rx) = mpsc::channel(256);
    let span = tracing::info_span!("request", otel.name = "choice", request_id = %spec.request_id, trace_id = tracing::field::Empty);
    span.record("trace_id", telemetry::trace_id(&span));
    let tasks = state.shutdown.clone();
    let choice_span = span.clone();
    tasks.spawn(
        async move {
            state.metrics.running.inc();
            let started = Instant::now();
            let mut progress = Progress::new(&state, &spec);
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
            match outcome {
                Ok(()) => {
                    let (m, r, generated) = (&state.metrics, &progress.record, progress.generated);
                    let e2e = started.elapsed().as_secs_f64();
                    m.e2e.observe(e2e);
                    m.vllm.e2e.observe(e2e);
                    m.vllm.success.with_label_values(&[r.finish_reason.as_deref().unwrap_or("stop")]).inc();
                    m.vllm.prompt_tokens.observe(r.prompt.len() as f64);
                    m.vllm.generation_tokens.observe(generated as f64);
                }
                Err(e) => {
                    if e.code != ErrorCode::Cancelled {
                        tracing::warn!(error = %e, "request failed");
                    }
                    telemetry::fail(&choice_span, e.code.name(), e.message.clone());
                    let _ = tx.send(Err(e)).await;
                }
            }
        }
        .instrument(span),
    );
    rx
}

/// The request's state as the cluster store sees it; tokens go out in batches.
struct Progress {
    record: RequestState,
    unflushed: Vec<u32>,
    /// Tokens generated so far.
    generated: usize,
}

impl Progress {
    const BATCH: usize = 16;

    /// Records the choice as queued.
    fn new(state: &AppState, spec: &ChoiceSpec) -> Self {
        let params = serde_json::to_value(&spec.params).unwrap_or_default();
        let record = RequestState::new(&spec.request_id, &state.model_name, spec.prompt.clone(), spec.seed, params);
        state.cluster.put_request(&record);
        Self { record, unflushed: Vec::new(), generated: 0 }
    }

    fn token(&mut self, state: &AppState, id: u32) {
        self.generated += 1;
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

/// How many times one choice may move to another decode worker after losing its stream.
const RESUMES: usize = 3;

async fn drive(state: &AppState, mut spec: ChoiceSpec, tx: &ChoiceTx, started: Instant, progress: &mut Progress) -> Result<(), ApiError> {
    let mut relay = Relay::new(state, tx, Detok::new(&state.tokenizer, spec.params.stop.clone(), spec.params.logprobs.is_some()), progress);
    relay.admission = spec.admission.take();
    relay.prompt_only = spec.prompt_only;
    relay.stop_token_ids = spec.params.stop_token_ids.clone();
    relay.scored_prompt = spec.params.prompt_logprobs.is_some().then(|| spec.prompt.clone());
    let (mut resumes, mut pass) = (0, 0);
    loop {
        let outcome = attempt(state, &spec, pass, &mut relay, started).await;
        pass += 1;
        let lost = match outcome {
            Ok(Some(lost)) => lost,
            Ok(None) => return Ok(()),
            // The decode worker refused the KV (corrupt on the way, say) and gave the pass up:
            // the pass starts over, on fresh workers, from the same point.
            Err(e) if e.code == ErrorCode::KvHandoffFailed && resumes < RESUMES => {
                resumes += 1;
                tracing::warn!(error = %e, attempt = resumes, "kv handoff failed; starting the pass again");
                continue;
            }
            Err(e) => return Err(e),
        };
        // The decode worker went away mid-stream. What the client has is exactly the tokens
        // relayed so far; the request goes on from there on another worker: the prompt and
        // those tokens are prefilled again (mostly from the prefix cache and the block store)
        // and the next token follows, drawn as the lost worker would have drawn it.
        if resumes == RESUMES {
            state.metrics.resumes.with_label_values(&["gave_up"]).inc();
            return Err(lost);
        }
        resumes += 1;
        tracing::warn!(error = %lost, tokens_sent = relay.emitted.len(), attempt = resumes, "decode stream lost; resuming on another worker");
        relay.lost_at = Some(Instant::now());
    }
}

/// One pass of the choice over a decode worker (and the prefill that feeds it): from the prompt,
/// or from where the last pass's worker was lost. `Ok(Some(e))` when this worker's stream broke
/// after the client got tokens from it, so the choice can go on elsewhere.
async fn attempt(
    state: &AppState,
    spec: &ChoiceSpec,
    pass: usize,
    relay: &mut Relay<'_>,
    started: Instant,
) -> Result<Option<ApiError>, ApiError> {
    let resumed = relay.emitted.clone();
    // Each pass is its own request to the workers, so nothing of an earlier pass (a decode
    // worker still holding its registration, say) can be mistaken for this one.
    let request_id = if pass == 0 { spec.request_id.clone() } else { format!("{}.{pass}", spec.request_id) };
    let mut params = pb::SamplingParams::from(&spec.params);
    // The prompt is scored once, by the pass that sends the first token.
    if relay.scored_prompt.is_none() {
        params.prompt_logprobs = None;
    }
    let scoring = params.prompt_logprobs.is_some();
    let g = GenerateRequest {
        request_id,
        prompt: spec.prompt.clone(),
        params: Some(params),
        seed: spec.seed,
        eos_ids: state.tokenizer.eos_ids().to_vec(),
        kv_wait_ms: state.cfg.request_timeout.as_millis().min(u32::MAX as u128) as u32,
        resumed: resumed.clone(),
        store_addr: state.workers.store().map(|(_, url)| url).unwrap_or_default(),
        // Set for the decode worker picked, if it is an aggregated one.
        compute_prompt: false,
    };
    let context: Vec<u32> = spec.prompt.iter().chain(&resumed).copied().collect();
    let route = tracing::info_span!(
        "route",
        otel.name = "route by prefix",
        tandem.route.prompt_blocks = tracing::field::Empty,
        tandem.route.holders = tracing::field::Empty,
        tandem.route.best_overlap_blocks = tracing::field::Empty,
        tandem.route.store_blocks = tracing::field::Empty,
    );
    let mut cached = CachedPrefix::look_up(state, &context, !resumed.is_empty()).instrument(route.clone()).await;
    if scoring {
        // A scored prompt is computed whole (every position's logits): nothing to pull.
        cached.store_blocks = 0;
    }
    route.record("tandem.route.prompt_blocks", (context.len() / cached.block_size) as i64);
    route.record("tandem.route.holders", cached.overlap.len() as i64);
    route.record("tandem.route.best_overlap_blocks", cached.overlap.values().copied().max().unwrap_or(0) as i64);
    route.record("tandem.route.store_blocks", cached.store_blocks as i64);
    drop(route);
    // The decode call's span lasts as long as its token stream.
    let decode_span = spans::grpc_client("Decode", "Generate");
    let (decode, tokens) = open_decode(state, spec, &g, cached.block_size, &decode_span).instrument(decode_span.clone()).await?;
    relay.progress.record.decode_worker = decode.info.worker_id.clone();
    if decode.info.aggregated {
        // The worker computes the prompt itself: no prefill, no handoff.
        relay.progress.record.prefill_worker = decode.info.worker_id.clone();
        relay.progress.phase(state, Phase::Decode);
        if resumed.is_empty() {
            state.metrics.prompt_tokens.inc_by(spec.prompt.len() as u64);
        }
        let out = relay.run(decode, tokens, None, started).instrument(decode_span.clone()).await;
        if let Err(e) | Ok(Some(e)) = &out {
            telemetry::fail(&decode_span, e.code.name(), e.message.clone());
        }
        return out;
    }
    let prefill_span = spans::grpc_client("Prefill", "Prefill");
    let prefilled = prefill(state, spec, g, &decode, &cached, relay.progress, &prefill_span).instrument(prefill_span.clone()).await;
    let prefilled = prefilled.inspect_err(|e| telemetry::fail(&prefill_span, e.code.name(), e.message.clone()))?;
    drop(prefill_span);
    if relay.emitted.is_empty() {
        relay.cached_tokens = prefilled.cached_tokens as usize;
    }
    let out = relay.run(decode, tokens, Some(prefilled), started).instrument(decode_span.clone()).await;
    match &out {
        Err(e) => telemetry::fail(&decode_span, e.code.name(), e.message.clone()),
        Ok(Some(e)) => telemetry::fail(&decode_span, e.code.name(), e.message.clone()),
        Ok(None) => {}
    }
    out
}

/// Where the prompt's leading blocks are cached, by the prefix index: what routes the prefill.
struct CachedPrefix {
    /// The tokens to prefill: the prompt, and on a resumed pass the tokens already sent.
    context: Vec<u32>,
    block_size: usize,
    /// Leading reusable blocks each worker (and the block store) holds, by worker id.
    overlap: HashMap<String, usize>,
    /// A healthy block store (id, address) and how many of the blocks it holds.
    store: Option<(String, String)>,
    store_blocks: usize,
}

impl CachedPrefix {
    /// `resumed`: the context holds tokens of an earlier pass, whose full blocks the lost decode
    /// worker sent to the block store as they filled; the prefill is offered all of them, and
    /// the store answers with the run it has.
    async fn look_up(state: &AppState, prompt: &[u32], resumed: bool) -> Self {
        let block_size = state.workers.block_size().unwrap_or(16);
        // The prompt's last token is always computed, so only the blocks before it are reusable.
        let reusable = block_hashes(&prompt[..prompt.len() - 1], block_size);
        let overlap = state.cluster.overlap(&reusable).await;
        let store = state.workers.store();
        let indexed = store.as_ref().and_then(|(id, _)| overlap.get(id)).copied().unwrap_or(0);
        let store_blocks = if resumed && store.is_some() { reusable.len() } else { indexed };
        Self { context: prompt.to_vec(), block_size, overlap, store, store_blocks }
    }
}

/// Opens the generate stream on a decode worker with room for the whole sequence. The worker
/// registers the request before it answers, so the prefill's KV cannot arrive unexpected.
async fn open_decode(
    state: &AppState,
    spec: &ChoiceSpec,
    g: &GenerateRequest,
    block_size: usize,
    span: &tracing::Span,
) -> Result<(Lease, Streaming<pb::TokenEvent>), ApiError> {
    let need_blocks = (spec.prompt.len() + spec.params.max_tokens).div_ceil(block_size);
    let mut attempts = 0u64;
    let out = retry::pick_and_call(
        state,
        Role::Decode,
        |tried| state.workers.pick_decode(need_blocks, tried),
        |decode: &Lease| {
            attempts += 1;
            span.record("tandem.worker_id", decode.info.worker_id.as_str());
            span.record("tandem.route.free_blocks", decode.info.free_blocks as i64);
            let mut client = DecodeClient::new(decode.channel.clone());
            let g = GenerateRequest { compute_prompt: decode.info.aggregated, ..g.clone() };
            let request = spans::grpc_request(g, &spec.request_id, span);
            async move { client.generate(request).await }
        },
    )
    .await;
    span.record("tandem.attempts", attempts as i64);
    out
}

/// Runs the prefill on the worker where the prompt costs least: it computes what no cache holds,
/// hands the KV to `decode`, and answers with the first token. Afterwards the prefix index learns
/// who holds the prompt's blocks now. The prefill worker's lease ends with this step.
async fn prefill(
    state: &AppState,
    spec: &ChoiceSpec,
    g: GenerateRequest,
    decode: &Lease,
    cached: &CachedPrefix,
    progress: &mut Progress,
    span: &tracing::Span,
) -> Result<pb::PrefillResponse, ApiError> {
    let m = &state.metrics;
    let context = &cached.context;
    let request = PrefillRequest {
        request: Some(g),
        decode_kv_addr: decode.info.kv_addr.clone(),
        store_addr: cached.store.as_ref().map(|(_, url)| url.clone()).unwrap_or_default(),
        store_prefix_blocks: cached.store_blocks as u32,
    };
    let pick =
        |tried: &[u64]| state.workers.pick_prefill(&cached.overlap, context.len(), cached.block_size, state.cfg.route_load_weight, tried);
    let call = |choice: &PrefillChoice| {
        progress.record.prefill_worker = choice.lease.info.worker_id.clone();
        progress.phase(state, Phase::Prefill);
        span.record("tandem.worker_id", choice.lease.info.worker_id.as_str());
        span.record("tandem.route.candidates", choice.candidates as i64);
        span.record("tandem.route.prefix_overlap_blocks", choice.cached_blocks as i64);
        span.record("tandem.route.score", choice.cost);
        let mut client = PrefillClient::new(choice.lease.channel.clone());
        let request = spans::grpc_request(request.clone(), &spec.request_id, span);
        async move { client.prefill(request).await }
    };
    let (chosen, resp) = retry::pick_and_call(state, Role::Prefill, pick, call).await.inspect_err(|e| {
        if e.code == ErrorCode::KvHandoffFailed {
            m.handoff_failures.inc();
        }
    })?;
    m.prefix_routed_blocks.inc_by(chosen.cached_blocks as u64);
    m.store_pulled_blocks.inc_by(resp.pulled_blocks as u64);
    m.store_offload_shed_blocks.inc_by(resp.offload_shed_blocks as u64);
    // The prefill worker now caches the prompt's full blocks; the store will hold the leading
    // ones it was sent. The index is a hint: a stale entry costs a worse route or a short fetch.
    let full = block_hashes(context, cached.block_size);
    state.cluster.publish(&chosen.lease.info.worker_id, full.clone());
    if let Some((store_id, _)) = &cached.store {
        let n = (resp.offloaded_blocks as usize).min(full.len());
        state.cluster.publish(store_id, full[..n].to_vec());
    }
    let first_pass = context.len() == spec.prompt.len();
    if first_pass {
        progress.record.cached_tokens = resp.cached_tokens as usize;
    }
    progress.phase(state, Phase::Decode);
    m.prefill_time.observe(resp.prefill_millis / 1e3);
    if let Some(t) = &resp.transfer {
        m.prefill_queue_time.observe(resp.queue_millis / 1e3);
        m.prefill_compute_time.observe(resp.compute_millis / 1e3);
        m.export_time.observe(resp.export_millis / 1e3);
        m.kv_transfer_bytes.with_label_values(&[t.transport.as_str()]).inc_by(t.bytes);
        m.handoff_time.with_label_values(&[t.transport.as_str()]).observe(t.millis / 1e3);
    }
    // A resumed pass is counted by the resume metrics, not as another prompt.
    if first_pass {
        m.prompt_tokens.inc_by(spec.prompt.len() as u64);
        m.cached_prompt_tokens.inc_by(resp.cached_tokens as u64);
    } else {
        m.resume_recomputed_tokens.inc_by(context.len().saturating_sub(resp.cached_tokens as usize) as u64);
    }
    Ok(resp)
}
