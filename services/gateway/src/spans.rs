//! The gateway's spans of a request, named and attributed by the OpenTelemetry semantic
//! conventions: the HTTP server span (`http.*`), the GenAI span under it (`gen_ai.*`), and the
//! gRPC client calls to the workers (`rpc.*`), whose context each call carries as `traceparent`.

use tandem_protocol::openai::Usage;
use tandem_protocol::{ApiError, SamplingParams, REQUEST_ID_HEADER};
use tandem_runtime::telemetry;
use tonic::metadata::MetadataValue;
use tracing::field::Empty;
use tracing::Span;

/// The server span of one API call, continuing the trace of the request's `traceparent`.
pub(crate) fn http(method: &str, route: &str, path: &str, headers: &axum::http::HeaderMap) -> Span {
    let span = tracing::info_span!(
        "http",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method,
        http.route = route,
        url.path = path,
        url.scheme = "http",
        http.response.status_code = Empty,
        user_agent.original = headers.get(axum::http::header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or(""),
        trace_id = Empty,
    );
    telemetry::continue_trace(&span, |k| headers.get(k).and_then(|v| v.to_str().ok()));
    span
}

/// Records the response's status on the server span (5xx is an error, as the conventions say).
pub(crate) fn http_status(span: &Span, status: u16) {
    span.record("http.response.status_code", status as i64);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The GenAI span of one request: `chat {model}` or `text_completion {model}`.
pub(crate) fn gen_ai(operation: &'static str, model: &str) -> Span {
    tracing::info_span!(
        "gen_ai",
        otel.name = format!("{operation} {model}"),
        gen_ai.operation.name = operation,
        gen_ai.provider.name = "tandem",
        gen_ai.request.model = model,
        gen_ai.request.max_tokens = Empty,
        gen_ai.request.temperature = Empty,
        gen_ai.request.top_p = Empty,
        gen_ai.request.top_k = Empty,
        gen_ai.request.seed = Empty,
        gen_ai.request.choice.count = Empty,
        gen_ai.response.id = Empty,
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        tandem.usage.cached_tokens = Empty,
        error.type = Empty,
    )
}

/// What was asked, once the request parsed.
pub(crate) fn gen_ai_request(span: &Span, params: &SamplingParams, n: usize) {
    span.record("gen_ai.request.max_tokens", params.max_tokens as i64);
    span.record("gen_ai.request.temperature", params.temperature as f64);
    span.record("gen_ai.request.top_p", params.top_p as f64);
    if params.top_k > 0 {
        span.record("gen_ai.request.top_k", params.top_k as i64);
    }
    if let Some(seed) = params.seed {
        span.record("gen_ai.request.seed", seed as i64);
    }
    if n > 1 {
        span.record("gen_ai.request.choice.count", n as i64);
    }
}

/// What came back: the response id and model, every choice's finish reason, the token counts of
/// the `usage` the client received, or the error. Ends the span's time here (a streamed
/// response ends long after its handler returned).
pub(crate) fn gen_ai_response(span: &Span, id: &str, model: &str, usage: &Usage, reasons: Vec<String>, error: Option<&ApiError>) {
    span.record("gen_ai.response.id", id);
    span.record("gen_ai.response.model", model);
    span.record("gen_ai.usage.input_tokens", usage.prompt_tokens as i64);
    span.record("gen_ai.usage.output_tokens", usage.completion_tokens as i64);
    span.record("tandem.usage.cached_tokens", usage.prompt_tokens_details.cached_tokens as i64);
    telemetry::set_strings(span, "gen_ai.response.finish_reasons", reasons);
    if let Some(e) = error {
        span.record("error.type", e.code.name());
        telemetry::fail(span, e.code.name(), e.message.clone());
    }
    span.in_scope(|| {});
}

/// A gRPC call to a worker, as a client span.
pub(crate) fn grpc_client(service: &'static str, method: &'static str) -> Span {
    tracing::info_span!(
        "grpc",
        otel.name = format!("tandem.v1.{service}/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = format!("tandem.v1.{service}"),
        rpc.method = method,
        tandem.worker_id = Empty,
        tandem.route.candidates = Empty,
        tandem.route.prefix_overlap_blocks = Empty,
        tandem.route.score = Empty,
        tandem.route.free_blocks = Empty,
        tandem.attempts = Empty,
        error.type = Empty,
    )
}

/// `msg` as a gRPC call of request `request_id`, carrying `span`'s trace context.
pub(crate) fn grpc_request<T>(msg: T, request_id: &str, span: &Span) -> tonic::Request<T> {
    let mut r = telemetry::grpc_request(msg, span);
    if let Ok(v) = MetadataValue::try_from(request_id) {
        r.metadata_mut().insert(REQUEST_ID_HEADER, v);
    }
    r
}
