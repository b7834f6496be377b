//! `ApiError` as an HTTP response in OpenAI's shape.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tandem_protocol::{ApiError, ErrorCode};

pub(crate) struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(self.0.body())).into_response();
        if self.0.code == ErrorCode::Unavailable {
            resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Turns a JSON decoding failure into a 400 that names the offending field where it can.
pub(crate) fn json_error(e: serde_json::Error) -> ApiError {
    let msg = e.to_string();
    let param = msg
        .split('`')
        .nth(1)
        .filter(|_| msg.starts_with("missing field") || msg.starts_with("unknown field"))
        .map(str::to_string);
    let message = if e.is_syntax() || e.is_eof() { format!("invalid JSON body: {msg}") } else { format!("invalid request: {msg}") };
    ApiError { code: ErrorCode::InvalidRequest, message, param }
}
