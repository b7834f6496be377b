//! Whole-cluster test support: real `tandem` processes on loopback ports, talking gRPC and TCP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const MODEL: &str = "SmolLM2-135M-Instruct";

pub fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

/// A running service; killed (or, through its closed stdin, stopped) on drop.
pub struct Proc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub fields: Vec<(String, String)>,
}

impl Proc {
    pub fn field(&self, key: &str) -> String {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no {key}"))
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
    let mut child = tandem()
        .args(args)
        .arg("--managed")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn tandem");
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
    Proc { child, stdin, fields }
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
        let engine = ["--kv-cache-mb", "64", "--handoff-lease-ms", "5000"];
        let prefill: Vec<Proc> = (0..prefill).map(|_| start(&[&["prefill"][..], &engine].concat())).collect();
        let decode: Vec<Proc> = (0..decode).map(|_| start(&[&["decode"][..], &engine].concat())).collect();
        let mut args = vec!["gateway".to_string(), "--listen".into(), "127.0.0.1:0".into(), "--poll-interval-ms".into(), "200".into()];
        for p in &prefill {
            args.extend(["--prefill".into(), p.field("grpc")]);
        }
        for d in &decode {
            args.extend(["--decode".into(), d.field("grpc")]);
        }
        args.extend(gateway_extra.iter().map(|s| s.to_string()));
        let gateway = start(&args.iter().map(String::as_str).collect::<Vec<_>>());
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

/// One shared cluster for the tests that only send requests.
pub fn shared() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| Cluster::start(1, 1))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// Status code of a GET, with plain blocking sockets (callable from inside async tests).
pub fn http_status(base: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

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
