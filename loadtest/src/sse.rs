//! Server-sent events as OpenAI streams them: `data: {chunk}` events ending in `data: [DONE]`.

use serde_json::Value;

/// Splits a byte stream into the data payloads of complete events, across any chunking.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    data: Vec<String>,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the payloads of the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, &mut events);
            } else {
                self.line.push(b);
            }
        }
        events
    }

    /// The stream ended: an event left without its closing blank line still counts.
    pub fn finish(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        let line = std::mem::take(&mut self.line);
        self.line_done(&line, &mut events);
        self.line_done(b"", &mut events);
        events
    }

    fn line_done(&mut self, line: &[u8], events: &mut Vec<String>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if !self.data.is_empty() {
                events.push(std::mem::take(&mut self.data).join("\n"));
            }
            return;
        }
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            self.data.push(String::from_utf8_lossy(rest).into_owned());
        }
        // Comments (`:`), `event:`, `id:` and `retry:` lines carry nothing we time.
    }
}

/// What one event says.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `[DONE]`: the stream is complete.
    Done,
    /// A completion chunk: the text it adds (empty for role-only or usage-only chunks) and
    /// the usage it reports, if any.
    Chunk { text: String, completion_tokens: Option<u64> },
    /// `{"error": ...}`.
    Error(String),
}

/// Interprets one payload; `Err` holds a description of a payload that is not a chunk.
pub fn interpret(payload: &str) -> Result<Event, String> {
    let payload = payload.trim();
    if payload == "[DONE]" {
        return Ok(Event::Done);
    }
    let v: Value = serde_json::from_str(payload).map_err(|e| format!("unparsable event {payload:.80}: {e}"))?;
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        let message = err.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| err.to_string());
        return Ok(Event::Error(message));
    }
    let mut text = String::new();
    for choice in v.get("choices").and_then(Value::as_array).into_iter().flatten() {
        // Completions put text in `text`; chat in `delta.content` (reasoning models also in
        // `delta.reasoning_content`), all of which are generated tokens.
        let delta = choice.get("delta");
        let parts = [
            choice.get("text"),
            delta.and_then(|d| d.get("reasoning_content")),
            delta.and_then(|d| d.get("reasoning")),
            delta.and_then(|d| d.get("content")),
        ];
        for part in parts.into_iter().flatten() {
            if let Some(s) = part.as_str() {
                text.push_str(s);
            }
        }
    }
    let completion_tokens = v.get("usage").and_then(|u| u.get("completion_tokens")).and_then(Value::as_u64);
    Ok(Event::Chunk { text, completion_tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_any_chunking() {
        let stream = b"data: {\"a\":1}\r\n\r\n: keepalive\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        for cut in 1..stream.len() {
            let mut d = SseDecoder::new();
            let mut got = d.push(&stream[..cut]);
            got.extend(d.push(&stream[cut..]));
            got.extend(d.finish());
            assert_eq!(got, vec!["{\"a\":1}", "x\ny", "[DONE]"], "cut at {cut}");
        }
    }

    #[test]
    fn unterminated_last_event_counts_at_the_end() {
        let mut d = SseDecoder::new();
        assert!(d.push(b"data: [DONE]").is_empty());
        assert_eq!(d.finish(), vec!["[DONE]"]);
    }

    #[test]
    fn chunks_of_both_endpoints() {
        let completion = r#"{"choices":[{"index":0,"text":" hi"}],"usage":null}"#;
        assert_eq!(interpret(completion), Ok(Event::Chunk { text: " hi".into(), completion_tokens: None }));
        let chat = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"yo"}}]}"#;
        assert_eq!(interpret(chat), Ok(Event::Chunk { text: "yo".into(), completion_tokens: None }));
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7}}"#;
        assert_eq!(interpret(usage), Ok(Event::Chunk { text: String::new(), completion_tokens: Some(7) }));
        let err = r#"{"error":{"message":"kv handoff failed","code":"unavailable"}}"#;
        assert_eq!(interpret(err), Ok(Event::Error("kv handoff failed".into())));
        assert_eq!(interpret(" [DONE] "), Ok(Event::Done));
        assert!(interpret("not json").is_err());
    }
}
