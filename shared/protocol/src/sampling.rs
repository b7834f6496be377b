//! Per-request sampling parameters, validated once at the edge and trusted inside.

use serde::{Deserialize, Serialize};

/// How the next token is chosen and when generation stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    pub min_p: f32,
    /// Same seed and same prompt give the same tokens, wherever the request runs.
    pub seed: Option<u64>,
    /// Multiplicative penalty (as in Hugging Face) on tokens seen in prompt or output.
    pub repetition_penalty: f32,
    /// Additive penalties (as in OpenAI) on tokens seen in the output.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub max_tokens: usize,
    /// End-of-sequence and stop tokens are suppressed until this many tokens are generated.
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// `Some(n)`: return the chosen token's log-probability and the `n` most likely alternatives.
    pub logprobs: Option<u32>,
    /// What the text must match (structured output); every step's logits are masked to it.
    pub constraint: Option<crate::Constraint>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`, −100 to 100).
    pub logit_bias: Vec<(u32, f32)>,
    /// `Some(n)`: the log-probability of each prompt token given the ones before it, with the
    /// `n` most likely alternatives (vLLM's `prompt_logprobs`; also what `echo` with `logprobs`
    /// reports for the prompt).
    pub prompt_logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: 256,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            constraint: None,
            logit_bias: Vec::new(),
            prompt_logprobs: None,
        }
    }
}

/// Most alternatives a request may ask for per position.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A parameter out of range; `param` names it as the client spelled it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SamplingParamsError {
    pub param: &'static str,
    pub message: String,
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self { temperature: 0.0, max_tokens, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Checks every range; the first violation wins.
    pub fn validate(&self) -> Result<(), SamplingParamsError> {
        fn check(ok: bool, param: &'static str, message: String) -> Result<(), SamplingParamsError> {
            if ok {
                Ok(())
            } else {
                Err(SamplingParamsError { param, message })
            }
        }
        let t = self.temperature;
        check(t.is_finite() && (0.0..=2.0).contains(&t), "temperature", format!("temperature must be between 0 and 2, got {t}"))?;
        let p = self.top_p;
        check(p.is_finite() && p > 0.0 && p <= 1.0, "top_p", format!("top_p must be in (0, 1], got {p}"))?;
        let m = self.min_p;
        check(m.is_finite() && (0.0..=1.0).contains(&m), "min_p", format!("min_p must be between 0 and 1, got {m}"))?;
        let r = self.repetition_penalty;
        check(r.is_finite() && r > 0.0 && r <= 10.0, "repetition_penalty", format!("repetition_penalty must be in (0, 10], got {r}"))?;
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            check(v.is_finite() && (-2.0..=2.0).contains(&v), name, format!("{name} must be between -2 and 2, got {v}"))?;
        }
        check(self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1".into())?;
        check(
            self.min_tokens <= self.max_tokens,
            "min_tokens",
            format!("min_tokens ({}) must not exceed max_tokens ({})", self.min_tokens, self.max_tokens),
        )?;
        check(self.stop.len() <= 16, "stop", "at most 16 stop sequences are allowed".into())?;
        check(self.stop.iter().all(|s| !s.is_empty()), "stop", "stop sequences must not be empty".into())?;
        check(self.logit_bias.len() <= 300, "logit_bias", "at most 300 tokens may be biased".into())?;
        for &(t, b) in &self.logit_bias {
            check(
                b.is_finite() && (-100.0..=100.0).contains(&b),
                "logit_bias",
                format!("the bias of token {t} must be between -100 and 100, got {b}"),
            )?;
        }
        if let Some(n) = self.logprobs {
            check(n <= MAX_TOP_LOGPROBS, "top_logprobs", format!("at most {MAX_TOP_LOGPROBS} alternatives per position, got {n}"))?;
        }
        if let Some(n) = self.prompt_logprobs {
            check(n <= MAX_TOP_LOGPROBS, "prompt_logprobs", format!("at most {MAX_TOP_LOGPROBS} alternatives per position, got {n}"))?;
        }
        Ok(())
    }
}

/// Why a sequence stopped, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-sequence token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The message is tool calls (chat, with `tools`).
    #[serde(rename = "tool_calls")]
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ranges_are_checked() {
        assert!(SamplingParams::default().validate().is_ok());
        let bad = SamplingParams { temperature: 3.0, ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().param, "temperature");
        let bad = SamplingParams { top_p: 0.0, ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().param, "top_p");
        let bad = SamplingParams { min_tokens: 10, max_tokens: 5, ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().param, "min_tokens");
        let bad = SamplingParams { logprobs: Some(21), ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().param, "top_logprobs");
    }
}
