//! The router in front of the served models: backends (models this cluster serves, or external
//! OpenAI-compatible endpoints), decisions that pick among them by the request's signals, and
//! Fusion panels (several backends answer in parallel, a judge writes one answer from theirs).
//!
//! A request reaches the router when it names one of the router's models (`…/auto`,
//! `…/fusion`) or carries a `fusion` plugin (`"plugins": [{"id": "fusion", …}]`, which the
//! OpenAI client sends as `extra_body`); every other request goes straight to its model's pools.

mod config;
pub(crate) mod fusion;
mod metrics;
mod signals;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tandem_protocol::{ApiError, ErrorCode};
use tracing::Instrument;

pub use config::{
    AlgorithmConfig, BackendConfig, BackendKind, DecisionConfig, FusionConfig, KeywordOperator, OnError, RouterConfig, RouterModel,
    SignalConfig,
};
pub use signals::{RequestText, Signal};

use crate::access::Caller;
use crate::front::Front;
use crate::AppState;
pub(crate) use metrics::RouterMetrics;

/// Most members one panel may ask (each a backend call the one client request causes).
pub(crate) const MAX_PANEL: usize = 16;

/// Where a backend's requests go.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A model this gateway serves, called in process.
    Local { model: String },
    /// An OpenAI-compatible endpoint elsewhere.
    External { base_url: String, model: String, key: Option<String> },
}

impl Target {
    /// The model name its requests carry.
    fn model(&self) -> &str {
        match self {
            Self::Local { model } | Self::External { model, .. } => model,
        }
    }
}

/// A panel: its members and judge by the names the request or configuration gave.
#[derive(Debug, Clone)]
pub(crate) struct Panel {
    /// The decision that chose it (`plugin` for a request's own panel).
    pub decision: String,
    pub members: Vec<String>,
    pub judge: String,
    pub max_concurrent: usize,
    pub on_error: OnError,
    pub judge_prompt: Option<String>,
}

impl Panel {
    fn of(decision: &str, f: &FusionConfig) -> Self {
        Self {
            decision: decision.to_string(),
            members: f.analysis_models.clone(),
            judge: f.judge_model.clone(),
            max_concurrent: f.max_concurrent.max(1),
            on_error: f.on_error,
            judge_prompt: f.judge_prompt.clone(),
        }
    }
}

/// What the router does with a request.
#[derive(Debug, Clone)]
pub(crate) enum Plan {
    Fusion(Panel),
    /// One backend answers (by its name); `decision` chose it.
    Single {
        backend: String,
        decision: String,
    },
}

struct Decision {
    id: String,
    algorithm: AlgorithmConfig,
    signals: Vec<Box<dyn Signal>>,
}

/// The router: its configuration checked against the served models, and an HTTP client for
/// external backends.
pub struct Router {
    models: Vec<RouterModel>,
    backends: Vec<BackendConfig>,
    keys: Vec<Option<String>>,
    decisions: Vec<Decision>,
    default_backend: Option<String>,
    judge_prompt: Option<String>,
    timeout: Duration,
    client: reqwest::Client,
    pub(crate) metrics: RouterMetrics,
    /// Router requests in flight (a panel between its members' calls and its judge's holds no
    /// model's request, yet must finish before the gateway stops).
    inflight: Arc<AtomicUsize>,
}

/// Counts a router request in flight while held.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn router_kind(id: &str) -> Option<&'static str> {
    let last = id.rsplit('/').next().unwrap_or(id);
    match last {
        "fusion" => Some("fusion"),
        "auto" => Some("auto"),
        _ => None,
    }
}

