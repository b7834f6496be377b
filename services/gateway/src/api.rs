//! HTTP routes: the OpenAI endpoints, health, readiness and metrics.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use tandem_protocol::openai::tools::{forced_call, read_tools, tools_prompt, Tool, ToolChoice};
use tandem_protocol::openai::{ChatCompletionRequest, CompletionRequest, MessageContent, PromptSpec, SamplingFields};
use tandem_protocol::{ApiError, ErrorCode, SamplingParams, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
use tandem_tokenizer::ChatMessage;
use tracing::Instrument;

use crate::access::{self, Caller, Refusal};
use crate::disagg::{self, ChoiceSpec};
use crate::error::{parse_body, too_large, HttpError, MAX_BODY_BYTES};
use crate::render::{self, ChatRenderer, CompletionRenderer, Envelope, Renderer, UsageTally};
use crate::spans;
use crate::AppState;

type S = Arc<AppState>;

/// The endpoints one model answers, as the front reaches them in process (keys, limits and
/// the request's span are the front's).
pub(crate) fn routes(state: S) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        // The front's limit, again: a request it builds carries none of the original's.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Around every route: refuses a body declared over the limit before reading any of it, and
/// places each API call in a trace: its server span continues the trace of an incoming
/// `traceparent` (a malformed one is ignored and a new trace starts), every worker call carries
/// it on, and the response's `traceparent` names it. Health, readiness and metrics get no span.
pub(crate) async fn edge(req: Request, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let path = req.uri().path().to_string();
    let span = path.starts_with("/v1/").then(|| {
        let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_string();
        spans::http(req.method().as_str(), &route, &path, req.headers())
    });
    let Some(span) = span else {
        return next.run(req).await;
    };
    let mut resp = if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        HttpError(too_large()).into_response()
    } else {
        next.run(req).instrument(span.clone()).await
    };
    spans::http_status(&span, resp.status().as_u16());
    if let Some(v) = tandem_runtime::telemetry::traceparent(&span).and_then(|t| HeaderValue::from_str(&t).ok()) {
        resp.headers_mut().insert(TRACEPARENT_HEADER, v);
    }
    resp
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<tandem_protocol::openai::ChatMessageIn>>,
}

