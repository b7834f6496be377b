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
use tandem_protocol::{BlockHash, BlockMemory, DevicePeer, KvExport};

enum Command {
    Submit { req: NewRequest, events: mpsc::UnboundedSender<Event> },
    Import { req: NewRequest, kv: Box<KvExport>, first: u32, events: mpsc::UnboundedSender<Event>, done: oneshot::Sender<Result<()>> },
    Cancel(SeqId),
    CachedPrefix { hashes: Vec<BlockHash>, reply: oneshot::Sender<usize> },
    CachedHashes { reply: oneshot::Sender<Vec<BlockHash>> },
    InsertCached { parent: BlockHash, tokens: Vec<u32>, blocks: Vec<Vec<u8>>, reply: oneshot::Sender<Result<usize>> },
    ReadFullBlocks { seq: SeqId, from: usize, reply: oneshot::Sender<Result<(Vec<u32>, Vec<tandem_protocol::Bytes>)>> },
    ReadHeld { seq: SeqId, reply: oneshot::Sender<Result<KvExport>> },
}

/// Load figures, refreshed after every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    pub running: usize,
    pub waiting: usize,
    pub pool: PoolStats,
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// Sequences it brought to their end: finished, or prefilled and handed over.
    pub finished: u64,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std::sync::mpsc::Sender<Command>,
    info: Arc<EngineInfo>,
    load: Arc<Mutex<WorkerLoad>>,
    evicted: Arc<Mutex<Vec<BlockHash>>>,
    next_id: Arc<AtomicU64>,
    block_memory: Option<Arc<dyn BlockMemory>>,
    device_peer: Option<Arc<dyn DevicePeer>>,
    /// Compiles structured-output constraints for this model (none: requests asking for one
    /// are refused).
    constraints: Option<Arc<crate::Constraints>>,
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
        let block_memory = batcher.engine().backend().block_memory();
        let device_peer = batcher.engine().backend().device_peer();
        let load = Arc::new(Mutex::new(WorkerLoad { pool: batcher.engine().stats(), ..WorkerLoad::default() }));
        let evicted = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared { load: load.clone(), evicted: evicted.clone() };
        std::thread::Builder::new().name(name.to_string()).spawn(move || run(batcher, rx, shared)).expect("spawning the engine thread");
        Self { tx, info, load, evicted, next_id: Arc::new(AtomicU64::new(1)), block_memory, device_peer, constraints: None }
    }

    /// Serves structured output with these compiled constraints.
    pub fn with_constraints(mut self, constraints: Arc<crate::Constraints>) -> Self {
        self.constraints = Some(constraints);
        self
    }

    pub fn constraints(&self) -> Option<&Arc<crate::Constraints>> {
        self.constraints.as_ref()
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// See [`crate::Engine::block_memory`].
    pub fn block_memory(&self) -> Option<Arc<dyn BlockMemory>> {
        self.block_memory.clone()
    }

    /// See [`crate::Engine::device_peer`]: set when this engine's handoffs can stay on the device.
    pub fn device_peer(&self) -> Option<Arc<dyn DevicePeer>> {
        self.device_peer.clone()
    }

    pub fn load(&self) -> WorkerLoad {
        *self.load.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hashes the cache evicted since the last call.
    pub fn take_evicted(&self) -> Vec<BlockHash> {
        std::mem::take(&mut *self.evicted.lock().unwrap_or_else(|e| e.into_inner()))
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).ok()?;
        rx.await.ok()
    }

    /// How many leading blocks of a hash chain the cache holds.
    pub async fn cached_prefix(&self, hashes: Vec<BlockHash>) -> usize {
        self.ask(|reply| Command::CachedPrefix { hashes, reply }).await.unwrap_or(0)
    }

    /// Every hash the cache holds.
    pub async fn cached_hashes(&self) -> Vec<BlockHash> {
        self.ask(|reply| Command::CachedHashes { reply }).await.unwrap_or_default()
    }

    /// Adds fetched full blocks to the prefix cache; see [`crate::Engine::insert_cached`].
    pub async fn insert_cached(&self, parent: BlockHash, tokens: Vec<u32>, blocks: Vec<Vec<u8>>) -> Result<usize> {
        self.ask(|reply| Command::InsertCached { parent, tokens, blocks, reply })
            .await
            .unwrap_or_else(|| Err(crate::EngineError::Import("engine thread stopped".into())))
    }

    /// A running sequence's full blocks from `from` on, with the tokens of all its full blocks;
    /// see [`crate::PagedEngine::read_full_blocks`]. Read between two steps.
    pub async fn read_full_blocks(&self, seq: SeqId, from: usize) -> Result<(Vec<u32>, Vec<tandem_protocol::Bytes>)> {
        self.ask(|reply| Command::ReadFullBlocks { seq, from, reply })
            .await
            .unwrap_or_else(|| Err(crate::EngineError::Import("engine thread stopped".into())))
    }

    /// The KV of a sequence prefilled to device memory and still held
    /// ([`crate::Mode::PrefillToDevice`]), read out into host memory: for a handoff that has to
    /// travel the host path after all. Unsealed.
    pub async fn read_held(&self, seq: SeqId) -> Result<KvExport> {
        self.ask(|reply| Command::ReadHeld { seq, reply })
            .await
            .unwrap_or_else(|| Err(crate::EngineError::Import("engine thread stopped".into())))
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

/// What the engine thread publishes to its handles.
struct Shared {
    load: Arc<Mutex<WorkerLoad>>,
    evicted: Arc<Mutex<Vec<BlockHash>>>,
}

fn run(mut batcher: Batcher, rx: std::sync::mpsc::Receiver<Command>, shared: Shared) {
    let mut routes = std::collections::HashMap::<SeqId, mpsc::UnboundedSender<Event>>::new();
    let mut finished = 0u64;
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
                Event::Token { id, .. }
                | Event::PromptLogprobs { id, .. }
                | Event::Finished { id, .. }
                | Event::Prefilled { id, .. }
                | Event::Failed { id, .. } => *id,
            };
            let last = !matches!(event, Event::Token { .. } | Event::PromptLogprobs { .. });
            finished += matches!(event, Event::Finished { .. } | Event::Prefilled { .. }) as u64;
            let delivered = routes.get(&id).is_some_and(|tx| tx.send(event).is_ok());
            if last {
                routes.remove(&id);
            } else if !delivered {
                // Nobody listens any more: the client went away.
                batcher.cancel(id);
                routes.remove(&id);
            }
        }
        let evicted = batcher.engine_mut().take_evicted();
        if !evicted.is_empty() {
            let mut e = shared.evicted.lock().unwrap_or_else(|e| e.into_inner());
            if e.len() < 1 << 16 {
                e.extend(evicted);
            }
        }
        *shared.load.lock().unwrap_or_else(|e| e.into_inner()) = WorkerLoad {
            running: batcher.running(),
            waiting: batcher.waiting(),
            pool: batcher.engine().stats(),
            preemptions: batcher.preemptions(),
            prefix_queried_tokens: batcher.prefix_lookups().0,
            prefix_hit_tokens: batcher.prefix_lookups().1,
            finished,
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
            // Also after the last event: a prefilled sequence may still hold its blocks.
            routes.remove(&id);
            batcher.cancel(id);
        }
        Command::CachedPrefix { hashes, reply } => {
            let _ = reply.send(batcher.engine().cached_prefix(&hashes));
        }
        Command::CachedHashes { reply } => {
            let _ = reply.send(batcher.engine().cached_hashes());
        }
        Command::InsertCached { parent, tokens, blocks, reply } => {
            let _ = reply.send(batcher.engine_mut().insert_cached(parent, &tokens, &blocks));
        }
        Command::ReadFullBlocks { seq, from, reply } => {
            let _ = reply.send(batcher.engine().read_full_blocks(seq, from));
        }
        Command::ReadHeld { seq, reply } => {
            let _ = reply.send(batcher.engine().export_unsealed(seq));
        }
    }
}
