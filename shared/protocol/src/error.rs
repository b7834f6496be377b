//! One error code for the whole system, mapped both to an HTTP status (OpenAI's error shape) and
//! to a gRPC code, so a failure keeps its meaning across every hop and clients never see
//! internals. The component nearest the cause picks the code; a gRPC status carries it in its
//! metadata (`tandem-error`), so no decision anywhere depends on an error's text.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed or out-of-range input.
    InvalidRequest,
    ModelNotFound,
    /// No such route.
    NotFound,
    /// The route exists, the method does not.
    MethodNotAllowed,
    /// The request body is over the size limit.
    RequestTooLarge,
    /// Prompt plus requested tokens exceed the model's context.
    ContextLengthExceeded,
    /// No worker can take the request now; retry later.
    Unavailable,
    /// The worker has no KV cache blocks left for the request (another worker may).
    OutOfKvBlocks,
    /// The worker's queue is at its bound (requests or prompt tokens); another worker may have
    /// room.
    Overloaded,
    /// The KV handoff from prefill to decode failed or outlived its lease.
    KvHandoffFailed,
    /// The worker is draining before it stops and takes no new requests.
    WorkerDraining,
    /// A deadline (such as the KV handoff lease) passed.
    Timeout,
    Cancelled,
    Internal,
    /// No API key, or not one the gateway accepts.
    InvalidApiKey,
    /// The caller is over its request or token rate; retry after the time the response names.
    #[serde(rename = "rate_limit_exceeded")]
    RateLimited,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest | Self::ContextLengthExceeded => 400,
            Self::ModelNotFound | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTooLarge => 413,
            Self::Cancelled => 499,
            Self::Unavailable | Self::OutOfKvBlocks | Self::Overloaded | Self::KvHandoffFailed | Self::WorkerDraining => 503,
            Self::Timeout => 504,
            Self::Internal => 500,
            Self::InvalidApiKey => 401,
            Self::RateLimited => 429,
        }
    }

    pub fn grpc(self) -> tonic::Code {
        match self {
            Self::InvalidRequest | Self::ContextLengthExceeded => tonic::Code::InvalidArgument,
            Self::ModelNotFound | Self::NotFound => tonic::Code::NotFound,
            Self::MethodNotAllowed => tonic::Code::Unimplemented,
            Self::RequestTooLarge => tonic::Code::OutOfRange,
            Self::Unavailable | Self::KvHandoffFailed | Self::WorkerDraining => tonic::Code::Unavailable,
            Self::OutOfKvBlocks | Self::Overloaded => tonic::Code::ResourceExhausted,
            Self::Timeout => tonic::Code::DeadlineExceeded,
            Self::Cancelled => tonic::Code::Cancelled,
            Self::Internal => tonic::Code::Internal,
            Self::InvalidApiKey => tonic::Code::Unauthenticated,
            Self::RateLimited => tonic::Code::ResourceExhausted,
        }
    }

    pub fn from_grpc(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Self::InvalidRequest,
            tonic::Code::NotFound => Self::ModelNotFound,
            tonic::Code::Unavailable | tonic::Code::ResourceExhausted => Self::Unavailable,
            tonic::Code::DeadlineExceeded => Self::Timeout,
            tonic::Code::Cancelled => Self::Cancelled,
            _ => Self::Internal,
        }
    }

    /// Whether the same request may go to another worker of the same role: this one is gone,
    /// leaving, or full. Not after a failed handoff: the decode side it was meant for has given
    /// the request up with it.
    pub fn retryable(self) -> bool {
        matches!(self, Self::Unavailable | Self::OutOfKvBlocks | Self::Overloaded | Self::WorkerDraining)
    }

    /// Whether the worker that answered with this code should leave routing until it is seen
    /// healthy again (it is unreachable or leaving; a full worker is merely busy).
    pub fn worker_down(self) -> bool {
        matches!(self, Self::Unavailable | Self::WorkerDraining)
    }

    /// The code's name (as in OpenAI's `error.code` and the `tandem-error` metadata).
    pub fn name(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::ModelNotFound => "model_not_found",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTooLarge => "request_too_large",
            Self::ContextLengthExceeded => "context_length_exceeded",
            Self::Unavailable => "unavailable",
            Self::OutOfKvBlocks => "out_of_kv_blocks",
            Self::Overloaded => "overloaded",
            Self::KvHandoffFailed => "kv_handoff_failed",
            Self::WorkerDraining => "worker_draining",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Internal => "internal",
            Self::InvalidApiKey => "invalid_api_key",
            Self::RateLimited => "rate_limit_exceeded",
        }
    }

    pub const ALL: [ErrorCode; 16] = [
        Self::InvalidRequest,
        Self::ModelNotFound,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::RequestTooLarge,
        Self::ContextLengthExceeded,
        Self::Unavailable,
        Self::OutOfKvBlocks,
        Self::Overloaded,
        Self::KvHandoffFailed,
        Self::WorkerDraining,
        Self::Timeout,
        Self::Cancelled,
        Self::Internal,
        Self::InvalidApiKey,
        Self::RateLimited,
    ];

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// OpenAI's `error.type`.
    pub fn openai_type(self) -> &'static str {
        match self {
            Self::InvalidRequest
            | Self::ContextLengthExceeded
            | Self::ModelNotFound
            | Self::NotFound
            | Self::MethodNotAllowed
            | Self::RequestTooLarge
            | Self::InvalidApiKey => "invalid_request_error",
            Self::RateLimited => "rate_limit_error",
            Self::Unavailable | Self::OutOfKvBlocks | Self::Overloaded | Self::KvHandoffFailed | Self::WorkerDraining => {
                "service_unavailable_error"
            }
            Self::Timeout => "timeout_error",
            Self::Cancelled => "cancelled",
            Self::Internal => "server_error",
        }
    }
}

