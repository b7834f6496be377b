//! Who may call the API, how fast, and how much the cluster takes on at once.
//!
//! - API keys: with any configured, every route but the public ones (`/health`, `/ready` and
//!   `/metrics` by default) needs `Authorization: Bearer KEY`; keys are compared in constant time,
//!   and a missing or unknown one is a 401 (`invalid_api_key`).
//! - Per-key rate limits, requests and tokens per minute (prompt plus `max_tokens`, charged when a
//!   request is admitted): token buckets that refill continuously; over either, a 429 whose
//!   `Retry-After` says when the bucket will hold enough again.
//! - Admission: requests waiting for their first token (queued or in prefill) are bounded by
//!   count and by prompt tokens, and optionally by the wait the queue predicts (the requests
//!   ahead, and the newcomer itself, times the pace at which requests left the queue while the
//!   cluster was busy, with a margin for how much that pace varies, and never less than the
//!   queue has already gone without a departure); past any, a 503 whose `Retry-After` comes
//!   from that prediction. An admitted request is not slowed by the ones
//!   refused, which is the point: at twice the capacity the admitted ones keep their latency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tandem_protocol::{ApiError, ErrorCode};

use crate::error::HttpError;
use crate::Metrics;

/// What the operator configured.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// Accepted API keys; empty: the API is open.
    pub api_keys: Vec<String>,
    /// Paths that need no key even when keys are configured.
    pub public_paths: Vec<String>,
    /// Per key, requests and tokens per minute (0: unlimited).
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
    /// Most requests, and most prompt tokens, waiting for their first token at once.
    pub max_waiting_requests: usize,
    pub max_waiting_prompt_tokens: usize,
    /// Refuse a request that would wait longer than this for its first token, as the queue's
    /// size (its own place included) over its recent drain rate predicts (zero: no such bound).
    /// Ties admission to a TTFT objective.
    pub max_queue_wait: Duration,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            public_paths: vec!["/health".into(), "/ready".into(), "/metrics".into()],
            requests_per_minute: 0,
            tokens_per_minute: 0,
            max_waiting_requests: 1024,
            max_waiting_prompt_tokens: 1 << 20,
            max_queue_wait: Duration::ZERO,
        }
    }
}

/// The caller of one request, as the key check found it: the key's index, or none when the API
/// is open (then limits are not per caller).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller(pub Option<usize>);

/// A refusal with the time after which trying again makes sense.
pub(crate) struct Refusal {
    pub error: ApiError,
    pub retry_after: Duration,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut resp = HttpError(self.error).into_response();
        let secs = self.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// Refills at `per_minute / 60` a second up to `per_minute`.
#[derive(Debug)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(per_minute: u64) -> Self {
        Self { level: per_minute as f64, at: Instant::now() }
    }

    /// Takes `n` if the bucket holds them; else how long until it will. A request larger than
    /// the whole bucket is let through once the bucket is full, so it is slow, never impossible.
    fn take(&mut self, n: u64, per_minute: u64) -> Result<(), Duration> {
        let rate = per_minute as f64 / 60.0;
        let now = Instant::now();
        self.level = (self.level + now.duration_since(self.at).as_secs_f64() * rate).min(per_minute as f64);
        self.at = now;
        let want = (n as f64).min(per_minute as f64);
        if self.level >= want {
            self.level -= n as f64;
            return Ok(());
        }
        Err(Duration::from_secs_f64((want - self.level) / rate))
    }
}

#[derive(Debug, Default)]
struct Waiting {
    requests: usize,
    tokens: usize,
    /// When the last waiting request left the queue, and whether some request has waited ever
    /// since (the cluster was busy all along, so the time between departures is its pace).
    last_departure: Option<Instant>,
    busy_since_last: bool,
    /// Seconds per departure, smoothed: the queue's drain pace. Idle time does not count, so a
    /// burst after a quiet spell is judged by how fast the cluster serves, not by how little it
    /// was asked before.
    pace: Option<f64>,
    /// The samples' variance about the pace, smoothed the same way (seconds squared).
    pace_var: f64,
    /// Departures seen: the first few weigh as a plain average does, before the smoothing's
    /// own weight takes over.
    samples: u32,
    /// Since when requests have waited with none leaving (the later of the last departure and
    /// the moment the queue stopped being empty); `None` while nothing waits.
    stalled_since: Option<Instant>,
}

/// Weight of the newest interval in the smoothed pace (about the last ten departures count).
const PACE_WEIGHT: f64 = 0.1;

/// Standard deviations of margin in a predicted wait: with that many, about one admitted
/// request in forty waits longer than predicted, where with none, one in two would.
const WAIT_MARGIN_SD: f64 = 2.0;

