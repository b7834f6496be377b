//! Requests arrive at the server at the requested rate, with the spread the burstiness asks
//! for, and runs bounded by time stop on time.

mod common;

use std::time::{Duration, Instant};

use common::{counter, one_at_a_time, spawn, Behavior, MODEL};
use tandem_loadtest::{dataset, run_benchmark, BenchConfig, DatasetSpec};

/// Inter-arrival times seen by the server (seconds) for `n` requests at `rate` per second.
async fn gaps(rate: f64, burstiness: f64, n: usize, seed: u64) -> Vec<f64> {
    let _serial = one_at_a_time().await;
    let server = spawn(|_| Behavior::timed(0, 0)).await;
    let counter = counter();
    let spec = DatasetSpec::Random { input_len: 8, output_len: 1, range_ratio: 0.0 };
    let requests = dataset::build(&spec, &counter, 50, seed).unwrap();
    let mut cfg = BenchConfig::new(server.url(), MODEL);
    cfg.num_prompts = Some(n);
    cfg.request_rate = rate;
    cfg.burstiness = burstiness;
    cfg.seed = seed;
    let r = run_benchmark(&cfg, &requests, counter).await.unwrap().result;
    assert_eq!(r.completed, n, "errors: {:?}", r.errors.iter().filter(|e| !e.is_empty()).take(3).collect::<Vec<_>>());
    let arrivals = server.arrivals();
    assert_eq!(arrivals.len(), n);
    arrivals.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect()
}

fn mean_cv(x: &[f64]) -> (f64, f64) {
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64;
    (mean, var.sqrt() / mean)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poisson_arrivals_fit_the_rate() {
    let (mean, cv) = mean_cv(&gaps(100.0, 1.0, 400, 11).await);
    assert!((mean - 0.01).abs() <= 0.001, "mean gap {:.2} ms, want 10 ms (±10%)", mean * 1e3);
    assert!((0.85..=1.15).contains(&cv), "coefficient of variation {cv:.3}, want about 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burstiness_changes_the_spread_not_the_rate() {
    let (bursty_mean, bursty_cv) = mean_cv(&gaps(200.0, 0.25, 400, 12).await);
    let (even_mean, even_cv) = mean_cv(&gaps(200.0, 4.0, 400, 13).await);
    for mean in [bursty_mean, even_mean] {
        assert!((mean - 0.005).abs() <= 0.0005 * 1.5, "mean gap {:.2} ms, want 5 ms", mean * 1e3);
    }
    // Gamma gaps of shape k have a coefficient of variation of 1/sqrt(k): 2 and 0.5 here.
    assert!((1.6..=2.4).contains(&bursty_cv), "burstiness 0.25: cv {bursty_cv:.3}, want about 2");
    assert!((0.4..=0.6).contains(&even_cv), "burstiness 4: cv {even_cv:.3}, want about 0.5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timed_run_stops_on_time() {
    let _serial = one_at_a_time().await;
    let server = spawn(|_| Behavior::timed(50, 10)).await;
    let counter = counter();
    let spec = DatasetSpec::Random { input_len: 8, output_len: 4, range_ratio: 0.0 };
    let requests = dataset::build(&spec, &counter, 10, 5).unwrap();
    let mut cfg = BenchConfig::new(server.url(), MODEL);
    cfg.num_prompts = None;
    cfg.duration = Some(Duration::from_secs(2));
    cfg.request_rate = 50.0;
    let started = Instant::now();
    let r = run_benchmark(&cfg, &requests, counter).await.unwrap().result;
    let took = started.elapsed().as_secs_f64();
    assert!((2.0..2.5).contains(&took), "a 2 s run took {took:.2} s");
    // About 100 requests at 50/s for 2 s (Poisson: ±3 sigma is ±30).
    assert!((70..=130).contains(&r.num_prompts), "{} requests sent", r.num_prompts);
    assert_eq!(r.completed, r.num_prompts, "requests in flight at the deadline still finish");
    assert_eq!(server.arrivals().len(), r.num_prompts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_cap_holds() {
    let _serial = one_at_a_time().await;
    let server = spawn(|_| Behavior::timed(100, 0)).await;
    let counter = counter();
    let spec = DatasetSpec::Random { input_len: 8, output_len: 1, range_ratio: 0.0 };
    let requests = dataset::build(&spec, &counter, 12, 5).unwrap();
    let mut cfg = BenchConfig::new(server.url(), MODEL);
    cfg.num_prompts = Some(12);
    cfg.max_concurrency = Some(4);
    let r = run_benchmark(&cfg, &requests, counter).await.unwrap();
    // 12 requests of 100 ms, 4 at a time: three waves, sent at about 0, 100 and 200 ms.
    assert!((0.29..0.4).contains(&r.result.duration), "took {:.3} s", r.result.duration);
    let waves: Vec<usize> = r.outcomes.iter().map(|o| (o.sent_at / 0.1).floor() as usize).collect();
    for wave in 0..3 {
        assert_eq!(
            waves.iter().filter(|&&w| w == wave).count(),
            4,
            "sent at {:?}",
            r.outcomes.iter().map(|o| o.sent_at).collect::<Vec<_>>()
        );
    }
}
