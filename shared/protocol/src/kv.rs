//! The layout descriptor that travels with every exported KV block set.

pub use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    F32,
    Bf16,
    F16,
    /// E4M3 bytes with one f32 scale per (token, head) row: each row of a block is followed, after
    /// all of the block's rows, by its scale ([`KvDtype::scale_bytes`]). The CUDA engine's.
    #[serde(rename = "fp8_e4m3")]
    Fp8E4m3,
}

impl KvDtype {
    /// The name flags and layouts use: `f32`, `bf16`, `f16`, `fp8`.
    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
            KvDtype::F16 => "f16",
            KvDtype::Fp8E4m3 => "fp8",
        }
    }

    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 | KvDtype::F16 => 2,
            KvDtype::Fp8E4m3 => 1,
        }
    }

    /// Bytes of the scale each (layer, k|v, slot, head) row carries: 4 for FP8, none otherwise.
    pub fn scale_bytes(self) -> usize {
        match self {
            KvDtype::Fp8E4m3 => 4,
            _ => 0,
        }
    }

    /// The parts of a block, as the bytes one head of one row takes in each: the elements, then
    /// (FP8) the scales. A block is `[row][head]` of the first part, then of the second.
    pub fn head_parts(self, head_dim: usize) -> Vec<usize> {
        let mut parts = vec![head_dim * self.size()];
        if self.scale_bytes() > 0 {
            parts.push(self.scale_bytes());
        }
        parts
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvDtype::F32),
            "f16" | "float16" | "half" => Ok(KvDtype::F16),
            "bf16" | "bfloat16" => Ok(KvDtype::Bf16),
            "fp8" | "fp8_e4m3" | "e4m3" => Ok(KvDtype::Fp8E4m3),
            other => Err(format!("`{other}` is not a KV cache type (f16, f32, bf16 or fp8)")),
        }
    }
}

/// Describes how a set of exported KV blocks is laid out.
///
/// Each block is one contiguous region ordered `[layer][k|v][slot][kv_head][head_dim]`, holding
/// the KV heads of one tensor-parallel rank ([`crate::tp::kv_heads_of_rank`]). Keeping a whole block
/// contiguous lets a transport send it without gathering pieces from every layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub model_id: String,
    pub num_layers: usize,
    /// KV heads of the whole model (all ranks).
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
    pub block_size: usize,
    pub tp_rank: usize,
    pub tp_size: usize,
    /// Tokens whose keys and values the blocks hold; the last block may be partly filled.
    pub token_count: usize,
}

/// Why a KV layout cannot be imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kv layout mismatch: {field} is {got}, expected {expected}")]
pub struct LayoutMismatch {
    pub field: &'static str,
    pub got: String,
    pub expected: String,
}

impl KvLayout {
    /// The global KV heads this rank's blocks hold.
    pub fn head_range(&self) -> std::ops::Range<usize> {
        crate::tp::kv_heads_of_rank(self.kv_heads, self.tp_size, self.tp_rank)
    }

    /// KV heads held by this rank.
    pub fn heads_per_rank(&self) -> usize {
        self.head_range().len()
    }

    /// Bytes of one block for this rank.
    pub fn block_bytes(&self) -> usize {
        self.num_layers * 2 * self.block_size * self.heads_per_rank() * (self.head_dim * self.dtype.size() + self.dtype.scale_bytes())
    }

    /// Number of blocks needed for `token_count` tokens.
    pub fn num_blocks(&self) -> usize {
        self.token_count.div_ceil(self.block_size)
    }

    /// Checks that blocks described by `self` can be read by an engine whose own layout is
    /// `ours` (TP degree aside: re-sharding is the transport's business).
    pub fn check_compatible(&self, ours: &KvLayout) -> Result<(), LayoutMismatch> {
        fn cmp<T: PartialEq + std::fmt::Debug>(field: &'static str, got: &T, expected: &T) -> Result<(), LayoutMismatch> {
            if got == expected {
                Ok(())
            } else {
                Err(LayoutMismatch { field, got: format!("{got:?}"), expected: format!("{expected:?}") })
            }
        }
        cmp("model_id", &self.model_id, &ours.model_id)?;
        cmp("num_layers", &self.num_layers, &ours.num_layers)?;
        cmp("kv_heads", &self.kv_heads, &ours.kv_heads)?;
        cmp("head_dim", &self.head_dim, &ours.head_dim)?;
        cmp("dtype", &self.dtype, &ours.dtype)?;
        cmp("block_size", &self.block_size, &ours.block_size)
    }
}

