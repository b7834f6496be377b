//! An engine without a model, for tests of what drives engines (the batcher, the services, a
//! whole cluster): the logits after a sequence are whatever a function of its tokens says, and
//! its KV blocks hold the token ids they cover, so a handoff that loses or mixes blocks shows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tandem_protocol::{Bytes, DeviceBlocks, DevicePeer, KvDtype, KvLayout};

use crate::engine::{Engine, EngineInfo, ForwardItem};
use crate::kv::{BlockId, SeqTable};
use crate::Result;

/// The logits for the next token after a sequence's tokens.
pub type LogitsFn = Arc<dyn Fn(&[u32]) -> Vec<f32> + Send + Sync>;

pub struct ScriptedEngine {
    info: EngineInfo,
    logits: LogitsFn,
    /// One f32 per slot of every block: the token id written there. Shared when the engine
    /// stands in for a device pool ([`ScriptedEngine::with_shared_pool`]).
    blocks: Pool,
    step_delay: Duration,
    /// The handle other scripted engines of this process find `blocks` by.
    shared: Option<Arc<SharedPools>>,
}

/// Scripted engines' pools by handle: what a device pool mapped by another process is to a GPU
/// engine, in one process.
#[derive(Debug)]
struct SharedPools {
    handle: Vec<u8>,
    node: String,
}

/// One scripted engine's blocks.
type Pool = Arc<Mutex<Vec<f32>>>;

fn pools() -> &'static Mutex<HashMap<Vec<u8>, Pool>> {
    static POOLS: OnceLock<Mutex<HashMap<Vec<u8>, Pool>>> = OnceLock::new();
    POOLS.get_or_init(Default::default)
}

impl DevicePeer for SharedPools {
    fn node(&self) -> &str {
        &self.node
    }

    fn open(&self, blocks: &DeviceBlocks, block_bytes: usize) -> std::result::Result<(), String> {
        let pool = pools().lock().unwrap_or_else(|e| e.into_inner()).get(&blocks.handle).cloned().ok_or("no such pool")?;
        let bytes = pool.lock().unwrap_or_else(|e| e.into_inner()).len() * 4;
        blocks.check_within(bytes as u64, block_bytes)
    }
}

impl std::fmt::Debug for ScriptedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedEngine").field("info", &self.info).finish_non_exhaustive()
    }
}

impl ScriptedEngine {
    /// `kv_blocks` blocks of 16 tokens; `logits` must return `vocab` values.
    pub fn new(model_name: &str, vocab: usize, kv_blocks: usize, logits: impl Fn(&[u32]) -> Vec<f32> + Send + Sync + 'static) -> Self {
        let block_size = 16;
        // One layer of one head of dimension 1 in f32 splits into K and V: two floats a slot,
        // the token id in K and its position in V.
        let layout = KvLayout {
            model_id: model_name.into(),
            num_layers: 1,
            kv_heads: 1,
            head_dim: 1,
            dtype: KvDtype::F32,
            block_size,
            tp_rank: 0,
            tp_size: 1,
            token_count: 0,
        };
        let info = EngineInfo {
            model_name: model_name.into(),
            vocab_size: vocab,
            max_context: kv_blocks * block_size,
            block_size,
            kv_blocks,
            layout,
            tp_size: 1,
        };
        Self {
            info,
            logits: Arc::new(logits),
            blocks: Arc::new(Mutex::new(vec![0.0; kv_blocks * 2 * block_size])),
            step_delay: Duration::ZERO,
            shared: None,
        }
    }

    /// Greedy decoding counts up: the token after `t` is `t + 1`, wrapping below `vocab`.
    pub fn counting(model_name: &str, vocab: usize, kv_blocks: usize) -> Self {
        Self::new(model_name, vocab, kv_blocks, move |seq| {
            let next = (seq.last().copied().unwrap_or(0) as usize + 1) % vocab;
            (0..vocab).map(|t| if t == next { 10.0 } else { 0.0 }).collect()
        })
    }

    /// Makes every forward pass take at least `delay` (a slow model, for timing-dependent tests).
    pub fn with_step_delay(mut self, delay: Duration) -> Self {
        self.step_delay = delay;
        self
    }

    /// Lets other scripted engines of this process copy blocks straight out of this one's pool,
    /// and this one out of theirs: the device handoff's engine side, without a device.
    pub fn with_shared_pool(self, handle: &str) -> Self {
        pools().lock().unwrap_or_else(|e| e.into_inner()).insert(handle.as_bytes().to_vec(), self.blocks.clone());
        self.with_unmappable_pool(handle)
    }