/// vLLM's `/tokenize`: a prompt's token ids, or a chat's as its template renders it.
async fn tokenize(State(s): State<S>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || {
        let r: TokenizeRequest = parse_body(body)?;
        if let Some(m) = &r.model {
            check_model(&s, m)?;
        }
        let tokens = match (&r.prompt, &r.messages) {
            (Some(p), None) => s.tokenizer.encode(p).map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
            (None, Some(ms)) => {
                let mut messages = Vec::with_capacity(ms.len());
                for (i, m) in ms.iter().enumerate() {
                    messages.push(chat_message(m, i, s.tokenizer.template_takes_tools())?);
                }
                s.tokenizer.encode_chat(&messages).map_err(|e| ApiError::invalid("messages", e.to_string()))?
            }
            _ => return Err(ApiError::invalid("prompt", "give either `prompt` or `messages`")),
        };
        Ok(serde_json::json!({"count": tokens.len(), "max_model_len": s.workers.max_context(), "tokens": tokens}))
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => HttpError(e).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

/// vLLM's `/detokenize`: the text of token ids.
async fn detokenize(State(s): State<S>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || {
        let r: DetokenizeRequest = parse_body(body)?;
        if let Some(m) = &r.model {
            check_model(&s, m)?;
        }
        let vocab = s.tokenizer.vocab_size() as u32;
        if let Some(bad) = r.tokens.iter().find(|&&t| t >= vocab) {
            return Err(ApiError::invalid("tokens", format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let prompt = s.tokenizer.decode(&r.tokens).map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
        Ok(serde_json::json!({"prompt": prompt}))
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => HttpError(e).into_response(),
    }
}

/// What both endpoints share after their own parsing.
struct Job {
    prompts: Vec<Vec<u32>>,
    params: SamplingParams,
    n: usize,
    stream: bool,
    include_usage: bool,
    /// The request's GenAI span: every choice runs under it.
    span: tracing::Span,
    /// Chat with tools: the functions calls are read back for.
    tools: Option<Arc<Vec<Tool>>>,
    /// Completions with `echo`: the prompts' texts, which each choice starts with.
    echo: Option<Vec<String>>,
    /// `echo` with `max_tokens: 0`: the prompts only, no completion.
    prompt_only: bool,
    /// `prompt_logprobs` as the client asked it (the params may score the prompts for `echo`
    /// alone).
    asked_prompt_logprobs: Option<u32>,
}

fn check_model(s: &AppState, model: &str) -> Result<(), ApiError> {
    if model == s.model_name {
        Ok(())
    } else {
        Err(ApiError {
            code: ErrorCode::ModelNotFound,
            message: format!("the model `{model}` does not exist; this server serves `{}`", s.model_name),
            param: Some("model".into()),
        })
    }
}

fn sampling(
    f: &SamplingFields,
    max_tokens: Option<u32>,
    default_max: usize,
    logprobs: Option<u32>,
    vocab: usize,
) -> Result<(SamplingParams, usize), ApiError> {
    if max_tokens == Some(0) {
        return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1"));
    }
    if let Some((param, why)) = f.unsupported.first(f.n.unwrap_or(1)) {
        return Err(ApiError::invalid(param, why));
    }
    let constraint = f.output_format.constraint().map_err(|(param, why)| ApiError::invalid(param, why))?;
    let mut logit_bias = Vec::new();
    for (token, &bias) in f.logit_bias.iter().flatten() {
        let id = token.trim().parse::<u32>().ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
            ApiError::invalid(
                "logit_bias",
                format!("`{token}` is not a token id of this model's vocabulary (0 to {})", vocab.saturating_sub(1)),
            )
        })?;
        logit_bias.push((id, bias));
    }
    logit_bias.sort_by_key(|&(t, _)| t);
    let n = f.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::invalid("n", format!("n must be between 1 and 16, got {n}")));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k.min(u32::MAX as i64) as u32,
        Some(k) => return Err(ApiError::invalid("top_k", format!("top_k must be -1 (off) or positive, got {k}"))),
    };
    let p = SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        top_p: f.top_p.unwrap_or(1.0),
        top_k,
        min_p: f.min_p.unwrap_or(0.0),
        seed: f.seed.map(|s| s as u64),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        max_tokens: max_tokens.map(|m| m as usize).unwrap_or(default_max),
        min_tokens: f.min_tokens.unwrap_or(0) as usize,
        stop: f.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        logprobs,
        constraint,
        logit_bias,
        prompt_logprobs: f.prompt_logprobs,
    };
    p.validate().map_err(|e| ApiError::invalid(e.param, e.message))?;
    if p.prompt_logprobs.is_some() && f.stream == Some(true) {
        return Err(ApiError::invalid("prompt_logprobs", "prompt_logprobs is not available with stream: true"));
    }
    Ok((p, n as usize))
}

fn max_context(s: &AppState) -> Result<usize, ApiError> {
    s.workers.max_context().ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "no worker is available; retry shortly"))
}

fn check_length(prompt: usize, max_tokens: usize, context: usize, param: &str) -> Result<(), ApiError> {
    if prompt == 0 {
        return Err(ApiError::invalid(param, "the prompt is empty"));
    }
    if prompt + max_tokens > context {
        return Err(ApiError {
            code: ErrorCode::ContextLengthExceeded,
            message: format!(
                "this model's maximum context length is {context} tokens; the prompt has {prompt} and max_tokens asks for {max_tokens}"
            ),
            param: Some(param.into()),
        });
    }
    Ok(())
}

