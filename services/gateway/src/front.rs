//! The endpoint clients see: every served model behind one address, a request going to the
//! pools of the model it names, and the router (its own models, and panels a request asks for)
//! in front of them. Keys, rate limits and traces apply here, once per client request.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, Request, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Serialize;
use serde_json::Value;
use tandem_protocol::openai::{Model, ModelList};
use tandem_protocol::{ApiError, ErrorCode};
use tandem_runtime::Shutdown;
use tower::ServiceExt;

use crate::access::{self, Access, Caller};
use crate::error::{HttpError, MAX_BODY_BYTES};
use crate::render::now;
use crate::workers::Role;
use crate::{api, router, AppState};

pub(crate) struct Front {
    models: Vec<Arc<AppState>>,
    /// Each model's own endpoints, in the order of `models`.
    routes: Vec<Router>,
    router: Arc<router::Router>,
    access: Arc<Access>,
    shutdown: Shutdown,
}

type F = Arc<Front>;

impl Front {
    pub fn new(models: Vec<Arc<AppState>>, router: Option<Arc<router::Router>>, access: Arc<Access>, shutdown: Shutdown) -> Self {
        let routes = models.iter().map(|s| api::routes(s.clone())).collect();
        let router = router.unwrap_or_else(|| Arc::new(router::Router::bare().expect("an empty router configuration is valid")));
        Self { models, routes, router, access, shutdown }
    }

    /// The served models' names, the first the default.
    pub fn names(&self) -> Vec<&str> {
        self.models.iter().map(|s| s.model_name.as_str()).collect()
    }

    pub fn model_index(&self, name: &str) -> Option<usize> {
        self.models.iter().position(|s| s.model_name == name)
    }

    /// Nothing in flight: no model's request, no router's.
    pub fn idle(&self) -> bool {
        self.models.iter().all(|s| s.metrics.running.get() == 0) && self.router.idle()
    }

    /// Every name a request may give as `model`, for an error that lists them.
    fn available(&self) -> String {
        let mut names: Vec<String> = self.names().iter().map(|n| format!("`{n}`")).collect();
        names.extend(self.router.models().iter().map(|m| format!("`{}`", m.id)));
        names.join(", ")
    }

    /// POSTs `body` to model `i`'s own `path`, in process, as `caller`.
    pub async fn local(&self, i: usize, path: &str, body: Bytes, caller: Caller) -> Response {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("a well-formed request");
        req.extensions_mut().insert(caller);
        match self.routes[i].clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

/// The gateway's routes over every model it serves.
pub(crate) fn router(front: F) -> Router {
    let access = front.access.clone();
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|s: State<F>, c: Extension<Caller>, b: Result<Bytes, BytesRejection>| dispatch(s, c, b, "/v1/chat/completions")),
        )
        .route(
            "/v1/completions",
            post(|s: State<F>, c: Extension<Caller>, b: Result<Bytes, BytesRejection>| dispatch(s, c, b, "/v1/completions")),
        )
        .route("/tokenize", post(|s: State<F>, c: Extension<Caller>, b: Result<Bytes, BytesRejection>| dispatch(s, c, b, "/tokenize")))
        .route("/detokenize", post(|s: State<F>, c: Extension<Caller>, b: Result<Bytes, BytesRejection>| dispatch(s, c, b, "/detokenize")))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/version", get(|| async { axum::Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION")})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            HttpError(ApiError::new(ErrorCode::MethodNotAllowed, format!("{method} is not allowed on {}", uri.path())))
        })
        .fallback(|method: Method, uri: Uri| async move {
            HttpError(ApiError::new(ErrorCode::NotFound, format!("no route for {method} {}", uri.path())))
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(access, access::guard))
        .layer(middleware::from_fn(api::edge))
        .with_state(front)
}

/// The routes of a gateway serving one model, with no router configuration.
#[cfg(test)]
pub(crate) fn single(state: Arc<AppState>) -> Router {
    let access = state.access.clone();
    let shutdown = state.shutdown.clone();
    router(Arc::new(Front::new(vec![state], None, access, shutdown)))
}

/// What `dispatch` reads of a body before choosing where it goes.
#[derive(serde::Deserialize)]
struct Peek {
    #[serde(default)]
    model: Option<Value>,
}

