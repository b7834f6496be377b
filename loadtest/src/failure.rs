//! Why a request failed, in kinds an operator can act on.

use std::collections::BTreeMap;
use std::error::Error as _;

use serde::Serialize;

/// The kind of one failed request. A run never stops for a failed request; it counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// Nothing listens at the target's address.
    ConnectionRefused,
    /// Any other failure to connect or to send the request.
    Connection,
    /// 429 Too Many Requests or 503 Service Unavailable: the target sheds load.
    Overloaded,
    /// Any other 4xx: the request was refused as invalid.
    Http4xx,
    /// Any other non-success status.
    Http5xx,
    /// The stream ended or broke before `data: [DONE]`.
    StreamCut,
    /// The stream carried an error event.
    StreamError,
    /// The request outlived `--request-timeout`.
    Timeout,
    /// A success status with a body that is not a stream of completion chunks, or no tokens.
    InvalidResponse,
}

impl FailureKind {
    pub const ALL: [FailureKind; 9] = [
        FailureKind::ConnectionRefused,
        FailureKind::Connection,
        FailureKind::Overloaded,
        FailureKind::Http4xx,
        FailureKind::Http5xx,
        FailureKind::StreamCut,
        FailureKind::StreamError,
        FailureKind::Timeout,
        FailureKind::InvalidResponse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::ConnectionRefused => "connection_refused",
            FailureKind::Connection => "connection",
            FailureKind::Overloaded => "overloaded",
            FailureKind::Http4xx => "http_4xx",
            FailureKind::Http5xx => "http_5xx",
            FailureKind::StreamCut => "stream_cut",
            FailureKind::StreamError => "stream_error",
            FailureKind::Timeout => "timeout",
            FailureKind::InvalidResponse => "invalid_response",
        }
    }

    /// The kind for a non-success HTTP status.
    pub fn from_status(status: u16) -> Self {
        match status {
            429 | 503 => FailureKind::Overloaded,
            400..=499 => FailureKind::Http4xx,
            _ => FailureKind::Http5xx,
        }
    }

    /// The kind for a transport error; `streaming` says whether the response had started.
    pub fn from_reqwest(e: &reqwest::Error, streaming: bool) -> Self {
        if e.is_timeout() {
            return FailureKind::Timeout;
        }
        let mut source = e.source();
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::ConnectionRefused {
                    return FailureKind::ConnectionRefused;
                }
            }
            source = s.source();
        }
        if streaming || e.is_body() || e.is_decode() {
            FailureKind::StreamCut
        } else {
            FailureKind::Connection
        }
    }
}

impl Serialize for FailureKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed request: its kind and what was seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// Counts per kind, every kind present (zero when it did not happen) so result files have one
/// shape.
pub fn count_by_kind<'a>(failures: impl IntoIterator<Item = &'a Failure>) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = FailureKind::ALL.iter().map(|k| (k.as_str().to_string(), 0)).collect();
    for f in failures {
        *counts.entry(f.kind.as_str().to_string()).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        assert_eq!(FailureKind::from_status(429), FailureKind::Overloaded);
        assert_eq!(FailureKind::from_status(503), FailureKind::Overloaded);
        assert_eq!(FailureKind::from_status(404), FailureKind::Http4xx);
        assert_eq!(FailureKind::from_status(500), FailureKind::Http5xx);
    }

    #[test]
    fn counts_have_every_kind() {
        let f = [Failure::new(FailureKind::Timeout, "t"), Failure::new(FailureKind::Timeout, "t")];
        let counts = count_by_kind(&f);
        assert_eq!(counts.len(), FailureKind::ALL.len());
        assert_eq!(counts["timeout"], 2);
        assert_eq!(counts["stream_cut"], 0);
        let json = serde_json::to_string(&FailureKind::Http4xx).unwrap();
        assert_eq!(json, "\"http_4xx\"");
    }
}
