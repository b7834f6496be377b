//! One run: warm-up requests first if asked for, then requests sent on the arrival schedule
//! under the concurrency cap, until the request count or the duration is reached, then every
//! outcome aggregated.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use crate::arrivals::Schedule;
use crate::client::{RequestOutcome, Target};
use crate::metrics::aggregate;
use crate::result::{utc_now_stamp, RunInfo};
use crate::{BenchConfig, BenchResult, LoadtestError, Result, SampleRequest, TokenCounter};

/// A finished run: the aggregate result and every request's outcome, in send order.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub result: BenchResult,
    pub outcomes: Vec<RequestOutcome>,
}

/// Runs `cfg` with `requests` (used again from the start when the run needs more of them).
/// Returns an error only for a configuration that cannot run; failed requests are counted.
pub async fn run_benchmark(cfg: &BenchConfig, requests: &[SampleRequest], counter: Arc<TokenCounter>) -> Result<RunReport> {
    cfg.validate()?;
    if requests.is_empty() {
        return Err(LoadtestError::Dataset("no requests to send".into()));
    }
    let target = Arc::new(Target::new(cfg, counter)?);
    let requests: Arc<[SampleRequest]> = requests.into();
    let schedule = Schedule::new(cfg.request_rate, cfg.burstiness, cfg.seed)?;
    let limit = cfg.num_prompts.unwrap_or(usize::MAX);
    let semaphore = cfg.max_concurrency.map(|n| Arc::new(Semaphore::new(n)));
    warm_up(&target, &requests, cfg.num_warmups, cfg.max_concurrency).await;
    let progress = progress_bar(cfg);
    let info = RunInfo {
        date: utc_now_stamp(),
        endpoint_type: cfg.backend.clone(),
        backend: cfg.backend.clone(),
        label: cfg.label.clone(),
        endpoint: cfg.endpoint.clone(),
        model_id: cfg.model.clone(),
        tokenizer_id: cfg.tokenizer_id.clone(),
        dataset_name: cfg.dataset_name.clone(),
        request_rate: cfg.request_rate,
        burstiness: cfg.burstiness,
        max_concurrency: cfg.max_concurrency,
        seed: cfg.seed,
    };

    let start = Instant::now();
    let deadline = cfg.duration.map(|d| start + d);
    let mut tasks = JoinSet::new();
    let mut outcomes: Vec<(usize, RequestOutcome)> = Vec::new();
    for (i, offset) in schedule.take(limit).enumerate() {
        // Send times are absolute, so a late wake-up never slows the rate down.
        let at = start + offset;
        if deadline.is_some_and(|d| at >= d) {
            break;
        }
        sleep_until(at).await;
        let permit = match &semaphore {
            None => None,
            Some(sem) => {
                let acquire = sem.clone().acquire_owned();
                let permit = match deadline {
                    None => acquire.await,
                    Some(d) => tokio::select! {
                        p = acquire => p,
                        _ = sleep_until(d) => break,
                    },
                };
                Some(permit.expect("the semaphore is never closed"))
            }
        };
        while let Some(done) = tasks.try_join_next() {
            outcomes.push(done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())));
        }
        let (target, requests, progress) = (target.clone(), requests.clone(), progress.clone());
        let sent_at = start.elapsed().as_secs_f64();
        let queue_time = (sent_at - offset.as_secs_f64()).max(0.0);
        tasks.spawn(async move {
            let mut outcome = target.send(&requests[i % requests.len()]).await;
            drop(permit);
            outcome.sent_at = sent_at;
            outcome.queue_time = queue_time;
            progress.inc(1);
            (i, outcome)
        });
    }
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())));
    }
    let duration = start.elapsed().as_secs_f64();
    progress.finish_and_clear();

    outcomes.sort_by_key(|(i, _)| *i);
    let outcomes: Vec<RequestOutcome> = outcomes.into_iter().map(|(_, o)| o).collect();
    let mut result = aggregate(info, &outcomes, duration, cfg.goodput.as_ref(), &cfg.percentile_metrics, &cfg.percentiles);
    result.detailed = cfg.save_detailed;
    Ok(RunReport { result, outcomes })
}

/// How often the ready check asks again.
const READY_RETRY: Duration = Duration::from_secs(1);

/// Sends `request` until the target serves it, for at most `timeout` (at least one try), as
/// `vllm bench serve --ready-check-timeout-sec` does before its run. Returns the last failure
/// when the target never served it.
pub async fn wait_until_ready(cfg: &BenchConfig, request: &SampleRequest, counter: Arc<TokenCounter>, timeout: Duration) -> Result<()> {
    let target = Target::new(cfg, counter)?;
    let deadline = Instant::now() + timeout;
    loop {
        let outcome = target.send(request).await;
        let Some(failure) = outcome.error else { return Ok(()) };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LoadtestError::Target(format!(
                "{} did not serve a first request within {:.0} s: {}: {}",
                cfg.url(&cfg.endpoint),
                timeout.as_secs_f64(),
                failure.kind,
                failure.message
            )));
        }
        tokio::time::sleep(left.min(READY_RETRY)).await;
    }
}

/// Sends `count` requests (the workload's, in turn) all at once under the concurrency cap, as
/// `vllm bench serve --num-warmups` does, and waits for them; their outcomes are not kept.
async fn warm_up(target: &Arc<Target>, requests: &Arc<[SampleRequest]>, count: usize, max_concurrency: Option<usize>) {
    if count == 0 {
        return;
    }
    let semaphore = Arc::new(Semaphore::new(max_concurrency.unwrap_or(count)));
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let (target, requests, semaphore) = (target.clone(), requests.clone(), semaphore.clone());
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await.expect("the semaphore is never closed");
            target.send(&requests[i % requests.len()]).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

fn progress_bar(cfg: &BenchConfig) -> ProgressBar {
    if !cfg.show_progress {
        return ProgressBar::hidden();
    }
    let bar = match cfg.num_prompts {
        Some(n) => ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} requests [{elapsed_precise}<{eta_precise}]").expect("a valid template"),
        ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
            .with_style(ProgressStyle::with_template("{spinner} {pos} requests [{elapsed_precise}]").expect("a valid template")),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
