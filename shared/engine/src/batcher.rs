//! Continuous batching: sequences join and leave at any step; each step packs every running
//! decode token plus as many prefill tokens as the budget allows into one forward pass.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tandem_protocol::{ApiError, ErrorCode, FinishReason, SamplingParams};

use crate::engine::{Engine, ForwardItem, PagedEngine, SeqId};
use crate::sampling::{prompt_logprob, sample, SampleContext, Sampled, TokenLogprobs};
use crate::{EngineError, Result};
use tandem_protocol::KvExport;

/// What the batcher does with a sequence once its prompt is in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Prefill, then decode to the end (single process).
    Full,
    /// Prefill and sample the first token, then hand the KV over ([`Event::Prefilled`]).
    PrefillOnly,
    /// As `PrefillOnly`, with the blocks left in the engine's device memory for a receiver on
    /// this host to copy ([`KvExport::device`]): the sequence keeps them until its events are
    /// dropped (the handoff's verdict came). Where the engine cannot, as `PrefillOnly`.
    PrefillToDevice,
}

#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Resolved seed: drawn once per request so every worker that runs it draws alike.
    pub seed: u64,
    /// Tokens that end the sequence unless `ignore_eos` (EOS and end-of-turn tokens).
    pub eos_ids: Vec<u32>,
    pub mode: Mode,
    /// Tokens this sequence already generated on a worker that failed (sent to the client):
    /// they follow the prompt as output, so the sequence goes on where it stopped.
    pub resumed: Vec<u32>,
    /// Structured output: the grammar every token must fit, advanced over `resumed` already.
    pub grammar: Option<crate::Grammar>,
}

impl NewRequest {
    /// The tokens known before this worker samples anything: the prompt, then what was resumed.
    pub fn context(&self) -> Vec<u32> {
        let mut t = self.prompt.clone();
        t.extend_from_slice(&self.resumed);
        t
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone)]
pub enum Event {
    Token {
        id: SeqId,
        token: u32,
        logprobs: Option<TokenLogprobs>,
    },
    /// The prompt's log-probabilities (asked with `prompt_logprobs`): one per prompt token
    /// after the first, sent once the whole prompt ran, just before the first `Token`.
    PromptLogprobs {
        id: SeqId,
        logprobs: Vec<TokenLogprobs>,
    },
    /// The sequence ended; its blocks are released.
    Finished {
        id: SeqId,
        reason: FinishReason,
        usage: Usage,
    },
    /// Prefill-only mode: the prompt is cached and the first token sampled (it came as a
    /// `Token` event just before); here is the KV to hand over, not yet sealed with its
    /// checksums ([`KvExport::seal`]). Blocks are released, unless the export left them in device
    /// memory ([`Mode::PrefillToDevice`]): they are then held until the request's events drop.
    Prefilled {
        id: SeqId,
        kv: Box<KvExport>,
        usage: Usage,
        timing: PrefillTiming,
    },
    /// The sequence could not run; its blocks are released. The error is classified here, where
    /// its cause is known.
    Failed {
        id: SeqId,
        error: ApiError,
    },
}

/// Where a prefill-only request's time went on the engine thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefillTiming {
    /// From joining the batcher's queue to its first forward pass.
    pub queue: Duration,
    /// From its first forward pass to the end of the pass that sampled its first token.
    pub compute: Duration,
    /// Reading its KV blocks out of the cache (with their checksums).
    pub export: Duration,
    /// Forward passes the prompt took: more than one when it was computed in chunks.
    pub passes: u32,
}

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// Most tokens in one forward pass (decode tokens count one each).
    pub max_batch_tokens: usize,
    pub max_running: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self { max_batch_tokens: 512, max_running: 64 }
    }
}

