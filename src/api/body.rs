//! Request bodies, before any handler: a JSON route gets JSON (415 for another declared
//! type), the whole body must arrive within `--body-read-timeout` (408: a client trickling
//! its body cannot hold a task and a connection for ever), and never more than
//! `--max-body-bytes` (413). Handlers then read the buffered bytes at once. The exceptions,
//! for a caller the gateway lets in: `/v1/files`, a multipart upload of up to 200 MiB in up
//! to 10 minutes, and `/v1/messages/batches`, a JSON body of up to 32 MiB. Then the JSON
//! read out of them: an object, its fields typed with errors that name the field.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use serde_json::Value;

use super::error::ApiError;
use super::AppState;

/// What a body must satisfy.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub read_timeout: Duration,
}

/// `application/json`, `application/*+json` (parameters such as `charset` allowed), or no
/// declared type at all (many clients send JSON without one).
pub fn is_json_type(value: Option<&str>) -> bool {
    let Some(v) = value else { return true };
    let essence = v
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The least time a `/v1/files` upload gets to arrive (200 MiB at 350 KB/s).
pub(super) const UPLOAD_READ_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn guard(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let mut limits = state.body_limits;
    let declared = req.headers().get(header::CONTENT_TYPE);
    let declared = match declared.map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => Some("(not text)"),
    };
    // `/v1/files` takes a multipart upload of up to a batch file's size, and more time, from
    // a caller the gateway lets in (anyone else gets the usual limits, then its 401).
    // A message batch (Anthropic's) is a JSON body of up to 32 MiB, on the same terms.
    let files = req.uri().path() == "/v1/files";
    let message_batch = req.uri().path() == "/v1/messages/batches";
    let admitted = (files || message_batch)
        && state
            .gateway
            .authenticate(super::gate::presented_key(req.headers()).as_deref())
            .is_ok();
    let multipart = declared.is_some_and(|v| {
        v.trim_start()
            .to_ascii_lowercase()
            .starts_with("multipart/form-data")
    });
    // Only a multipart upload: any other body there is refused by the route anyway, and
    // must not be buffered up to a batch file's size first.
    let upload = files && admitted && multipart;
    if upload {
        limits = BodyLimits {
            max_bytes: super::batches::MAX_UPLOAD_BYTES,
            read_timeout: limits.read_timeout.max(UPLOAD_READ_TIMEOUT),
        };
    } else if message_batch && admitted {
        limits.max_bytes = limits
            .max_bytes
            .max(super::anthropic_batches::MAX_CREATE_BYTES);
    }
    if !(is_json_type(declared) || (files && multipart)) {
        return ApiError::unsupported_media_type(declared.unwrap_or_default()).into_response();
    }
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limits.max_bytes as u64) {
        return ApiError::payload_too_large(limits.max_bytes).into_response();
    }
    if upload {
        // Not buffered here (it would be held twice more): `batches::upload` reads it
        // within the same limits.
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, limits.max_bytes);
    let bytes = match tokio::time::timeout(limits.read_timeout, read).await {
        Err(_) => return ApiError::body_timeout(limits.read_timeout).into_response(),
        Ok(Err(e)) => {
            let too_long = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            return if too_long {
                ApiError::payload_too_large(limits.max_bytes)
            } else {
                ApiError::bad_request(format!("Cannot read the request body: {e}"))
            }
            .into_response();
        }
        Ok(Ok(b)) => b,
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A request body's top-level `null`s dropped: OpenAI's optional fields take `null` as not
/// given (`"stream": null`, `"logprobs": null`), and so does every field of ours.
pub fn without_nulls(mut body: Value) -> Value {
    if let Some(o) = body.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    body
}

/// Parses a request body as a JSON object.
pub fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::bad_request("The request body is not valid UTF-8"));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object",
        ));
    }
    Ok(v)
}

/// Reads typed fields out of a parsed body, naming the field whose type is wrong.
pub fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            // A missing required field: serde names it in the message.
            let msg = inner.to_string();
            let field = msg.split('`').nth(1).unwrap_or("").to_string();
            ApiError::invalid(field, format!("Invalid request: {msg}"))
        } else {
            ApiError::invalid(path.clone(), format!("Invalid value for `{path}`: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::is_json_type;

    #[test]
    fn json_types() {
        for ok in [
            None,
            Some("application/json"),
            Some("Application/JSON; charset=utf-8"),
            Some("application/vnd.api+json"),
        ] {
            assert!(is_json_type(ok), "{ok:?}");
        }
        for bad in [
            Some("application/x-www-form-urlencoded"),
            Some("text/plain"),
            Some("multipart/form-data; boundary=x"),
            Some(""),
            Some("application/jsonx"),
        ] {
            assert!(!is_json_type(bad), "{bad:?}");
        }
    }
}
