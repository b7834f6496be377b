//! Failed requests are counted by kind and never stop the run.

mod common;

use std::time::{Duration, Instant};

use common::{counter, refused_addr, spawn, Behavior, MODEL};
use tandem_loadtest::{dataset, run_benchmark, BenchConfig, DatasetSpec, SampleRequest};

fn requests(n: usize) -> Vec<SampleRequest> {
    let spec = DatasetSpec::Random { input_len: 8, output_len: 4, range_ratio: 0.0 };
    dataset::build(&spec, &counter(), n, 2).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_counted_and_the_run_completes() {
    let mut cfg = BenchConfig::new(format!("http://{}", refused_addr()), MODEL);
    cfg.num_prompts = Some(6);
    let r = run_benchmark(&cfg, &requests(6), counter()).await.unwrap().result;
    assert_eq!((r.completed, r.failed), (0, 6));
    assert_eq!(r.failures_by_kind["connection_refused"], 6, "{:?}", r.errors);
    assert!(r.errors.iter().all(|e| e.starts_with("connection_refused")));
    assert_eq!((r.total_output_tokens, r.request_throughput), (0, 0.0));
    assert_eq!(r.latency["mean_ttft_ms"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_fault_is_counted() {
    // Eight behaviours in turn, each twice.
    let server = spawn(|i| match i % 8 {
        0 => Behavior::timed(10, 5),
        1 => Behavior::Status(429),
        2 => Behavior::Status(503),
        3 => Behavior::Status(400),
        4 => Behavior::Status(500),
        5 => Behavior::EndAfter(2),
        6 => Behavior::AbortAfter(2),
        _ => Behavior::ErrorEvent,
    })
    .await;
    let mut cfg = BenchConfig::new(server.url(), MODEL);
    cfg.num_prompts = Some(16);
    cfg.max_concurrency = Some(4);
    let r = run_benchmark(&cfg, &requests(16), counter()).await.unwrap().result;
    let kinds = &r.failures_by_kind;
    assert_eq!((r.completed, r.failed), (2, 14), "{:?}", r.errors);
    assert_eq!(kinds["overloaded"], 4, "429 and 503: {kinds:?}");
    assert_eq!(kinds["http_4xx"], 2, "{kinds:?}");
    assert_eq!(kinds["http_5xx"], 2, "{kinds:?}");
    assert_eq!(kinds["stream_cut"], 4, "clean end and broken connection, both before [DONE]: {kinds:?}");
    assert_eq!(kinds["stream_error"], 2, "{kinds:?}");
    assert_eq!(kinds.values().sum::<usize>(), 14);
    // Only completed requests enter the token totals and latencies.
    assert_eq!(r.total_output_tokens, 2 * 4);
    assert!(r.latency["mean_ttft_ms"] >= 10.0);
    assert_eq!(r.errors.iter().filter(|e| e.is_empty()).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_servers_time_out() {
    let server = spawn(|i| if i % 2 == 0 { Behavior::Hang } else { Behavior::timed(10, 5) }).await;
    let mut cfg = BenchConfig::new(server.url(), MODEL);
    cfg.num_prompts = Some(4);
    cfg.request_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let r = run_benchmark(&cfg, &requests(4), counter()).await.unwrap().result;
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!((r.completed, r.failed), (2, 2));
    assert_eq!(r.failures_by_kind["timeout"], 2, "{:?}", r.errors);
}