/// A sequence the batcher owns. Its known tokens are `prompt ++ output`; the cache holds the
/// first `fed` of them. Prefill, decode and recompute after preemption are the same thing: feed
/// the tokens not yet in the cache, and sample once all of them are.
struct Running {
    req: NewRequest,
    output: Vec<u32>,
    fed: usize,
    cached: usize,
    /// When it joined the queue, and when it first ran.
    queued: Instant,
    started: Option<Instant>,
    /// Forward passes it has been part of.
    passes: u32,
    /// The prompt's log-probabilities so far, while they are being computed (`prompt_logprobs`
    /// asked, and not yet sent).
    prompt_lp: Option<Vec<TokenLogprobs>>,
}

/// Most prompt tokens of a sequence computing its prompt log-probabilities in one pass: each
/// brings a whole row of logits back, so the chunk stays small.
const SCORED_CHUNK: usize = 256;

impl Running {
    fn new(req: NewRequest) -> Self {
        let output = req.resumed.clone();
        // A resumed sequence's prompt was scored on its first run.
        let prompt_lp = (req.params.prompt_logprobs.is_some() && req.resumed.is_empty()).then(Vec::new);
        Self { req, output, fed: 0, cached: 0, queued: Instant::now(), started: None, passes: 0, prompt_lp }
    }

    fn known(&self) -> usize {
        self.req.prompt.len() + self.output.len()
    }

    fn token(&self, i: usize) -> u32 {
        let p = self.req.prompt.len();
        if i < p {
            self.req.prompt[i]
        } else {
            self.output[i - p]
        }
    }

    fn is_decoding(&self) -> bool {
        self.known() - self.fed == 1 && !self.output.is_empty()
    }
}

pub struct Batcher {
    engine: PagedEngine,
    cfg: BatcherConfig,
    waiting: VecDeque<Running>,
    running: Vec<Running>,
    preemptions: u64,
    /// Prompt tokens looked up in the prefix cache as requests were admitted, and those found.
    prefix_lookups: (u64, u64),
    /// Sequences (by index in `running`) whose grammar could not give the last pass a mask, with
    /// why: their token from that pass is not theirs to keep.
    mask_failures: Vec<(usize, String)>,
    /// Prefilled sequences whose blocks a receiver copies out of device memory: kept, and
    /// released on cancel.
    held: Vec<SeqId>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("waiting", &self.waiting.len()).field("running", &self.running.len()).finish()
    }
}

/// What a forward pass returned: logits to sample from, or tokens the engine already picked.
enum Pass {
    Logits(Vec<Vec<Vec<f32>>>),
    Tokens(Vec<u32>),
}

enum Out {
    Rows(Vec<Vec<f32>>),
    Token(u32),
}

impl Batcher {
    pub fn new(engine: Box<dyn Engine>, cfg: BatcherConfig) -> Self {
        Self::from_paged(PagedEngine::from_box(engine), cfg)
    }

    /// A batcher over an engine whose sequence table may already hold sequences.
    pub fn from_paged(engine: PagedEngine, cfg: BatcherConfig) -> Self {
        Self {
            engine,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            prefix_lookups: (0, 0),
            mask_failures: Vec::new(),
            held: Vec::new(),
        }
    }

