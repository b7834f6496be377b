//! Request bodies are input from anyone: through the whole router (in process, no server, no
//! worker contacted), whatever the body of `/v1/completions` or `/v1/chat/completions` holds
//! (arbitrary bytes, JSON of any shape, the right fields with wrong types or out-of-range values,
//! deep nesting, unicode), the gateway never panics and never answers a bad body with a 5xx: a
//! 4xx in OpenAI's error shape, with a message.
//!
//! The gateway here has a prefill worker that reported a context of 128 tokens and no decode
//! worker, so a body that passes every check gets the one 5xx it may: 503 `unavailable`, "no
//! prefill or decode worker", answered before any worker is called.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use serde_json::{json, Value};
use tandem_protocol::pb::WorkerInfo;
use tandem_runtime::Shutdown;
use tandem_tokenizer::Tokenizer;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::{access, cluster, AccessConfig, AppState, GatewayConfig, Metrics, WorkerPool};

const MODEL: &str = "tiny";
const CONTEXT: u32 = 128;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap())
}

/// The gateway's state: the tiny-llama fixture's tokenizer, one prefill worker that reported
/// itself (never called), no decode worker.
fn state() -> Arc<AppState> {
    static S: OnceLock<Arc<AppState>> = OnceLock::new();
    S.get_or_init(|| {
        runtime().block_on(async {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/engine/tests/fixtures/tiny-llama");
            let tokenizer = Tokenizer::from_folder(&dir).unwrap();
            let state: Arc<dyn tandem_state::StateStore> = Arc::new(tandem_state::EmbeddedStore::new());
            let cfg = GatewayConfig {
                model_name: MODEL.into(),
                prefill: vec!["127.0.0.1:9".into()],
                decode: Vec::new(),
                block_stores: Vec::new(),
                state: state.clone(),
                local_index: None,
                discover: false,
                index_ttl: Duration::from_secs(60),
                request_ttl: Duration::from_secs(60),
                route_load_weight: 1.0,
                request_timeout: Duration::from_secs(1),
                poll_interval: Duration::from_secs(60),
                access: AccessConfig::default(),
                tls: None,
                other_models: Vec::new(),
                router: None,
            };
            let metrics = Metrics::new(MODEL).unwrap();
            let workers = WorkerPool::new(&cfg.prefill, &cfg.decode, &cfg.block_stores).unwrap();
            workers.report(&WorkerInfo {
                worker_id: "p0".into(),
                role: "prefill".into(),
                model: MODEL.into(),
                max_context: CONTEXT,
                block_size: 16,
                total_blocks: 64,
                free_blocks: 64,
                ..WorkerInfo::default()
            });
            let cluster = cluster::Cluster::new(state, None, metrics.clone(), cfg.index_ttl, cfg.request_ttl);
            let access = Arc::new(access::Access::new(cfg.access.clone(), metrics.clone()));
            let shutdown = Shutdown::new(CancellationToken::new(), Duration::from_secs(1));
            Arc::new(AppState { cfg: Arc::new(cfg), model_name: MODEL.into(), tokenizer, workers, metrics, cluster, access, shutdown })
        })
    })
    .clone()
}

/// POSTs `body` to `path`; the status and the body as JSON.
fn post(path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let state = state();
    runtime().block_on(async {
        let req = Request::post(path).header("content-type", "application/json").body(Body::from(body)).unwrap();
        let resp = crate::front::single(state).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
        (status, v)
    })
}

/// A refusal in OpenAI's shape, with a message and a type.
fn assert_error_shape(status: StatusCode, v: &Value) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{status}: {v}");
    assert!(e["type"].as_str().is_some_and(|t| !t.is_empty()), "{status}: {v}");
}

/// A 4xx, or the 503 a request that passed every check gets here. Returns whether it passed.
fn assert_refused_or_accepted(status: StatusCode, v: &Value) -> bool {
    assert_error_shape(status, v);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        assert_eq!(v["error"]["code"], "unavailable", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("no prefill or decode worker"), "{v}");
        return true;
    }
    assert!(status.is_client_error(), "{status}: {v}");
    false
}

const PATHS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

fn valid_body(path: &str) -> Value {
    if path == PATHS[0] {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    } else {
        json!({"model": MODEL, "prompt": "hello", "max_tokens": 4})
    }
}