impl Router {
    /// Checks `cfg` against the models served (`states`): every name a backend, decision or
    /// default refers to must resolve.
    pub(crate) fn new(cfg: RouterConfig, states: &[Arc<AppState>]) -> anyhow::Result<Self> {
        let served: Vec<&str> = states.iter().map(|s| s.model_name.as_str()).collect();
        let mut keys = Vec::new();
        for (i, b) in cfg.backends.iter().enumerate() {
            if cfg.backends[..i].iter().any(|o| o.id == b.id) {
                anyhow::bail!("router config: backend `{}` is defined twice", b.id);
            }
            if b.base_url.is_none() && !served.contains(&b.model()) {
                anyhow::bail!(
                    "router config: backend `{}` has no base_url, so it must be a model this gateway serves, and `{}` is not one (served: {})",
                    b.id,
                    b.model(),
                    served.join(", ")
                );
            }
            keys.push(b.key().map_err(anyhow::Error::msg)?);
        }
        let known = |name: &str| cfg.backends.iter().any(|b| b.id == name) || served.contains(&name);
        let check = |what: &str, name: &str| {
            if known(name) {
                Ok(())
            } else {
                Err(anyhow::anyhow!("router config: {what} names `{name}`, which is neither a backend nor a served model"))
            }
        };
        let mut decisions = Vec::new();
        for d in &cfg.decisions {
            match &d.algorithm {
                AlgorithmConfig::Fusion(f) => {
                    if f.analysis_models.is_empty() || f.analysis_models.len() > MAX_PANEL {
                        anyhow::bail!(
                            "router config: decision `{}` has {} panel members; give 1 to {MAX_PANEL}",
                            d.id,
                            f.analysis_models.len()
                        );
                    }
                    for m in &f.analysis_models {
                        check(&format!("decision `{}`", d.id), m)?;
                    }
                    check(&format!("decision `{}`'s judge", d.id), &f.judge_model)?;
                }
                AlgorithmConfig::Single { backend } => check(&format!("decision `{}`", d.id), backend)?,
            }
            decisions.push(Decision {
                id: d.id.clone(),
                algorithm: d.algorithm.clone(),
                signals: d.signals.iter().map(signals::build).collect(),
            });
        }
        if let Some(b) = &cfg.default_backend {
            check("default_backend", b)?;
        }
        for m in &cfg.models {
            match router_kind(&m.id) {
                Some("fusion") if !decisions.iter().any(|d| matches!(d.algorithm, AlgorithmConfig::Fusion(_))) => {
                    anyhow::bail!("router config: model `{}` runs a fusion panel, but no decision defines one", m.id)
                }
                Some(_) => {}
                None => anyhow::bail!("router config: model `{}` must end in /auto or /fusion", m.id),
            }
            if served.contains(&m.id.as_str()) {
                anyhow::bail!("router config: `{}` is both a router model and a served model", m.id);
            }
        }
        // External backends may be reached over HTTPS (ring, as everywhere else here).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| anyhow::anyhow!("building the router's HTTP client: {e}"))?;
        Ok(Self {
            timeout: cfg.timeout()?,
            models: cfg.models,
            backends: cfg.backends,
            keys,
            decisions,
            default_backend: cfg.default_backend,
            judge_prompt: cfg.judge_prompt,
            client,
            metrics: RouterMetrics::new()?,
            inflight: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// A router with no configuration: only requests' own panels (`plugins`), over the served
    /// models.
    pub(crate) fn bare() -> anyhow::Result<Self> {
        Self::new(RouterConfig::default(), &[])
    }

    /// The router's own models, for `/v1/models`.
    pub(crate) fn models(&self) -> &[RouterModel] {
        &self.models
    }

    pub(crate) fn is_router_model(&self, name: &str) -> bool {
        self.models.iter().any(|m| m.id == name)
    }

    pub(crate) fn idle(&self) -> bool {
        self.inflight.load(Ordering::SeqCst) == 0
    }

    pub(crate) fn enter(&self) -> InFlight {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.inflight.clone())
    }

    /// Where a backend or model name leads: a configured backend first, then a served model.
    pub(crate) fn target(&self, front: &Front, name: &str) -> Option<Target> {
        if let Some((b, key)) = self.backends.iter().zip(&self.keys).find(|(b, _)| b.id == name) {
            return Some(match &b.base_url {
                Some(url) => {
                    Target::External { base_url: url.trim_end_matches('/').to_string(), model: b.model().to_string(), key: key.clone() }
                }
                None => Target::Local { model: b.model().to_string() },
            });
        }
        front.model_index(name).map(|_| Target::Local { model: name.to_string() })
    }

    /// What to do with a chat request naming `model`, or `None` when the router has no part in
    /// it. A request's own `fusion` plugin comes first.
    pub(crate) async fn plan(&self, model: &str, body: &Value) -> Result<Option<Plan>, ApiError> {
        if let Some(mut panel) = plugin_panel(body)? {
            if panel.judge.is_empty() {
                // The judge defaults to the request's model, which must then be one that answers.
                if self.is_router_model(model) {
                    return Err(ApiError::invalid("plugins", format!("`{model}` is a router model: give the fusion plugin a judge_model")));
                }
                panel.judge = model.to_string();
            }
            return Ok(Some(Plan::Fusion(panel)));
        }
        match self.models.iter().find(|m| m.id == model).and_then(|m| router_kind(&m.id)) {
            Some("fusion") => {
                let (id, f) = self
                    .decisions
                    .iter()
                    .find_map(|d| match &d.algorithm {
                        AlgorithmConfig::Fusion(f) => Some((&d.id, f)),
                        _ => None,
                    })
                    .expect("checked when the router was built");
                Ok(Some(Plan::Fusion(Panel::of(id, f))))
            }
            Some(_) => {
                let text = RequestText::of_chat(body);
                for d in &self.decisions {
                    let mut fired = false;
                    for s in &d.signals {
                        if s.fires(&text).await {
                            fired = true;
                            break;
                        }
                    }
                    if fired {
                        tracing::debug!(decision = %d.id, "decision fired");
                        return Ok(Some(match &d.algorithm {
                            AlgorithmConfig::Fusion(f) => Plan::Fusion(Panel::of(&d.id, f)),
                            AlgorithmConfig::Single { backend } => Plan::Single { backend: backend.clone(), decision: d.id.clone() },
                        }));
                    }
                }
                let fallback = self.default_backend.clone().or_else(|| self.backends.first().map(|b| b.id.clone()));
                match fallback {
                    Some(backend) => Ok(Some(Plan::Single { backend, decision: "default".into() })),
                    None => Err(ApiError::new(ErrorCode::Unavailable, format!("`{model}` fired no decision and has no default backend"))),
                }
            }
            None => Ok(None),
        }
    }

    /// Sends a chat request (`body`, whose `model` is replaced by the target's) to `target`,
    /// under `span`: the target's own response, streamed if the request streams.
    pub(crate) async fn call(&self, front: &Front, target: &Target, mut body: Value, caller: Caller, span: &tracing::Span) -> Response {
        body["model"] = Value::String(target.model().to_string());
        match target {
            Target::Local { model } => {
                let Some(i) = front.model_index(model) else {
                    return crate::error::HttpError(ApiError::new(ErrorCode::ModelNotFound, format!("`{model}` is not served here")))
                        .into_response();
                };
                let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
                front.local(i, "/v1/chat/completions", bytes, caller).instrument(span.clone()).await
            }
            Target::External { base_url, key, .. } => self.external(base_url, key.as_deref(), &body, span).await,
        }
    }

    async fn external(&self, base_url: &str, key: Option<&str>, body: &Value, span: &tracing::Span) -> Response {
        let mut req = self.client.post(format!("{base_url}/chat/completions")).json(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let mut carried = Vec::new();
        tandem_runtime::telemetry::inject(span, |k, v| carried.push((k.to_string(), v)));
        for (k, v) in carried {
            req = req.header(k, v);
        }
        // A non-streaming call is bounded as a whole; a stream only until its headers arrive
        // (then by the client, which may read for as long as the answer takes).
        let streaming = body["stream"] == true;
        if !streaming {
            req = req.timeout(self.timeout);
        }
        let sent = match tokio::time::timeout(self.timeout, req.send()).await {
            Err(_) => return upstream_error(ErrorCode::Timeout, format!("{base_url} did not answer within {:?}", self.timeout)),
            Ok(Err(e)) if e.is_timeout() => return upstream_error(ErrorCode::Timeout, format!("{base_url} timed out: {e}")),
            Ok(Err(e)) => return upstream_error(ErrorCode::Unavailable, format!("cannot reach {base_url}: {e}")),
            Ok(Ok(r)) => r,
        };
        let status = StatusCode::from_u16(sent.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let content_type = sent.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
        let mut resp = Response::new(Body::from_stream(sent.bytes_stream()));
        *resp.status_mut() = status;
        if let Some(ct) = content_type {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        resp
    }

    /// The judge's instructions for `panel`.
    pub(crate) fn judge_prompt<'a>(&'a self, panel: &'a Panel) -> &'a str {
        panel.judge_prompt.as_deref().or(self.judge_prompt.as_deref()).unwrap_or(fusion::DEFAULT_JUDGE_PROMPT)
    }

    /// Runs `plan` for a chat request whose `model` was `requested`.
    pub(crate) async fn run(&self, front: &Front, plan: Plan, body: Value, requested: &str, caller: Caller) -> Response {
        let _inflight = self.enter();
        match plan {
            Plan::Single { backend, decision } => {
                self.metrics.decisions.with_label_values(&[&decision]).inc();
                let Some(target) = self.target(front, &backend) else {
                    return crate::error::HttpError(ApiError::new(ErrorCode::ModelNotFound, format!("no backend `{backend}`")))
                        .into_response();
                };
                let span = tracing::info_span!("route", otel.name = format!("route {backend}"), tandem.backend = %backend, tandem.decision = %decision);
                let started = Instant::now();
                let resp = self.call(front, &target, body, caller, &span).await;
                self.metrics.observe(&backend, started.elapsed(), resp.status().is_success());
                resp
            }
            Plan::Fusion(panel) => {
                self.metrics.decisions.with_label_values(&[&panel.decision]).inc();
                fusion::run(front, self, panel, body, requested, caller).await
            }
        }
    }
}

fn upstream_error(code: ErrorCode, message: String) -> Response {
    crate::error::HttpError(ApiError::new(code, message)).into_response()
}

/// A request's own panel: `plugins: [{"id": "fusion", "analysis_models": […], "judge_model": …}]`
/// at the top level (as the OpenAI client sends `extra_body`) or under `extra_body`. Without a
/// `judge_model` the panel's judge is left empty, for the request's model.
fn plugin_panel(body: &Value) -> Result<Option<Panel>, ApiError> {
    let plugins = match (&body["plugins"], &body["extra_body"]["plugins"]) {
        (Value::Null, Value::Null) => return Ok(None),
        (Value::Null, p) | (p, _) => p,
    };
    let Some(list) = plugins.as_array() else {
        return Err(ApiError::invalid("plugins", "plugins must be a list"));
    };
    let Some(p) = list.iter().find(|p| p["id"] == "fusion") else {
        return Ok(None);
    };
    let members: Vec<String> = match p["analysis_models"].as_array() {
        Some(a) if a.len() > MAX_PANEL => {
            return Err(ApiError::invalid("plugins", format!("the fusion plugin asks {} analysis_models; at most {MAX_PANEL}", a.len())))
        }
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|m| m.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::invalid("plugins", "the fusion plugin's analysis_models must be model or backend names"))?,
        _ => return Err(ApiError::invalid("plugins", "the fusion plugin needs analysis_models: a non-empty list of models")),
    };
    let judge = match &p["judge_model"] {
        Value::Null => String::new(),
        Value::String(j) if !j.is_empty() => j.clone(),
        _ => return Err(ApiError::invalid("plugins", "the fusion plugin's judge_model must be a model name")),
    };
    let max_concurrent = p["max_concurrent"].as_u64().map_or(3, |n| n.clamp(1, MAX_PANEL as u64) as usize);
    let on_error = match p["on_error"].as_str() {
        None | Some("skip") => OnError::Skip,
        Some("fail") => OnError::Fail,
        Some(other) => return Err(ApiError::invalid("plugins", format!("on_error must be `skip` or `fail`, got `{other}`"))),
    };
    Ok(Some(Panel {
        decision: "plugin".into(),
        members,
        judge,
        max_concurrent,
        on_error,
        judge_prompt: p["judge_prompt"].as_str().map(str::to_string),
    }))
}

/// The body without the router's own fields, as a backend should get it.
pub(crate) fn strip_router_fields(body: &mut Value) {
    if let Some(o) = body.as_object_mut() {
        o.remove("plugins");
        if let Some(extra) = o.get_mut("extra_body").and_then(Value::as_object_mut) {
            extra.remove("plugins");
            if extra.is_empty() {
                o.remove("extra_body");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_read_from_either_place() {
        let body = serde_json::json!({"plugins": [{"id": "fusion", "analysis_models": ["a", "b"]}]});
        let p = plugin_panel(&body).unwrap().expect("a panel");
        assert_eq!((p.members, p.judge.as_str(), p.max_concurrent, p.on_error), (vec!["a".to_string(), "b".into()], "", 3, OnError::Skip));
        let body = serde_json::json!({"extra_body": {"plugins": [{"id": "fusion", "analysis_models": ["a"], "judge_model": "j", "on_error": "fail"}]}});
        let p = plugin_panel(&body).unwrap().expect("a panel");
        assert_eq!((p.judge.as_str(), p.on_error), ("j", OnError::Fail));
        assert!(plugin_panel(&serde_json::json!({"plugins": [{"id": "other"}]})).unwrap().is_none());
        let e = plugin_panel(&serde_json::json!({"plugins": [{"id": "fusion", "analysis_models": []}]})).unwrap_err();
        assert!(e.message.contains("analysis_models"), "{}", e.message);
        let many: Vec<String> = (0..=MAX_PANEL).map(|i| format!("m{i}")).collect();
        let e = plugin_panel(&serde_json::json!({"plugins": [{"id": "fusion", "analysis_models": many}]})).unwrap_err();
        assert!(e.message.contains("at most 16"), "{}", e.message);
        let mut body = serde_json::json!({"model": "m", "plugins": [], "extra_body": {"plugins": []}});
        strip_router_fields(&mut body);
        assert_eq!(body, serde_json::json!({"model": "m"}));
    }
}
