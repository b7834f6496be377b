//! What the gateway does when a worker refuses a request before its first token: the same rule
//! for the decode and the prefill pool, so the two cannot drift apart.

use std::future::Future;
use std::time::Duration;

use tandem_protocol::{ApiError, ErrorCode};

use crate::workers::{Lease, PrefillChoice, Role};
use crate::AppState;

/// Attempts per role when a worker turns out to be unreachable, draining or full before any
/// token.
const ATTEMPTS: usize = 3;

/// After a worker refused, how long a retry waits for another one to become routable (a worker
/// joining while another drains, say) before the request fails.
const RETRY_WAIT: Duration = Duration::from_secs(3);

/// A picked worker, through the lease that names it in the pool.
pub(super) trait Leased {
    fn lease(&self) -> &Lease;
}

impl Leased for Lease {
    fn lease(&self) -> &Lease {
        self
    }
}

impl Leased for PrefillChoice {
    fn lease(&self) -> &Lease {
        &self.lease
    }
}

/// Picks a worker of `role` and calls it until a call succeeds or fails for good. `pick` gets
/// the workers already tried, to leave them out. A refusal whose code is retryable (the worker
/// is gone, leaving or full) moves the request to another worker, [`ATTEMPTS`] in all; a worker
/// whose code says it is down leaves routing at once, whether or not another attempt follows.
/// Returns the worker (its lease still held) and its answer.
pub(super) async fn pick_and_call<W: Leased, T, F>(
    state: &AppState,
    role: Role,
    mut pick: impl FnMut(&[u64]) -> Option<W>,
    mut call: impl FnMut(&W) -> F,
) -> Result<(W, T), ApiError>
where
    F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut tried = Vec::new();
    let mut last: Option<ApiError> = None;
    loop {
        // With no other worker to go to, the request ends with what the last one said (full,
        // draining), which says more than that none was left.
        let Some(worker) = pick_with_wait(!tried.is_empty(), || pick(&tried)).await else {
            return Err(last.unwrap_or_else(|| unavailable(role)));
        };
        let e = match call(&worker).await {
            Ok(answer) => return Ok((worker, answer.into_inner())),
            Err(status) => call_error(&status),
        };
        if e.code.worker_down() {
            state.workers.mark_down(worker.lease());
        }
        if !e.code.retryable() || tried.len() + 1 >= ATTEMPTS {
            return Err(e);
        }
        tracing::info!(role = role.name(), error = %e, code = e.code.name(), "worker refused; trying another");
        state.metrics.retries.with_label_values(&[role.name()]).inc();
        tried.push(worker.lease().key());
        last = Some(e);
    }
}

/// A failed call's error. A status the worker did not answer with (no Tandem error code on it)
/// and that says the call never got through or broke off (`Unknown` is what a refused or reset
/// connection gives) means the worker is unreachable: counted as unavailable, so the request
/// moves on and the worker leaves routing.
fn call_error(status: &tonic::Status) -> ApiError {
    let answered = status.metadata().contains_key(tandem_protocol::ERROR_CODE_KEY);
    if !answered && matches!(status.code(), tonic::Code::Unknown | tonic::Code::Unavailable) {
        return ApiError::new(ErrorCode::Unavailable, format!("worker unreachable: {}", status.message()));
    }
    ApiError::from_status(status)
}

fn unavailable(role: Role) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("no {} worker is available; retry shortly", role.name()))
}

/// Picks a worker; after a refusal (`retrying`), waits up to [`RETRY_WAIT`] for one to appear.
async fn pick_with_wait<T>(retrying: bool, mut pick: impl FnMut() -> Option<T>) -> Option<T> {
    if let Some(w) = pick() {
        return Some(w);
    }
    if !retrying {
        return None;
    }
    let deadline = tokio::time::Instant::now() + RETRY_WAIT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(w) = pick() {
            return Some(w);
        }
    }
    None
}
