//! `ApiError` as an HTTP response in OpenAI's shape, and request bodies read into typed requests
//! with errors that name the offending field.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_path_to_error::Segment;
use tandem_protocol::openai::SamplingFields;
use tandem_protocol::{ApiError, ErrorCode};

/// Largest request body the gateway reads; bigger ones get a 413.
pub(crate) const MAX_BODY_BYTES: usize = 8 << 20;

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
        // Every 503 means "come back shortly": no worker now, a full or draining one, or a
        // handoff that failed on its way.
        if self.0.code.http_status() == 503 {
            resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

pub(crate) fn too_large() -> ApiError {
    ApiError::new(ErrorCode::RequestTooLarge, format!("the request body is larger than {} MiB", MAX_BODY_BYTES >> 20))
}

/// Reads a JSON request body as `T`. Every failure is a 400 (413 for an oversized body); a
/// missing field or a value of the wrong type is named in `param`, at any depth
/// (`max_tokens`, `messages[0].content`).
pub(crate) fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::new(ErrorCode::InvalidRequest, format!("could not read the request body: {e}"))
        }
    })?;
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "the request body must be a JSON object"));
    }
    serde_path_to_error::deserialize::<_, T>(&value).map_err(|e| field_error(e, &value))
}

/// A path as the client spells it: `messages[0].content`. `None` for the top level, or where a
/// step is unknown.
fn param_of(path: &serde_path_to_error::Path) -> Option<String> {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => return None,
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The field a serde message names in backticks (`missing field `model``).
fn named_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `").and_then(|rest| rest.split('`').next())
}

fn field_error(e: serde_path_to_error::Error<serde_json::Error>, value: &Value) -> ApiError {
    let msg = e.inner().to_string();
    let mut at = param_of(e.path());
    // (Not for a missing field: no sampling field is required, so the block's own errors would
    // name another field, `ignore_eos.model` for a missing `model` beside a bad `ignore_eos`.)
    if at.is_none() && named_field(&msg).is_none() {
        // The sampling fields are flattened into both request types, and serde reads flattened
        // fields from a buffer that hides where they failed: read that block alone to find out.
        if let Err(e) = serde_path_to_error::deserialize::<_, SamplingFields>(value) {
            at = param_of(e.path());
        }
    }
    let param = match (at, named_field(&msg)) {
        (Some(at), Some(field)) => Some(format!("{at}.{field}")),
        (None, Some(field)) => Some(field.to_string()),
        (at, None) => at,
    };
    let message = match &param {
        Some(p) => format!("invalid request: `{p}`: {msg}"),
        None => format!("invalid request: {msg}"),
    };
    ApiError { code: ErrorCode::InvalidRequest, message, param }
}

/// Bad request bodies through the whole router: property tests.
#[cfg(test)]
mod robustness;

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_protocol::openai::{ChatCompletionRequest, CompletionRequest};

    fn chat(body: &str) -> Result<ChatCompletionRequest, ApiError> {
        parse_body(Ok(Bytes::from(body.to_string())))
    }

    fn param(r: Result<impl Sized, ApiError>) -> Option<String> {
        let e = r.err().expect("an error");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        e.param
    }

    const MSGS: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

    #[test]
    fn names_the_field_of_a_type_error() {
        let e = chat(&format!(r#"{{"model":"m",{MSGS},"max_tokens":"ten"}}"#)).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("expected u32"), "{}", e.message);
        // A flattened sampling field, and one at depth.
        assert_eq!(param(chat(&format!(r#"{{"model":"m",{MSGS},"temperature":"hot"}}"#))).as_deref(), Some("temperature"));
        assert_eq!(
            param(chat(&format!(r#"{{"model":"m",{MSGS},"stream_options":{{"include_usage":1}}}}"#))).as_deref(),
            Some("stream_options.include_usage")
        );
        assert_eq!(param(chat(r#"{"model":"m","messages":[{"role":"user","content":7}]}"#)).as_deref(), Some("messages[0].content"));
        assert_eq!(param(chat(r#"{"model":"m","messages":"hi"}"#)).as_deref(), Some("messages"));
        let c: Result<CompletionRequest, _> = parse_body(Ok(Bytes::from_static(br#"{"model":"m","prompt":"x","stop_token_ids":[-1]}"#)));
        assert_eq!(param(c).as_deref(), Some("stop_token_ids[0]"));
    }

    #[test]
    fn names_a_missing_field() {
        assert_eq!(param(chat(&format!("{{{MSGS}}}"))).as_deref(), Some("model"));
        assert_eq!(param(chat(r#"{"model":"m","messages":[{"content":"hi"}]}"#)).as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn bad_json_and_non_objects_are_400s_without_a_param() {
        for body in ["{not json", "", "[1, 2]", "\"text\""] {
            let e = chat(body).err().unwrap();
            assert_eq!((e.code, e.param), (ErrorCode::InvalidRequest, None), "{body:?}");
        }
        assert!(chat("{not json").err().unwrap().message.contains("invalid JSON"));
        assert!(chat(&format!(r#"{{"model":"m",{MSGS}}}"#)).is_ok());
    }
}
