//! Reported latencies match a server whose timing is known: TTFT 200 ms, then a token every
//! 25 ms, at concurrency 1 and 64.

mod common;

use common::{counter, one_at_a_time, spawn, Behavior, MODEL};
use tandem_loadtest::{dataset, run_benchmark, BenchConfig, DatasetSpec, RunReport};

const TTFT_MS: f64 = 200.0;
const ITL_MS: f64 = 25.0;
const TOKENS: usize = 16;

fn within_tol(name: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want;
    assert!(err <= tol, "{name}: reported {got:.2}, truth {want:.2} ({:.1}% off)", err * 100.0);
}

fn within(name: &str, got: f64, want: f64) {
    within_tol(name, got, want, 0.05);
}

/// Within 5% plus `slack_ms`: for the metrics that hold the first token, whose time also holds
/// the opening of the request's connection.
fn within_slack(name: &str, got: f64, want: f64, slack_ms: f64) {
    let err = (got - want).abs();
    let bound = 0.05 * want + slack_ms;
    assert!(err <= bound, "{name}: reported {got:.2}, truth {want:.2} ({err:.1} ms off, bound {bound:.1} ms)");
}

/// The time a burst of new connections may add to the first token of each request: 64 of them
/// opened at once on a busy two-core machine have added 12 ms to the mean TTFT (5.9% of 200 ms).
/// A unit or bookkeeping error is off by far more than this.
const CONNECT_SLACK_MS: f64 = 20.0;

async fn run(concurrency: usize, num_prompts: usize, behavior: Behavior, endpoint: &str) -> RunReport {
    let _serial = one_at_a_time().await;
    let server = spawn(move |_| behavior.clone()).await;
    let counter = counter();
    let spec = DatasetSpec::Random { input_len: 32, output_len: TOKENS, range_ratio: 0.0 };
    let requests = dataset::build(&spec, &counter, num_prompts, 1).unwrap();
    let mut cfg = BenchConfig::new(server.url(), MODEL);
    cfg.endpoint = endpoint.into();
    cfg.num_prompts = Some(num_prompts);
    cfg.max_concurrency = Some(concurrency);
    cfg.percentile_metrics = tandem_loadtest::config::METRICS.map(String::from).to_vec();
    run_benchmark(&cfg, &requests, counter).await.unwrap()
}

fn check_latencies(report: &RunReport, num_prompts: usize) {
    let r = &report.result;
    assert_eq!((r.completed, r.failed), (num_prompts, 0), "errors: {:?}", r.errors);
    assert!(r.output_lens.iter().all(|&n| n == TOKENS), "output lens {:?}", r.output_lens);
    assert_eq!(r.total_output_tokens, num_prompts * TOKENS);
    let e2el = TTFT_MS + ITL_MS * (TOKENS - 1) as f64;
    for (metric, truth) in [("ttft", TTFT_MS), ("tpot", ITL_MS), ("itl", ITL_MS), ("e2el", e2el)] {
        for stat in ["mean", "median"] {
            let key = format!("{stat}_{metric}_ms");
            match metric {
                "ttft" | "e2el" => within_slack(&key, r.latency[&key], truth, CONNECT_SLACK_MS),
                _ => within(&key, r.latency[&key], truth),
            }
        }
        // The tail also holds the test machine's own hiccups: a burst of 64 new connections takes
        // tens of milliseconds to open on a small, busy machine, and the fake server's 25 ms
        // timers slip by as much (a p99 inter-token gap of 40 ms has been seen on two cores), so
        // the tail may be up to twice the truth. The means and medians above are the accuracy
        // claim; this only catches a unit or bookkeeping error, which is off by far more.
        let key = format!("p99_{metric}_ms");
        within_tol(&key, r.latency[&key], truth, 1.0);
    }
    for o in &report.outcomes {
        within_tol("request ttft", o.ttft * 1e3, TTFT_MS, 0.40);
        within_tol("request e2el", o.e2el * 1e3, e2el, 0.40);
        assert_eq!(o.itl.len(), TOKENS - 1, "one gap between each pair of tokens");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latencies_at_concurrency_1() {
    let report = run(1, 4, Behavior::timed(200, 25), "/v1/completions").await;
    check_latencies(&report, 4);
    // One at a time: the run lasts about the sum of the requests.
    let e2el = (TTFT_MS + ITL_MS * (TOKENS - 1) as f64) / 1e3;
    within("duration", report.result.duration * 1e3, 4.0 * e2el * 1e3);
    within("request throughput", report.result.request_throughput, 1.0 / e2el);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latencies_at_concurrency_64() {
    let report = run(64, 128, Behavior::timed(200, 25), "/v1/completions").await;
    check_latencies(&report, 128);
    // 128 requests, 64 at a time: two waves, each opening a burst of 64 connections, which the
    // run's duration (and so its throughput) holds as well as the first tokens do.
    let e2el = (TTFT_MS + ITL_MS * (TOKENS - 1) as f64) / 1e3;
    let truth_ms = 2.0 * e2el * 1e3;
    within_slack("duration", report.result.duration * 1e3, truth_ms, 2.0 * CONNECT_SLACK_MS);
    let tol = 0.05 + 2.0 * CONNECT_SLACK_MS / truth_ms;
    within_tol("output throughput", report.result.output_throughput, 128.0 * TOKENS as f64 / (2.0 * e2el), tol);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_stream_without_usage_is_counted_with_the_tokenizer() {
    let no_usage = Behavior::Stream {
        ttft: std::time::Duration::from_millis(200),
        itl: std::time::Duration::from_millis(25),
        usage: false,
        token: " the",
    };
    let report = run(8, 8, no_usage, "/v1/chat/completions").await;
    check_latencies(&report, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn goodput_counts_requests_meeting_every_slo() {
    // Even requests answer fast, odd ones slowly; only the fast ones meet a 100 ms TTFT SLO.
    let _serial = one_at_a_time().await;
    let server = spawn(|i| if i % 2 == 0 { Behavior::timed(20, 5) } else { Behavior::timed(300, 5) }).await;
    let counter = counter();
    let spec = DatasetSpec::Random { input_len: 16, output_len: 4, range_ratio: 0.0 };
    let requests = dataset::build(&spec, &counter, 10, 3).unwrap();
    let mut cfg = BenchConfig::new(server.url(), MODEL);
    cfg.num_prompts = Some(10);
    cfg.max_concurrency = Some(1);
    cfg.goodput = Some(tandem_loadtest::Slo { ttft_ms: Some(100.0), ..Default::default() });
    let r = run_benchmark(&cfg, &requests, counter).await.unwrap().result;
    assert_eq!(r.completed, 10);
    let goodput = r.request_goodput.expect("goodput with an SLO");
    within("goodput", goodput, r.request_throughput / 2.0);
}
