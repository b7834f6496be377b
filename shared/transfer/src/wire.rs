//! What every transport carries around the block payload: the header (request, layout, tokens,
//! checksums), its checks before any payload is accepted, the receiver's verdict, and the
//! hand-over to the waiting request.

use serde::{Deserialize, Serialize};
use tandem_protocol::{Bytes, DeviceBlocks, ErrorCode, KvExport, KvLayout};
use tokio::sync::oneshot;

use crate::{Handoff, HandoffRegistry, Incoming, TransferError};

pub(crate) const MAX_HEADER: usize = 64 << 20;
pub(crate) const MAX_PAYLOAD: usize = 8 << 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Header {
    pub request_id: String,
    pub first_token: u32,
    pub layout: KvLayout,
    pub tokens: Vec<u32>,
    pub checksums: Vec<u64>,
    /// Blocks left in the sender's device memory (the `cudaipc` transport): no payload follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceBlocks>,
}

impl Header {
    pub fn of(h: &Handoff) -> Self {
        Self {
            request_id: h.request_id.clone(),
            first_token: h.first_token,
            layout: h.kv.layout.clone(),
            tokens: h.kv.tokens.clone(),
            checksums: h.kv.checksums.clone(),
            device: h.kv.device.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Verdict {
    pub ok: bool,
    pub error: Option<String>,
    /// The refusal's [`ErrorCode`] name (absent from senders that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl Verdict {
    pub fn of(outcome: &Result<(), TransferError>) -> Self {
        match outcome {
            Ok(()) => Verdict { ok: true, error: None, code: None },
            Err(TransferError::Refused { code, message }) => {
                Verdict { ok: false, error: Some(message.clone()), code: Some(code.name().to_string()) }
            }
            Err(e) => Verdict { ok: false, error: Some(e.to_string()), code: None },
        }
    }

    pub fn into_result(self) -> Result<(), TransferError> {
        if self.ok {
            Ok(())
        } else {
            let code = self.code.as_deref().and_then(ErrorCode::from_name).unwrap_or(ErrorCode::KvHandoffFailed);
            Err(TransferError::Refused { code, message: self.error.unwrap_or_default() })
        }
    }
}

/// Checks a header before any payload is read; returns the block count and bytes per block.
/// `device` says whether the transport carries device handoffs (and nothing else) or payloads.
pub(crate) fn check_header(h: &Header, device: bool) -> Result<(usize, usize), TransferError> {
    if h.device.is_some() != device {
        let what = if device { "a payload" } else { "device blocks" };
        return Err(TransferError::Protocol(format!("this transport does not carry {what}")));
    }
    let l = &h.layout;
    if l.block_size == 0 || l.tp_size == 0 {
        return Err(TransferError::Protocol("block size and TP size must be positive".into()));
    }
    if l.tp_rank >= l.tp_size {
        return Err(TransferError::Protocol(format!("rank {} of a TP group of {}", l.tp_rank, l.tp_size)));
    }
    let n = l.num_blocks();
    let block = [l.num_layers, 2, l.block_size, l.heads_per_rank()]
        .into_iter()
        .try_fold(1usize, |a, b| a.checked_mul(b))
        .and_then(|rows| rows.checked_mul(l.head_dim.checked_mul(l.dtype.size())?.checked_add(l.dtype.scale_bytes())?))
        // Device handoffs carry no payload: their bytes never cross the connection.
        .filter(|b| n.checked_mul(*b).is_some_and(|total| device || total <= MAX_PAYLOAD));
    let Some(block) = block else {
        return Err(TransferError::Protocol(format!("a payload of {n} blocks is over the {MAX_PAYLOAD}-byte limit")));
    };
    let sums = match &h.device {
        Some(d) if !h.checksums.is_empty() || d.offsets.len() != d.sums.len() => usize::MAX,
        Some(d) => d.sums.len(),
        None => h.checksums.len(),
    };
    if sums != n || h.tokens.len() != l.token_count {
        return Err(TransferError::Protocol(format!(
            "inconsistent header: {n} blocks, {} checksums, {} tokens",
            if sums == usize::MAX { "mismatched".to_string() } else { sums.to_string() },
            h.tokens.len()
        )));
    }
    Ok((n, block))
}

/// Verifies the checksums, hands the blocks to the request waiting for them and waits for its
/// verdict (imported, or refused).
pub(crate) async fn deliver(registry: &HandoffRegistry, h: Header, blocks: Vec<Bytes>) -> Result<(), TransferError> {
    let kv = KvExport { layout: h.layout, tokens: h.tokens, blocks, checksums: h.checksums, device: h.device };
    if let Some(bad) = kv.first_corrupt_block() {
        return Err(refused(ErrorCode::KvHandoffFailed, format!("block {bad} fails its checksum")));
    }
    let (tx, rx) = oneshot::channel();
    registry.deliver(Incoming { handoff: Handoff { request_id: h.request_id, first_token: h.first_token, kv }, verdict: tx });
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(TransferError::Refused { code: e.code, message: e.message }),
        Err(_) => Err(refused(ErrorCode::Internal, "receiver dropped the blocks")),
    }
}

pub(crate) fn refused(code: ErrorCode, message: impl Into<String>) -> TransferError {
    TransferError::Refused { code, message: message.into() }
}