impl Waiting {
    /// How long a newcomer would wait for its first token, its own turn included, or `None`
    /// before the queue was ever seen to drain.
    ///
    /// With `n` waiting ahead: the interval now running (at least as long as it has run so
    /// far, which is known before it ends: a queue that stopped draining is seen at once), then
    /// `n` more at the pace, plus a margin for the intervals' spread that grows as the square
    /// root of their count, as the spread of a sum of independent intervals does.
    fn predicted_wait(&self, now: Instant) -> Option<Duration> {
        let pace = self.pace?;
        let running = self.stalled_since.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        let n = self.requests as f64;
        let secs = pace.max(running) + n * pace + WAIT_MARGIN_SD * ((n + 1.0) * self.pace_var).sqrt();
        Some(Duration::from_secs_f64(secs))
    }

    /// Nothing has left the queue yet and something waits: no wait can be predicted, and the
    /// first request's time to its first token may be long (a cold cluster, long prompts).
    fn cold(&self) -> bool {
        self.pace.is_none() && self.requests > 0
    }

    /// A departure at `now` of a request admitted at `admitted`.
    fn depart(&mut self, now: Instant, admitted: Instant) {
        self.requests = self.requests.saturating_sub(1);
        // Each departure measures one request's share of the drain: the time since the one
        // before it when requests waited all along, or else its own wait (it found the queue
        // empty, so nothing was ahead of it).
        let sample = match (self.last_departure, self.busy_since_last) {
            (Some(last), true) => now.duration_since(last),
            _ => now.duration_since(admitted),
        }
        .as_secs_f64();
        self.samples += 1;
        match self.pace {
            // The spread is unknown at first: taken as large as the pace itself, it makes the
            // first predictions cautious until more departures have been seen (an idle cluster's
            // first request is faster than a busy one's).
            None => {
                self.pace = Some(sample);
                self.pace_var = sample * sample;
            }
            Some(p) => {
                let w = (1.0 / f64::from(self.samples)).max(PACE_WEIGHT);
                let d = sample - p;
                self.pace = Some(p + w * d);
                self.pace_var = (1.0 - w) * (self.pace_var + w * d * d);
            }
        }
        self.last_departure = Some(now);
        self.busy_since_last = self.requests > 0;
        self.stalled_since = (self.requests > 0).then_some(now);
    }

    /// An arrival at `now`.
    fn arrive(&mut self, now: Instant, tokens: usize) {
        if self.requests == 0 {
            self.stalled_since = Some(now);
        }
        self.requests += 1;
        self.tokens += tokens;
    }
}

pub(crate) struct Access {
    cfg: AccessConfig,
    buckets: Mutex<HashMap<Option<usize>, (Bucket, Bucket)>>,
    waiting: Mutex<Waiting>,
    metrics: Metrics,
}

impl Access {
    pub fn new(cfg: AccessConfig, metrics: Metrics) -> Self {
        Self { cfg, buckets: Mutex::new(HashMap::new()), waiting: Mutex::new(Waiting::default()), metrics }
    }

    /// The key a request presents, checked against every configured key in constant time.
    fn caller(&self, req: &Request) -> Result<Caller, ApiError> {
        if self.cfg.api_keys.is_empty() {
            return Ok(Caller(None));
        }
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .unwrap_or("");
        // Every key is compared, found or not, so the time taken says nothing about which.
        let mut found = None;
        for (i, key) in self.cfg.api_keys.iter().enumerate() {
            if bool::from(key.as_bytes().ct_eq(presented.as_bytes())) {
                found = Some(i);
            }
        }
        match found {
            Some(i) if !presented.is_empty() => Ok(Caller(Some(i))),
            _ => Err(ApiError::new(
                ErrorCode::InvalidApiKey,
                if presented.is_empty() { "no API key: send one as `Authorization: Bearer KEY`" } else { "the API key is not valid" },
            )),
        }
    }

    fn charge(&self, caller: Caller, requests: u64, tokens: u64) -> Result<(), Refusal> {
        let (rpm, tpm) = (self.cfg.requests_per_minute, self.cfg.tokens_per_minute);
        if rpm == 0 && tpm == 0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (r, t) = buckets.entry(caller.0).or_insert_with(|| (Bucket::full(rpm), Bucket::full(tpm)));
        let refuse = |what: &str, wait: Duration| {
            self.metrics.refused.with_label_values(&[what]).inc();
            Refusal {
                error: ApiError::new(
                    ErrorCode::RateLimited,
                    format!("over the {what} per minute allowed for this key; retry in {wait:.1?}"),
                ),
                retry_after: wait,
            }
        };
        if rpm > 0 && requests > 0 {
            r.take(requests, rpm).map_err(|w| refuse("requests", w))?;
        }
        if tpm > 0 && tokens > 0 {
            t.take(tokens, tpm).map_err(|w| refuse("tokens", w))?;
        }
        Ok(())
    }

