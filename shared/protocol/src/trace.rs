//! W3C trace context (`traceparent`, <https://www.w3.org/TR/trace-context/>) and the request id:
//! how both are read from and written to HTTP headers and gRPC metadata.
//!
//! The gateway keeps the trace id a client sends (or starts a trace), opens its own span under
//! it, and passes `traceparent` and `x-request-id` to every prefill and decode call; the workers
//! put both on the tracing span of that request, so one trace id finds a request's log lines in
//! every process it went through.

use std::fmt;

use tonic::metadata::{MetadataMap, MetadataValue};

use crate::REQUEST_ID_HEADER;

/// Header (and gRPC metadata key) carrying the trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// One position in a trace: the trace, the span of the caller, and the trace flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: u128,
    /// 8 bytes, never all zero: the span of whoever sends this context.
    pub span_id: u64,
    pub flags: u8,
}

fn nonzero<T: PartialEq + Default>(mut f: impl FnMut() -> T) -> T {
    loop {
        let v = f();
        if v != T::default() {
            return v;
        }
    }
}

fn hex_field(s: &str, len: usize) -> Option<&str> {
    (s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(s)
}

impl TraceContext {
    /// The `sampled` trace flag.
    pub const SAMPLED: u8 = 0x01;

    /// A new trace: random trace and span ids, sampled.
    pub fn new_root() -> Self {
        Self { trace_id: nonzero(rand::random::<u128>), span_id: nonzero(rand::random::<u64>), flags: Self::SAMPLED }
    }

    /// A new span in the same trace, with the same flags.
    pub fn child(&self) -> Self {
        Self { span_id: nonzero(rand::random::<u64>), ..*self }
    }

    /// Parses a `traceparent` header. `None` for anything malformed, as the spec asks (the
    /// receiver then starts a new trace): wrong lengths, upper-case or non-hex digits, version
    /// `ff`, all-zero ids, or a version-00 header with extra fields. A later version is read by
    /// its first four fields.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let mut parts = header.split('-');
        let version = hex_field(parts.next()?, 2)?;
        let trace_id = u128::from_str_radix(hex_field(parts.next()?, 32)?, 16).ok()?;
        let span_id = u64::from_str_radix(hex_field(parts.next()?, 16)?, 16).ok()?;
        let flags = u8::from_str_radix(hex_field(parts.next()?, 2)?, 16).ok()?;
        let extra = parts.next().is_some();
        if version == "ff" || (version == "00" && extra) || trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self { trace_id, span_id, flags })
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 lower-case hex digits.
    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The context a gRPC call carries, if it carries a valid one.
    pub fn from_metadata(md: &MetadataMap) -> Option<Self> {
        md.get(TRACEPARENT_HEADER).and_then(|v| v.to_str().ok()).and_then(Self::parse)
    }
}

/// `traceparent` as sent: version 00.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

/// Wraps `msg` for a gRPC call that belongs to request `request_id` in trace position `trace`.
pub fn request<T>(msg: T, request_id: &str, trace: &TraceContext) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let md = r.metadata_mut();
    if let Ok(v) = MetadataValue::try_from(request_id) {
        md.insert(REQUEST_ID_HEADER, v);
    }
    if let Ok(v) = MetadataValue::try_from(trace.to_string()) {
        md.insert(TRACEPARENT_HEADER, v);
    }
    r
}

/// The request id a gRPC call carries, if any.
pub fn request_id(md: &MetadataMap) -> Option<&str> {
    md.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_a_valid_header() {
        let t = TraceContext::parse(VALID).unwrap();
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.span_id, 0x00f067aa0ba902b7);
        assert_eq!(t.flags, 1);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(t.to_string(), VALID);
        // Unsampled, and surrounding whitespace.
        let u = TraceContext::parse(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ").unwrap();
        assert_eq!(u.flags, 0);
    }

    #[test]
    fn a_later_version_is_read_by_its_first_four_fields() {
        let t = TraceContext::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-comes-next").unwrap();
        assert_eq!((t.trace_id_hex().as_str(), t.flags), ("4bf92f3577b34da6a3ce929d0e0e4736", 9));
        // Written back as the version this side speaks.
        assert!(t.to_string().starts_with("00-"));
    }

    #[test]
    fn rejects_malformed_headers() {
        for bad in [
            "",
            "00",
            "garbage",
            // Upper-case hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // All-zero trace id, all-zero span id.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff is forbidden; version 00 has exactly four fields.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Wrong lengths.
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // Not hex; a sign that from_str_radix alone would take.
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn new_traces_and_child_spans() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(a.flags, TraceContext::SAMPLED);
        let s = a.to_string();
        assert_eq!(s.len(), 55);
        assert_eq!(TraceContext::parse(&s), Some(a), "{s}");
        let c = a.child();
        assert_eq!((c.trace_id, c.flags), (a.trace_id, a.flags));
        assert_ne!(c.span_id, a.span_id);
    }

    #[test]
    fn travels_in_grpc_metadata() {
        let t = TraceContext::parse(VALID).unwrap();
        let r = request((), "cmpl-1-0", &t);
        assert_eq!(request_id(r.metadata()), Some("cmpl-1-0"));
        assert_eq!(TraceContext::from_metadata(r.metadata()), Some(t));
        let bare = tonic::Request::new(());
        assert_eq!((request_id(bare.metadata()), TraceContext::from_metadata(bare.metadata())), (None, None));
    }
}
