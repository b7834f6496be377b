//! A fake OpenAI-compatible server with scripted timing and faults, and the real tokenizer.
#![allow(dead_code)]

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};
use tandem_loadtest::{load_tokenizer, TokenCounter};
use tokio::time::{sleep_until, Instant};

pub const MODEL: &str = "fake-model";

/// The tokenizer of the default model; the tests need real token counts.
pub fn counter() -> Arc<TokenCounter> {
    let path = tandem_loadtest::tokens::default_tokenizer_path();
    assert!(
        path.is_file(),
        "the default model {} is missing; fetch it first (scripts/test.sh does, or run `tandem up` once)",
        path.display()
    );
    Arc::new(TokenCounter::new(load_tokenizer(&path).expect("load the default tokenizer")).expect("count tokens"))
}

/// What the server does with request number `i` (in arrival order).
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Streams `max_tokens` chunks of `token`: the first after `ttft`, then one every `itl`,
    /// then the usage chunk (when `usage`) and `[DONE]` at once.
    Stream { ttft: Duration, itl: Duration, usage: bool, token: &'static str },
    /// Answers this status with an OpenAI error body.
    Status(u16),
    /// Streams this many tokens, then ends the body cleanly without `[DONE]`.
    EndAfter(usize),
    /// Streams this many tokens, then breaks the connection.
    AbortAfter(usize),
    /// Streams one token, then an error event and `[DONE]`.
    ErrorEvent,
    /// Accepts the request and never answers.
    Hang,
}

impl Behavior {
    pub fn timed(ttft_ms: u64, itl_ms: u64) -> Self {
        Behavior::Stream { ttft: Duration::from_millis(ttft_ms), itl: Duration::from_millis(itl_ms), usage: true, token: " the" }
    }
}

type Plan = Arc<dyn Fn(usize) -> Behavior + Send + Sync>;

/// One request as the server saw it: its headers and its JSON body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone)]
struct Shared {
    plan: Plan,
    count: Arc<AtomicUsize>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

pub struct FakeServer {
    pub addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// When each request arrived, in order.
    pub fn arrivals(&self) -> Vec<Instant> {
        let mut a = self.arrivals.lock().unwrap().clone();
        a.sort();
        a
    }

    /// Every completion request received, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        // Streams still open (a hanging request) would hold a graceful shutdown, so the
        // server's thread is left to end with the test process.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        drop(self.thread.take());
    }
}

/// `GET /v1/models` as vLLM answers it: the model's `root` is its path, here the default
/// model's file, so the load generator finds its tokenizer there.
fn models() -> Value {
    let root = tandem_loadtest::tokens::default_tokenizer_path().display().to_string();
    json!({"object": "list", "data": [{"id": MODEL, "object": "model", "root": root}]})
}

type Log<T> = Arc<Mutex<Vec<T>>>;

/// The routes of the fake server, with its logs of arrivals and of requests seen.
fn router(plan: impl Fn(usize) -> Behavior + Send + Sync + 'static) -> (Router, Log<Instant>, Log<Seen>) {
    let shared = Shared { plan: Arc::new(plan), count: Arc::default(), arrivals: Arc::default(), seen: Arc::default() };
    let (arrivals, seen) = (shared.arrivals.clone(), shared.seen.clone());
    let app = Router::new()
        .route("/v1/completions", post(complete))
        .route("/v1/chat/completions", post(complete))
        .route("/v1/models", get(|| async { Json(models()) }))
        .with_state(shared);
    (app, arrivals, seen)
}

pub async fn spawn(plan: impl Fn(usize) -> Behavior + Send + Sync + 'static) -> FakeServer {
    spawn_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), None, plan)
}

/// The fake server on this address (one where nothing listens yet).
pub fn spawn_at(addr: SocketAddr, plan: impl Fn(usize) -> Behavior + Send + Sync + 'static) -> FakeServer {
    spawn_on(std::net::TcpListener::bind(addr).unwrap(), None, plan)
}

/// The fake server over TLS, with a self-signed certificate for `localhost`.
pub fn spawn_tls(plan: impl Fn(usize) -> Behavior + Send + Sync + 'static) -> FakeServer {
    use tokio_rustls::rustls;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let config =
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![certified.cert.der().clone()], key.into()).unwrap();
    spawn_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), Some(Arc::new(config)), plan)
}

/// TLS over a TCP listener; connections whose handshake fails are dropped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else { continue };
            let _ = tcp.set_nodelay(true);
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

