//! The paged KV cache: fixed-size blocks, a ref-counted allocator with prefix sharing and LRU
//! eviction, and the storage the attention kernels read.

mod cache;
mod pool;
mod seqs;

pub(crate) use cache::KvCache;
pub use pool::{BlockId, BlockPool, PoolStats};
pub use seqs::{SeqState, SeqTable};