fn flatten(content: &Option<MessageContent>, i: usize) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(MessageContent::Text(t)) => Ok(t.clone()),
        Some(MessageContent::Parts(parts)) => parts
            .iter()
            .map(|p| match (p.kind.as_str(), &p.text) {
                ("text", Some(t)) => Ok(t.as_str()),
                _ => Err(ApiError::invalid(
                    format!("messages[{i}].content"),
                    format!("content part of type `{}` is not supported; send text", p.kind),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.concat()),
    }
}

/// One request message for the chat template. With a template that renders tools (`native`),
/// an assistant's calls and a tool's answer go to it as they are; otherwise they are written
/// into the text as the Hermes-style blocks the tools prompt asks for.
fn chat_message(m: &tandem_protocol::openai::ChatMessageIn, i: usize, native: bool) -> Result<ChatMessage, ApiError> {
    let role = if m.role == "developer" { "system" } else { m.role.as_str() };
    let mut message = ChatMessage::new(role, flatten(&m.content, i)?);
    if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) {
        if native {
            message.tool_calls = Some(serde_json::Value::Array(calls.clone()));
        } else {
            for c in calls {
                let f = &c["function"];
                let args = f["arguments"].as_str().and_then(|a| serde_json::from_str(a).ok()).unwrap_or_else(|| f["arguments"].clone());
                let call = serde_json::json!({"name": f["name"], "arguments": args});
                message.content.push_str(&format!("\n<tool_call>\n{call}\n</tool_call>"));
            }
            message.content = message.content.trim_start().to_string();
        }
    }
    if m.role == "tool" {
        message.tool_call_id = m.tool_call_id.clone();
        if !native {
            message.content = format!("<tool_response>\n{}\n</tool_response>", message.content);
        }
    }
    Ok(message)
}

async fn chat(State(s): State<S>, Extension(caller): Extension<Caller>, body: Result<Bytes, BytesRejection>) -> Response {
    let span = spans::gen_ai("chat", &s.model_name);
    let job = span.in_scope(|| {
        let r: ChatCompletionRequest = parse_body(body)?;
        check_model(&s, &r.model)?;
        if r.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let (tools, tool_choice) = read_tools(r.tools.as_ref(), r.tool_choice.as_ref()).map_err(|(p, m)| ApiError::invalid(p, m))?;
        let calling = tool_choice != ToolChoice::None;
        // A template that renders tools gets them as transformers passes them; for one that does
        // not, the tools and the call format go in the system message, and earlier calls and
        // their results are written in that format.
        let native = s.tokenizer.template_takes_tools();
        let mut messages = Vec::with_capacity(r.messages.len() + 1);
        for (i, m) in r.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
                return Err(ApiError::invalid(format!("messages[{i}].role"), format!("unknown role `{}`", m.role)));
            }
            messages.push(chat_message(m, i, native)?);
        }
        if calling && !native {
            let prompt = tools_prompt(&tools);
            match messages.first_mut() {
                Some(first) if first.role == "system" => first.content = format!("{}\n\n{prompt}", first.content),
                _ => messages.insert(0, ChatMessage::new("system", prompt)),
            }
        }
        if r.top_logprobs.is_some() && r.logprobs != Some(true) {
            return Err(ApiError::invalid("top_logprobs", "top_logprobs requires logprobs to be true"));
        }
        let logprobs = (r.logprobs == Some(true)).then(|| r.top_logprobs.unwrap_or(0));
        let template_tools = (calling && native).then_some(r.tools.as_ref()).flatten();
        let prompt = tracing::info_span!("tokenize", otel.name = "template and tokenize", tandem.messages = messages.len() as i64)
            .in_scope(|| s.tokenizer.encode_chat_with_tools(&messages, template_tools))
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        let context = max_context(&s)?;
        let requested = r.max_completion_tokens.or(r.max_tokens);
        let default_max = context.saturating_sub(prompt.len()).max(1);
        let (mut params, n) = sampling(&r.sampling, requested, default_max, logprobs, s.tokenizer.vocab_size())?;
        if let Some(forced) = forced_call(&tools, &tool_choice) {
            if params.constraint.is_some() {
                return Err(ApiError::invalid("tool_choice", "a forced tool call cannot be combined with another output constraint"));
            }
            params.constraint = Some(forced);
        }
        check_length(prompt.len(), params.max_tokens, context, if requested.is_some() { "max_tokens" } else { "messages" })?;
        spans::gen_ai_request(&span, &params, n);
        Ok(Job {
            prompts: vec![prompt],
            params,
            n,
            stream: r.sampling.stream.unwrap_or(false),
            include_usage: r.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage),
            span: span.clone(),
            tools: calling.then(|| Arc::new(tools)),
            echo: None,
            prompt_only: false,
            asked_prompt_logprobs: r.sampling.prompt_logprobs,
        })
    });
    answer::<ChatRenderer>(s, caller, job, span).await
}

