//! One streamed request against the target, timed token by token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Map, Value};

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
    /// From its arrival time to its send: the wait for a `--max-concurrency` slot.
    pub queue_time: f64,
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
    ignore_eos: bool,
    extra_body: Map<String, Value>,
    timeout: Duration,
    counter: Arc<TokenCounter>,
}

/// `Authorization: Bearer $OPENAI_API_KEY` when it is set, then `--header`s, which win.
fn default_headers(cfg: &BenchConfig) -> Result<HeaderMap> {
    let key = std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.is_empty());
    let auth = key.map(|k| ("Authorization".to_string(), format!("Bearer {k}")));
    let mut headers = HeaderMap::new();
    for (name, value) in auth.iter().chain(&cfg.headers) {
        let bad = |e: &dyn std::fmt::Display| LoadtestError::Config(format!("--header {name}={value}: {e}"));
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad(&e))?;
        let value = HeaderValue::from_str(value).map_err(|e| bad(&e))?;
        headers.insert(name, value);
    }
    Ok(headers)
}

fn http_client(cfg: &BenchConfig) -> Result<reqwest::Client> {
    // TLS through rustls with ring, as elsewhere in the workspace; installed once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        // The target is named explicitly; an environment proxy must not reroute the load.
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(cfg.request_timeout.min(Duration::from_secs(30)))
        .default_headers(default_headers(cfg)?)
        .tls_danger_accept_invalid_certs(cfg.insecure)
        .build()
        .map_err(|e| LoadtestError::Target(format!("http client: {}", error_chain(&e))))
}

impl Target {
    pub fn new(cfg: &BenchConfig, counter: Arc<TokenCounter>) -> Result<Self> {
        Ok(Self {
            client: http_client(cfg)?,
            url: cfg.url(&cfg.endpoint),
            model: cfg.model.clone(),
            chat: cfg.is_chat(),
            ignore_eos: cfg.ignore_eos,
            extra_body: cfg.extra_body.clone(),
            timeout: cfg.request_timeout,
            counter,
        })
    }

    /// The body of one request: sampling parameters only when given, `ignore_eos` only when
    /// set, and `--extra-body` merged last, as `vllm bench serve` builds it.
    pub fn body(&self, req: &SampleRequest) -> Value {
        let mut body = json!({
            "model": self.model,
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
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Value::Object(fields) = &mut body {
            fields.extend(self.extra_body.clone());
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

/// One entry of `GET /v1/models`: the name requests use, and `root`, the model's path or hub
/// id when the server says.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedModel {
    pub id: String,
    pub root: Option<String>,
}

/// The models the target serves, from `GET /v1/models`, in its order.
pub async fn list_models(cfg: &BenchConfig) -> Result<Vec<ServedModel>> {
    let url = cfg.url("/v1/models");
    let client = http_client(cfg)?;
    let fail = |m: String| LoadtestError::Target(format!("{url}: {m}"));
    let resp = client.get(&url).timeout(cfg.request_timeout).send().await.map_err(|e| fail(error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let v: Value = resp.json().await.map_err(|e| fail(e.to_string()))?;
    let models: Vec<ServedModel> = v["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let id = m["id"].as_str()?.to_string();
            let root = m["root"].as_str().filter(|r| !r.is_empty()).map(str::to_string);
            Some(ServedModel { id, root })
        })
        .collect();
    if models.is_empty() {
        return Err(fail("no model listed".into()));
    }
    Ok(models)
}

/// The served model's id, the first `GET /v1/models` lists, for runs that do not name one.
pub async fn discover_model(cfg: &BenchConfig) -> Result<String> {
    let models = list_models(cfg).await.map_err(|e| match e {
        LoadtestError::Target(m) => LoadtestError::Target(format!("{m} (pass --model)")),
        other => other,
    })?;
    Ok(models[0].id.clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Result;

    fn target(cfg: &BenchConfig) -> Result<Target> {
        let tokenizer = crate::load_tokenizer(&crate::tokens::default_tokenizer_path()).expect("the default model's tokenizer");
        Target::new(cfg, Arc::new(TokenCounter::new(tokenizer)?))
    }

    #[test]
    fn the_body_sends_only_what_was_asked_for() {
        let mut cfg = BenchConfig::new("http://h:1", "m");
        let plain = target(&cfg).unwrap();
        let req = SampleRequest { prompt: "hi".into(), prompt_len: 2, output_len: 5 };
        let body = plain.body(&req);
        assert_eq!(body, json!({"model": "m", "prompt": "hi", "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}));
        cfg.ignore_eos = true;
        cfg.endpoint = "/v1/chat/completions".into();
        cfg.extra_body =
            crate::config::request_extras(&[("temperature", Some(json!(0.0)))], Some(r#"{"max_completion_tokens": 9, "seed": 1}"#))
                .unwrap();
        let body = target(&cfg).unwrap().body(&req);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["temperature"], 0.0);
        assert_eq!(body["max_completion_tokens"], 9, "--extra-body wins");
        assert_eq!(body["seed"], 1);
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut cfg = BenchConfig::new("http://h:1", "m");
        cfg.headers = vec![("bad header".into(), "v".into())];
        assert!(default_headers(&cfg).is_err());
        cfg.headers = vec![("x-ok".into(), "v".into())];
        assert_eq!(default_headers(&cfg).unwrap()["x-ok"], "v");
    }
}