/// JSON of any shape, with the numbers and strings that trip parsers up.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![0.0, -0.0, 1.5, -1.0, 1e300, -1e300, 3.5e38, f64::MIN_POSITIVE, 4294967296.0]).prop_map(Value::from),
        prop::sample::select(vec!["NaN", "Infinity", "-inf", "1e999", "", "user", "text", "\u{0}", "\u{202e}\u{1F600}", "<|im_start|>"])
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// Every field either endpoint reads, plus a few it does not.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "role",
    "content",
    "type",
    "text",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "echo",
    "prompt_logprobs",
    "suffix",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
    "stream",
    "stream_options",
    "include_usage",
    "user",
    "tools",
    "",
];

/// Values that are wrong for a field, in type or in range, each with the endpoint it applies to
/// (`None`: both).
fn bad_fields() -> Vec<(Option<usize>, &'static str, Value)> {
    let many_stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    vec![
        (None, "model", json!("another-model")),
        (None, "model", json!(5)),
        (None, "model", json!(null)),
        (None, "max_tokens", json!(0)),
        (None, "max_tokens", json!(-1)),
        (None, "max_tokens", json!(4294967296u64)),
        (None, "max_tokens", json!(1e10)),
        (None, "max_tokens", json!(100_000)),
        (None, "max_tokens", json!("10")),
        (None, "temperature", json!(-0.5)),
        (None, "temperature", json!(2.5)),
        (None, "temperature", json!(1e39)),
        (None, "temperature", json!("NaN")),
        (None, "top_p", json!(0)),
        (None, "top_p", json!(1.5)),
        (None, "top_k", json!(-2)),
        (None, "top_k", json!(1.5)),
        (None, "n", json!(0)),
        (None, "n", json!(17)),
        (None, "n", json!(-1)),
        (None, "stop", json!(many_stops)),
        (None, "stop", json!([""])),
        (None, "stop", json!(5)),
        (None, "seed", json!(1.5)),
        (None, "seed", json!(18446744073709551615u64)),
        (None, "presence_penalty", json!(3)),
        (None, "frequency_penalty", json!(-3)),
        (None, "repetition_penalty", json!(0)),
        (None, "repetition_penalty", json!(11)),
        (None, "min_p", json!(-0.1)),
        (None, "min_p", json!(1.1)),
        (None, "min_tokens", json!(100_000)),
        (None, "min_tokens", json!(-1)),
        (None, "stop_token_ids", json!([-1])),
        (None, "stop_token_ids", json!("x")),
        (None, "stream", json!("yes")),
        (None, "stream_options", json!({"include_usage": 1})),
        (None, "ignore_eos", json!(1)),
        (Some(0), "messages", json!([])),
        (Some(0), "messages", json!("hi")),
        (Some(0), "messages", json!([{"role": "robot", "content": "x"}])),
        (Some(0), "messages", json!([{"content": "x"}])),
        (Some(0), "messages", json!([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])),
        (Some(0), "messages", json!([{"role": "user", "content": 7}])),
        (Some(0), "messages", json!([{"role": "user", "content": "x".repeat(2000)}])),
        (Some(0), "top_logprobs", json!(3)),
        (Some(0), "logprobs", json!("yes")),
        (Some(0), "max_completion_tokens", json!(0)),
        (Some(1), "prompt", json!([])),
        (Some(1), "prompt", json!("")),
        (Some(1), "prompt", json!([[]])),
        (Some(1), "prompt", json!([99_999])),
        (Some(1), "prompt", json!([-1])),
        (Some(1), "prompt", json!(5)),
        (Some(1), "prompt", json!({})),
        (Some(1), "prompt", json!(vec![vec![1]; 65])),
        (Some(1), "prompt", json!("x ".repeat(400))),
        (Some(1), "echo", json!("yes")),
        (Some(0), "prompt_logprobs", json!(21)),
        (Some(1), "prompt_logprobs", json!(-1)),
        (Some(1), "suffix", json!("x")),
        (Some(1), "logprobs", json!(6)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary bytes as a body: a 400 with a message.
    #[test]
    fn arbitrary_bytes_get_a_4xx(path in prop::sample::select(&PATHS[..]), body in prop::collection::vec(any::<u8>(), 0..200)) {
        let (status, v) = post(path, body);
        prop_assert!(!assert_refused_or_accepted(status, &v), "bytes accepted: {v}");
    }

    /// JSON of any shape: a 4xx with a message (or, where it happens to be a valid request, the
    /// 503 of a gateway with no decode worker).
    #[test]
    fn any_json_gets_a_4xx_or_passes(path in prop::sample::select(&PATHS[..]), body in any_json()) {
        let (status, v) = post(path, serde_json::to_vec(&body).unwrap());
        assert_refused_or_accepted(status, &v);
    }

    /// A valid request with fields added or overwritten by anything: the same.
    #[test]
    fn a_valid_request_with_arbitrary_fields_gets_a_4xx_or_passes(
        path in prop::sample::select(&PATHS[..]),
        fields in prop::collection::vec((prop::sample::select(FIELDS), any_json()), 0..4),
    ) {
        let mut body = valid_body(path);
        for (k, v) in fields {
            body[k] = v;
        }
        let (status, v) = post(path, serde_json::to_vec(&body).unwrap());
        assert_refused_or_accepted(status, &v);
    }

    /// A valid request with one to three fields made wrong: always a 4xx.
    #[test]
    fn a_request_with_a_wrong_field_gets_a_4xx(picks in prop::collection::vec(any::<prop::sample::Index>(), 1..4), chat in any::<bool>()) {
        let endpoint = usize::from(!chat);
        let bad: Vec<_> = bad_fields().into_iter().filter(|(e, _, _)| e.is_none_or(|e| e == endpoint)).collect();
        let mut body = valid_body(PATHS[endpoint]);
        for pick in &picks {
            let (_, field, value) = &bad[pick.index(bad.len())];
            body[*field] = value.clone();
        }
        let (status, v) = post(PATHS[endpoint], serde_json::to_vec(&body).unwrap());
        prop_assert!(!assert_refused_or_accepted(status, &v), "{body} passed");
    }
}

#[test]
fn a_valid_request_reaches_the_worker_check() {
    for path in PATHS {
        let (status, v) = post(path, serde_json::to_vec(&valid_body(path)).unwrap());
        assert!(assert_refused_or_accepted(status, &v), "{path}: {status} {v}");
    }
}

#[test]
fn every_wrong_field_alone_gets_a_4xx_naming_it() {
    for (endpoint, field, value) in bad_fields() {
        for e in [0, 1].into_iter().filter(|e| endpoint.is_none_or(|x| x == *e)) {
            let mut body = valid_body(PATHS[e]);
            body[field] = value.clone();
            let (status, v) = post(PATHS[e], serde_json::to_vec(&body).unwrap());
            assert!(!assert_refused_or_accepted(status, &v), "{field}={value} passed");
            // The refusal names the field, or says the request does not fit the context.
            let named = v["error"]["param"].as_str().unwrap_or_default();
            let message = v["error"]["message"].as_str().unwrap();
            let context = v["error"]["code"] == "context_length_exceeded";
            // `max_completion_tokens` is refused under the name of the field it stands in for.
            let alias = field == "max_completion_tokens" && named == "max_tokens";
            assert!(named.starts_with(field) || message.contains(field) || context || alias, "{field}={value}: {v}");
        }
    }
}

#[test]
fn deep_nesting_and_huge_numbers_get_a_400() {
    let deep = format!("{{\"model\":\"tiny\",\"prompt\":{}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let huge = r#"{"model":"tiny","prompt":"x","max_tokens":1e999}"#;
    let nan = r#"{"model":"tiny","prompt":"x","temperature":NaN}"#;
    for body in [deep.as_str(), huge, nan, "{", "", "null", "[]", "\"text\"", "{\"model\":\"tiny\"}"] {
        for path in PATHS {
            let (status, v) = post(path, body.as_bytes().to_vec());
            assert_eq!(status, StatusCode::BAD_REQUEST, "{}: {v}", &body[..body.len().min(40)]);
            assert_error_shape(status, &v);
        }
    }
}

/// Found by the properties above: a missing `model` beside a sampling field of the wrong type was
/// reported as `ignore_eos.model`.
#[test]
fn a_missing_field_is_named_alone_beside_a_bad_sampling_field() {
    for (path, body) in [(PATHS[1], json!({"prompt": "x", "ignore_eos": 1})), (PATHS[0], json!({"messages": [], "stop_token_ids": "x"}))] {
        let (status, v) = post(path, serde_json::to_vec(&body).unwrap());
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["param"], "model", "{v}");
    }
}