/// Sends an API request where its `model` says: a served model's pools, or the router. A body
/// that does not parse, or names no model, goes to the default model, whose endpoint says
/// what is wrong with it.
async fn dispatch(
    State(f): State<F>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
    path: &'static str,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return HttpError(crate::error::parse_body::<Value>(Err(e)).expect_err("a rejected body")).into_response(),
    };
    let model = match serde_json::from_slice::<Peek>(&body) {
        Ok(Peek { model: Some(Value::String(m)) }) => m,
        _ => return f.local(0, path, body, caller).await,
    };
    let chat = path == "/v1/chat/completions";
    let asks_router = f.router.is_router_model(&model) || (chat && has_plugins(&body));
    if asks_router {
        if !chat {
            return HttpError(ApiError::invalid("model", format!("`{model}` answers chat completions only (/v1/chat/completions)")))
                .into_response();
        }
        let Ok(value) = serde_json::from_slice::<Value>(&body) else { return f.local(0, path, body, caller).await };
        match f.router.plan(&model, &value).await {
            Err(e) => return HttpError(e).into_response(),
            Ok(Some(plan)) => return f.router.run(&f, plan, value, &model, caller).await,
            // A plugin that is not the router's: the model's own endpoint, without it.
            Ok(None) => {
                if let Some(i) = f.model_index(&model) {
                    let mut value = value;
                    router::strip_router_fields(&mut value);
                    return f.local(i, path, Bytes::from(serde_json::to_vec(&value).unwrap_or_default()), caller).await;
                }
            }
        }
    }
    match f.model_index(&model) {
        Some(i) => f.local(i, path, body, caller).await,
        None => HttpError(ApiError {
            code: ErrorCode::ModelNotFound,
            message: format!("the model `{model}` does not exist; this server serves {}", f.available()),
            param: Some("model".into()),
        })
        .into_response(),
    }
}

/// Whether a body carries `plugins` (at the top or under `extra_body`), without parsing it all.
fn has_plugins(body: &[u8]) -> bool {
    body.windows(b"\"plugins\"".len()).any(|w| w == b"\"plugins\"")
}

async fn models(State(f): State<F>) -> Json<ModelList> {
    let mut list: Vec<Model> = f.models.iter().map(|s| Model::new(&s.model_name, now(), "tandem", s.workers.max_context())).collect();
    list.extend(f.router.models().iter().map(|m| Model::new(&m.id, now(), "tandem-router", None)));
    Json(ModelList::new(list))
}

/// `/ready`'s body: what the gateway can route to, and whether it is on its way out. The fields
/// are in the order they have always been written in; they describe the default model, and
/// `models` each one when there are several.
#[derive(Serialize)]
struct Readiness {
    decode_workers: usize,
    draining: bool,
    prefill_workers: usize,
    /// Decode workers among `decode_workers` that compute prompts too.
    aggregated_workers: usize,
    /// The tensor-parallel degrees the healthy workers of each pool run.
    tp_sizes: TpSizes,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    models: Vec<ModelReadiness>,
}

#[derive(Serialize)]
struct TpSizes {
    prefill: Vec<u32>,
    decode: Vec<u32>,
}

#[derive(Serialize)]
struct ModelReadiness {
    model: String,
    ready: bool,
    prefill_workers: usize,
    decode_workers: usize,
    aggregated_workers: usize,
}

/// 200 when a served model can take a request and the gateway is not draining: a model whose
/// pools are all gone takes no other model out of the load balancer (its requests get a 503,
/// and `models` says which is down).
async fn ready(State(f): State<F>) -> Response {
    let first = &f.models[0].workers;
    let draining = f.shutdown.is_draining();
    let models = if f.models.len() > 1 {
        f.models
            .iter()
            .map(|s| ModelReadiness {
                model: s.model_name.clone(),
                ready: s.workers.can_serve(),
                prefill_workers: s.workers.healthy(Role::Prefill),
                decode_workers: s.workers.healthy(Role::Decode),
                aggregated_workers: s.workers.healthy_aggregated(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let body = Json(Readiness {
        decode_workers: first.healthy(Role::Decode),
        draining,
        prefill_workers: first.healthy(Role::Prefill),
        aggregated_workers: first.healthy_aggregated(),
        tp_sizes: TpSizes { prefill: first.tp_sizes(Role::Prefill), decode: first.tp_sizes(Role::Decode) },
        models,
    });
    if f.models.iter().any(|s| s.workers.can_serve()) && !draining {
        body.into_response()
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(f): State<F>) -> String {
    let models: Vec<&crate::Metrics> = f.models.iter().map(|s| &s.metrics).collect();
    crate::metrics::render(&models, f.router.metrics.gather())
}