/// Runs a parsed job, or refuses the request, under its GenAI span.
async fn answer<R: Renderer>(s: S, caller: Caller, job: Result<Job, ApiError>, span: tracing::Span) -> Response {
    match job {
        Ok(job) => respond::<R>(s, caller, job).instrument(span).await,
        Err(e) => {
            spans::gen_ai_response(&span, "", &s.model_name, &tandem_protocol::openai::Usage::new(0, 0, 0), Vec::new(), Some(&e));
            HttpError(e).into_response()
        }
    }
}

async fn completions(State(s): State<S>, Extension(caller): Extension<Caller>, body: Result<Bytes, BytesRejection>) -> Response {
    let span = spans::gen_ai("text_completion", &s.model_name);
    let job = span.in_scope(|| {
        let r: CompletionRequest = parse_body(body)?;
        check_model(&s, &r.model)?;
        let echo = r.echo == Some(true);
        if r.suffix.is_some() {
            return Err(ApiError::invalid("suffix", "suffix is not supported"));
        }
        if let Some(n) = r.logprobs {
            if n > 5 {
                return Err(ApiError::invalid("logprobs", format!("logprobs must be between 0 and 5, got {n}")));
            }
        }
        let encode = |t: &str| {
            tracing::info_span!("tokenize", otel.name = "tokenize")
                .in_scope(|| s.tokenizer.encode(t))
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))
        };
        let prompts = match &r.prompt {
            PromptSpec::Text(t) => vec![encode(t)?],
            PromptSpec::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
            PromptSpec::Tokens(ids) => vec![ids.clone()],
            PromptSpec::TokenLists(l) => l.clone(),
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid("prompt", "prompt must not be empty"));
        }
        let vocab = s.tokenizer.vocab_size() as u32;
        if prompts.iter().flatten().any(|&t| t >= vocab) {
            return Err(ApiError::invalid("prompt", format!("token ids must be below the vocabulary size {vocab}")));
        }
        let context = max_context(&s)?;
        // `echo` with `max_tokens: 0` (how log-likelihoods are asked for): the workers still
        // produce the one token a prefill ends with, which the client does not get.
        let prompt_only = echo && r.max_tokens == Some(0);
        let max_tokens = if prompt_only { Some(1) } else { r.max_tokens };
        let (mut params, n) = sampling(&r.sampling, max_tokens, 16, r.logprobs, s.tokenizer.vocab_size())?;
        if echo && params.logprobs.is_some() {
            // The echoed prompt's tokens come with their log-probabilities too.
            params.prompt_logprobs = params.prompt_logprobs.max(params.logprobs);
        }
        for p in &prompts {
            check_length(p.len(), params.max_tokens, context, if r.max_tokens.is_some() { "max_tokens" } else { "prompt" })?;
        }
        let echo = if echo {
            let decode = |ids: &[u32]| s.tokenizer.decode(ids).map_err(|e| ApiError::invalid("prompt", e.to_string()));
            Some(match &r.prompt {
                PromptSpec::Text(t) => vec![t.clone()],
                PromptSpec::Texts(ts) => ts.clone(),
                PromptSpec::Tokens(_) | PromptSpec::TokenLists(_) => prompts.iter().map(|p| decode(p)).collect::<Result<_, _>>()?,
            })
        } else {
            None
        };
        spans::gen_ai_request(&span, &params, n);
        Ok(Job {
            prompts,
            params,
            n,
            stream: r.sampling.stream.unwrap_or(false),
            include_usage: r.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage),
            span: span.clone(),
            tools: None,
            echo,
            prompt_only,
            asked_prompt_logprobs: r.sampling.prompt_logprobs,
        })
    });
    answer::<CompletionRenderer>(s, caller, job, span).await
}