    /// Charges a request's tokens (prompts plus what it may generate) to its caller.
    pub fn charge_tokens(&self, caller: Caller, tokens: u64) -> Result<(), Refusal> {
        self.charge(caller, 0, tokens)
    }

    /// Admits a request of `prompt_tokens` into the waiting set, or refuses it with how long the
    /// waiting set has lately taken to drain that far.
    pub fn admit(self: &Arc<Self>, prompt_tokens: usize) -> Result<Ticket, Refusal> {
        self.admit_at(prompt_tokens, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, prompt_tokens: usize, now: Instant) -> Result<Ticket, Refusal> {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        // Its own turn included: with that many ahead of it, the newcomer's first token comes
        // after theirs and its own, which makes the bound comparable to a TTFT objective.
        let predicted_wait = w.predicted_wait(now);
        let full_requests = w.requests + 1 > self.cfg.max_waiting_requests;
        // One request larger than the whole token bound still gets in when nothing waits.
        let full_tokens = w.requests > 0 && w.tokens + prompt_tokens > self.cfg.max_waiting_prompt_tokens;
        // Under a wait bound, a cold queue takes one request at a time until the first one has
        // its first token, which measures the pace.
        let bounded = !self.cfg.max_queue_wait.is_zero();
        // A request that finds nothing waiting is always taken: refusing it would help no one.
        let too_long = bounded && w.requests > 0 && (w.cold() || predicted_wait.is_some_and(|p| p > self.cfg.max_queue_wait));
        if full_requests || full_tokens || too_long {
            let retry_after = match predicted_wait {
                Some(p) => p.saturating_sub(self.cfg.max_queue_wait).clamp(Duration::from_secs(1), Duration::from_secs(60)),
                None if w.cold() => Duration::from_secs(1),
                None => Duration::from_secs(5),
            };
            let what = if full_requests {
                "queue_full"
            } else if full_tokens {
                "queued_tokens_full"
            } else {
                "queue_wait"
            };
            self.metrics.refused.with_label_values(&[what]).inc();
            return Err(Refusal {
                error: ApiError::new(
                    ErrorCode::Unavailable,
                    format!("the cluster is at capacity ({} requests, {} prompt tokens waiting); retry shortly", w.requests, w.tokens),
                ),
                retry_after,
            });
        }
        w.arrive(now, prompt_tokens);
        self.metrics.waiting.set(w.requests as i64);
        Ok(Ticket { access: self.clone(), tokens: prompt_tokens, admitted: now })
    }

    fn leave(&self, tokens: usize, admitted: Instant) {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        w.tokens = w.tokens.saturating_sub(tokens);
        w.depart(Instant::now(), admitted);
        self.metrics.waiting.set(w.requests as i64);
    }
}

/// A request's place among those waiting for a first token; leaving is dropping it (once every
/// choice of the request holds no clone of it).
pub(crate) struct Ticket {
    access: Arc<Access>,
    tokens: usize,
    admitted: Instant,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.access.leave(self.tokens, self.admitted);
    }
}