/// The gRPC metadata key that carries an [`ErrorCode`]'s name.
pub const ERROR_CODE_KEY: &str = "tandem-error";

/// An error as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), param: None }
    }

    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: ErrorCode::InvalidRequest, message: message.into(), param: Some(param.into()) }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.code.openai_type(),
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// The error as a gRPC status: the closest gRPC code, and the exact code in the
    /// `tandem-error` metadata.
    pub fn to_status(&self) -> tonic::Status {
        let mut status = tonic::Status::new(self.code.grpc(), self.message.clone());
        status.metadata_mut().insert(ERROR_CODE_KEY, tonic::metadata::MetadataValue::from_static(self.code.name()));
        status
    }

    /// The error a gRPC status carries: its `tandem-error` code, else one read from the gRPC
    /// code (a status from outside Tandem, or from the transport itself).
    pub fn from_status(s: &tonic::Status) -> Self {
        let named = s.metadata().get(ERROR_CODE_KEY).and_then(|v| v.to_str().ok()).and_then(ErrorCode::from_name);
        Self::new(named.unwrap_or_else(|| ErrorCode::from_grpc(s.code())), s.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_survives_a_grpc_hop() {
        for code in ErrorCode::ALL {
            let e = ApiError::new(code, "x");
            assert_eq!(ApiError::from_status(&e.to_status()).code, code);
            assert_eq!(serde_json::to_value(code).unwrap(), code.name(), "one name per code");
        }
        // A status without the metadata (from outside Tandem) is read from its gRPC code.
        assert_eq!(ApiError::from_status(&tonic::Status::unavailable("gone")).code, ErrorCode::Unavailable);
        assert_eq!(ApiError::from_status(&tonic::Status::internal("boom")).code, ErrorCode::Internal);
        let body = ApiError::invalid("temperature", "too hot").body();
        assert_eq!(body["error"]["param"], "temperature");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_request");
    }

    #[test]
    fn http_only_codes_have_their_status_and_name() {
        for (code, status, name) in [
            (ErrorCode::NotFound, 404, "not_found"),
            (ErrorCode::MethodNotAllowed, 405, "method_not_allowed"),
            (ErrorCode::RequestTooLarge, 413, "request_too_large"),
            (ErrorCode::ModelNotFound, 404, "model_not_found"),
        ] {
            let body = ApiError::new(code, "x").body();
            assert_eq!((code.http_status(), body["error"]["code"].as_str()), (status, Some(name)));
            assert_eq!(body["error"]["type"], "invalid_request_error");
        }
    }
}
