//! Whole-cluster test support: real `tandem` processes on loopback ports, talking gRPC and TCP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const MODEL: &str = "SmolLM2-135M-Instruct";

pub fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

/// What the services log in the tests: warnings, plus the workers' per-request lines (which
/// carry the request and trace ids).
pub const LOG_FILTER: &str = "warn,tandem_prefill=info,tandem_decode=info";

/// A running service; killed (or, through its closed stdin, stopped) on drop.
pub struct Proc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub fields: Vec<(String, String)>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn field(&self, key: &str) -> String {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no {key}"))
    }

    /// The lines the service wrote to stderr so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// Keeps every line of a service's stderr; passes on all but its info-and-below log lines, so
/// warnings and panics still show in the test output.
fn capture(stderr: std::process::ChildStderr) -> Arc<Mutex<Vec<String>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !matches!(line.split_whitespace().nth(1), Some("INFO" | "DEBUG" | "TRACE")) {
                eprintln!("{line}");
            }
            sink.lock().unwrap().push(line);
        }
    });
    log
}

impl Proc {
    /// Closes stdin (a managed service drains and exits) and waits up to `limit` for the exit.
    pub fn stop_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        drop(self.stdin.take());
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tandem <args> --managed` and waits for its READY line.
pub fn start(args: &[&str]) -> Proc {
    start_env(args, &[])
}

/// As [`start`], with these environment variables set for the service.
pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut child = tandem()
        .args(args)
        .arg("--managed")
        .env("RUST_LOG", LOG_FILTER)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tandem");
    let log = capture(child.stderr.take().unwrap());
    let stdin = child.stdin.take();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("READY ") => break l,
            Some(Ok(_)) => continue,
            _ => panic!("tandem {args:?} exited before it was ready"),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let fields = line.split_whitespace().skip(2).filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
    Proc { child, stdin, fields, log }
}

pub struct Cluster {
    pub prefill: Vec<Proc>,
    pub decode: Vec<Proc>,
    pub gateway: Proc,
    pub base: String,
}

impl Cluster {
    pub fn start(prefill: usize, decode: usize) -> Self {
        Self::start_with(prefill, decode, &[])
    }

    pub fn start_with(prefill: usize, decode: usize, gateway_extra: &[&str]) -> Self {
        Self::with_workers(&vec![&[][..]; prefill], &vec![&[][..]; decode], gateway_extra, &[])
    }

    /// A worker per entry of `prefill` and `decode`, each with those extra arguments; every
    /// process with the variables in `env`.
    pub fn with_workers(prefill: &[&[&str]], decode: &[&[&str]], gateway_extra: &[&str], env: &[(&str, &str)]) -> Self {
        let engine = ["--kv-cache-mb", "64", "--handoff-lease-ms", "5000"];
        let worker = |role: &str, extra: &[&str]| start_env(&[&[role][..], &engine, extra].concat(), env);
        let prefill: Vec<Proc> = prefill.iter().map(|extra| worker("prefill", extra)).collect();
        let decode: Vec<Proc> = decode.iter().map(|extra| worker("decode", extra)).collect();
        let mut args = vec!["gateway".to_string(), "--listen".into(), "127.0.0.1:0".into(), "--poll-interval-ms".into(), "200".into()];
        for p in &prefill {
            args.extend(["--prefill".into(), p.field("grpc")]);
        }
        for d in &decode {
            args.extend(["--decode".into(), d.field("grpc")]);
        }
        args.extend(gateway_extra.iter().map(|s| s.to_string()));
        let gateway = start_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), env);
        let base = format!("http://{}", gateway.field("http"));
        let c = Self { prefill, decode, gateway, base };
        c.wait_ready();
        c
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if http_status(&self.base, "/ready") == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cluster not ready");
    }
}

/// A cluster that shares its state through Redis: every service registers there and the gateway
/// finds the workers in the registry (none are given to it).
pub struct RedisCluster {
    pub redis_url: String,
    pub kv: Proc,
    pub prefill: Vec<Proc>,
    pub decode: Vec<Proc>,
    pub gateway: Proc,
    pub base: String,
}

/// Heartbeats this often in the tests, so a dead worker lapses within a second.
pub const HEARTBEAT_MS: &str = "300";

pub fn worker_args<'a>(role: &'a str, redis_url: &'a str) -> Vec<&'a str> {
    vec![role, "--kv-cache-mb", "64", "--handoff-lease-ms", "5000", "--redis", redis_url, "--heartbeat-ms", HEARTBEAT_MS]
}

impl RedisCluster {
    pub fn start(redis_url: &str, prefill: usize, decode: usize) -> Self {
        let kv = start(&["kv-transfer", "--redis", redis_url, "--heartbeat-ms", HEARTBEAT_MS]);
        let prefill: Vec<Proc> = (0..prefill).map(|_| start(&worker_args("prefill", redis_url))).collect();
        let decode: Vec<Proc> = (0..decode).map(|_| start(&worker_args("decode", redis_url))).collect();
        let gateway = start(&["gateway", "--listen", "127.0.0.1:0", "--poll-interval-ms", "200", "--redis", redis_url]);
        let base = format!("http://{}", gateway.field("http"));
        let c = Self { redis_url: redis_url.to_string(), kv, prefill, decode, gateway, base };
        wait_for("the gateway finds its workers in the registry", Duration::from_secs(60), || {
            metric(&c.base, "tandem_workers{role=\"prefill\"}") == Some(prefill_len(&c) as f64)
                && metric(&c.base, "tandem_workers{role=\"decode\"}") == Some(c.decode.len() as f64)
        });
        c
    }
}

fn prefill_len(c: &RedisCluster) -> usize {
    c.prefill.len()
}

/// Polls `f` every 50 ms until it holds; panics after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting until {what}");
}

/// A GET's body, with plain blocking sockets.
pub fn http_get(base: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// One sample of the gateway's Prometheus metrics, by its full name with labels.
pub fn metric(base: &str, name: &str) -> Option<f64> {
    let body = http_get(base, "/metrics")?;
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' '))).and_then(|v| v.trim().parse().ok())
}

/// One shared cluster for the tests that only send requests.
pub fn shared() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| Cluster::start(1, 1))
}

pub fn client() -> reqwest::Client {
    tandem_runtime::grpc::default_tls_provider();
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// Status code of a GET, with plain blocking sockets (callable from inside async tests).
pub use tandem_test_support::http_status;

pub async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(format!("{base}{path}")).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// Reads an SSE response to its end; returns the JSON payloads and whether `[DONE]` came last.
pub async fn sse(resp: reqwest::Response) -> (Vec<Value>, bool) {
    use futures::StreamExt;
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let datas: Vec<&str> = buf.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let done = datas.last() == Some(&"[DONE]");
    (datas.iter().filter(|d| **d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect(), done)
}

/// Polls `f` every 50 ms until it holds; panics after `limit`. For async tests.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {limit:?} waiting until {what}");
}

/// The default model's tokenizer, for tests that need token ids.
pub fn tokenizer() -> &'static tandem_tokenizer::Tokenizer {
    static T: OnceLock<tandem_tokenizer::Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = tandem::default_model::ensure_default().expect("the default model");
        tandem_tokenizer::Tokenizer::from_gguf_file(&path).expect("its tokenizer")
    })
}

/// A W3C `traceparent` as the tests read one: trace id, parent span id and flags, in hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traceparent {
    pub trace_id: String,
    pub span_id: String,
    pub flags: String,
}

impl Traceparent {
    /// A new sampled one with random ids.
    pub fn new_root() -> Self {
        let r = || std::collections::hash_map::RandomState::new().hash_one(Instant::now());
        use std::hash::BuildHasher;
        Self { trace_id: format!("{:016x}{:016x}", r() | 1, r()), span_id: format!("{:016x}", r() | 1), flags: "01".into() }
    }

    pub fn parse(h: &str) -> Option<Self> {
        let p: Vec<&str> = h.split('-').collect();
        (p.len() == 4 && p[0] == "00" && p[1].len() == 32 && p[2].len() == 16 && p[3].len() == 2).then(|| Self {
            trace_id: p[1].into(),
            span_id: p[2].into(),
            flags: p[3].into(),
        })
    }

    pub fn header(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}
