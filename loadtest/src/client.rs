//! One streamed request against the target, timed token by token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::failure::{Failure, FailureKind};
use crate::sse::{interpret, Event, SseDecoder};
use crate::{BenchConfig, LoadtestError, Result, SampleRequest, TokenCounter};

/// How long to wait for the end of a body after `[DONE]`, so the connection can be reused.
const DRAIN: Duration = Duration::from_secs(1);

/// What happened to one request. Times are seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOutcome {
    pub prompt_len: usize,
    /// Generated tokens: the stream's `usage` when sent, else the tokenizer's count.
    pub output_len: usize,
    /// Send to the first chunk carrying text.
    pub ttft: f64,
    /// Every gap between consecutive chunks carrying text.
    pub itl: Vec<f64>,
    /// Send to `[DONE]`.
    pub e2el: f64,
    /// When it was sent, after the start of the run.
    pub sent_at: f64,
    /// The streamed text; empty for a failed request.
    pub generated_text: String,
    pub error: Option<Failure>,
}

impl RequestOutcome {
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }

    /// Time per output token after the first; zero for a one-token answer.
    pub fn tpot(&self) -> f64 {
        if self.output_len > 1 {
            (self.e2el - self.ttft) / (self.output_len - 1) as f64
        } else {
            0.0
        }
    }
}

/// An OpenAI-compatible endpoint and the client that loads it.
#[derive(Debug, Clone)]
pub struct Target {
    client: reqwest::Client,
    url: String,
    model: String,
    chat: bool,
    timeout: Duration,
    counter: Arc<TokenCounter>,
}

fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        // The target is named explicitly; an environment proxy must not reroute the load.
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(timeout.min(Duration::from_secs(30)))
        .build()
        .map_err(|e| LoadtestError::Target(format!("http client: {e}")))
}

impl Target {
    pub fn new(cfg: &BenchConfig, counter: Arc<TokenCounter>) -> Result<Self> {
        Ok(Self {
            client: http_client(cfg.request_timeout)?,
            url: cfg.url(&cfg.endpoint),
            model: cfg.model.clone(),
            chat: cfg.is_chat(),
            timeout: cfg.request_timeout,
            counter,
        })
    }

    fn body(&self, req: &SampleRequest) -> Value {
        let mut body = json!({
            "model": self.model,
            "temperature": 0.0,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if self.chat {
            body["messages"] = json!([{"role": "user", "content": req.prompt}]);
            body["max_completion_tokens"] = json!(req.output_len);
        } else {
            body["prompt"] = json!(req.prompt);
            body["max_tokens"] = json!(req.output_len);
        }
        body
    }

    /// Sends one request and times its stream; never fails, a failure is in the outcome.
    pub async fn send(&self, req: &SampleRequest) -> RequestOutcome {
        let mut out = RequestOutcome { prompt_len: req.prompt_len, ..Default::default() };
        let start = Instant::now();
        match tokio::time::timeout(self.timeout, self.stream(req, start, &mut out)).await {
            Ok(Ok(())) => {}
            Ok(Err(failure)) => out.error = Some(failure),
            Err(_) => {
                let message = format!("no [DONE] within {:.1} s", self.timeout.as_secs_f64());
                out.error = Some(Failure::new(FailureKind::Timeout, message));
            }
        }
        if out.error.is_some() {
            out.e2el = start.elapsed().as_secs_f64();
        }
        out
    }

    async fn stream(&self, req: &SampleRequest, start: Instant, out: &mut RequestOutcome) -> std::result::Result<(), Failure> {
        let sent = self.client.post(&self.url).json(&self.body(req)).send().await;
        let mut resp = sent.map_err(|e| Failure::new(FailureKind::from_reqwest(&e, false), error_chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(Failure::new(FailureKind::from_status(status.as_u16()), format!("HTTP {status}: {text:.200}")));
        }
        let mut decoder = SseDecoder::new();
        let mut last: Option<Instant> = None;
        let mut text = String::new();
        let mut usage = None;
        let mut done = false;
        let mut chunks = 0usize;
        let mut events = 0usize;
        while !done {
            let chunk = resp.chunk().await.map_err(|e| {
                let message = format!("stream broke after {chunks} text chunks: {}", error_chain(&e));
                Failure::new(FailureKind::from_reqwest(&e, true), message)
            })?;
            let now = Instant::now();
            let ended = chunk.is_none();
            let payloads = match &chunk {
                Some(bytes) => decoder.push(bytes),
                None => decoder.finish(),
            };
            events += payloads.len();
            for payload in payloads {
                match interpret(&payload) {
                    Ok(Event::Done) => {
                        done = true;
                        out.e2el = (now - start).as_secs_f64();
                    }
                    Ok(Event::Error(message)) => return Err(Failure::new(FailureKind::StreamError, message)),
                    Ok(Event::Chunk { text: t, completion_tokens }) => {
                        usage = completion_tokens.or(usage);
                        if t.is_empty() {
                            continue;
                        }
                        match last {
                            None => out.ttft = (now - start).as_secs_f64(),
                            Some(prev) => out.itl.push((now - prev).as_secs_f64()),
                        }
                        last = Some(now);
                        chunks += 1;
                        text.push_str(&t);
                    }
                    Err(message) => return Err(Failure::new(FailureKind::InvalidResponse, message)),
                }
            }
            if ended && events == 0 {
                return Err(Failure::new(FailureKind::InvalidResponse, "the response is not an event stream"));
            }
            if ended && !done {
                let message = format!("stream ended before [DONE] after {chunks} text chunks");
                return Err(Failure::new(FailureKind::StreamCut, message));
            }
        }
        // Read to the end of the body so the connection goes back to the pool.
        let _ = tokio::time::timeout(DRAIN, async { while let Ok(Some(_)) = resp.chunk().await {} }).await;
        if last.is_none() {
            return Err(Failure::new(FailureKind::InvalidResponse, "stream finished without any text"));
        }
        out.output_len = match usage {
            Some(n) => n as usize,
            None => self.counter.completion_tokens(&text).map_err(|e| Failure::new(FailureKind::InvalidResponse, e.to_string()))?,
        };
        out.generated_text = text;
        Ok(())
    }
}

/// The served model's id, from `GET /v1/models`, for runs that do not name one.
pub async fn discover_model(cfg: &BenchConfig) -> Result<String> {
    let url = cfg.url("/v1/models");
    let client = http_client(cfg.request_timeout)?;
    let fail = |m: String| LoadtestError::Target(format!("{url}: {m} (pass --model)"));
    let resp = client.get(&url).send().await.map_err(|e| fail(error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let v: Value = resp.json().await.map_err(|e| fail(e.to_string()))?;
    v["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| fail("no model listed".into()))
}

/// reqwest's own message hides the cause ("error sending request"); the chain names it.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}