    pub fn engine(&self) -> &PagedEngine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut PagedEngine {
        &mut self.engine
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences whose cache was dropped to make room for others and later recomputed.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Prompt tokens looked up in the prefix cache on admission (recomputes after preemption
    /// not counted), and those found there.
    pub fn prefix_lookups(&self) -> (u64, u64) {
        self.prefix_lookups
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Queues a request; it joins the batch at the next step with room for it.
    pub fn add(&mut self, req: NewRequest) {
        self.waiting.push_back(Running::new(req));
    }

    /// Joins a sequence whose prompt was prefilled elsewhere. `kv.tokens` is the prompt (and the
    /// resumed tokens); `first` is the token the prefill sampled (already sent to the client),
    /// fed at the next step.
    pub fn add_imported(&mut self, req: NewRequest, kv: &KvExport, first: u32) -> Result<()> {
        if kv.tokens.len() != req.prompt.len() + req.resumed.len() || kv.tokens != req.context() {
            return Err(EngineError::Import("transferred tokens differ from the request's prompt".into()));
        }
        // An arriving sequence takes blocks from locally admitted ones, as a local one would.
        loop {
            match self.engine.import(req.id, kv) {
                Err(EngineError::OutOfBlocks { .. }) if self.preempt_one(req.id) => continue,
                other => break other?,
            }
        }
        let mut req = req;
        if let Some(g) = req.grammar.as_mut() {
            g.advance(first).map_err(|e| EngineError::Import(format!("the first token breaks the output constraint: {e}")))?;
        }
        let fed = kv.tokens.len();
        let now = Instant::now();
        let mut output = req.resumed.clone();
        output.push(first);
        self.running.push(Running { req, output, fed, cached: 0, queued: now, started: Some(now), passes: 0, prompt_lp: None });
        Ok(())
    }

    /// Stops a request wherever it is and frees its blocks. Returns whether it was known.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        if let Some(i) = self.held.iter().position(|&h| h == id) {
            self.held.swap_remove(i);
            self.engine.release(id);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|r| r.req.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|r| r.req.id == id) {
            self.running.remove(i);
            self.engine.release(id);
            return true;
        }
        false
    }

    fn admit(&mut self, events: &mut Vec<Event>) {
        while self.running.len() < self.cfg.max_running {
            let Some(mut r) = self.waiting.pop_front() else { break };
            let max = self.engine.info().max_context;
            if r.req.prompt.is_empty() {
                events.push(Event::Failed { id: r.req.id, error: ApiError::invalid("prompt", "empty prompt") });
                continue;
            }
            let vocab = self.engine.info().vocab_size;
            if let Some(bad) = r.req.prompt.iter().chain(&r.req.resumed).find(|&&t| t as usize >= vocab) {
                let error = ApiError::invalid("prompt", format!("token id {bad} is outside the vocabulary of {vocab}"));
                events.push(Event::Failed { id: r.req.id, error });
                continue;
            }
            if r.req.prompt.len() + r.req.resumed.len() >= max {
                let message = format!("prompt of {} tokens leaves no room in a context of {max}", r.req.prompt.len() + r.req.resumed.len());
                events.push(Event::Failed { id: r.req.id, error: ApiError::new(ErrorCode::ContextLengthExceeded, message) });
                continue;
            }
            let known: Vec<u32> = (0..r.known()).map(|i| r.token(i)).collect();
            // A prompt to score is computed whole: cached blocks would leave positions without
            // logits.
            let added = if r.prompt_lp.is_some() {
                self.engine.add_sequence_uncached(r.req.id, &known)
            } else {
                self.engine.add_sequence(r.req.id, &known)
            };
            match added {
                Ok(cached) => {
                    if r.output.len() == r.req.resumed.len() {
                        r.cached = cached;
                        self.prefix_lookups.0 += r.known() as u64;
                        self.prefix_lookups.1 += cached as u64;
                    }
                    r.fed = cached;
                    self.running.push(r);
                }
                Err(e) => events.push(Event::Failed { id: r.req.id, error: (&e).into() }),
            }
        }
    }

    /// Builds the next batch: every decode token first (they are latency-critical), then prefill
    /// chunks in arrival order within the token budget.
    fn plan(&self) -> Vec<(usize, ForwardItem)> {
        let mut budget = self.cfg.max_batch_tokens;
        let mut items = Vec::new();
        for (i, r) in self.running.iter().enumerate().filter(|(_, r)| r.is_decoding()) {
            items.push((i, ForwardItem { seq: r.req.id, tokens: vec![r.token(r.fed)], all_logits: false }));
            budget = budget.saturating_sub(1);
        }
        for (i, r) in self.running.iter().enumerate().filter(|(_, r)| !r.is_decoding()) {
            if budget == 0 {
                break;
            }
            let scored = r.prompt_lp.is_some();
            let end = (r.fed + if scored { budget.min(SCORED_CHUNK) } else { budget }).min(r.known());
            items.push((i, ForwardItem { seq: r.req.id, tokens: (r.fed..end).map(|j| r.token(j)).collect(), all_logits: scored }));
            budget -= end - r.fed;
        }
        items
    }

    /// Drops the cache of the most recently admitted sequence outside `keep` and queues it to be
    /// recomputed (its full blocks stay in the prefix cache, so recompute is often cheap).
    fn preempt_one(&mut self, keep: SeqId) -> bool {
        let Some(i) = self.running.iter().rposition(|r| r.req.id != keep) else { return false };
        let mut r = self.running.remove(i);
        self.engine.release(r.req.id);
        r.fed = 0;
        if let Some(lp) = r.prompt_lp.as_mut() {
            lp.clear();
        }
        self.preemptions += 1;
        tracing::debug!(seq = r.req.id, "preempted for lack of kv blocks");
        self.waiting.push_front(r);
        true
    }

    /// True when every sequence that gets a token from this plan wants exactly the argmax of its
    /// logits (within its grammar, if it has one): greedy, no penalties, no log-probabilities,
    /// no suppressed tokens. Then the engine may pick the tokens where the logits are
    /// ([`Engine::forward_argmax`], or [`Engine::forward_argmax_masked`] with grammars). Seeded
    /// sampling stays on the host so that a seed draws the same tokens on every engine.
    fn plain_greedy(&self, plan: &[(usize, ForwardItem)]) -> bool {
        plan.iter().all(|(i, item)| {
            let r = &self.running[*i];
            let p = &r.req.params;
            // A scored prompt needs every row of logits.
            !item.all_logits
                && (r.fed + item.tokens.len() < r.known()
                    || (p.is_greedy()
                        && p.repetition_penalty == 1.0
                        && p.presence_penalty == 0.0
                        && p.frequency_penalty == 0.0
                        && p.logprobs.is_none()
                        && p.logit_bias.is_empty()
                        && r.output.len() >= p.min_tokens))
        })
    }

    fn pass(&mut self, plan: &[(usize, ForwardItem)], items: &[ForwardItem], greedy: bool) -> Result<Pass> {
        self.mask_failures.clear();
        if greedy {
            let constrained = plan.iter().any(|(i, it)| {
                let r = &self.running[*i];
                r.req.grammar.is_some() && r.fed + it.tokens.len() >= r.known()
            });
            if !constrained {
                if let Some(tokens) = self.engine.forward_argmax(items) {
                    return tokens.map(Pass::Tokens);
                }
            } else if self.engine.masks_on_device() {
                // The grammars' masks go to the engine, which asks for them once the layers
                // run; otherwise the logits come back here to be masked.
                let words = self.engine.info().vocab_size.div_ceil(32);
                let (running, failures) = (&mut self.running, &mut self.mask_failures);
                let mut masks = || grammar_masks(running, plan, words, failures);
                if let Some(tokens) = self.engine.forward_argmax_masked(items, &mut masks) {
                    return tokens.map(Pass::Tokens);
                }
            }
        }
        self.engine.forward(items).map(Pass::Logits)
    }

    /// Runs one forward pass and returns what happened.
    pub fn step(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        self.admit(&mut events);
        let pass_started = Instant::now();
        let (plan, logits) = loop {
            let mut plan = self.plan();
            if plan.is_empty() {
                return events;
            }
            // Shrink the batch until it fits; a lone sequence that cannot fit takes the blocks
            // of another, and fails only when it is alone.
            let outcome = loop {
                let items: Vec<ForwardItem> = plan.iter().map(|(_, it)| it.clone()).collect();
                let greedy = self.plain_greedy(&plan);
                match self.pass(&plan, &items, greedy) {
                    Err(EngineError::OutOfBlocks { .. }) if plan.len() > 1 => plan.truncate(plan.len() / 2),
                    other => break other,
                }
            };
            match outcome {
                Ok(l) => break (plan, l),
                Err(EngineError::OutOfBlocks { .. }) if self.preempt_one(plan[0].1.seq) => continue,
                Err(e) => {
                    // Not a capacity problem: nothing says which sequence caused it, so the
                    // whole batch fails rather than one innocent sequence per step.
                    for id in plan.iter().map(|(_, it)| it.seq).collect::<Vec<_>>() {
                        self.cancel(id);
                        events.push(Event::Failed { id, error: (&e).into() });
                    }
                    return events;
                }
            }
        };

        let passed = Instant::now();
        for (i, _) in &plan {
            let r = &mut self.running[*i];
            r.started.get_or_insert(pass_started);
            r.passes += 1;
        }
        let outs: Vec<Out> = match logits {
            Pass::Logits(l) => l.into_iter().map(Out::Rows).collect(),
            Pass::Tokens(t) => t.into_iter().map(Out::Token).collect(),
        };
        let (mut done, mut hold) = (Vec::new(), Vec::new());
        for ((i, item), out) in plan.into_iter().zip(outs) {
            let max_context = self.engine.info().max_context;
            let r = &mut self.running[i];
            let first = r.fed;
            r.fed += item.tokens.len();
            if let (Some(lp), Out::Rows(rows), Some(n)) = (r.prompt_lp.as_mut(), &out, r.req.params.prompt_logprobs) {
                // Row j holds the logits after position first + j: the next prompt token's odds.
                let prompt = &r.req.prompt;
                for (j, row) in rows.iter().enumerate() {
                    if let Some(&next) = prompt.get(first + j + 1) {
                        lp.push(prompt_logprob(row, next, n as usize));
                    }
                }
            }
            if r.fed < r.known() {
                continue;
            }
            if let Some(logprobs) = r.prompt_lp.take() {
                events.push(Event::PromptLogprobs { id: r.req.id, logprobs });
            }
            if let Some(at) = self.mask_failures.iter().position(|(f, _)| *f == i) {
                let (_, e) = self.mask_failures.swap_remove(at);
                events.push(Event::Failed { id: r.req.id, error: ApiError::new(ErrorCode::InvalidRequest, e) });
                done.push(r.req.id);
                continue;
            }
            let s = match out {
                Out::Token(token) => Sampled { token, logprobs: None },
                Out::Rows(mut rows) => {
                    let Some(mut row) = rows.pop() else { continue };
                    if let Some(Err(e)) = r.req.grammar.as_mut().map(|g| g.mask(&mut row)) {
                        events.push(Event::Failed { id: r.req.id, error: ApiError::new(ErrorCode::InvalidRequest, e) });
                        done.push(r.req.id);
                        continue;
                    }
                    let suppress: Vec<u32> = if r.output.len() < r.req.params.min_tokens {
                        r.req.eos_ids.iter().chain(&r.req.params.stop_token_ids).copied().collect()
                    } else {
                        Vec::new()
                    };
                    let ctx = SampleContext { prompt: &r.req.prompt, output: &r.output, seed: r.req.seed, suppress: &suppress };
                    sample(row, &r.req.params, &ctx)
                }
            };
            // The grammar follows every token drawn; once complete, nothing may follow.
            let complete = match r.req.grammar.as_mut().map(|g| g.advance(s.token)) {
                None => false,
                Some(Ok(complete)) => complete,
                Some(Err(e)) => {
                    events.push(Event::Failed { id: r.req.id, error: ApiError::new(ErrorCode::Internal, e) });
                    done.push(r.req.id);
                    continue;
                }
            };
            r.output.push(s.token);
            events.push(Event::Token { id: r.req.id, token: s.token, logprobs: s.logprobs });

            let p = &r.req.params;
            let is_stop = (!p.ignore_eos && r.req.eos_ids.contains(&s.token)) || p.stop_token_ids.contains(&s.token) || complete;
            let finish = if is_stop {
                Some(FinishReason::Stop)
            } else if r.output.len() >= p.max_tokens || r.known() >= max_context {
                Some(FinishReason::Length)
            } else {
                None
            };
            let usage = Usage { prompt_tokens: r.req.prompt.len(), completion_tokens: r.output.len(), cached_tokens: r.cached };
            match (finish, r.req.mode) {
                (Some(reason), _) => {
                    events.push(Event::Finished { id: r.req.id, reason, usage });
                    done.push(r.req.id);
                }
                (None, mode @ (Mode::PrefillOnly | Mode::PrefillToDevice)) => {
                    let started = r.started.unwrap_or(pass_started);
                    let exporting = Instant::now();
                    let on_device = match mode {
                        Mode::PrefillToDevice => self.engine.export_device(r.req.id),
                        _ => None,
                    };
                    let exported = match on_device {
                        Some(Ok(kv)) => {
                            // Out of the batch, but not released: the receiver copies from them.
                            hold.push(r.req.id);
                            Ok(kv)
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "device export failed; reading the blocks out");
                            self.engine.export_unsealed(r.req.id)
                        }
                        None => self.engine.export_unsealed(r.req.id),
                    };
                    match exported {
                        Ok(kv) => {
                            let timing = PrefillTiming {
                                queue: started.saturating_duration_since(r.queued),
                                compute: passed.saturating_duration_since(started),
                                export: exporting.elapsed(),
                                passes: r.passes,
                            };
                            events.push(Event::Prefilled { id: r.req.id, kv: Box::new(kv), usage, timing })
                        }
                        Err(e) => events.push(Event::Failed { id: r.req.id, error: (&e).into() }),
                    }
                    if hold.last() != Some(&r.req.id) {
                        done.push(r.req.id);
                    }
                }
                (None, Mode::Full) => {}
            }
        }
        for id in done {
            self.cancel(id);
        }
        for id in hold {
            if let Some(i) = self.running.iter().position(|r| r.req.id == id) {
                self.running.remove(i);
            }
            self.held.push(id);
        }
        events
    }
}

