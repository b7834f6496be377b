//! Conversions between engine types and the gRPC messages the workers speak.

use tandem_protocol::pb::{self, WorkerInfo};
use tandem_protocol::{ApiError, FinishReason, SamplingParams};

use crate::batcher::{Mode, NewRequest, Usage};
use crate::sampling::TokenLogprobs;
use crate::worker::EngineHandle;

/// The engine's view of a gRPC request, validated.
pub fn new_request(engine: &EngineHandle, r: &pb::GenerateRequest, mode: Mode) -> Result<NewRequest, ApiError> {
    let params = r.params.as_ref().map(SamplingParams::from).ok_or_else(|| ApiError::invalid("params", "missing params"))?;
    params.validate().map_err(|e| ApiError::invalid(e.param, e.message))?;
    if r.prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "empty prompt"));
    }
    let wire = r.params.as_ref().map(|p| p.constraint.as_str()).unwrap_or_default();
    if !wire.is_empty() && params.constraint.is_none() {
        return Err(ApiError::invalid("response_format", "the output constraint is not readable"));
    }
    let grammar = match &params.constraint {
        None => None,
        Some(c) => {
            let compiler = engine.constraints().ok_or_else(|| {
                ApiError::invalid("response_format", "structured output is not available for this model (its tokenizer is not byte-level)")
            })?;
            Some(compiler.compile(c, &r.resumed)?)
        }
    };
    Ok(NewRequest {
        id: engine.next_id(),
        prompt: r.prompt.clone(),
        params,
        seed: r.seed,
        eos_ids: r.eos_ids.clone(),
        mode,
        resumed: r.resumed.clone(),
        grammar,
    })
}

pub fn token_message(token: u32, logprobs: Option<TokenLogprobs>) -> pb::Token {
    pb::Token {
        id: token,
        logprobs: logprobs.map(|l| pb::Logprobs {
            logprob: l.logprob,
            top: l.top.into_iter().map(|(token, logprob)| pb::TopLogprob { token, logprob }).collect(),
            rank: l.rank,
        }),
    }
}

pub fn finished_message(reason: FinishReason, usage: Usage) -> pb::Finished {
    pb::Finished {
        finish_reason: reason.as_str().to_string(),
        usage: Some(pb::Usage {
            prompt_tokens: usage.prompt_tokens as u32,
            completion_tokens: usage.completion_tokens as u32,
            cached_tokens: usage.cached_tokens as u32,
        }),
    }
}

/// What a worker reports about itself: identity, model, and load.
pub fn worker_info(engine: &EngineHandle, worker_id: &str, role: &str, kv_addr: &str) -> WorkerInfo {
    let load = engine.load();
    let info = engine.info();
    WorkerInfo {
        worker_id: worker_id.to_string(),
        role: role.to_string(),
        model: info.model_name.clone(),
        tp_size: info.tp_size as u32,
        kv_addr: kv_addr.to_string(),
        running: load.running as u32,
        waiting: load.waiting as u32,
        free_blocks: (load.pool.total_blocks - load.pool.used_blocks) as u32,
        total_blocks: load.pool.total_blocks as u32,
        max_context: info.max_context as u32,
        prefix_hit_blocks: load.pool.prefix_hit_blocks,
        block_size: info.block_size as u32,
        ..WorkerInfo::default()
    }
}
