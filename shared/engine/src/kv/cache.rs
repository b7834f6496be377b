//! Storage of KV blocks. Each block is one contiguous region laid out
//! `[layer][k|v][slot][kv_head][head_dim]`, so a block can be exported or imported as a single
//! byte slice with no gathering across layers.

use super::BlockId;

#[derive(Debug)]
pub(crate) struct KvCache {
    data: Vec<f32>,
    pub block_size: usize,
    pub layers: usize,
    /// Elements of one token's keys (or values) in one layer: kv heads × head dim.
    pub row: usize,
}

impl KvCache {
    pub fn new(num_blocks: usize, block_size: usize, layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        let row = kv_heads * head_dim;
        Self { data: vec![0.0; num_blocks * layers * 2 * block_size * row], block_size, layers, row }
    }

    pub fn block_elems(&self) -> usize {
        self.layers * 2 * self.block_size * self.row
    }

    /// The (layer, k|v, slot) rows of one block, each `row` elements long.
    pub fn rows_per_block(&self) -> usize {
        self.layers * 2 * self.block_size
    }

    /// Offset of the key row (`kv = 0`) or value row (`kv = 1`) of `slot` in `block` at `layer`.
    #[inline]
    pub fn offset(&self, block: BlockId, layer: usize, kv: usize, slot: usize) -> usize {
        block as usize * self.block_elems() + ((layer * 2 + kv) * self.block_size + slot) * self.row
    }

    pub fn write(&mut self, block: BlockId, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let ko = self.offset(block, layer, 0, slot);
        self.data[ko..ko + self.row].copy_from_slice(k);
        let vo = self.offset(block, layer, 1, slot);
        self.data[vo..vo + self.row].copy_from_slice(v);
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn block(&self, block: BlockId) -> &[f32] {
        let n = self.block_elems();
        &self.data[block as usize * n..(block as usize + 1) * n]
    }

    pub fn block_mut(&mut self, block: BlockId) -> &mut [f32] {
        let n = self.block_elems();
        &mut self.data[block as usize * n..(block as usize + 1) * n]
    }
}
