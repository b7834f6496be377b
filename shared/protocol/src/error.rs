//! One error code for the whole system, mapped both to an HTTP status (OpenAI's error shape) and
//! to a gRPC code, so a failure keeps its meaning across every hop and clients never see
//! internals.

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
    /// A deadline (such as the KV handoff lease) passed.
    Timeout,
    Cancelled,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest | Self::ContextLengthExceeded => 400,
            Self::ModelNotFound | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTooLarge => 413,
            Self::Cancelled => 499,
            Self::Unavailable => 503,
            Self::Timeout => 504,
            Self::Internal => 500,
        }
    }

    pub fn grpc(self) -> tonic::Code {
        match self {
            Self::InvalidRequest | Self::ContextLengthExceeded => tonic::Code::InvalidArgument,
            Self::ModelNotFound | Self::NotFound => tonic::Code::NotFound,
            Self::MethodNotAllowed => tonic::Code::Unimplemented,
            Self::RequestTooLarge => tonic::Code::OutOfRange,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Timeout => tonic::Code::DeadlineExceeded,
            Self::Cancelled => tonic::Code::Cancelled,
            Self::Internal => tonic::Code::Internal,
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

    /// OpenAI's `error.type`.
    pub fn openai_type(self) -> &'static str {
        match self {
            Self::InvalidRequest
            | Self::ContextLengthExceeded
            | Self::ModelNotFound
            | Self::NotFound
            | Self::MethodNotAllowed
            | Self::RequestTooLarge => "invalid_request_error",
            Self::Unavailable => "service_unavailable_error",
            Self::Timeout => "timeout_error",
            Self::Cancelled => "cancelled",
            Self::Internal => "server_error",
        }
    }
}

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

    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code.grpc(), self.message.clone())
    }

    pub fn from_status(s: &tonic::Status) -> Self {
        Self::new(ErrorCode::from_grpc(s.code()), s.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_survives_a_grpc_hop() {
        for code in [ErrorCode::InvalidRequest, ErrorCode::Unavailable, ErrorCode::Timeout, ErrorCode::Internal] {
            let e = ApiError::new(code, "x");
            assert_eq!(ApiError::from_status(&e.to_status()).code, code);
        }
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
