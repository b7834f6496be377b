//! The README's quick start: `tandem up` brings the whole cluster up as separate processes,
//! serves a request, and takes every process down again on Ctrl-C (SIGINT) or SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::json;

/// A failed assertion must not leave the cluster running (its children follow it down).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tandem up` on a free port, in a process group of its own (as a shell runs a foreground job);
/// returns it and its base URL once it serves.
fn up() -> (KillOnDrop, String) {
    up_with(&[])
}

fn up_with(extra: &[&str]) -> (KillOnDrop, String) {
    let (up, base, line) = start(&[&["up", "--port", "0", "--kv-cache-mb", "64"], extra].concat());
    assert!(line.contains("SmolLM2-135M-Instruct"), "{line}");
    (up, base)
}

/// `tandem ARGS` that ends up serving: it, its base URL and the line that said so.
fn start(args: &[&str]) -> (KillOnDrop, String, String) {
    let mut up = KillOnDrop(tandem().args(args).process_group(0).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap());
    let mut lines = BufReader::new(up.0.stdout.take().unwrap()).lines();
    let line = lines.next().expect("tandem up printed nothing").unwrap();
    let base = line
        .split("at ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("endpoint in the first line")
        .trim_end_matches("/v1")
        .to_string();
    (up, base, line)
}

/// The command line of every live process whose parent is `pid`, by pid.
fn children(pid: u32) -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Some((state, ppid)) = stat(child) else { continue };
        if ppid == pid && state != "Z" {
            let cmdline = std::fs::read_to_string(format!("/proc/{child}/cmdline")).unwrap_or_default();
            out.push((child, cmdline.split('\0').filter(|a| !a.is_empty()).map(str::to_string).collect()));
        }
    }
    out
}

/// A process's state letter and parent pid; `None` once it is gone.
fn stat(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything; the fields after it are plain.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.to_string();
    Some((state, rest.next()?.parse().ok()?))
}

/// Exited: no entry left, or a zombie that nobody has reaped yet.
fn gone(pid: u32) -> bool {
    stat(pid).is_none_or(|(state, _)| state == "Z")
}

/// Checks that `up` runs the four services as its children, sends `signal` to `target`, and
/// waits for `up` to exit cleanly and every child to be gone.
fn stop_with(up: &mut KillOnDrop, base: &str, signal: &str, target: &str) {
    stop_services(up, base, signal, target, &["decode", "gateway", "kv-transfer", "prefill"]);
}

