//! Declarative types every Tandem service agrees on: the generated gRPC contract, OpenAI request
//! and response types, error codes, sampling parameters, trace context, the KV layout descriptor
//! and the chained block hash that names a KV block across the cluster.
#![forbid(unsafe_code)]

mod blocks;
pub mod constraint;
mod convert;
mod error;
mod kv;
pub mod openai;
mod sampling;
pub mod tp;
pub mod trace;

pub use blocks::{block_hashes, chain_hash, BlockHash, ROOT_HASH};
pub use constraint::Constraint;
pub use error::{ApiError, ErrorCode, ERROR_CODE_KEY};
pub use kv::{
    device_checksum, host_node_id, BlockMemory, Bytes, DeviceBlocks, DevicePeer, KvDtype, KvExport, KvLayout, LayoutMismatch, ReceiveBuffer,
};
pub use sampling::{FinishReason, SamplingParams, SamplingParamsError, MAX_TOP_LOGPROBS};
pub use trace::TRACEPARENT_HEADER;

/// Code generated from `proto/tandem/v1/tandem.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("tandem.v1");
}

/// gRPC metadata key carrying the request id across every hop.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
