//! The JSON each endpoint writes, pinned byte for byte: key order, `null`s and absent fields
//! included, since clients parse these exact shapes.

use axum::response::IntoResponse;
use tandem_protocol::openai::{CompletionChunk, CompletionResponse};
use tandem_protocol::{ApiError, ErrorCode, FinishReason};
use tokio::sync::mpsc;

use super::*;
use crate::disagg::{ChoiceEvent, ChoiceRx, ChoiceUsage, TokenOut};

const CREATED: u64 = 1700000000;

/// Two tokens: one widened from `f32` to more digits, one non-ASCII, one impossible alternative.
fn tokens() -> Vec<TokenOut> {
    vec![
        TokenOut { text: "Hi".into(), logprob: -0.1, top: vec![("Hi".into(), -0.1), ("Hello".into(), -2.5)] },
        TokenOut { text: " é".into(), logprob: -1.25, top: vec![(" é".into(), -1.25), (" you".into(), f32::NEG_INFINITY)] },
    ]
}

const CHAT_LOGPROBS: &str = r#"{"content":[{"bytes":[72,105],"logprob":-0.10000000149011612,"token":"Hi","top_logprobs":[{"bytes":[72,105],"logprob":-0.10000000149011612,"token":"Hi"},{"bytes":[72,101,108,108,111],"logprob":-2.5,"token":"Hello"}]},{"bytes":[32,195,169],"logprob":-1.25,"token":" é","top_logprobs":[{"bytes":[32,195,169],"logprob":-1.25,"token":" é"},{"bytes":[32,121,111,117],"logprob":null,"token":" you"}]}]}"#;

const COMPLETION_LOGPROBS_AT_7: &str = r#"{"text_offset":[7,9],"token_logprobs":[-0.10000000149011612,-1.25],"tokens":["Hi"," é"],"top_logprobs":[{"Hello":-2.5,"Hi":-0.10000000149011612},{" you":null," é":-1.25}]}"#;

const NO_COMPLETION_LOGPROBS: &str = r#"{"text_offset":[],"token_logprobs":[],"tokens":[],"top_logprobs":[]}"#;

fn envelope(id: &str) -> Envelope {
    Envelope { id: id.into(), model: "m".into(), span: tracing::Span::none() }
}

/// One receiver per choice, already holding all of its events.
fn choices(events: Vec<Vec<Result<ChoiceEvent, ApiError>>>) -> Vec<ChoiceRx> {
    events
        .into_iter()
        .map(|evs| {
            let (tx, rx) = mpsc::channel(16);
            for e in evs {
                tx.try_send(e).unwrap();
            }
            rx
        })
        .collect()
}

fn delta(text: &str, tokens: Vec<TokenOut>) -> Result<ChoiceEvent, ApiError> {
    Ok(ChoiceEvent::Delta { text: text.into(), tokens })
}

fn done(reason: FinishReason, completion_tokens: usize, cached_tokens: usize) -> Result<ChoiceEvent, ApiError> {
    Ok(ChoiceEvent::Done { ending: reason.into(), usage: ChoiceUsage { completion_tokens, cached_tokens } })
}