/// Memory that arriving KV blocks are received into, chosen by the engine that will import them:
/// page-locked host memory a GPU copies from at the link's full speed, without the driver
/// staging every block through a bounce buffer on the engine's own thread.
pub trait BlockMemory: Send + Sync + std::fmt::Debug {
    /// A buffer of `len` bytes for one block, or `None` (none free, or another size: the
    /// receiver then uses the heap).
    fn buffer(&self, len: usize) -> Option<Box<dyn ReceiveBuffer>>;
}

/// One block's memory, written by a receiver and then frozen into the block's bytes.
pub trait ReceiveBuffer: Send {
    fn as_mut_slice(&mut self) -> &mut [u8];
    /// The written bytes; the memory returns to its owner when the last view of them drops.
    fn freeze(self: Box<Self>) -> Bytes;
}

/// A sequence's KV cache as bytes: what the prefill hands to the decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvExport {
    pub layout: KvLayout,
    /// The tokens whose keys and values the blocks hold (`layout.token_count` of them).
    pub tokens: Vec<u32>,
    /// One entry per block, each `layout.block_bytes()` long, little-endian. Reference-counted
    /// views, so that a transport can hand over blocks that still sit in its receive buffer, and
    /// a sender can keep them alive while the wire reads them, without copying.
    pub blocks: Vec<Bytes>,
    /// xxh3-64 of each block.
    pub checksums: Vec<u64>,
    /// Set when the blocks stayed in the exporting engine's device memory, for a receiver on
    /// the same host to copy from there: `blocks` and `checksums` are then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceBlocks>,
}

impl KvExport {
    pub fn checksum(bytes: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(bytes)
    }

    /// Computes the blocks' checksums, unless they are already there (an export read out of a
    /// cache leaves them to whoever sends it, off the engine's thread).
    pub fn seal(&mut self) {
        if self.checksums.len() != self.blocks.len() {
            self.checksums = self.blocks.iter().map(|b| Self::checksum(b)).collect();
        }
    }

    /// Index of the first block whose bytes do not match its checksum.
    pub fn first_corrupt_block(&self) -> Option<usize> {
        self.blocks.iter().zip(&self.checksums).position(|(b, c)| Self::checksum(b) != *c)
    }

    pub fn total_bytes(&self) -> usize {
        match &self.device {
            Some(d) => d.offsets.len() * self.layout.block_bytes(),
            None => self.blocks.iter().map(Bytes::len).sum(),
        }
    }

    /// How many blocks the export carries, wherever they are.
    pub fn block_count(&self) -> usize {
        match &self.device {
            Some(d) => d.offsets.len(),
            None => self.blocks.len(),
        }
    }
}

/// KV blocks left where the exporting engine computed them: a device memory pool that another
/// process of the same host maps through an inter-process handle and copies from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBlocks {
    /// The host the pool lives on ([`host_node_id`]): a handle means nothing anywhere else.
    pub node: String,
    /// The pool's inter-process handle, as the driver wrote it.
    pub handle: Vec<u8>,
    /// Byte offset of each block in the pool, in the sequence's order.
    pub offsets: Vec<u64>,
    /// [`device_checksum`] of each block, computed where the blocks lie.
    pub sums: Vec<u64>,
}

/// What lets an engine take [`DeviceBlocks`]: it maps other processes' pools of its host.
pub trait DevicePeer: Send + Sync + std::fmt::Debug {
    /// This host's [`host_node_id`].
    fn node(&self) -> &str;
    /// Maps the pool `blocks` lie in (once per pool; later calls find it mapped) and checks that
    /// every block of `block_bytes` bytes lies inside it, or says why not: then nothing has been
    /// copied, and the sender may use the host path.
    fn open(&self, blocks: &DeviceBlocks, block_bytes: usize) -> Result<(), String>;
}

impl DeviceBlocks {
    /// Checks that each block, `block_bytes` long at its offset, lies inside a pool of
    /// `pool_bytes` bytes and starts on a block boundary: offsets come from the network.
    pub fn check_within(&self, pool_bytes: u64, block_bytes: usize) -> Result<(), String> {
        let bb = block_bytes as u64;
        if bb == 0 {
            return Err("blocks of 0 bytes".into());
        }
        match self.offsets.iter().position(|&o| !o.is_multiple_of(bb) || o.checked_add(bb).is_none_or(|end| end > pool_bytes)) {
            Some(i) => Err(format!("block {i} at offset {} does not lie in a pool of {pool_bytes} bytes", self.offsets[i])),
            None => Ok(()),
        }
    }
}

/// Names this host for as long as it stays up: its kernel's boot id (containers of one host
/// share it), else its host name.
pub fn host_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

