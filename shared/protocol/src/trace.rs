//! The request id on gRPC calls: how it is read from metadata. The trace context beside it
//! (`traceparent`) is written and read by the OpenTelemetry W3C propagator (the runtime crate's
//! `telemetry` module), so one mechanism places every hop in its trace.

use tonic::metadata::MetadataMap;

/// Header (and gRPC metadata key) carrying the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The request id a gRPC call carries, if any.
pub fn request_id(md: &MetadataMap) -> Option<&str> {
    md.get(crate::REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty())
}

/// A metadata value as text, for the trace propagator.
pub fn metadata_str<'a>(md: &'a MetadataMap, key: &str) -> Option<&'a str> {
    md.get(key).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_id_travels_in_grpc_metadata() {
        let mut r = tonic::Request::new(());
        r.metadata_mut().insert(crate::REQUEST_ID_HEADER, "cmpl-1-0".parse().unwrap());
        assert_eq!(request_id(r.metadata()), Some("cmpl-1-0"));
        let bare = tonic::Request::new(());
        assert_eq!(request_id(bare.metadata()), None);
        assert_eq!(metadata_str(bare.metadata(), TRACEPARENT_HEADER), None);
    }
}