/// As [`stop_with`], for a cluster of these services (by role, sorted).
fn stop_services(up: &mut KillOnDrop, base: &str, signal: &str, target: &str, expected: &[&str]) {
    let services = children(up.0.id());
    let mut roles: Vec<&str> = services.iter().filter_map(|(_, args)| args.get(1).map(String::as_str)).collect();
    roles.sort();
    assert_eq!(roles, expected, "{services:?}");
    assert!(services.iter().all(|(_, args)| args.iter().any(|a| a == "--managed")), "{services:?}");

    assert!(std::process::Command::new("kill").args([signal, "--", target]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = up.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "tandem up did not stop on {signal}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "tandem up exited with {status} on {signal}");
    // Its children went with it; `up` waits for them, so none may be left by now.
    let left: Vec<_> = services.iter().filter(|(pid, _)| !gone(*pid)).collect();
    assert!(left.is_empty(), "still running after {signal}: {left:?}");
    assert_eq!(http_status(base, "/health"), None, "the gateway's port still answers");
}

#[tokio::test(flavor = "multi_thread")]
async fn tandem_up_serves_and_stops_on_ctrl_c() {
    let (mut up, base) = up();
    let (status, v) = post(&base, "/v1/chat/completions", &chat_body("Hello!", json!({"max_tokens": 8}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(http_status(&base, "/ready"), Some(200));
    // Ctrl-C: SIGINT to the whole foreground process group, `up` and its children alike.
    let group = format!("-{}", up.0.id());
    stop_with(&mut up, &base, "-INT", &group);
}

#[tokio::test(flavor = "multi_thread")]
async fn tandem_up_stops_every_service_on_sigterm_after_the_streams_in_flight() {
    let (mut up, base) = up();
    assert_eq!(http_status(&base, "/ready"), Some(200));
    // Two streams are under way when the stop comes; each must still run to its end.
    let mut readers = Vec::new();
    for i in 0..2 {
        let body = json!({"model": MODEL, "prompt": format!("Story {i}: once upon a time"), "max_tokens": 40,
                          "ignore_eos": true, "temperature": 0, "stream": true});
        let resp = client().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let first = body.next().await.expect("a first chunk").unwrap();
        readers.push(tokio::spawn(async move {
            let mut text = String::from_utf8_lossy(&first).into_owned();
            while let Some(chunk) = body.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.expect("the stream was cut")));
            }
            text
        }));
    }
    // A supervisor stopping `up` alone: it takes its children down itself, after they drain.
    let pid = up.0.id().to_string();
    tokio::task::block_in_place(|| stop_with(&mut up, &base, "-TERM", &pid));
    for r in readers {
        let text = r.await.unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        assert!(!text.contains("\"error\""), "a stream in flight got an error instead of its end: {text}");
        assert!(text.contains("\"finish_reason\":\"length\""), "the stream did not run to its 40 tokens: {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tandem_up_restarts_a_killed_worker_and_keeps_serving() {
    let (mut up, base) = up_with(&["--decode", "2"]);
    let decodes = |up: &KillOnDrop| -> Vec<u32> {
        children(up.0.id()).into_iter().filter(|(_, a)| a.get(1).is_some_and(|r| r == "decode")).map(|(p, _)| p).collect()
    };
    let before = decodes(&up);
    assert_eq!(before.len(), 2);
    let victim = before[0];
    assert!(std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap().success());

    // The rest of the cluster goes on serving meanwhile.
    let (status, v) = post(&base, "/v1/completions", &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4})).await;
    assert_eq!(status, 200, "{v}");
    assert!(up.0.try_wait().unwrap().is_none(), "tandem up stopped when one worker died");

    // The dead worker is back, at the address the gateway knows, and in routing again.
    eventually("the killed decode worker is restarted and routable", Duration::from_secs(60), || {
        let (now, base) = (decodes(&up), base.clone());
        async move {
            now.len() == 2
                && !now.contains(&victim)
                && http_get(&base, "/ready").is_some_and(|r| r.contains("\"decode_workers\":2"))
        }
    })
    .await;
    let (status, v) = post(&base, "/v1/completions", &json!({"model": MODEL, "prompt": "Hello again", "max_tokens": 4})).await;
    assert_eq!(status, 200, "{v}");
    let pid = up.0.id().to_string();
    tokio::task::block_in_place(|| {
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(20);
        while up.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "tandem up did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn tandem_serve_takes_vllm_flags_and_refuses_what_it_cannot_do_by_name() {
    // Refused before anything starts, naming the flag.
    let out = tandem().args(["serve", "--quantization", "awq"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--quantization"), "{err}");

    let (mut serve, base, line) = start(&[
        "serve",
        "--port",
        "0",
        "--served-model-name",
        "smol",
        "--max-model-len",
        "300",
        "--max-num-seqs",
        "4",
        "--api-key",
        "k1",
        "--enable-prefix-caching",
        "--dtype",
        "auto",
        "--tensor-parallel-size",
        "2",
    ]);
    assert!(line.contains("smol"), "{line}");
    // Every worker a group of two ranks.
    let ready: serde_json::Value = serde_json::from_str(&http_get(&base, "/ready").unwrap()).unwrap();
    assert_eq!(ready["tp_sizes"], json!({"prefill": [2], "decode": [2]}), "{ready}");
    // The key guards the API...
    let models = client().get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401);
    let authed = |path: &str| client().get(format!("{base}{path}")).bearer_auth("k1");
    let models: serde_json::Value = authed("/v1/models").send().await.unwrap().json().await.unwrap();
    // ...the name and the context are the ones given.
    assert_eq!((models["data"][0]["id"].as_str(), models["data"][0]["max_model_len"].as_u64()), (Some("smol"), Some(300)), "{models}");
    let ask = |body: serde_json::Value| client().post(format!("{base}/v1/completions")).bearer_auth("k1").json(&body).send();
    let resp = ask(json!({"model": "smol", "prompt": "Hello", "max_tokens": 4})).await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = ask(json!({"model": "smol", "prompt": "Hello", "max_tokens": 400})).await.unwrap();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    let pid = serve.0.id().to_string();
    tokio::task::block_in_place(|| stop_with(&mut serve, &base, "-TERM", &pid));
}

#[tokio::test(flavor = "multi_thread")]
async fn tandem_up_aggregated_serves_with_aggregated_workers_alone() {
    let (mut up, base, line) = start(&["up", "--port", "0", "--kv-cache-mb", "64", "--aggregated", "1"]);
    assert!(line.contains("(aggregated: 1)"), "{line}");
    let ready: serde_json::Value = serde_json::from_str(&http_get(&base, "/ready").unwrap()).unwrap();
    assert_eq!((ready["aggregated_workers"].as_u64(), ready["prefill_workers"].as_u64()), (Some(1), Some(0)), "{ready}");
    let (status, v) = post(&base, "/v1/chat/completions", &chat_body("Hello!", json!({"max_tokens": 8, "ignore_eos": true}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
    let group = format!("-{}", up.0.id());
    tokio::task::block_in_place(|| stop_services(&mut up, &base, "-INT", &group, &["gateway", "kv-transfer", "worker"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn tandem_up_with_different_tp_on_each_side_writes_what_tandem_generate_writes() {
    // A prompt whose greedy continuation has no near tie (see tests/cluster_tp.rs).
    let prompt = "1, 2, 3, 4, 5,";
    let out = tandem().args(["generate", "--raw", "--prompt", prompt, "--max-tokens", "16"]).output().expect("tandem generate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = String::from_utf8(out.stdout).unwrap();
    assert!(!want.is_empty());
    for sides in [["--prefill-tp", "2", "--decode-tp", "1"], ["--prefill-tp", "1", "--decode-tp", "2"]] {
        let (mut up, base) = up_with(&sides);
        let ready: serde_json::Value = serde_json::from_str(&http_get(&base, "/ready").unwrap()).unwrap();
        assert_eq!(ready["tp_sizes"], json!({"prefill": [sides[1].parse::<u32>().unwrap()], "decode": [sides[3].parse::<u32>().unwrap()]}));
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0});
        let (status, v) = post(&base, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want, "{sides:?}");
        let group = format!("-{}", up.0.id());
        tokio::task::block_in_place(|| stop_with(&mut up, &base, "-INT", &group));
    }
}