const SUM_STEP: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The checksum of a block that a GPU computes where the block lies (the kernel
/// `block_checksum` computes the same value): the little-endian 64-bit words `w[i]`, each mixed
/// with its position, summed, and the sum mixed with the word count. A sum can be taken in any
/// order, so thousands of threads take it at once; every term is a bijection of its word, so a
/// change to any one word always changes the sum, and a word moved to another position changes
/// its term. `bytes.len()` must be a multiple of 8.
pub fn device_checksum(bytes: &[u8]) -> u64 {
    debug_assert!(bytes.len().is_multiple_of(8));
    let mut sum = 0u64;
    for (i, w) in bytes.chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        sum = sum.wrapping_add(mix64(w ^ (i as u64).wrapping_mul(SUM_STEP)));
    }
    mix64(sum ^ (bytes.len() / 8) as u64)
}

#[cfg(test)]
mod device_sum_tests {
    use super::device_checksum;

    #[test]
    fn offsets_outside_the_pool_or_off_a_block_boundary_are_refused() {
        let d = |offsets: Vec<u64>| super::DeviceBlocks { node: String::new(), handle: Vec::new(), offsets, sums: Vec::new() };
        assert!(d(vec![0, 100, 900]).check_within(1000, 100).is_ok());
        assert!(d(vec![1000]).check_within(1000, 100).is_err(), "one past the end");
        assert!(d(vec![950]).check_within(1000, 50).is_ok());
        assert!(d(vec![50]).check_within(1000, 100).is_err(), "mid-block");
        assert!(d(vec![u64::MAX - 99]).check_within(u64::MAX, 100).is_err(), "wraps around");
        assert!(d(vec![0]).check_within(1000, 0).is_err());
    }

    #[test]
    fn any_changed_or_moved_word_changes_the_sum() {
        let block: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let sum = device_checksum(&block);
        assert_eq!(sum, device_checksum(&block.clone()));
        for at in [0, 7, 8, 2047, 4095] {
            let mut flipped = block.clone();
            flipped[at] ^= 1;
            assert_ne!(device_checksum(&flipped), sum, "bit flip at byte {at}");
        }
        let mut swapped = block.clone();
        swapped.copy_within(0..8, 4088);
        swapped[..8].copy_from_slice(&block[4088..]);
        assert_ne!(device_checksum(&swapped), sum, "two words exchanged");
        assert_ne!(device_checksum(&block[..4088]), sum, "a word missing");
        assert_ne!(device_checksum(&[0u8; 64]), device_checksum(&[0u8; 128]), "zero blocks of two sizes");
    }
}

#[cfg(test)]
mod fp8_layout_tests {
    use super::*;

    fn layout(dtype: KvDtype, tp_size: usize) -> KvLayout {
        KvLayout {
            model_id: "m".into(),
            num_layers: 3,
            kv_heads: 4,
            head_dim: 64,
            dtype,
            block_size: 16,
            tp_rank: 0,
            tp_size,
            token_count: 40,
        }
    }

    #[test]
    fn fp8_blocks_hold_bytes_and_one_scale_a_row() {
        let rows = 3 * 2 * 16;
        assert_eq!(layout(KvDtype::Bf16, 1).block_bytes(), rows * 4 * 64 * 2);
        assert_eq!(layout(KvDtype::Fp8E4m3, 1).block_bytes(), rows * 4 * (64 + 4));
        // A rank of two holds half the heads, scales included.
        assert_eq!(layout(KvDtype::Fp8E4m3, 2).block_bytes(), rows * 2 * (64 + 4));
        assert_eq!(KvDtype::Fp8E4m3.head_parts(64), vec![64, 4]);
        assert_eq!(KvDtype::F16.head_parts(64), vec![128]);
    }

    #[test]
    fn fp8_parses_and_travels_by_name() {
        for name in ["fp8", "FP8_E4M3", "e4m3"] {
            assert_eq!(name.parse::<KvDtype>(), Ok(KvDtype::Fp8E4m3));
        }
        assert_eq!(KvDtype::Fp8E4m3.as_str().parse::<KvDtype>(), Ok(KvDtype::Fp8E4m3));
        assert_eq!(serde_json::to_string(&KvDtype::Fp8E4m3).unwrap(), "\"fp8_e4m3\"");
        assert!("fp4".parse::<KvDtype>().unwrap_err().contains("fp8"));
        // A decode pool on a bf16 cache refuses FP8 blocks by name.
        let err = layout(KvDtype::Fp8E4m3, 1).check_compatible(&layout(KvDtype::Bf16, 1)).unwrap_err();
        assert_eq!(err.field, "dtype");
    }
}