fn spawn_on(
    listener: std::net::TcpListener,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    plan: impl Fn(usize) -> Behavior + Send + Sync + 'static,
) -> FakeServer {
    let (app, arrivals, seen) = router(plan);
    // The server runs on its own runtime, as a separate process would, so its timers do not
    // queue behind the client's work.
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let tcp = tokio::net::TcpListener::from_std(listener).unwrap();
            let stopped = async {
                let _ = stopped.await;
            };
            let served = match tls {
                // Like real servers, no Nagle delay between a chunk and the next.
                None => {
                    let listener = tcp.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    tokio::time::timeout(
                        Duration::from_secs(3600),
                        axum::serve(listener, app).with_graceful_shutdown(stopped).into_future(),
                    )
                    .await
                }
                Some(config) => {
                    let listener = TlsListener { tcp, acceptor: tokio_rustls::TlsAcceptor::from(config) };
                    tokio::time::timeout(
                        Duration::from_secs(3600),
                        axum::serve(listener, app).with_graceful_shutdown(stopped).into_future(),
                    )
                    .await
                }
            };
            let _ = served;
        });
        rt.shutdown_background();
    });
    FakeServer { addr, arrivals, seen, stop: Some(stop), thread: Some(thread) }
}

/// An address where nothing listens.
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn chunk(chat: bool, text: &str) -> Bytes {
    let choice = if chat {
        json!({"index": 0, "delta": {"content": text}, "finish_reason": null})
    } else {
        json!({"index": 0, "text": text, "finish_reason": null})
    };
    Bytes::from(format!("data: {}\n\n", json!({"id": "x", "choices": [choice], "usage": null})))
}

async fn complete(State(s): State<Shared>, uri: Uri, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let now = Instant::now();
    s.arrivals.lock().unwrap().push(now);
    s.seen.lock().unwrap().push(Seen { headers, body: body.clone() });
    let i = s.count.fetch_add(1, Ordering::SeqCst);
    let chat = uri.path().contains("chat");
    let max_tokens = body.get("max_tokens").or(body.get("max_completion_tokens")).and_then(Value::as_u64).unwrap_or(16) as usize;
    let prompt_tokens = 1;
    let behavior = (s.plan)(i);
    // Each step is (when, what); `None` breaks the connection.
    let mut steps: Vec<(Instant, Option<Bytes>)> = Vec::new();
    match behavior {
        Behavior::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            let body = json!({"error": {"message": "scripted", "type": "scripted", "param": null, "code": code}});
            return (status, Json(body)).into_response();
        }
        Behavior::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            unreachable!();
        }
        Behavior::Stream { ttft, itl, usage, token } => {
            for k in 0..max_tokens {
                steps.push((now + ttft + itl * k as u32, Some(chunk(chat, token))));
            }
            let end = steps.last().map(|s| s.0).unwrap_or(now + ttft);
            if usage {
                let u = json!({"id": "x", "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens, "total_tokens": prompt_tokens + max_tokens}});
                steps.push((end, Some(Bytes::from(format!("data: {u}\n\n")))));
            }
            steps.push((end, Some(Bytes::from_static(b"data: [DONE]\n\n"))));
        }
        Behavior::EndAfter(n) | Behavior::AbortAfter(n) => {
            for k in 0..n {
                steps.push((now + Duration::from_millis(5 * k as u64), Some(chunk(chat, " the"))));
            }
            if matches!(behavior, Behavior::AbortAfter(_)) {
                steps.push((now + Duration::from_millis(5 * n as u64), None));
            }
        }
        Behavior::ErrorEvent => {
            steps.push((now, Some(chunk(chat, " the"))));
            let e = json!({"error": {"message": "kv handoff failed", "type": "unavailable", "code": "unavailable"}});
            steps.push((now, Some(Bytes::from(format!("data: {e}\n\n")))));
            steps.push((now, Some(Bytes::from_static(b"data: [DONE]\n\n"))));
        }
    }
    let stream = futures::stream::unfold(steps.into_iter(), |mut steps| async move {
        let (at, what) = steps.next()?;
        sleep_until(at).await;
        let item = what.ok_or_else(|| std::io::Error::other("scripted abort"));
        Some((item, steps))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Timing tests of one file run one at a time: they measure the clock, and a neighbour's
/// burst of work on a small machine would be measured with it.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// A scratch directory for result files and plots.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}
