//! `--router-config`: the router's models, its backends and its decisions, in the YAML shape of
//! vLLM Semantic Router's configuration:
//!
//! ```yaml
//! router:
//!   models:   [{id: "vllm-sr/auto", description: "…"}, {id: "vllm-sr/fusion", description: "…"}]
//!   backends:
//!     - {id: alpha, type: tandem, model: alpha}                       # served by this cluster
//!     - {id: remote, type: openai, base_url: "http://host:8000/v1", model: gpt-x, api_key: "…"}
//!   decisions:
//!     - id: research_fusion
//!       algorithm: {type: fusion, analysis_models: [alpha, remote], judge_model: alpha,
//!                   max_concurrent: 3, on_error: skip}
//!       signals: [{type: keyword, keywords: ["research", "compare"]}]
//!   default_backend: alpha
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The file: everything under `router:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    router: RouterConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// The router's own models, listed by `/v1/models`: an id ending in `/fusion` (or `fusion`)
    /// always runs the first fusion decision's panel; one ending in `/auto` (or `auto`) runs the
    /// first decision whose signals fire, or sends the request to the default backend.
    #[serde(default)]
    pub models: Vec<RouterModel>,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub decisions: Vec<DecisionConfig>,
    /// Where `…/auto` sends a request no decision takes (default: the first backend).
    #[serde(default)]
    pub default_backend: Option<String>,
    /// The judge's instructions (see [`crate::router::fusion::DEFAULT_JUDGE_PROMPT`] for the
    /// placeholders); a fusion algorithm may give its own.
    #[serde(default)]
    pub judge_prompt: Option<String>,
    /// Longest one backend call may take, in seconds (default 300).
    #[serde(default)]
    pub timeout_s: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterModel {
    pub id: String,
    #[serde(default)]
    pub description: String,
}

/// Which API a backend speaks; every kind is called as an OpenAI-compatible endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Vllm,
    Openai,
    Tandem,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: BackendKind,
    /// An external endpoint's base (`http://host:port/v1`); without it the backend is a model
    /// this cluster serves, named by `model` (default: the id).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The model to ask for (default: the id).
    #[serde(default)]
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer …` to an external endpoint.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The name of an environment variable holding the key, to keep it out of the file.
    #[serde(default)]
    pub api_key_env: Option<String>,
}

impl BackendConfig {
    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or(&self.id)
    }

    /// The key to send, from the file or from the environment.
    pub fn key(&self) -> Result<Option<String>, String> {
        match (&self.api_key, &self.api_key_env) {
            (Some(k), _) => Ok(Some(k.clone())),
            (None, Some(var)) => {
                std::env::var(var).map(Some).map_err(|_| format!("backend `{}`: the environment variable {var} is not set", self.id))
            }
            (None, None) => Ok(None),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionConfig {
    pub id: String,
    pub algorithm: AlgorithmConfig,
    /// Any one firing takes the request (none: the decision never fires by itself, but `…/fusion`
    /// still runs it).
    #[serde(default)]
    pub signals: Vec<SignalConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AlgorithmConfig {
    /// A panel of backends answers in parallel; a judge reads their answers and writes one.
    Fusion(FusionConfig),
    /// One backend answers.
    Single { backend: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusionConfig {
    /// The panel: backend ids (or names of models this cluster serves).
    pub analysis_models: Vec<String>,
    pub judge_model: String,
    /// Most panel members asked at once.
    #[serde(default = "default_concurrency")]
    pub max_concurrent: usize,
    #[serde(default)]
    pub on_error: OnError,
    /// Instructions for the judge, instead of the router's.
    #[serde(default)]
    pub judge_prompt: Option<String>,
}

fn default_concurrency() -> usize {
    3
}

/// What a failing (or timed-out) panel member does to the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Drop the member and go on with the rest (the request fails only if none answers).
    #[default]
    Skip,
    /// Fail the request.
    Fail,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SignalConfig {
    /// Fires when the request's user text contains the keywords (`operator: any`, the default,
    /// or `all`), ignoring case unless `case_sensitive`.
    Keyword {
        keywords: Vec<String>,
        #[serde(default)]
        operator: KeywordOperator,
        #[serde(default)]
        case_sensitive: bool,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeywordOperator {
    #[default]
    Any,
    All,
}

impl RouterConfig {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: File = serde_norway::from_str(text)?;
        Ok(file.router)
    }

    /// `timeout_s`, checked: positive and at most a day.
    pub fn timeout(&self) -> anyhow::Result<Duration> {
        match self.timeout_s {
            None => Ok(Duration::from_secs(300)),
            Some(t) if t > 0.0 && t <= 86_400.0 => Ok(Duration::from_secs_f64(t)),
            Some(t) => anyhow::bail!("router config: timeout_s must be above 0 and at most 86400 seconds, got {t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_semantic_router_shape_parses() {
        let c = RouterConfig::parse(
            r#"
router:
  models:
    - {id: "vllm-sr/auto", description: "routes by signals"}
    - {id: "vllm-sr/fusion", description: "always a panel"}
  backends:
    - {id: a, type: tandem, model: alpha}
    - {id: ext, type: openai, base_url: "http://127.0.0.1:9/v1", model: x, api_key: k}
  decisions:
    - id: research_fusion
      algorithm: {type: fusion, analysis_models: [a, ext], judge_model: a, max_concurrent: 2, on_error: fail}
      signals: [{type: keyword, keywords: ["research", "compare"]}]
    - id: code
      algorithm: {type: single, backend: ext}
      signals: [{type: keyword, keywords: ["rust", "cargo"], operator: all}]
"#,
        )
        .unwrap();
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.backends[0].model(), "alpha");
        assert_eq!(c.backends[1].key().unwrap().as_deref(), Some("k"));
        let AlgorithmConfig::Fusion(f) = &c.decisions[0].algorithm else { panic!("fusion") };
        assert_eq!((f.max_concurrent, f.on_error), (2, OnError::Fail));
        assert!(matches!(&c.decisions[1].signals[0], SignalConfig::Keyword { operator: KeywordOperator::All, .. }));
        assert_eq!(c.timeout().unwrap(), Duration::from_secs(300));
        for bad in ["0", "-1", ".inf", "1e30"] {
            let c = RouterConfig::parse(&format!("router:\n  timeout_s: {bad}\n")).unwrap();
            assert!(c.timeout().is_err(), "{bad}");
        }
    }

    #[test]
    fn mistakes_are_named() {
        let e = RouterConfig::parse("router:\n  backends: [{id: a, type: grpc}]\n").unwrap_err().to_string();
        assert!(e.contains("grpc"), "{e}");
        let e =
            RouterConfig::parse("router:\n  decisions: [{id: d, algorithm: {type: fusion, judge_model: a}}]\n").unwrap_err().to_string();
        assert!(e.contains("analysis_models"), "{e}");
        let e = RouterConfig::parse("router:\n  modles: []\n").unwrap_err().to_string();
        assert!(e.contains("modles"), "{e}");
    }
}