/// Around every route: the key check and the per-key request rate, before anything is read.
pub(crate) async fn guard(State(access): State<Arc<Access>>, mut req: Request, next: Next) -> Response {
    if access.cfg.public_paths.iter().any(|p| p == req.uri().path()) {
        req.extensions_mut().insert(Caller(None));
        return next.run(req).await;
    }
    let caller = match access.caller(&req) {
        Ok(c) => c,
        Err(e) => {
            access.metrics.refused.with_label_values(&["invalid_api_key"]).inc();
            let mut resp = HttpError(e).into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    };
    if let Err(r) = access.charge(caller, 1, 0) {
        return r.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_says_how_long_to_wait() {
        let mut b = Bucket::full(60);
        for _ in 0..60 {
            b.take(1, 60).unwrap();
        }
        let wait = b.take(1, 60).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        // A request larger than the bucket waits for a full bucket, then passes.
        let mut b = Bucket::full(10);
        b.take(100, 10).unwrap();
        assert!(b.take(100, 10).unwrap_err() > Duration::from_secs(59));
    }

    #[test]
    fn admission_bounds_requests_and_tokens_and_frees_on_drop() {
        let cfg = AccessConfig { max_waiting_requests: 2, max_waiting_prompt_tokens: 100, ..AccessConfig::default() };
        let a = Arc::new(Access::new(cfg, Metrics::new("m").unwrap()));
        let t1 = a.admit(60).ok().unwrap();
        // Over the token bound while another waits.
        assert!(a.admit(50).is_err());
        let t2 = a.admit(40).ok().unwrap();
        // Over the request bound.
        let refused = a.admit(1).err().unwrap();
        assert_eq!(refused.error.code, ErrorCode::Unavailable);
        drop((t1, t2));
        // Alone, a prompt over the token bound still gets in.
        let _big = a.admit(1000).ok().unwrap();
        // Two left within the window: the retry estimate is the queue over that rate.
        let refused = a.admit(1000).err().unwrap();
        assert!(refused.retry_after >= Duration::from_secs(1) && refused.retry_after <= Duration::from_secs(60));
    }

    fn ms(t: Instant, ms: u64) -> Instant {
        t + Duration::from_millis(ms)
    }

    fn secs(d: Option<Duration>) -> f64 {
        d.expect("a prediction").as_secs_f64()
    }

    #[test]
    fn the_pace_is_learnt_from_every_departure_without_idle_time() {
        let t = Instant::now();
        let mut w = Waiting::default();
        assert_eq!(w.predicted_wait(t), None, "nothing known, nothing waiting");
        for _ in 0..3 {
            w.arrive(t, 1);
        }
        // Never seen drain: nothing to predict from.
        assert!(w.cold() && w.predicted_wait(ms(t, 100)).is_none());
        // The first departure's own wait (200 ms) starts the pace, its spread as large; then
        // departures 200 ms, then 0 ms apart, averaged.
        w.depart(ms(t, 200), t);
        assert_eq!((w.pace, w.pace_var), (Some(0.2), 0.2 * 0.2));
        w.depart(ms(t, 400), t);
        w.depart(ms(t, 400), t);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(w.pace.unwrap(), 0.4 / 3.0), "{:?}", w.pace);
        assert!(close(w.pace_var, 2.0 / 3.0 * (0.02 + 0.04 / 3.0)), "{}", w.pace_var);
        assert!(!w.cold());
        // Idle for 400 ms: one pace plus two standard deviations of margin.
        assert!(close(secs(w.predicted_wait(ms(t, 800))), 0.4 / 3.0 + 2.0 * w.pace_var.sqrt()));
        // A request that came to an empty queue counts with its own wait (400 ms), the idle
        // time before it not at all.
        w.arrive(ms(t, 800), 1);
        w.depart(ms(t, 1200), ms(t, 800));
        assert!(close(w.pace.unwrap(), 0.4 / 3.0 + (0.4 - 0.4 / 3.0) / 4.0), "{:?}", w.pace);
    }

    #[test]
    fn a_queue_that_stopped_draining_is_seen_before_anything_leaves() {
        let t = Instant::now();
        let mut w = Waiting { pace: Some(0.1), ..Waiting::default() };
        w.arrive(t, 1);
        // Just arrived: its interval and the newcomer's, at the pace.
        assert!((secs(w.predicted_wait(t)) - 0.2).abs() < 1e-9);
        // A second on, still nothing left: the running interval is at least that long.
        assert!((secs(w.predicted_wait(ms(t, 1000))) - 1.1).abs() < 1e-9);
    }

    #[test]
    fn a_predicted_wait_over_the_bound_is_refused() {
        let cfg = AccessConfig { max_queue_wait: Duration::from_millis(300), ..AccessConfig::default() };
        let a = Arc::new(Access::new(cfg, Metrics::new("m").unwrap()));
        let t = Instant::now();
        // Nothing known, nothing waiting: admitted.
        let held = a.admit_at(1, t).ok().unwrap();
        // Cold: one at a time until a first token says how fast the queue drains.
        let refused = a.admit_at(1, ms(t, 50)).err().unwrap();
        assert!(refused.error.message.contains("capacity"), "{}", refused.error.message);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        {
            // Then a pace of 100 ms is known, and the one waiting has waited a second already:
            // its turn and the newcomer's take at least 1.1 s, over the bound, by 0.8 s (a
            // second at least).
            let mut w = a.waiting.lock().unwrap();
            w.pace = Some(0.1);
        }
        let refused = a.admit_at(1, ms(t, 1000)).err().unwrap();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        // Two turns at the pace fit within 300 ms when nothing has stalled.
        {
            let mut w = a.waiting.lock().unwrap();
            w.stalled_since = Some(ms(t, 1000));
        }
        let admitted = a.admit_at(1, ms(t, 1000)).ok().unwrap();
        drop((held, admitted));
        // Alone, a request is taken whatever its predicted wait: refusing it would help no one.
        a.waiting.lock().unwrap().pace = Some(10.0);
        let alone = a.admit_at(1, ms(t, 2000)).ok().unwrap();
        drop(alone);
    }
}
