//! Fusion: a panel of backends answers one chat request in parallel (at most `max_concurrent` at
//! a time), a judge reads the question with every answer and writes one, and that answer is the
//! response: whole, or streamed as the judge writes it. `usage` sums the panel's and the judge's;
//! `fusion_trace` says who answered what, in how long, and who failed.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Value};
use tandem_protocol::{ApiError, ErrorCode};
use tracing::Instrument;

use super::{strip_router_fields, OnError, Panel, Router, Target};
use crate::access::Caller;
use crate::error::HttpError;
use crate::front::Front;

/// The judge's instructions. `{question}` is the request (its user text, or the conversation),
/// `{answers}` the panel's answers one after another, `{count}` how many there are.
pub const DEFAULT_JUDGE_PROMPT: &str = "You are the judge of a panel. {count} assistants answered the same request independently.

The request:
{question}

Their answers:
{answers}
Compare the answers. Note where they agree and where they disagree, and decide which of their claims hold up. Then write one answer to the request that keeps what is right, corrects or drops what is wrong, and adds nothing the request did not ask for. Reply with that answer alone.";

/// Largest backend response the router reads whole.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// One panel member's outcome.
#[derive(Debug, Clone)]
struct MemberResult {
    id: String,
    answer: Option<String>,
    prompt_tokens: u64,
    completion_tokens: u64,
    latency: Duration,
    error: Option<String>,
    /// A failed member's answer was a 400 (the request was wrong, not the member).
    client_error: bool,
}

impl MemberResult {
    fn trace(&self) -> Value {
        json!({
            "id": self.id,
            "answer": self.answer,
            "tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": (self.latency.as_secs_f64() * 1e3 * 10.0).round() / 10.0,
            "error": self.error,
        })
    }
}

/// Usage as three counts.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    prompt: u64,
    completion: u64,
}

impl Tally {
    fn of(usage: &Value) -> Self {
        Self { prompt: usage["prompt_tokens"].as_u64().unwrap_or(0), completion: usage["completion_tokens"].as_u64().unwrap_or(0) }
    }

    /// `usage` with this tally added to it.
    fn add_to(self, usage: &mut Value) {
        let add = |v: &mut Value, n: u64| *v = Value::from(v.as_u64().unwrap_or(0) + n);
        if !usage.is_object() {
            *usage = json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
        }
        add(&mut usage["prompt_tokens"], self.prompt);
        add(&mut usage["completion_tokens"], self.completion);
        add(&mut usage["total_tokens"], self.prompt + self.completion);
    }
}

/// What went wrong with a backend call: the status it answered (none if it never did) and why.
#[derive(Debug, Clone)]
struct Failure {
    status: Option<u16>,
    message: String,
}

