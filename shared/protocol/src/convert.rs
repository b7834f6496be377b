//! Conversions between the gRPC messages and the crate's own types.

use crate::pb;
use crate::sampling::SamplingParams;

impl From<&SamplingParams> for pb::SamplingParams {
    fn from(p: &SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            max_tokens: p.max_tokens as u32,
            min_tokens: p.min_tokens as u32,
            stop_token_ids: p.stop_token_ids.clone(),
            ignore_eos: p.ignore_eos,
            logprobs: p.logprobs,
            constraint: p.constraint.as_ref().and_then(|c| serde_json::to_string(c).ok()).unwrap_or_default(),
            logit_bias: p.logit_bias.iter().copied().collect(),
            prompt_logprobs: p.prompt_logprobs,
        }
    }
}

impl From<&pb::SamplingParams> for SamplingParams {
    fn from(p: &pb::SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            min_p: p.min_p,
            seed: None,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            max_tokens: p.max_tokens as usize,
            min_tokens: p.min_tokens as usize,
            stop: Vec::new(),
            stop_token_ids: p.stop_token_ids.clone(),
            ignore_eos: p.ignore_eos,
            logprobs: p.logprobs,
            // An unreadable constraint is refused where requests are validated
            // (`tandem_engine::grpc::new_request`), not dropped here.
            constraint: (!p.constraint.is_empty()).then(|| serde_json::from_str(&p.constraint).ok()).flatten(),
            logit_bias: {
                let mut b: Vec<(u32, f32)> = p.logit_bias.iter().map(|(&t, &v)| (t, v)).collect();
                b.sort_by_key(|&(t, _)| t);
                b
            },
            prompt_logprobs: p.prompt_logprobs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_params_round_trip_except_what_stays_in_the_gateway() {
        let p = SamplingParams {
            temperature: 0.5,
            top_k: 7,
            min_tokens: 3,
            logprobs: Some(2),
            stop_token_ids: vec![9],
            constraint: Some(crate::Constraint::Regex { pattern: "[a-z]+".into() }),
            logit_bias: vec![(3, -100.0), (11, 2.5)],
            prompt_logprobs: Some(0),
            ..Default::default()
        };
        let back = SamplingParams::from(&pb::SamplingParams::from(&p));
        assert_eq!(back, p);
    }
}
