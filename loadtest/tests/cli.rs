//! The binary end to end: flags, model discovery, result files, plots, sweeps, compare.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{counter, refused_addr, spawn, spawn_at, spawn_tls, Behavior, MODEL};
use serde_json::{json, Value};

fn loadtest(args: Vec<String>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem-loadtest")).args(args).output().expect("run tandem-loadtest")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn assert_svg(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.contains("<svg") && text.contains("<polyline"), "{} is not a line plot", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_writes_a_vllm_shaped_result_and_plots() {
    let _ = counter(); // fails clearly when the default model is missing
    let server = spawn(|_| Behavior::timed(20, 5)).await;
    let dir = common::scratch();
    let d = dir.path().to_str().unwrap();
    let mut a = args(&["--base-url", &server.url(), "--random-input-len", "16", "--random-output-len", "4"]);
    a.extend(args(&[
        "--num-prompts",
        "8",
        "--request-rate",
        "50",
        "--max-concurrency",
        "4",
        "--goodput",
        "ttft:1000",
        "tpot:1000",
        "--num-warmups",
        "3",
        "--label",
        "nightly",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "90,99",
        "--header",
        "x-bench=nightly",
        "--temperature",
        "0",
        "--extra-body",
        r#"{"seed": 7, "top_k": 1}"#,
    ]));
    a.extend(args(&["--save-result", "--save-detailed", "--result-dir", d, "--result-filename", "run.json", "--plot-dir", d]));
    a.push("--disable-tqdm".into());
    let out = tokio::task::spawn_blocking(move || loadtest(a)).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Serving Benchmark Result") && stdout.contains("Mean TTFT (ms)"), "{stdout}");

    let r = read_json(&dir.path().join("run.json"));
    for field in [
        "date",
        "endpoint_type",
        "backend",
        "label",
        "model_id",
        "num_prompts",
        "request_rate",
        "burstiness",
        "max_concurrency",
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
        "input_lens",
        "output_lens",
        "start_times",
        "ttfts",
        "itls",
        "latencies",
        "queue_times",
        "generated_texts",
        "errors",
        "failures_by_kind",
    ] {
        assert!(r.get(field).is_some(), "result has no {field}: {r}");
    }
    for metric in ["ttft", "tpot", "itl", "e2el"] {
        for stat in ["mean", "median", "std", "p90", "p99"] {
            let key = format!("{stat}_{metric}_ms");
            assert!(r[&key].as_f64().is_some(), "result has no {key}");
        }
    }
    assert_eq!(r["model_id"], MODEL, "the model is asked from /v1/models");
    let default_tokenizer = tandem_loadtest::tokens::default_tokenizer_path().display().to_string();
    assert_eq!(r["tokenizer_id"], default_tokenizer.as_str(), "the tokenizer is the served model's root");
    assert!(r.get("e2els").is_none(), "vLLM calls them latencies");
    assert_eq!(r["latencies"].as_array().unwrap().len(), 8);
    // Every request, warm-ups included, carries the header, the sampling parameters given and
    // the extra body; the random dataset ignores EOS.
    let seen = server.seen();
    assert_eq!(seen.len(), 8 + 3);
    for s in &seen {
        assert_eq!(s.headers.get("x-bench").map(|v| v.to_str().unwrap()), Some("nightly"));
        assert_eq!((&s.body["seed"], &s.body["top_k"], &s.body["temperature"]), (&json!(7), &json!(1), &json!(0.0)));
        assert_eq!(s.body["ignore_eos"], true);
        assert!(s.body.get("top_p").is_none(), "sampling parameters not given are not sent");
    }
    assert_eq!(r["backend"], "openai");
    assert_eq!(r["endpoint_type"], "openai");
    assert_eq!(r["label"], "nightly");
    // Warm-up requests reach the server but not the result.
    assert_eq!(server.arrivals().len(), 8 + 3);
    assert_eq!(r["num_prompts"], 8);
    // The server streams " the" once per output token.
    let texts = r["generated_texts"].as_array().unwrap();
    assert_eq!(texts.len(), 8);
    assert!(texts.iter().all(|t| t == " the the the the"), "{texts:?}");
    // Peaks: one-second buckets over a run of about 0.2 s hold most of the 32 tokens; the per-second
    // concurrency counts at least the requests truly in flight at once, which the cap bounds.
    let peak_tokens = r["max_output_tokens_per_s"].as_f64().unwrap();
    let buckets = r["duration"].as_f64().unwrap().ceil() + 1.0;
    assert!(peak_tokens <= 32.0 && peak_tokens >= 32.0 / buckets, "max_output_tokens_per_s {peak_tokens}");
    let (per_second, in_flight) = (r["max_concurrent_requests"].as_u64().unwrap(), r["max_in_flight"].as_u64().unwrap());
    assert!((1..=4).contains(&in_flight), "max_in_flight {in_flight} under --max-concurrency 4");
    assert!((in_flight..=8).contains(&per_second), "max_concurrent_requests {per_second}, in flight {in_flight}");
    assert!(stdout.contains("Peak output token throughput (tok/s)"), "{stdout}");
    assert_eq!((r["completed"].as_u64(), r["failed"].as_u64()), (Some(8), Some(0)));
    assert_eq!(r["request_rate"], 50.0);
    assert_eq!(r["max_concurrency"], 4);
    assert_eq!(r["total_output_tokens"], 32);
    assert_eq!(r["request_goodput"], r["request_throughput"], "every request meets loose SLOs");
    assert_eq!(r["ttfts"].as_array().unwrap().len(), 8);
    assert!(r["itls"].as_array().unwrap().iter().all(|g| g.as_array().unwrap().len() == 3));
    assert!(r["errors"].as_array().unwrap().iter().all(|e| e == ""));
    for name in ["ttft_cdf.svg", "itl_cdf.svg", "e2el_cdf.svg"] {
        assert_svg(&dir.path().join(name));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_runs_each_rate_and_compare_reads_the_results() {
    let _ = counter();
    let server = spawn(|_| Behavior::timed(10, 2)).await;
    let dir = common::scratch();
    let d = dir.path().to_str().unwrap();
    let mut a = args(&["--base-url", &format!("{}/v1", server.url()), "--model", MODEL, "--endpoint", "/v1/chat/completions"]);
    a.extend(args(&["--random-input-len", "16", "--random-output-len", "3", "--num-prompts", "6", "--sweep", "20,40"]));
    a.extend(args(&["--goodput", "ttft:1000", "e2el:5000"]));
    a.extend(args(&["--save-result", "--result-dir", d, "--result-filename", "s.json", "--plot-dir", d, "--disable-tqdm"]));
    let out = tokio::task::spawn_blocking(move || loadtest(a)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (slow, fast) = (dir.path().join("s-rate20.json"), dir.path().join("s-rate40.json"));
    assert_eq!(read_json(&slow)["request_rate"], 20.0);
    assert_eq!(read_json(&fast)["request_rate"], 40.0);
    assert_eq!(read_json(&fast)["backend"], "openai-chat");
    assert_eq!(read_json(&fast)["completed"], 6);
    assert_svg(&dir.path().join("throughput_vs_rate.svg"));
    assert_svg(&dir.path().join("output_throughput_vs_rate.svg"));
    // --goodput: each run has its goodput (every request meets such loose SLOs), and the
    // throughput plot has a goodput series beside request throughput and offered load.
    for path in [&slow, &fast] {
        let r = read_json(path);
        assert_eq!(r["request_goodput"], r["request_throughput"], "{}", path.display());
    }
    let svg = std::fs::read_to_string(dir.path().join("throughput_vs_rate.svg")).unwrap();
    let texts: Vec<&str> = svg.split("<text").skip(1).filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim())).collect();
    for series in ["request throughput", "goodput", "offered load"] {
        assert!(texts.contains(&series), "no {series} series in the plot: {texts:?}");
    }

    let a = vec!["compare".to_string(), slow.display().to_string(), fast.display().to_string()];
    let out = tokio::task::spawn_blocking(move || loadtest(a)).await.unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rate_row = table.lines().find(|l| l.starts_with("request_rate")).unwrap_or_else(|| panic!("{table}"));
    assert!(rate_row.trim_end().ends_with("2.000"), "40 / 20 = 2: {rate_row}");
    assert!(table.lines().any(|l| l.starts_with("p99_ttft_ms")), "{table}");
}

#[test]
fn a_missing_tokenizer_is_a_clear_error() {
    let out = loadtest(args(&["--tokenizer", "/nonexistent/model.gguf", "--model", "m", "--num-prompts", "1"]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/model.gguf") && stderr.contains("does not exist"), "{stderr}");
}

/// Latency statistics in a result: `{stat}_{metric}_ms` keys.
fn latency_keys(r: &Value) -> Vec<String> {
    let mut keys: Vec<String> = r.as_object().unwrap().keys().filter(|k| k.ends_with("_ms")).cloned().collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_follow_vllm_bench_serve() {
    let _ = counter();
    let server = spawn(|_| Behavior::timed(5, 2)).await;
    let dir = common::scratch();
    let d = dir.path().to_str().unwrap();
    let port = server.addr.port().to_string();
    // --host and --port instead of --base-url; the prefix workload under its old name and flags.
    let mut a = args(&["--host", "127.0.0.1", "--port", &port, "--model", MODEL, "--dataset-name", "prefix"]);
    a.extend(args(&["--prefix-len", "8", "--suffix-len", "4", "--num-prefixes", "2", "--output-len", "3", "--num-prompts", "4"]));
    a.extend(args(&["--save-result", "--result-dir", d, "--result-filename", "r.json", "--disable-tqdm"]));
    let out = tokio::task::spawn_blocking(move || loadtest(a)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = read_json(&dir.path().join("r.json"));
    assert_eq!(r["completed"], 4);
    assert_eq!(r["dataset_name"], "prefix_repetition");
    // Only ttft, tpot and itl, only p99.
    let mut want: Vec<String> =
        ["ttft", "tpot", "itl"].iter().flat_map(|m| ["mean", "median", "std", "p99"].map(|s| format!("{s}_{m}_ms"))).collect();
    want.sort();
    assert_eq!(latency_keys(&r), want);
    // The per-request lists need --save-detailed; latencies and queue times are always there.
    for key in ["input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts", "errors"] {
        assert!(r.get(key).is_none(), "{key} without --save-detailed");
    }
    assert_eq!(r["latencies"].as_array().unwrap().len(), 4);
    assert_eq!(r["queue_times"].as_array().unwrap().len(), 4);
    // No ignore_eos and no sampling parameter unless asked for.
    for s in server.seen() {
        for key in ["ignore_eos", "temperature", "top_p", "top_k"] {
            assert!(s.body.get(key).is_none(), "{key} sent unasked: {}", s.body);
        }
        assert_eq!(s.body["max_tokens"], 3);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("P99 ITL (ms)") && !stdout.contains("E2EL") && !stdout.contains("P90"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_eos_and_percentiles_are_chosen_by_flags() {
    let _ = counter();
    let server = spawn(|_| Behavior::timed(5, 2)).await;
    let dir = common::scratch();
    let d = dir.path().to_str().unwrap();
    let mut a = args(&["--base-url", &server.url(), "--dataset-name", "prefix_repetition", "--ignore-eos"]);
    a.extend(args(&["--prefix-repetition-prefix-len", "8", "--prefix-repetition-suffix-len", "4"]));
    a.extend(args(&["--prefix-repetition-output-len", "2", "--num-prompts", "3"]));
    a.extend(args(&["--percentile-metrics", "e2el,ttft", "--metric-percentiles", "50,99.9"]));
    a.extend(args(&["--save-result", "--result-dir", d, "--result-filename", "r.json", "--disable-tqdm"]));
    let out = tokio::task::spawn_blocking(move || loadtest(a)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = read_json(&dir.path().join("r.json"));
    let mut want: Vec<String> =
        ["ttft", "e2el"].iter().flat_map(|m| ["mean", "median", "std", "p50", "p99.9"].map(|s| format!("{s}_{m}_ms"))).collect();
    want.sort();
    assert_eq!(latency_keys(&r), want);
    assert!(server.seen().iter().all(|s| s.body["ignore_eos"] == true && s.body["max_tokens"] == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_targets_work() {
    let _ = counter();
    let server = spawn_tls(|_| Behavior::timed(5, 2));
    let url = format!("https://localhost:{}", server.addr.port());
    let a = args(&["--base-url", &url, "--insecure", "--random-input-len", "8", "--random-output-len", "2", "--num-prompts", "3"]);
    let out = tokio::task::spawn_blocking(move || loadtest(a)).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("Successful requests:") && l.trim_end().ends_with(" 3")), "{stdout}");
    assert_eq!(server.seen().len(), 3);
    // Without --insecure the self-signed certificate is refused.
    let tokenizer = tandem_loadtest::tokens::default_tokenizer_path().display().to_string();
    let mut a = args(&["--base-url", &url, "--model", MODEL, "--tokenizer", &tokenizer]);
    a.extend(args(&["--random-input-len", "8", "--random-output-len", "2", "--num-prompts", "1"]));
    let out = tokio::task::spawn_blocking(move || loadtest(a)).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().any(|l| l.starts_with("Failed requests:") && l.trim_end().ends_with(" 1")), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ready_check_waits_for_a_late_target() {
    let _ = counter();
    let addr = refused_addr();
    let tokenizer = tandem_loadtest::tokens::default_tokenizer_path().display().to_string();
    let mut a = args(&["--base-url", &format!("http://{addr}"), "--model", MODEL, "--tokenizer", &tokenizer]);
    a.extend(args(&["--random-input-len", "8", "--random-output-len", "2", "--num-prompts", "2", "--ready-check-timeout-sec", "30"]));
    let run = tokio::task::spawn_blocking(move || loadtest(a));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let server = spawn_at(addr, |_| Behavior::timed(5, 2));
    let out = run.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Initial test run completed"), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("Failed requests:") && l.trim_end().ends_with(" 0")), "{stdout}");
    // The test request, then the run's two.
    assert_eq!(server.seen().len(), 3);
}

#[test]
fn a_target_that_never_answers_fails_the_ready_check() {
    // A port held open that never answers (a refused port could be taken by a neighbour's
    // server meanwhile).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let tokenizer = tandem_loadtest::tokens::default_tokenizer_path().display().to_string();
    let started = std::time::Instant::now();
    let mut a = args(&["--base-url", &url, "--model", "m", "--tokenizer", &tokenizer, "--num-prompts", "1"]);
    a.extend(args(&["--request-timeout", "0.5", "--ready-check-timeout-sec", "1"]));
    let out = loadtest(a);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not serve a first request within 1 s") && stderr.contains("timeout"), "{stderr}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
}

#[test]
fn without_a_served_tokenizer_the_error_names_the_flag() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let out = loadtest(args(&["--base-url", &url, "--model", "no-such-model", "--num-prompts", "1", "--request-timeout", "0.5"]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tokenizer") && stderr.contains("no-such-model"), "{stderr}");
}
