//! Choosing a transport per transfer. A receiver advertises every transport it serves as one
//! address list, `scheme://addr` entries separated by commas (a bare `host:port` means TCP):
//!
//! ```text
//! ucx://10.0.0.7:7101,quic://10.0.0.7:7102#sha256=4f…,tcp://10.0.0.7:7100
//! ```
//!
//! The sender walks its own preference order and uses the first transport the receiver offers.
//! If that one cannot even connect, nothing was handed over yet, so the next common transport is
//! tried within what is left of the lease; any later failure is final.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Handoff, KvTransport, TransferError, TransferReport};

/// One advertised entry: its scheme and the address as that transport reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    pub scheme: String,
    pub addr: String,
}

/// Parses an advertised address list.
pub fn parse_peer(list: &str) -> Vec<PeerAddr> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once("://") {
            Some((scheme, rest)) => PeerAddr { scheme: scheme.to_ascii_lowercase(), addr: rest.to_string() },
            None => PeerAddr { scheme: "tcp".into(), addr: e.to_string() },
        })
        .collect()
}

/// Joins advertised entries into the list form.
pub fn format_peer(entries: &[PeerAddr]) -> String {
    entries.iter().map(|e| format!("{}://{}", e.scheme, e.addr)).collect::<Vec<_>>().join(",")
}

/// Transports in preference order, used as one.
#[derive(Clone)]
pub struct TransportSet {
    transports: Vec<Arc<dyn KvTransport>>,
}

impl std::fmt::Debug for TransportSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.transports.iter().map(|t| t.name())).finish()
    }
}

impl TransportSet {
    pub fn new(transports: Vec<Arc<dyn KvTransport>>) -> Self {
        Self { transports }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.transports.iter().map(|t| t.name()).collect()
    }
}

#[async_trait::async_trait]
impl KvTransport for TransportSet {
    fn name(&self) -> &'static str {
        "auto"
    }

    async fn send(&self, peer: &str, handoff: &Handoff, lease: Duration) -> Result<TransferReport, TransferError> {
        let offered = parse_peer(peer);
        let deadline = Instant::now() + lease;
        let mut last = None;
        for t in &self.transports {
            if t.carries_device() != handoff.kv.device.is_some() {
                continue;
            }
            let Some(entry) = offered.iter().find(|e| e.scheme == t.name()) else { continue };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransferError::LeaseExpired(lease));
            }
            match t.send(&entry.addr, handoff, left).await {
                Err(e @ TransferError::Connect { .. }) => {
                    tracing::warn!(transport = t.name(), peer = %entry.addr, error = %e, "transport unavailable; trying the next one");
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| TransferError::Connect {
            peer: peer.to_string(),
            reason: format!(
                "no common transport for {} blocks (we speak {:?})",
                if handoff.kv.device.is_some() { "device" } else { "host" },
                self.names()
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lists_parse_and_format() {
        let p = parse_peer("ucx://10.0.0.1:1, quic://10.0.0.1:2#sha256=ab ,10.0.0.1:3");
        assert_eq!(
            p,
            vec![
                PeerAddr { scheme: "ucx".into(), addr: "10.0.0.1:1".into() },
                PeerAddr { scheme: "quic".into(), addr: "10.0.0.1:2#sha256=ab".into() },
                PeerAddr { scheme: "tcp".into(), addr: "10.0.0.1:3".into() },
            ]
        );
        assert_eq!(parse_peer(&format_peer(&p)), p);
    }
}
