//! `tandem generate` on a model it cannot use: a non-zero exit and one line on stderr that names
//! the problem, never a panic.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::tandem;

fn generate(model: &str) -> Output {
    tandem()
        .args(["generate", "--model", model, "--prompt", "hi", "--max-tokens", "1"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("tandem runs")
}

fn assert_clean_failure(out: &Output, expected: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "tandem generate succeeded: {stderr}");
    assert!(out.stdout.is_empty(), "nothing is generated: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!stderr.contains("panicked"), "a clean error, not a panic: {stderr}");
    for e in expected {
        assert!(stderr.contains(e), "stderr should say {e:?}: {stderr}");
    }
    stderr
}

#[test]
fn a_missing_model_file_is_named() {
    let out = generate("/nonexistent.gguf");
    assert_clean_failure(&out, &["/nonexistent.gguf", "no such file or folder"]);
    // Relative, in the shape of a hub id: still a missing file, not a failed download.
    let out = generate("models/missing.gguf");
    let stderr = assert_clean_failure(&out, &["models/missing.gguf", "no such file or folder"]);
    assert!(!stderr.contains("download"), "{stderr}");
}

#[test]
fn a_corrupt_model_file_is_named() {
    let path = std::env::temp_dir().join(format!("tandem-generate-corrupt-{}.gguf", std::process::id()));
    std::fs::write(&path, b"not a model at all").unwrap();
    let out = generate(path.to_str().unwrap());
    let _ = std::fs::remove_file(&path);
    assert_clean_failure(&out, &[path.to_str().unwrap(), "not a readable GGUF file"]);
}

#[test]
fn an_unsupported_architecture_is_named() {
    let dir = std::env::temp_dir().join(format!("tandem-generate-neox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/engine/tests/fixtures/tiny-llama");
    for f in ["tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        std::fs::copy(tiny.join(f), dir.join(f)).unwrap();
    }
    let config = r#"{"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 32,
        "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 320}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    let out = generate(dir.to_str().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    assert_clean_failure(&out, &["unsupported model_type `gpt_neox`"]);
}

/// A worker `tandem up` manages watches its stdin (closed: its parent is gone). One whose model
/// does not load must still exit with the error while its stdin stays open, or `tandem up`
/// would wait on it forever.
#[test]
fn a_managed_worker_whose_model_does_not_load_exits() {
    use std::io::Read;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let path = std::env::temp_dir().join(format!("tandem-managed-corrupt-{}.gguf", std::process::id()));
    std::fs::write(&path, b"not a model at all").unwrap();
    let mut child = tandem()
        .args(["prefill", "--managed", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--model", path.to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tandem runs");
    let _stdin = child.stdin.take();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = std::fs::remove_file(&path);
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = status.unwrap_or_else(|| panic!("still running a minute after its model failed to load: {stderr}"));
    assert!(!status.success());
    assert!(stderr.contains("not a readable GGUF file"), "{stderr}");
}