/// The JSON with its `created` (the clock) set to [`CREATED`].
fn pinned(json: &str) -> String {
    let Some(at) = json.find(r#""created":"#).map(|i| i + r#""created":"#.len()) else { return json.to_string() };
    let end = at + json[at..].find(|c: char| !c.is_ascii_digit()).unwrap();
    format!("{}{CREATED}{}", &json[..at], &json[end..])
}

/// The `data:` of every event a streamed response sends.
async fn sse_data<R: Renderer>(logprobs: Option<u32>, include_usage: bool, usage: UsageTally, rxs: Vec<ChoiceRx>) -> Vec<String> {
    let resp = sse(R::new(logprobs), envelope(if R::ID_PREFIX == "cmpl" { "cmpl-1" } else { "chatcmpl-1" }), include_usage, usage, rxs);
    let body = axum::body::to_bytes(resp.into_response().into_body(), usize::MAX).await.unwrap();
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert!(body.ends_with("\n\n"), "{body:?}");
    body.split_terminator("\n\n").map(|e| pinned(e.strip_prefix("data: ").unwrap_or_else(|| panic!("{e:?}")))).collect()
}

#[tokio::test]
async fn a_chat_completion_with_usage_and_logprobs() {
    let rxs = choices(vec![
        vec![delta("Hi", tokens()[..1].to_vec()), delta(" é", tokens()[1..].to_vec()), done(FinishReason::Length, 2, 3)],
        vec![done(FinishReason::Stop, 0, 3)],
    ]);
    let resp =
        collect(&mut ChatRenderer::new(Some(2)), envelope("chatcmpl-1"), UsageTally::new(&[vec![1, 2, 3, 4, 5]], 2), rxs).await.unwrap();
    let expected = format!(
        r#"{{"choices":[{{"finish_reason":"length","index":0,"logprobs":{CHAT_LOGPROBS},"message":{{"content":"Hi é","role":"assistant"}},"stop_reason":null}},{{"finish_reason":"stop","index":1,"logprobs":{{"content":[]}},"message":{{"content":"","role":"assistant"}},"stop_reason":null}}],"created":1700000000,"id":"chatcmpl-1","model":"m","object":"chat.completion","system_fingerprint":null,"usage":{{"completion_tokens":2,"prompt_tokens":5,"prompt_tokens_details":{{"cached_tokens":3}},"total_tokens":7}}}}"#
    );
    assert_eq!(pinned(&serde_json::to_string(&resp).unwrap()), expected);

    let plain = ChatRenderer::new(None).choice(1, String::new(), &[], &FinishReason::Stop.into());
    assert_eq!(
        serde_json::to_string(&plain).unwrap(),
        r#"{"finish_reason":"stop","index":1,"logprobs":null,"message":{"content":"","role":"assistant"},"stop_reason":null}"#
    );
}

#[tokio::test]
async fn a_text_completion_with_logprobs() {
    let rxs = choices(vec![
        vec![delta("Hi é", tokens()), done(FinishReason::Length, 2, 0)],
        vec![delta("", Vec::new()), done(FinishReason::Stop, 0, 0)],
    ]);
    let resp = collect(&mut CompletionRenderer::new(Some(2)), envelope("cmpl-1"), UsageTally::new(&[vec![1, 2], vec![3, 4, 5]], 1), rxs)
        .await
        .unwrap();
    let expected = format!(
        r#"{{"choices":[{{"finish_reason":"length","index":0,"logprobs":{{"text_offset":[0,2],"token_logprobs":[-0.10000000149011612,-1.25],"tokens":["Hi"," é"],"top_logprobs":[{{"Hello":-2.5,"Hi":-0.10000000149011612}},{{" you":null," é":-1.25}}]}},"stop_reason":null,"text":"Hi é"}},{{"finish_reason":"stop","index":1,"logprobs":{NO_COMPLETION_LOGPROBS},"stop_reason":null,"text":""}}],"created":1700000000,"id":"cmpl-1","model":"m","object":"text_completion","system_fingerprint":null,"usage":{{"completion_tokens":2,"prompt_tokens":5,"prompt_tokens_details":{{"cached_tokens":0}},"total_tokens":7}}}}"#
    );
    assert_eq!(pinned(&serde_json::to_string(&resp).unwrap()), expected);

    let plain = CompletionRenderer::new(None).choice(0, "x".into(), &[], &FinishReason::Length.into());
    assert_eq!(
        serde_json::to_string(&plain).unwrap(),
        r#"{"finish_reason":"length","index":0,"logprobs":null,"stop_reason":null,"text":"x"}"#
    );
}

#[tokio::test]
async fn a_chat_stream_opens_with_the_role_and_ends_with_usage() {
    let rxs = choices(vec![vec![delta("Hi é", tokens()), delta("", Vec::new()), done(FinishReason::Stop, 2, 3)]]);
    let events = sse_data::<ChatRenderer>(Some(2), true, UsageTally::new(&[vec![1, 2, 3, 4, 5]], 1), rxs).await;
    let head = r#""created":1700000000,"id":"chatcmpl-1","model":"m","object":"chat.completion.chunk""#;
    assert_eq!(
        events,
        [
            format!(
                r#"{{"choices":[{{"delta":{{"content":"","role":"assistant"}},"finish_reason":null,"index":0,"logprobs":null}}],{head},"usage":null}}"#
            ),
            format!(
                r#"{{"choices":[{{"delta":{{"content":"Hi é"}},"finish_reason":null,"index":0,"logprobs":{CHAT_LOGPROBS}}}],{head},"usage":null}}"#
            ),
            format!(
                r#"{{"choices":[{{"delta":{{}},"finish_reason":"stop","index":0,"logprobs":null,"stop_reason":null}}],{head},"usage":null}}"#
            ),
            format!(
                r#"{{"choices":[],{head},"usage":{{"completion_tokens":2,"prompt_tokens":5,"prompt_tokens_details":{{"cached_tokens":3}},"total_tokens":7}}}}"#
            ),
            "[DONE]".to_string(),
        ]
    );
}

#[tokio::test]
async fn a_chat_stream_without_usage_or_logprobs() {
    let rxs = choices(vec![vec![delta("Hi", Vec::new()), done(FinishReason::Stop, 1, 0)]]);
    let events = sse_data::<ChatRenderer>(None, false, UsageTally::new(&[vec![1, 2, 3, 4, 5]], 1), rxs).await;
    let head = r#""created":1700000000,"id":"chatcmpl-1","model":"m","object":"chat.completion.chunk""#;
    assert_eq!(
        events,
        [
            format!(
                r#"{{"choices":[{{"delta":{{"content":"","role":"assistant"}},"finish_reason":null,"index":0,"logprobs":null}}],{head}}}"#
            ),
            format!(r#"{{"choices":[{{"delta":{{"content":"Hi"}},"finish_reason":null,"index":0,"logprobs":null}}],{head}}}"#),
            format!(r#"{{"choices":[{{"delta":{{}},"finish_reason":"stop","index":0,"logprobs":null,"stop_reason":null}}],{head}}}"#),
            "[DONE]".to_string(),
        ]
    );
}

#[tokio::test]
async fn a_completion_stream_counts_text_offsets_across_chunks() {
    let rxs = choices(vec![vec![delta("abcdefg", Vec::new()), delta("Hi é", tokens()), done(FinishReason::Length, 3, 0)]]);
    let events = sse_data::<CompletionRenderer>(Some(2), true, UsageTally::new(&[vec![1, 2, 3, 4, 5]], 1), rxs).await;
    let head = r#""created":1700000000,"id":"cmpl-1","model":"m","object":"text_completion""#;
    assert_eq!(
        events,
        [
            format!(
                r#"{{"choices":[{{"finish_reason":null,"index":0,"logprobs":{NO_COMPLETION_LOGPROBS},"text":"abcdefg"}}],{head},"usage":null}}"#
            ),
            format!(
                r#"{{"choices":[{{"finish_reason":null,"index":0,"logprobs":{COMPLETION_LOGPROBS_AT_7},"text":"Hi é"}}],{head},"usage":null}}"#
            ),
            format!(
                r#"{{"choices":[{{"finish_reason":"length","index":0,"logprobs":null,"stop_reason":null,"text":""}}],{head},"usage":null}}"#
            ),
            format!(
                r#"{{"choices":[],{head},"usage":{{"completion_tokens":3,"prompt_tokens":5,"prompt_tokens_details":{{"cached_tokens":0}},"total_tokens":8}}}}"#
            ),
            "[DONE]".to_string(),
        ]
    );
}

#[test]
fn a_completion_chunk_of_another_choice() {
    let mut r = CompletionRenderer::new(None);
    r.delta(0, "ignored".into(), &[]);
    let c = r.delta(1, "Hi".into(), &tokens()[..1]);
    let json = serde_json::to_string(&CompletionChunk::new("cmpl-1", CREATED, "m", vec![c], None)).unwrap();
    assert_eq!(
        json,
        r#"{"choices":[{"finish_reason":null,"index":1,"logprobs":null,"text":"Hi"}],"created":1700000000,"id":"cmpl-1","model":"m","object":"text_completion"}"#
    );
}

#[tokio::test]
async fn an_error_after_the_stream_started_goes_in_band_and_ends_it() {
    let rxs = choices(vec![vec![Err(ApiError::new(ErrorCode::Unavailable, "decode worker failed mid-request: gone"))]]);
    let events = sse_data::<CompletionRenderer>(None, true, UsageTally::new(&[vec![1]], 1), rxs).await;
    // Compared as JSON: the key order of an object is serde_json's to choose (it keeps
    // insertion order where a dependency enables that).
    assert_eq!(events.len(), 2, "{events:?}");
    let error: serde_json::Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(
        error,
        serde_json::json!({"error": {"message": "decode worker failed mid-request: gone", "type": "service_unavailable_error", "param": null, "code": "unavailable"}})
    );
    assert_eq!(events[1], "[DONE]");
}

#[test]
fn usage_counts_each_prompt_once_with_its_first_choices_cache_hits() {
    let mut tally = UsageTally::new(&[vec![1, 2], vec![3, 4, 5]], 2);
    for (i, (completion_tokens, cached_tokens)) in [(1, 2), (2, 9), (3, 1), (4, 7)].into_iter().enumerate() {
        tally.record(i, ChoiceUsage { completion_tokens, cached_tokens }, tandem_protocol::FinishReason::Stop);
    }
    let u = tally.total();
    assert_eq!((u.prompt_tokens, u.completion_tokens, u.total_tokens, u.prompt_tokens_details.cached_tokens), (5, 10, 15, 3));
    let resp: CompletionResponse<tandem_protocol::openai::ChatChoice> = CompletionResponse::new("x", CREATED, "m", Vec::new(), u);
    assert_eq!(resp.object, "chat.completion");
}

fn scored_prompt() -> Vec<crate::disagg::PromptTokenOut> {
    use crate::disagg::PromptTokenOut;
    vec![
        PromptTokenOut { id: 5, text: "Hello".into(), logprob: None, rank: 0, top: Vec::new() },
        PromptTokenOut {
            id: 9,
            text: " world".into(),
            logprob: Some(-2.0),
            rank: 3,
            top: vec![(1, " there".into(), -0.5), (2, ",".into(), -1.0)],
        },
    ]
}

#[tokio::test]
async fn echo_leads_with_the_prompt_and_its_scores() {
    let rxs = choices(vec![vec![
        Ok(ChoiceEvent::Prompt { tokens: scored_prompt() }),
        delta("Hi", tokens()[..1].to_vec()),
        done(FinishReason::Length, 1, 0),
    ]]);
    let mut r = CompletionRenderer::new(Some(1)).with_prompt(Some(Echo { texts: vec!["Hello world".into()], n: 1 }), Some(1));
    let resp = collect(&mut r, envelope("cmpl-1"), UsageTally::new(&[vec![5, 9]], 1), rxs).await.unwrap();
    let v = serde_json::to_value(&resp).unwrap();
    let ch = &v["choices"][0];
    assert_eq!(ch["text"], "Hello worldHi");
    let lp = &ch["logprobs"];
    assert_eq!(lp["tokens"], serde_json::json!(["Hello", " world", "Hi"]));
    assert_eq!(lp["text_offset"], serde_json::json!([0, 5, 11]));
    assert_eq!(lp["token_logprobs"][0], serde_json::Value::Null);
    assert_eq!(lp["token_logprobs"][1], -2.0);
    // One alternative, as `logprobs: 1` asks, for the prompt's tokens as for the completion's.
    assert_eq!((&lp["top_logprobs"][0], &lp["top_logprobs"][1]), (&serde_json::Value::Null, &serde_json::json!({" there": -0.5})));
    // vLLM's prompt_logprobs: the own token with its rank, and the best alternative.
    let pl = &ch["prompt_logprobs"];
    assert_eq!(pl[0], serde_json::Value::Null);
    assert_eq!(pl[1]["9"], serde_json::json!({"decoded_token": " world", "logprob": -2.0, "rank": 3}));
    assert_eq!(pl[1]["1"]["rank"], 1);
    assert_eq!(pl[1].as_object().unwrap().len(), 2);

    // A stream of the prompt alone (`max_tokens: 0`): its lead goes out in the finishing chunk.
    let rxs = choices(vec![vec![Ok(ChoiceEvent::Prompt { tokens: scored_prompt() }), done(FinishReason::Length, 0, 0)]]);
    let r = CompletionRenderer::new(Some(0)).with_prompt(Some(Echo { texts: vec!["Hello world".into()], n: 1 }), None);
    let resp = sse(r, envelope("cmpl-1"), false, UsageTally::new(&[vec![5, 9]], 1), rxs);
    let body = axum::body::to_bytes(resp.into_response().into_body(), usize::MAX).await.unwrap();
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8(body.to_vec()).unwrap().split("\n\n").next().unwrap().strip_prefix("data: ").unwrap())
            .unwrap();
    let ch = &first["choices"][0];
    assert_eq!((ch["text"].as_str(), ch["finish_reason"].as_str()), (Some("Hello world"), Some("length")));
    assert_eq!(ch["logprobs"]["tokens"], serde_json::json!(["Hello", " world"]));
    assert!(ch.get("prompt_logprobs").is_none());
}

#[tokio::test]
async fn a_streamed_tool_call_opens_with_its_name_then_streams_its_arguments() {
    let tools: Vec<tandem_protocol::openai::tools::Tool> =
        serde_json::from_value(serde_json::json!([{"type": "function", "function": {"name": "get_weather"}}])).unwrap();
    let text = ["Sure.", " <tool", "_call>{\"name\": \"get_", "weather\", \"arguments\": {\"city\"", ": \"Oslo\"}}", "</tool_call>"];
    let mut evs: Vec<_> = text.iter().map(|t| delta(t, vec![])).collect();
    evs.push(done(FinishReason::Stop, 6, 0));
    let renderer = ChatRenderer::new(None).with_tools(std::sync::Arc::new(tools));
    let resp = sse(renderer, envelope("chatcmpl-1"), false, UsageTally::new(&[vec![1]], 1), choices(vec![evs]));
    let body = axum::body::to_bytes(resp.into_response().into_body(), usize::MAX).await.unwrap();
    let deltas: Vec<serde_json::Value> = String::from_utf8(body.to_vec())
        .unwrap()
        .split_terminator("\n\n")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e.strip_prefix("data: ")?).ok())
        .map(|v| v["choices"][0].clone())
        .collect();
    use serde_json::json;
    let d = |i: usize| deltas[i]["delta"].clone();
    assert_eq!(d(0), json!({"content": "", "role": "assistant"}));
    assert_eq!(d(1), json!({"content": "Sure."}));
    // The space cannot begin a tag and goes out; `<tool` could, and is held.
    assert_eq!(d(2), json!({"content": " "}));
    assert_eq!(d(3), json!({}));
    let opening = &deltas[4]["delta"]["tool_calls"][0];
    assert!(opening["id"].as_str().unwrap().starts_with("call_"), "{opening}");
    assert_eq!((&opening["index"], &opening["type"]), (&json!(0), &json!("function")));
    assert_eq!(opening["function"], json!({"name": "get_weather", "arguments": "{\"city\""}));
    assert_eq!(d(5), json!({"tool_calls": [{"index": 0, "function": {"arguments": ": \"Oslo\"}"}}]}));
    assert_eq!(d(6), json!({}));
    assert_eq!(deltas[7]["finish_reason"], "tool_calls");
    assert_eq!(deltas.len(), 8);
}
