//! The README's quick start: `tandem up` brings the whole cluster up as separate processes,
//! serves a request, and takes every process down again on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A failed assertion must not leave the cluster running (its children follow it down).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tandem_up_serves_and_stops_cleanly() {
    let mut up = KillOnDrop(
        tandem().args(["up", "--port", "0", "--kv-cache-mb", "64"]).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap(),
    );
    let up = &mut up.0;
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let line = lines.next().expect("tandem up printed nothing").unwrap();
    let base = line.split("at ").nth(1).and_then(|s| s.split_whitespace().next()).expect("endpoint in the first line").trim_end_matches("/v1").to_string();
    assert!(line.contains("SmolLM2-135M-Instruct"), "{line}");

    let (status, v) = post(&base, "/v1/chat/completions", &chat_body("Hello!", json!({"max_tokens": 8}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(http_status(&base, "/ready"), Some(200));

    let pid = up.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "tandem up did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its children went with it: nothing answers on the gateway's port any more.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(http_status(&base, "/health"), None);
}
