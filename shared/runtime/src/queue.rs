//! A worker's own bound on the work it has accepted and not yet started to answer: so many
//! requests, so many prompt tokens. The gateway bounds its waiting requests too, but a worker
//! may serve several gateways, each within its own bound; this one keeps the worker's queue, and
//! so its requests' wait, bounded whatever is in front of it. A request past the bound is refused
//! at once (`overloaded`), and the gateway moves it to another worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The bound, and what is queued against it.
#[derive(Debug)]
pub struct WorkQueue {
    max_requests: usize,
    max_tokens: usize,
    queued: Mutex<(usize, usize)>,
    refused: AtomicUsize,
}

/// A place in the queue, given back when dropped (the request started to answer, or ended).
#[derive(Debug)]
pub struct Queued {
    queue: Arc<WorkQueue>,
    tokens: usize,
}

/// Why a request was refused, for its error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub requests: usize,
    pub tokens: usize,
    pub max_requests: usize,
    pub max_tokens: usize,
}

impl std::fmt::Display for QueueFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests with {} prompt tokens are queued (bounds: {} requests, {} tokens)",
            self.requests, self.tokens, self.max_requests, self.max_tokens
        )
    }
}

impl WorkQueue {
    /// At most `max_requests` requests and `max_tokens` prompt tokens queued at once (each at
    /// least 1). A request larger than the token bound alone is still taken when nothing else is
    /// queued, so no prompt the model accepts is refused forever.
    pub fn new(max_requests: usize, max_tokens: usize) -> Arc<Self> {
        Arc::new(Self {
            max_requests: max_requests.max(1),
            max_tokens: max_tokens.max(1),
            queued: Mutex::new((0, 0)),
            refused: AtomicUsize::new(0),
        })
    }

    /// A place for a request of `tokens` prompt tokens, or why there is none.
    pub fn enter(self: &Arc<Self>, tokens: usize) -> Result<Queued, QueueFull> {
        let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        let (requests, queued_tokens) = *q;
        let fits = requests == 0 || (requests < self.max_requests && queued_tokens.saturating_add(tokens) <= self.max_tokens);
        if !fits {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(QueueFull { requests, tokens: queued_tokens, max_requests: self.max_requests, max_tokens: self.max_tokens });
        }
        *q = (requests + 1, queued_tokens.saturating_add(tokens));
        Ok(Queued { queue: self.clone(), tokens })
    }

    /// Requests and prompt tokens queued now.
    pub fn len(&self) -> (usize, usize) {
        *self.queued.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.len().0 == 0
    }

    /// Requests refused since the start.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut q = self.queue.queued.lock().unwrap_or_else(|e| e.into_inner());
        q.0 = q.0.saturating_sub(1);
        q.1 = q.1.saturating_sub(self.tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_requests_and_tokens_and_gives_places_back() {
        let q = WorkQueue::new(2, 100);
        let a = q.enter(60).unwrap();
        // 60 + 50 is over the token bound.
        let full = q.enter(50).unwrap_err();
        assert_eq!((full.requests, full.tokens), (1, 60));
        let b = q.enter(40).unwrap();
        // Two requests: the request bound.
        assert!(q.enter(0).is_err());
        assert_eq!(q.len(), (2, 100));
        drop(a);
        assert_eq!(q.len(), (1, 40));
        let c = q.enter(50).unwrap();
        drop((b, c));
        assert!(q.is_empty());
        assert_eq!(q.len(), (0, 0));
        assert_eq!(q.refused(), 2);
    }

    #[test]
    fn an_oversized_request_goes_alone() {
        let q = WorkQueue::new(4, 10);
        let big = q.enter(1_000).unwrap();
        assert!(q.enter(1).is_err());
        drop(big);
        assert!(q.enter(1).is_ok());
    }
}
