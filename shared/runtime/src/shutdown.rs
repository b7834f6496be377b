//! Phased shutdown under one deadline:
//!
//! 1. **not ready**: the service takes no new work; its readiness turns 503 / `NOT_SERVING` and
//!    the registry marks it draining, so routers stop sending it requests;
//! 2. **drain**: the work in flight finishes, until the service says it is idle or the deadline
//!    passes;
//! 3. **stop**: background tasks are told to stop, and every task spawned through the shutdown is
//!    joined within what is left of the deadline.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One service's shutdown. Cheap to clone; every clone is the same shutdown.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    requested: CancellationToken,
    stopping: CancellationToken,
    draining: AtomicBool,
    tasks: TaskTracker,
    deadline: Duration,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("requested", &self.inner.requested.is_cancelled())
            .field("draining", &self.is_draining())
            .field("tasks", &self.inner.tasks.len())
            .field("deadline", &self.inner.deadline)
            .finish()
    }
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// The work in flight finished before the deadline.
    pub drained: bool,
    /// Every tracked task ended before the deadline.
    pub joined: bool,
}

impl Shutdown {
    /// A shutdown that starts when `requested` fires (a signal, a closed stdin, a test) and gives
    /// the whole of phases 1 to 3 at most `deadline`.
    pub fn new(requested: CancellationToken, deadline: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                requested,
                stopping: CancellationToken::new(),
                draining: AtomicBool::new(false),
                tasks: TaskTracker::new(),
                deadline,
            }),
        }
    }

    /// Fires when the stop is asked for (phase 1 begins).
    pub fn requested(&self) -> &CancellationToken {
        &self.inner.requested
    }

    /// Fires at phase 3: background work (heartbeats, polls, servers) stops.
    pub fn stopping(&self) -> CancellationToken {
        self.inner.stopping.clone()
    }

    /// From phase 1 on: the service takes no new work.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Spawns a task that phase 3 waits for. It should end once [`Shutdown::stopping`] fires.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.tasks.spawn(task)
    }

    /// Tasks spawned through this shutdown that have not ended yet.
    pub fn tasks(&self) -> usize {
        self.inner.tasks.len()
    }

    /// Waits for the stop request, then runs the phases: `not_ready` once the service is marked
    /// draining (to tell the registry, say), then drains until `idle()` holds, then stops and
    /// joins the tracked tasks, all within the deadline.
    pub async fn run<N, NF, B>(&self, not_ready: N, idle: B) -> ShutdownReport
    where
        N: FnOnce() -> NF,
        NF: Future<Output = ()>,
        B: Fn() -> bool,
    {
        self.inner.requested.cancelled().await;
        let started = Instant::now();
        let left = || self.inner.deadline.saturating_sub(started.elapsed());

        // Phase 1.
        self.inner.draining.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(left(), not_ready()).await;
        tracing::info!(deadline = ?self.inner.deadline, "draining: no new work; finishing what is in flight");

        // Phase 2.
        let drained = loop {
            if idle() {
                break true;
            }
            if left().is_zero() {
                tracing::warn!(deadline = ?self.inner.deadline, "drain deadline reached; stopping with work in flight");
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20).min(left())).await;
        };

        // Phase 3.
        self.inner.stopping.cancel();
        self.inner.tasks.close();
        let joined = tokio::time::timeout(left().max(Duration::from_millis(100)), self.inner.tasks.wait()).await.is_ok();
        if !joined {
            tracing::warn!(tasks = self.inner.tasks.len(), "tasks still running at the shutdown deadline");
        }
        ShutdownReport { drained, joined }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn phases_run_in_order_and_tasks_are_joined() {
        let requested = CancellationToken::new();
        let s = Shutdown::new(requested.clone(), Duration::from_secs(5));
        let busy = Arc::new(AtomicUsize::new(1));
        let stopped = Arc::new(AtomicBool::new(false));
        let (stop, done) = (s.stopping(), stopped.clone());
        s.spawn(async move {
            stop.cancelled().await;
            done.store(true, Ordering::SeqCst);
        });
        let (s2, b2) = (s.clone(), busy.clone());
        tokio::spawn(async move {
            // The in-flight request ends some time after the stop was asked for.
            s2.requested().cancelled().await;
            assert!(!s2.stopping().is_cancelled(), "stop must wait for the drain");
            tokio::time::sleep(Duration::from_millis(100)).await;
            b2.store(0, Ordering::SeqCst);
        });
        assert!(!s.is_draining());
        requested.cancel();
        let s3 = s.clone();
        let report =
            s.run(|| async move { assert!(s3.is_draining(), "not ready before the hook") }, || busy.load(Ordering::SeqCst) == 0).await;
        assert_eq!(report, ShutdownReport { drained: true, joined: true });
        assert!(stopped.load(Ordering::SeqCst), "the tracked task saw phase 3 and was joined");
        assert_eq!(s.tasks(), 0);
    }

    #[tokio::test]
    async fn one_deadline_bounds_every_phase() {
        let requested = CancellationToken::new();
        let s = Shutdown::new(requested.clone(), Duration::from_millis(300));
        // A task that ignores the stop.
        s.spawn(std::future::pending::<()>());
        requested.cancel();
        let started = Instant::now();
        let report = s.run(|| async {}, || false).await;
        assert_eq!(report, ShutdownReport { drained: false, joined: false });
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    }
}
