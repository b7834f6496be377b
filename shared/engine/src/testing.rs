//! An engine without a model, for tests of what drives engines (the batcher, the services, a
//! whole cluster): the logits after a sequence are whatever a function of its tokens says, and
//! its KV blocks hold the token ids they cover, so a handoff that loses or mixes blocks shows.

use std::sync::Arc;
use std::time::Duration;

use tandem_protocol::{Bytes, KvDtype, KvLayout};

use crate::engine::{Engine, EngineInfo, ForwardItem};
use crate::kv::{BlockId, SeqTable};
use crate::Result;

/// The logits for the next token after a sequence's tokens.
pub type LogitsFn = Arc<dyn Fn(&[u32]) -> Vec<f32> + Send + Sync>;

pub struct ScriptedEngine {
    info: EngineInfo,
    logits: LogitsFn,
    /// One f32 per slot of every block: the token id written there.
    blocks: Vec<f32>,
    step_delay: Duration,
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
        Self { info, logits: Arc::new(logits), blocks: vec![0.0; kv_blocks * 2 * block_size], step_delay: Duration::ZERO }
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
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            let s = seqs.get(it.seq)?;
            // The cache must hold what the sequence says it holds (after an import, too).
            for (pos, &t) in s.tokens.iter().enumerate() {
                let at = s.blocks[pos / bs] as usize * per_block + pos % bs;
                if self.blocks[at] != t as f32 || self.blocks[at + bs] != pos as f32 {
                    return Err(crate::EngineError::Import(format!("sequence {}: slot {pos} does not hold token {t}", it.seq)));
                }
            }
            let mut tokens = s.tokens.clone();
            let mut rows = Vec::new();
            for (j, &t) in it.tokens.iter().enumerate() {
                let pos = tokens.len();
                let at = s.blocks[pos / bs] as usize * per_block + pos % bs;
                self.blocks[at] = t as f32;
                self.blocks[at + bs] = pos as f32;
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
        Ok(blocks
            .iter()
            .map(|&b| Bytes::copy_from_slice(bytemuck::cast_slice(&self.blocks[b as usize * n..(b as usize + 1) * n])))
            .collect())
    }

    fn write_blocks(&mut self, writes: &[(BlockId, &[u8])]) -> Result<()> {
        let n = self.block_floats();
        for &(b, bytes) in writes {
            bytemuck::cast_slice_mut::<f32, u8>(&mut self.blocks[b as usize * n..(b as usize + 1) * n]).copy_from_slice(bytes);
        }
        Ok(())
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