impl Failure {
    fn new(status: Option<u16>, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    /// The backend found the request itself wrong (a 400: bad parameters, too long a prompt),
    /// which is the client's to fix rather than to retry.
    fn client_error(&self) -> bool {
        self.status == Some(400)
    }
}

/// A response's JSON object, or what went wrong (its error message, or its status).
async fn read_json(resp: Response) -> Result<Value, Failure> {
    let status = resp.status();
    let code = Some(status.as_u16());
    let bytes = axum::body::to_bytes(resp.into_body(), MAX_ANSWER_BYTES)
        .await
        .map_err(|e| Failure::new(code, format!("reading the answer: {e}")))?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|_| Failure::new(code, format!("{status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)]))))?;
    if !status.is_success() {
        let message = v["error"]["message"].as_str().map(|m| format!("{status}: {m}")).unwrap_or_else(|| format!("{status}: {v}"));
        return Err(Failure::new(code, message));
    }
    if !v.is_object() {
        return Err(Failure::new(code, format!("{status}: the answer is not a JSON object")));
    }
    Ok(v)
}

/// The request as the judge reads it: the user's text, or the whole conversation when it has
/// more than one turn.
fn question_of(body: &Value) -> String {
    let text = |m: &Value| match &m["content"] {
        Value::String(t) => t.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""),
        _ => String::new(),
    };
    let turns: Vec<&Value> = body["messages"].as_array().map(|a| a.iter().filter(|m| m["role"] != "system").collect()).unwrap_or_default();
    match turns.as_slice() {
        [one] => text(one),
        many => many.iter().map(|m| format!("{}: {}", m["role"].as_str().unwrap_or("user"), text(m))).collect::<Vec<_>>().join("\n"),
    }
}

/// The template with its placeholders filled in one pass, so that text filled in (the client's
/// question, the answers) is never read for placeholders itself.
fn judge_prompt(template: &str, question: &str, answers: &[&MemberResult]) -> String {
    let mut listed = String::new();
    for (i, r) in answers.iter().enumerate() {
        listed.push_str(&format!("[Answer {} from {}]\n{}\n\n", i + 1, r.id, r.answer.as_deref().unwrap_or("").trim()));
    }
    let count = answers.len().to_string();
    let mut out = String::with_capacity(template.len() + question.len() + listed.len());
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let filled = [("{question}", question), ("{answers}", listed.as_str()), ("{count}", count.as_str())]
            .into_iter()
            .find(|(name, _)| rest.starts_with(name));
        match filled {
            Some((name, value)) => {
                out.push_str(value);
                rest = &rest[name.len()..];
            }
            None => {
                out.push('{');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn failed(code: ErrorCode, message: String) -> Response {
    HttpError(ApiError::new(code, message)).into_response()
}

/// Asks one member, under its own span (a child of the panel's).
async fn ask(front: &Front, router: &Router, id: String, target: Target, body: Value, caller: Caller, span: tracing::Span) -> MemberResult {
    let started = Instant::now();
    let call = async {
        let resp = router.call(front, &target, body, caller, &span).await;
        read_json(resp).await
    };
    let outcome = match tokio::time::timeout(router.timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(Failure::new(None, format!("no answer within {:?}", router.timeout))),
    };
    let latency = started.elapsed();
    router.metrics.observe(&id, latency, outcome.is_ok());
    match outcome {
        Ok(v) => {
            let usage = Tally::of(&v["usage"]);
            let answer = v["choices"][0]["message"]["content"].as_str().unwrap_or("").to_string();
            MemberResult {
                id,
                answer: Some(answer),
                prompt_tokens: usage.prompt,
                completion_tokens: usage.completion,
                latency,
                error: None,
                client_error: false,
            }
        }
        Err(e) => {
            span.in_scope(|| tracing::warn!(member = %id, error = %e.message, "panel member failed"));
            MemberResult {
                id,
                answer: None,
                prompt_tokens: 0,
                completion_tokens: 0,
                latency,
                client_error: e.client_error(),
                error: Some(e.message),
            }
        }
    }
}

/// Runs `panel` for a chat request (`body`) that asked for `requested`.
pub(crate) async fn run(front: &Front, router: &Router, panel: Panel, body: Value, requested: &str, caller: Caller) -> Response {
    let span = tracing::info_span!(
        "fusion",
        otel.name = "fusion panel",
        tandem.decision = %panel.decision,
        tandem.panel_size = panel.members.len() as i64,
        tandem.judge = %panel.judge,
    );
    run_panel(front, router, panel, body, requested, caller, span.clone()).instrument(span).await
}

async fn run_panel(
    front: &Front,
    router: &Router,
    panel: Panel,
    mut body: Value,
    requested: &str,
    caller: Caller,
    span: tracing::Span,
) -> Response {
    strip_router_fields(&mut body);
    let resolve = |name: &str| {
        router.target(front, name).ok_or_else(|| {
            ApiError::new(ErrorCode::ModelNotFound, format!("`{name}` in the fusion panel is neither a router backend nor a served model"))
        })
    };
    let mut members = Vec::with_capacity(panel.members.len());
    for m in &panel.members {
        match resolve(m) {
            Ok(t) => members.push((m.clone(), t)),
            Err(e) => return HttpError(e).into_response(),
        }
    }
    let judge = match resolve(&panel.judge) {
        Ok(t) => t,
        Err(e) => return HttpError(e).into_response(),
    };
    router.metrics.panel_size.observe(members.len() as f64);

    // Every member gets the request as it came, answered whole.
    let mut question = body.clone();
    question["stream"] = Value::Bool(false);
    if let Some(o) = question.as_object_mut() {
        o.remove("stream_options");
        o.remove("n");
    }
    let results: Vec<MemberResult> = futures::stream::iter(members.into_iter().map(|(id, target)| {
        let member = tracing::info_span!(parent: &span, "fusion member", otel.name = format!("fusion member {id}"), tandem.backend = %id);
        ask(front, router, id, target, question.clone(), caller, member)
    }))
    .buffered(panel.max_concurrent)
    .collect()
    .await;

    let failures: Vec<&MemberResult> = results.iter().filter(|r| r.error.is_some()).collect();
    if panel.on_error == OnError::Fail {
        if let Some(f) = failures.first() {
            return failed(
                ErrorCode::Unavailable,
                format!("panel member `{}` failed ({}); the panel's on_error is fail", f.id, f.error.as_deref().unwrap_or("")),
            );
        }
    }
    let answers: Vec<&MemberResult> = results.iter().filter(|r| r.error.is_none()).collect();
    if answers.is_empty() {
        let why: Vec<String> = failures.iter().map(|f| format!("{}: {}", f.id, f.error.as_deref().unwrap_or(""))).collect();
        // Every member refusing the request as it is: the client's to fix, not to retry.
        let code = if failures.iter().all(|f| f.client_error) { ErrorCode::InvalidRequest } else { ErrorCode::Unavailable };
        return failed(code, format!("every panel member failed ({})", why.join("; ")));
    }
    router.metrics.skipped.inc_by(failures.len() as u64);
    let mut panel_usage = Tally::default();
    for r in &answers {
        panel_usage.prompt += r.prompt_tokens;
        panel_usage.completion += r.completion_tokens;
    }

    let prompt = judge_prompt(router.judge_prompt(&panel), &question_of(&body), &answers);
    let stream = body["stream"] == true;
    let include_usage = body["stream_options"]["include_usage"] == true;
    let mut ask_judge = body.clone();
    ask_judge["messages"] = json!([{"role": "user", "content": prompt}]);
    if let Some(o) = ask_judge.as_object_mut() {
        for k in ["tools", "tool_choice", "n"] {
            o.remove(k);
        }
    }
    if stream {
        // The judge's usage is needed for the total whether or not the client asked for it.
        ask_judge["stream_options"] = json!({"include_usage": true});
    }
    let trace = json!({
        "decision": panel.decision,
        "panel_results": results.iter().map(MemberResult::trace).collect::<Vec<_>>(),
        "judge_model": panel.judge,
        "skipped": failures.len(),
    });
    let judge_span = tracing::info_span!(parent: &span, "fusion judge", otel.name = format!("fusion judge {}", panel.judge), tandem.backend = %panel.judge);
    let started = Instant::now();
    let resp = router.call(front, &judge, ask_judge, caller, &judge_span).await;
    if !stream || !resp.status().is_success() {
        let outcome = read_json(resp).await;
        let took = started.elapsed();
        router.metrics.observe(&panel.judge, took, outcome.is_ok());
        router.metrics.judge.observe(took.as_secs_f64());
        return match outcome {
            Ok(mut v) => {
                v["model"] = Value::String(requested.to_string());
                panel_usage.add_to(&mut v["usage"]);
                let mut trace = trace;
                trace["judge_latency_ms"] = json!((took.as_secs_f64() * 1e4).round() / 10.0);
                v["fusion_trace"] = trace;
                Json(v).into_response()
            }
            Err(e) => {
                let code = if e.client_error() { ErrorCode::InvalidRequest } else { ErrorCode::Unavailable };
                failed(code, format!("the judge `{}` failed: {}", panel.judge, e.message))
            }
        };
    }
    let relay = Relay {
        requested: requested.to_string(),
        include_usage,
        panel_usage,
        trace,
        judge: panel.judge.clone(),
        started,
        metrics: router.metrics.clone(),
        inflight: router.enter(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    tokio::spawn(relay.run(resp.into_body(), tx).instrument(judge_span));
    let mut out = Response::new(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)));
    out.headers_mut().insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("text/event-stream"));
    out.headers_mut().insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-cache"));
    out
}

/// `bytes` with every CR LF pair made LF (a CR at the very end stays, for the LF that may follow).
fn crlf_to_lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        if !(b == b'\r' && bytes.get(i + 1) == Some(&b'\n')) {
            out.push(b);
        }
    }
    out
}

/// Passes the judge's stream to the client, each chunk under the model the client asked for,
/// the panel's usage added to the judge's, and `fusion_trace` on the usage chunk (or, if the
/// client did not ask for usage, on a last chunk of its own before `[DONE]`).
struct Relay {
    requested: String,
    include_usage: bool,
    panel_usage: Tally,
    trace: Value,
    judge: String,
    started: Instant,
    metrics: super::RouterMetrics,
    inflight: super::InFlight,
}

impl Relay {
    async fn run(self, body: Body, tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) {
        let mut data = body.into_data_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut last: Option<(Value, Value)> = None;
        let mut traced = false;
        let mut done = false;
        let mut ok = true;
        'read: while let Some(chunk) = data.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(judge = %self.judge, error = %e, "the judge's stream broke");
                    ok = false;
                    break;
                }
            };
            buf.extend_from_slice(&chunk);
            // Events may be framed with CRLF (as some servers write them): read them as LF, byte
            // by byte (a chunk may end inside a character, which text decoding would spoil).
            if buf.contains(&b'\r') {
                buf = crlf_to_lf(&buf);
            }
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                let Some(payload) = text.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim) else { continue };
                let out = if payload == "[DONE]" {
                    let mut out = String::new();
                    if !traced {
                        out.push_str(&self.closing(last.take()));
                        traced = true;
                    }
                    out.push_str("data: [DONE]\n\n");
                    done = true;
                    if tx.send(Ok(Bytes::from(out))).await.is_err() {
                        break 'read;
                    }
                    continue;
                } else {
                    match serde_json::from_str::<Value>(payload) {
                        Ok(mut v) => {
                            if v.get("model").is_some() {
                                v["model"] = Value::String(self.requested.clone());
                            }
                            last = Some((v["id"].clone(), v["created"].clone()));
                            let has_usage = v.get("usage").is_some_and(|u| !u.is_null());
                            let has_choices = v["choices"].as_array().is_some_and(|c| !c.is_empty());
                            if has_usage {
                                if self.include_usage {
                                    self.panel_usage.add_to(&mut v["usage"]);
                                    v["fusion_trace"] = self.finished_trace();
                                    traced = true;
                                } else if has_choices {
                                    v.as_object_mut().map(|o| o.remove("usage"));
                                } else {
                                    continue;
                                }
                            }
                            format!("data: {v}\n\n")
                        }
                        // Not JSON (an error line from another server): as it came.
                        Err(_) => String::from_utf8_lossy(&event).into_owned(),
                    }
                };
                if tx.send(Ok(Bytes::from(out))).await.is_err() {
                    break 'read;
                }
            }
        }
        if !done {
            // The judge's stream ended (or broke) without its `[DONE]`: the client still gets
            // the trace and the end of the stream.
            let mut out = String::new();
            if !traced {
                out.push_str(&self.closing(last.take()));
            }
            out.push_str("data: [DONE]\n\n");
            let _ = tx.send(Ok(Bytes::from(out))).await;
        }
        let took = self.started.elapsed();
        self.metrics.observe(&self.judge, took, ok);
        self.metrics.judge.observe(took.as_secs_f64());
        drop(self.inflight);
    }

    fn finished_trace(&self) -> Value {
        let mut t = self.trace.clone();
        t["judge_latency_ms"] = json!((self.started.elapsed().as_secs_f64() * 1e4).round() / 10.0);
        t
    }

    /// The chunk that carries `fusion_trace` when no usage chunk did.
    fn closing(&self, last: Option<(Value, Value)>) -> String {
        let (id, created) = last.unwrap_or((Value::Null, Value::Null));
        let mut v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.requested,
            "choices": [],
            "fusion_trace": self.finished_trace(),
        });
        if self.include_usage {
            let mut usage = Value::Null;
            self.panel_usage.add_to(&mut usage);
            v["usage"] = usage;
        }
        format!("data: {v}\n\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_judge_reads_the_question_and_every_answer() {
        let body = json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Why is the sky blue?"}]});
        assert_eq!(question_of(&body), "Why is the sky blue?");
        let multi = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "why?"}]});
        assert_eq!(question_of(&multi), "user: hi\nassistant: hello\nuser: why?");
        let r = |id: &str, a: &str| MemberResult {
            id: id.into(),
            answer: Some(a.into()),
            prompt_tokens: 1,
            completion_tokens: 2,
            latency: Duration::ZERO,
            error: None,
            client_error: false,
        };
        let (a, b) = (r("alpha", "Rayleigh scattering."), r("ext", " Dust. "));
        let p = judge_prompt(DEFAULT_JUDGE_PROMPT, "Why is the sky blue?", &[&a, &b]);
        assert!(p.contains("2 assistants") && p.contains("Why is the sky blue?"), "{p}");
        assert!(p.contains("[Answer 1 from alpha]\nRayleigh scattering.") && p.contains("[Answer 2 from ext]\nDust."), "{p}");
        // A question that names a placeholder is taken as it is.
        let sly = judge_prompt("Q: {question} | A: {answers} | {n}", "tell me {answers}", &[&a]);
        assert_eq!(sly, "Q: tell me {answers} | A: [Answer 1 from alpha]\nRayleigh scattering.\n\n | {n}");
    }

    #[test]
    fn crlf_framing_reads_as_lf_without_touching_split_characters() {
        let text = "data: {\"x\": \"é\"}\r\n\r\n".as_bytes();
        // A chunk that ends inside `é` (two bytes) and on a lone CR.
        let cut = text.iter().position(|&b| b == 0xc3).unwrap() + 1;
        let first = crlf_to_lf(&text[..cut]);
        assert_eq!(first, &text[..cut], "nothing to replace yet, and the half character kept");
        let mut joined = first;
        joined.extend_from_slice(&text[cut..]);
        assert_eq!(crlf_to_lf(&joined), "data: {\"x\": \"é\"}\n\n".as_bytes());
        assert_eq!(crlf_to_lf(b"a\r"), b"a\r", "a CR at the end waits for its LF");
    }

    #[test]
    fn usage_adds_up() {
        let mut usage =
            json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 0}});
        Tally { prompt: 7, completion: 3 }.add_to(&mut usage);
        assert_eq!(
            (usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64(), usage["total_tokens"].as_u64()),
            (Some(17), Some(8), Some(25))
        );
        let mut none = Value::Null;
        Tally { prompt: 1, completion: 2 }.add_to(&mut none);
        assert_eq!(none["total_tokens"], 3);
    }
}
