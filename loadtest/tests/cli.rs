//! The binary end to end: flags, model discovery, result files, plots, sweeps, compare.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{counter, spawn, Behavior, MODEL};
use serde_json::Value;

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
    ]));
    a.extend(args(&["--save-result", "--result-dir", d, "--result-filename", "run.json", "--plot-dir", d, "--disable-tqdm"]));
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
        "ttfts",
        "itls",
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
    assert!(table.lines().any(|l| l.starts_with("p99_e2el_ms")), "{table}");
}

#[test]
fn a_missing_tokenizer_is_a_clear_error() {
    let out = loadtest(args(&["--tokenizer", "/nonexistent/model.gguf", "--model", "m", "--num-prompts", "1"]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/model.gguf") && stderr.contains("does not exist"), "{stderr}");
}
