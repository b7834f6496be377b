//! Declarative types every Tandem service agrees on: sampling parameters, the KV layout
//! descriptor and the chained block hash that names a KV block across the cluster.
#![forbid(unsafe_code)]

mod blocks;
mod kv;
mod sampling;

pub use blocks::{block_hashes, chain_hash, BlockHash, ROOT_HASH};
pub use kv::{KvDtype, KvLayout, LayoutMismatch};
pub use sampling::{FinishReason, SamplingParams, SamplingParamsError};