/// The bitmask each constrained item of `plan` that gets a token must draw within (the others
/// `None`). A grammar that allows nothing gets an empty mask, and its sequence is noted in
/// `failures`, to fail with the grammar's reason once the pass is back. A mask takes tens of
/// microseconds to a millisecond; a step's masks are computed on several threads at once.
fn grammar_masks(
    running: &mut [Running],
    plan: &[(usize, ForwardItem)],
    words: usize,
    failures: &mut Vec<(usize, String)>,
) -> Vec<Option<Vec<u32>>> {
    use rayon::prelude::*;
    // The sequences that draw within a grammar this step: index in `running` -> place in `plan`.
    let wanted: std::collections::HashMap<usize, usize> = plan
        .iter()
        .enumerate()
        .filter(|(_, (i, it))| {
            let r = &running[*i];
            r.req.grammar.is_some() && r.fed + it.tokens.len() >= r.known()
        })
        .map(|(pos, (i, _))| (*i, pos))
        .collect();
    let mut jobs: Vec<(usize, usize, &mut crate::Grammar)> =
        running.iter_mut().enumerate().filter_map(|(i, r)| Some((*wanted.get(&i)?, i, r.req.grammar.as_mut()?))).collect();
    let mask = |(pos, i, g): &mut (usize, usize, &mut crate::Grammar)| {
        let mut m = vec![0u32; words];
        let ok = g.allowed_words(&mut m);
        (*pos, *i, ok.map(|()| m))
    };
    let computed: Vec<_> = if jobs.len() > 1 { jobs.par_iter_mut().map(mask).collect() } else { jobs.iter_mut().map(mask).collect() };
    let mut out = vec![None; plan.len()];
    for (pos, i, m) in computed {
        out[pos] = Some(m.unwrap_or_else(|e| {
            failures.push((i, e));
            vec![0u32; words]
        }));
    }
    out
}