    /// As [`ScriptedEngine::with_shared_pool`], except that no other engine can map this one's
    /// pool (as a GPU pool that a process in another IPC namespace cannot open): its device
    /// handoffs are refused before any copy.
    pub fn with_unmappable_pool(mut self, handle: &str) -> Self {
        self.shared = Some(Arc::new(SharedPools { handle: handle.as_bytes().to_vec(), node: tandem_protocol::host_node_id() }));
        self
    }

    fn block_floats(&self) -> usize {
        2 * self.info.block_size
    }
}

impl Engine for ScriptedEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn forward(&mut self, seqs: &mut SeqTable, items: &[ForwardItem]) -> Result<Vec<Vec<Vec<f32>>>> {
        std::thread::sleep(self.step_delay);
        let (bs, per_block) = (self.info.block_size, self.block_floats());
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            let s = seqs.get(it.seq)?;
            // The cache must hold what the sequence says it holds (after an import, too).
            for (pos, &t) in s.tokens.iter().enumerate() {
                let at = s.blocks[pos / bs] as usize * per_block + pos % bs;
                if blocks[at] != t as f32 || blocks[at + bs] != pos as f32 {
                    return Err(crate::EngineError::Import(format!("sequence {}: slot {pos} does not hold token {t}", it.seq)));
                }
            }
            let mut tokens = s.tokens.clone();
            let mut rows = Vec::new();
            for (j, &t) in it.tokens.iter().enumerate() {
                let pos = tokens.len();
                let at = s.blocks[pos / bs] as usize * per_block + pos % bs;
                blocks[at] = t as f32;
                blocks[at + bs] = pos as f32;
                tokens.push(t);
                if it.all_logits || j + 1 == it.tokens.len() {
                    rows.push((self.logits)(&tokens));
                }
            }
            out.push(rows);
        }
        seqs.commit(items);
        Ok(out)
    }

    fn read_blocks(&self, blocks: &[BlockId]) -> Result<Vec<Bytes>> {
        let n = self.block_floats();
        let pool = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        Ok(blocks.iter().map(|&b| Bytes::copy_from_slice(bytemuck::cast_slice(&pool[b as usize * n..(b as usize + 1) * n]))).collect())
    }

    fn write_blocks(&mut self, writes: &[(BlockId, &[u8])]) -> Result<()> {
        let n = self.block_floats();
        let mut pool = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        for &(b, bytes) in writes {
            bytemuck::cast_slice_mut::<f32, u8>(&mut pool[b as usize * n..(b as usize + 1) * n]).copy_from_slice(bytes);
        }
        Ok(())
    }

    fn device_peer(&self) -> Option<Arc<dyn DevicePeer>> {
        self.shared.clone().map(|s| s as Arc<dyn DevicePeer>)
    }

    fn export_device(&self, blocks: &[BlockId]) -> Option<Result<DeviceBlocks>> {
        let shared = self.shared.as_ref()?;
        let bytes = self.block_floats() * 4;
        let pool = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let raw: &[u8] = bytemuck::cast_slice(&pool);
        let offsets: Vec<u64> = blocks.iter().map(|&b| (b as usize * bytes) as u64).collect();
        let sums = offsets.iter().map(|&o| tandem_protocol::device_checksum(&raw[o as usize..o as usize + bytes])).collect();
        Some(Ok(DeviceBlocks { node: shared.node.clone(), handle: shared.handle.clone(), offsets, sums }))
    }

    fn import_device(&mut self, blocks: &[BlockId], src: &DeviceBlocks) -> Result<()> {
        let Some(from) = pools().lock().unwrap_or_else(|e| e.into_inner()).get(&src.handle).cloned() else {
            return Err(crate::EngineError::Import("no such pool".into()));
        };
        let bytes = self.block_floats() * 4;
        // Read before taking our own lock: the source may be this very pool.
        let copies: Vec<Vec<u8>> = {
            let from = from.lock().unwrap_or_else(|e| e.into_inner());
            let raw: &[u8] = bytemuck::cast_slice(&from);
            src.check_within(raw.len() as u64, bytes).map_err(crate::EngineError::Import)?;
            src.offsets.iter().map(|&o| raw[o as usize..o as usize + bytes].to_vec()).collect()
        };
        for (i, c) in copies.iter().enumerate() {
            if tandem_protocol::device_checksum(c) != src.sums[i] {
                return Err(crate::EngineError::Import(format!("block {i} fails its checksum after the device copy")));
            }
        }
        let writes: Vec<(BlockId, &[u8])> = blocks.iter().copied().zip(copies.iter().map(|c| &c[..])).collect();
        self.write_blocks(&writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PagedEngine;
    use tandem_protocol::KvExport;

    fn prefilled(tokens: &[u32]) -> (PagedEngine<ScriptedEngine>, KvExport) {
        let mut e = PagedEngine::new(ScriptedEngine::counting("m", 64, 8));
        e.add_sequence(1, tokens).unwrap();
        e.forward(&[ForwardItem { seq: 1, tokens: tokens.to_vec(), all_logits: false }]).unwrap();
        let kv = e.export(1).unwrap();
        (e, kv)
    }

    fn next_after_import(kv: &KvExport) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut e = PagedEngine::new(ScriptedEngine::counting("m", 64, 8));
        e.import(7, kv)?;
        e.forward(&[ForwardItem { seq: 7, tokens: vec![40], all_logits: false }])
    }

    #[test]
    fn an_imported_sequence_decodes_on() {
        let (_, kv) = prefilled(&(1..=20).collect::<Vec<_>>());
        let logits = next_after_import(&kv).unwrap();
        let best = logits[0][0].iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(best, 41, "counting continues after the imported tokens");
    }

    #[test]
    fn a_device_export_is_copied_from_the_senders_pool_and_checked_where_it_lands() {
        let tokens: Vec<u32> = (1..=20).collect();
        let mut sender = PagedEngine::new(ScriptedEngine::counting("m", 64, 8).with_shared_pool("device-test-a"));
        sender.add_sequence(1, &tokens).unwrap();
        sender.forward(&[ForwardItem { seq: 1, tokens: tokens.clone(), all_logits: false }]).unwrap();
        let kv = sender.export_device(1).unwrap().unwrap();
        let d = kv.device.clone().unwrap();
        assert!(kv.blocks.is_empty() && d.offsets.len() == 2 && d.sums.len() == 2);
        assert_eq!(kv.block_count(), 2);
        // The host read of the same sequence is what the device copy must equal.
        let host = sender.export(1).unwrap();
        assert_eq!(d.sums, host.blocks.iter().map(|b| tandem_protocol::device_checksum(b)).collect::<Vec<_>>());

        let mut receiver = PagedEngine::new(ScriptedEngine::counting("m", 64, 8).with_shared_pool("device-test-b"));
        receiver.import(7, &kv).unwrap();
        let logits = receiver.forward(&[ForwardItem { seq: 7, tokens: vec![40], all_logits: false }]).unwrap();
        assert_eq!(logits[0][0].iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0, 41);

        let mut bad = kv.clone();
        bad.device.as_mut().unwrap().sums[1] ^= 1;
        let before = receiver.stats().used_blocks;
        let err = receiver.import(8, &bad).unwrap_err();
        assert!(err.to_string().contains("block 1 fails its checksum"), "{err}");
        assert_eq!(receiver.stats().used_blocks, before, "a refused import gives its blocks back");
    }

    #[test]
    fn a_prefill_to_device_holds_its_blocks_until_cancelled() {
        use crate::batcher::{Batcher, BatcherConfig, Event, Mode, NewRequest};
        let engine = ScriptedEngine::counting("m", 64, 8).with_shared_pool("device-test-c");
        let mut b = Batcher::new(Box::new(engine), BatcherConfig::default());
        let req = |id, mode| NewRequest {
            id,
            prompt: (1..=20).collect(),
            params: tandem_protocol::SamplingParams::greedy(4),
            seed: 0,
            eos_ids: vec![],
            mode,
            resumed: vec![],
            grammar: None,
        };
        b.add(req(1, Mode::PrefillToDevice));
        let mut device = None;
        while device.is_none() {
            for e in b.step() {
                if let Event::Prefilled { kv, .. } = e {
                    device = Some(kv.device.is_some());
                }
            }
        }
        assert_eq!(device, Some(true));
        assert!(!b.has_work(), "out of the batch");
        assert_eq!(b.engine().stats().used_blocks, 2, "still held for the receiver");
        assert_eq!(b.engine().export_unsealed(1).unwrap().blocks.len(), 2, "and readable for the host path");
        assert!(b.cancel(1));
        assert_eq!(b.engine().stats().used_blocks, 0);

        // The host mode releases at once.
        b.add(req(2, Mode::PrefillOnly));
        while b.has_work() {
            b.step();
        }
        assert_eq!(b.engine().stats().used_blocks, 0);
    }

    #[test]
    fn blocks_that_do_not_hold_the_sequence_fail_the_next_pass() {
        let tokens: Vec<u32> = (1..=20).collect();
        let (_, mut kv) = prefilled(&tokens);
        // Blocks swapped in transit, checksums recomputed so the import's own checks pass.
        kv.blocks.swap(0, 1);
        kv.checksums = kv.blocks.iter().map(|b| KvExport::checksum(b)).collect();
        let err = next_after_import(&kv).unwrap_err();
        assert!(matches!(err, crate::EngineError::Import(_)), "{err}");
    }
}