/// Starts every choice: prompt `p`, sample `j` becomes choice `p * n + j`.
fn start_choices(s: &S, job: &Job, id: &str, ticket: Arc<access::Ticket>) -> Vec<disagg::ChoiceRx> {
    let base_seed = job.params.seed.unwrap_or_else(rand::random);
    let mut out = Vec::new();
    for (p, prompt) in job.prompts.iter().enumerate() {
        for j in 0..job.n {
            let index = p * job.n + j;
            let spec = ChoiceSpec {
                request_id: format!("{id}-{index}"),
                prompt: prompt.clone(),
                params: job.params.clone(),
                seed: base_seed.wrapping_add(index as u64),
                admission: Some(ticket.clone()),
                prompt_only: job.prompt_only,
            };
            out.push(disagg::start(s.clone(), spec));
        }
    }
    out
}

/// Most choices one request may start (prompts × n).
const MAX_CHOICES: usize = 64;

/// Starts the job's choices and answers with them, whole or as a stream, in the shapes of the
/// endpoint `R` renders.
async fn respond<R: Renderer>(s: S, caller: Caller, job: Job) -> Response {
    let refused = |e: &ApiError| {
        spans::gen_ai_response(&job.span, "", &s.model_name, &tandem_protocol::openai::Usage::new(0, 0, 0), Vec::new(), Some(e));
    };
    let refuse = |e: ApiError| {
        refused(&e);
        HttpError(e).into_response()
    };
    let refuse_for = |r: Refusal| {
        refused(&r.error);
        r.into_response()
    };
    if job.prompts.len() * job.n > MAX_CHOICES {
        return refuse(ApiError::invalid("prompt", format!("at most {MAX_CHOICES} choices (prompts × n) per request")));
    }
    // Refuse before a stream commits to 200.
    if !s.workers.can_serve() {
        return refuse(ApiError::new(ErrorCode::Unavailable, "no prefill or decode worker is available; retry shortly"));
    }
    // What the request may cost the caller's token rate: its prompts and all it may generate.
    let choices = job.prompts.len() * job.n;
    let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum::<usize>() * job.n;
    let ticket = match s.access.admit(prompt_tokens) {
        Ok(t) => Arc::new(t),
        Err(r) => return refuse_for(r),
    };
    // Charged once admitted: a request the cluster had no room for costs the caller nothing.
    if let Err(r) = s.access.charge_tokens(caller, (prompt_tokens + job.params.max_tokens * choices) as u64) {
        return refuse_for(r);
    }
    let id = new_id(R::ID_PREFIX);
    let rxs = start_choices(&s, &job, &id, ticket);
    let id_header = HeaderValue::from_str(&id).ok();
    let mut renderer = R::new(job.params.logprobs);
    if let Some(tools) = &job.tools {
        renderer = renderer.with_tools(tools.clone());
    }
    // What the client asked of the prompts (the params may score them for `echo` alone).
    renderer = renderer.with_prompt(job.echo.clone().map(|texts| render::Echo { texts, n: job.n }), job.asked_prompt_logprobs);
    let envelope = Envelope { id, model: s.model_name.clone(), span: job.span.clone() };
    let usage = UsageTally::new(&job.prompts, job.n);
    let mut resp = if job.stream {
        render::sse(renderer, envelope, job.include_usage, usage, rxs).into_response()
    } else {
        match render::collect(&mut renderer, envelope, usage, rxs).await {
            Ok(body) => Json(body).into_response(),
            Err(e) => HttpError(e).into_response(),
        }
    };
    if let Some(v) = id_header {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}
