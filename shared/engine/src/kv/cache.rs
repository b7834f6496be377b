//! Storage of KV blocks. Each block is one contiguous region laid out
//! `[layer][k|v][slot][kv_head][head_dim]`, so a block can be exported or imported as a single
//! byte slice with no gathering across layers. Keys and values are held as f16 by default (as
//! llama.cpp holds them: half the memory an attention step reads and half the bytes a handoff
//! carries) or as f32 (what the exact reference tests compare).

use half::f16;
use half::slice::HalfFloatSliceExt;
use tandem_protocol::KvDtype;

use super::BlockId;

#[derive(Debug)]
enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

#[derive(Debug)]
pub(crate) struct KvCache {
    data: Data,
    pub block_size: usize,
    pub layers: usize,
    /// Elements of one token's keys (or values) in one layer: kv heads × head dim.
    pub row: usize,
}

impl KvCache {
    /// `dtype` is f16 or f32 (the CPU engine refuses bf16 and fp8 before they get here).
    pub fn new(num_blocks: usize, block_size: usize, layers: usize, kv_heads: usize, head_dim: usize, dtype: KvDtype) -> Self {
        let row = kv_heads * head_dim;
        let n = num_blocks * layers * 2 * block_size * row;
        let data = match dtype {
            KvDtype::F32 => Data::F32(vec![0.0; n]),
            KvDtype::F16 | KvDtype::Bf16 | KvDtype::Fp8E4m3 => Data::F16(vec![f16::ZERO; n]),
        };
        Self { data, block_size, layers, row }
    }

    pub fn block_elems(&self) -> usize {
        self.layers * 2 * self.block_size * self.row
    }

    /// Bytes of one element.
    pub fn elem_size(&self) -> usize {
        match self.data {
            Data::F32(_) => 4,
            Data::F16(_) => 2,
        }
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
        let (ko, vo, row) = (self.offset(block, layer, 0, slot), self.offset(block, layer, 1, slot), self.row);
        match &mut self.data {
            Data::F32(d) => {
                d[ko..ko + row].copy_from_slice(k);
                d[vo..vo + row].copy_from_slice(v);
            }
            Data::F16(d) => {
                d[ko..ko + row].convert_from_f32_slice(k);
                d[vo..vo + row].convert_from_f32_slice(v);
            }
        }
    }

    /// `n` runs of `len` elements from `at`, `stride` apart, as f32 one after another in `dst`.
    pub fn widen(&self, at: usize, n: usize, stride: usize, len: usize, dst: &mut [f32]) {
        for (j, out) in dst.chunks_exact_mut(len).take(n).enumerate() {
            let from = at + j * stride;
            match &self.data {
                Data::F32(d) => out.copy_from_slice(&d[from..from + len]),
                Data::F16(d) => d[from..from + len].convert_to_f32_slice(out),
            }
        }
    }

    /// Asks the cache for the memory [`KvCache::widen`] with the same arguments reads.
    pub fn prefetch(&self, at: usize, n: usize, stride: usize, len: usize) {
        match &self.data {
            Data::F32(d) => tandem_kernels::prefetch_rows(d, at, n, stride, len),
            Data::F16(d) => tandem_kernels::prefetch_rows(d, at, n, stride, len),
        }
    }

    /// One block as bytes (little-endian elements), the form handoffs carry.
    pub fn block_bytes(&self, block: BlockId) -> &[u8] {
        let n = self.block_elems();
        let range = block as usize * n..(block as usize + 1) * n;
        match &self.data {
            Data::F32(d) => bytemuck::cast_slice(&d[range]),
            Data::F16(d) => bytemuck::cast_slice(&d[range]),
        }
    }

    pub fn block_bytes_mut(&mut self, block: BlockId) -> &mut [u8] {
        let n = self.block_elems();
        let range = block as usize * n..(block as usize + 1) * n;
        match &mut self.data {
            Data::F32(d) => bytemuck::cast_slice_mut(&mut d[range]),
            Data::F16(d) => bytemuck::cast_slice_mut(&mut d[range]),
        }
    }
}
