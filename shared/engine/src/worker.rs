//! Runs a [`Batcher`] on its own thread and talks to async code over channels: requests go in
//! as commands, each request's events come back on its own channel, and dropping that channel
//! cancels the request and frees its blocks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::batcher::{Batcher, Event, NewRequest};
use crate::engine::{EngineInfo, SeqId};
use crate::kv::PoolStats;
use crate::Result;
use tandem_protocol::KvExport;

enum Command {
    Submit { req: NewRequest, events: mpsc::UnboundedSender<Event> },
    Import { req: NewRequest, kv: Box<KvExport>, first: u32, events: mpsc::UnboundedSender<Event>, done: oneshot::Sender<Result<()>> },
    Cancel(SeqId),
}

/// Load figures, refreshed after every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    pub running: usize,
    pub waiting: usize,
    pub pool: PoolStats,
    pub preemptions: u64,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std::sync::mpsc::Sender<Command>,
    info: Arc<EngineInfo>,
    load: Arc<Mutex<WorkerLoad>>,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("model", &self.info.model_name).finish_non_exhaustive()
    }
}

/// The events of one request. Dropping it cancels the request.
#[derive(Debug)]
pub struct RequestEvents {
    pub id: SeqId,
    rx: mpsc::UnboundedReceiver<Event>,
    tx: std::sync::mpsc::Sender<Command>,
}

impl RequestEvents {
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for RequestEvents {
    fn drop(&mut self) {
        // A no-op for requests that already finished.
        let _ = self.tx.send(Command::Cancel(self.id));
    }
}

impl EngineHandle {
    /// Moves `batcher` onto a new thread named `name`.
    pub fn spawn(name: &str, batcher: Batcher) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let info = Arc::new(batcher.engine().info().clone());
        let load = Arc::new(Mutex::new(WorkerLoad { pool: batcher.engine().stats(), ..WorkerLoad::default() }));
        let thread_load = load.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(batcher, rx, thread_load))
            .expect("spawning the engine thread");
        Self { tx, info, load, next_id: Arc::new(AtomicU64::new(1)) }
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    pub fn load(&self) -> WorkerLoad {
        *self.load.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh sequence id for this engine.
    pub fn next_id(&self) -> SeqId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn events(&self, id: SeqId) -> (mpsc::UnboundedSender<Event>, RequestEvents) {
        let (etx, rx) = mpsc::unbounded_channel();
        (etx, RequestEvents { id, rx, tx: self.tx.clone() })
    }

    /// Queues a request (its `id` from [`Self::next_id`]).
    pub fn submit(&self, req: NewRequest) -> RequestEvents {
        let (events, out) = self.events(req.id);
        let _ = self.tx.send(Command::Submit { req, events });
        out
    }

    /// Joins a sequence prefilled elsewhere; resolves once the blocks are imported (or refused).
    pub async fn import(&self, req: NewRequest, kv: KvExport, first: u32) -> Result<RequestEvents> {
        let (events, out) = self.events(req.id);
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Import { req, kv: Box::new(kv), first, events, done });
        rx.await.unwrap_or_else(|_| Err(crate::EngineError::Import("engine thread stopped".into())))?;
        Ok(out)
    }
}

fn run(mut batcher: Batcher, rx: std::sync::mpsc::Receiver<Command>, load: Arc<Mutex<WorkerLoad>>) {
    let mut routes = std::collections::HashMap::<SeqId, mpsc::UnboundedSender<Event>>::new();
    loop {
        // Block while idle; otherwise take whatever arrived and keep stepping.
        if !batcher.has_work() {
            match rx.recv() {
                Ok(cmd) => apply(&mut batcher, &mut routes, cmd),
                Err(_) => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            apply(&mut batcher, &mut routes, cmd);
        }
        for event in batcher.step() {
            let id = match &event {
                Event::Token { id, .. } | Event::Finished { id, .. } | Event::Prefilled { id, .. } | Event::Failed { id, .. } => *id,
            };
            let last = !matches!(event, Event::Token { .. });
            let delivered = routes.get(&id).is_some_and(|tx| tx.send(event).is_ok());
            if last {
                routes.remove(&id);
            } else if !delivered {
                // Nobody listens any more: the client went away.
                batcher.cancel(id);
                routes.remove(&id);
            }
        }
        *load.lock().unwrap_or_else(|e| e.into_inner()) = WorkerLoad {
            running: batcher.running(),
            waiting: batcher.waiting(),
            pool: batcher.engine().stats(),
            preemptions: batcher.preemptions(),
        };
    }
}

fn apply(batcher: &mut Batcher, routes: &mut std::collections::HashMap<SeqId, mpsc::UnboundedSender<Event>>, cmd: Command) {
    match cmd {
        Command::Submit { req, events } => {
            routes.insert(req.id, events);
            batcher.add(req);
        }
        Command::Import { req, kv, first, events, done } => {
            let id = req.id;
            let result = batcher.add_imported(req, &kv, first);
            if result.is_ok() {
                routes.insert(id, events);
            }
            let _ = done.send(result);
        }
        Command::Cancel(id) => {
            if routes.remove(&id).is_some() {
                batcher.cancel(id);
            }
        }
    }
}
