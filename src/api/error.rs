//! The one place where failures become HTTP: status codes and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::core::SubmitError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// More headers (`retry-after`, rate-limit state).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            headers: Vec::new(),
        }
    }

    /// 401: no key, or one that is unknown, revoked or expired.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
        }
    }

    /// 403: a valid key asking for something it may not use.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            ..Self::new(StatusCode::FORBIDDEN, "permission_error", message)
        }
    }

    /// 404 for a thing named in the request (a key, a route).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    /// 429 from a rate limit or budget. `retry`: when it would fit (`None`: it never will,
    /// and clients are told not to retry).
    pub fn rate_limited(
        code: &'static str,
        message: impl Into<String>,
        retry: Option<std::time::Duration>,
    ) -> Self {
        let mut e = Self {
            code: Some(code),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        };
        match retry {
            Some(d) => {
                let secs = d.as_secs_f64().ceil().max(1.0) as u64;
                e.headers.push(("retry-after", secs.to_string()));
                e.headers
                    .push(("retry-after-ms", (d.as_millis() as u64).max(1).to_string()));
            }
            None => e.headers.push(("x-should-retry", "false".into())),
        }
        e
    }

    /// 400 naming the offending field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 `context_length_exceeded`, naming the field that holds the input (`messages`,
    /// `prompt`, `input`).
    pub fn context_length(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            code: Some("context_length_exceeded"),
            ..Self::bad_request(message)
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{model}` does not exist"),
            )
        }
    }

    pub fn overloaded() -> Self {
        Self {
            headers: vec![("retry-after", "1".into())],
            code: Some("rate_limit_exceeded"),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "The server is at capacity: too many requests are queued. Retry shortly.",
            )
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            headers: vec![("retry-after", "1".into())],
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body exceeds the limit of {limit} bytes"),
        )
    }

    /// 415: a JSON route given a body of another declared type.
    pub fn unsupported_media_type(declared: &str) -> Self {
        Self {
            param: Some("content-type".into()),
            ..Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                format!("Expected a JSON body (content-type: application/json), got `{declared}`"),
            )
        }
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "The request body did not arrive within {} s",
                limit.as_secs_f64()
            ),
        )
    }

    /// 504: the first part of the response was not ready within the request's timeout
    /// (`cf-aig-request-timeout`, or the server's `--request-timeout-ms`); it was cancelled.
    pub fn request_timeout(limit: std::time::Duration) -> Self {
        Self {
            code: Some("request_timeout"),
            ..Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                format!(
                    "The response did not begin within the request timeout of {} ms; the request was cancelled",
                    limit.as_millis()
                ),
            )
        }
    }

    /// 409: an `Idempotency-Key` whose reply was made and is no longer held.
    pub fn idempotency_gone() -> Self {
        Self {
            code: Some("idempotency_reply_gone"),
            param: Some("idempotency-key".into()),
            ..Self::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "The reply to this Idempotency-Key was made and is no longer held (evicted, or too large to keep); it is not generated again. Send the request under a new key.",
            )
        }
    }

    /// 409: the thing named is in a state that does not allow this (a finished batch
    /// cancelled).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
    }

    /// The engine thread ended before the request did.
    pub fn engine_stopped() -> Self {
        Self {
            code: Some(ENGINE_UNAVAILABLE),
            ..Self::unavailable("The engine stopped before the request finished")
        }
    }

    /// A request the engine ended unfinished: 503 (retry) when the server could not go on,
    /// 500 when the request itself failed.
    pub fn engine(f: crate::engine::request::Failure) -> Self {
        use crate::engine::request::Cause;
        match f.cause {
            Cause::Request => Self::internal(f.message),
            Cause::Stopping => Self::unavailable(f.message),
            Cause::Engine => Self {
                code: Some(ENGINE_UNAVAILABLE),
                ..Self::unavailable(f.message)
            },
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The JSON body, also used inside SSE streams for errors after the headers went out.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Anthropic's error type for an HTTP status.
fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// Workers AI's (and the Cloudflare API's) error code for a status and our OpenAI code.
fn workers_code(status: StatusCode, code: Option<&str>) -> u32 {
    match (status.as_u16(), code) {
        (_, Some("model_not_found")) => 3042,
        (_, Some("context_length_exceeded")) => 5021,
        (401, _) => 10000,
        (403, _) => 5018,
        (404, _) => 7000,
        (408, _) => 3007,
        (413, _) => 3006,
        (429, Some("insufficient_quota")) => 3036,
        (429, _) | (503, _) => 3040,
        (500..=599, _) => 5000,
        _ => 5006,
    }
}

impl ApiError {
    /// The body in Anthropic's envelope: `{"type": "error", "error": {"type", "message"}}`.
    pub fn anthropic_body(&self) -> serde_json::Value {
        anthropic_envelope(self.status, &self.message, self.code)
    }

    /// The body in Cloudflare's envelope:
    /// `{"result": null, "success": false, "errors": [{"code", "message"}], "messages": []}`.
    pub fn workers_body(&self) -> serde_json::Value {
        workers_envelope(self.status, &self.message, self.code)
    }
}

fn anthropic_envelope(status: StatusCode, message: &str, _code: Option<&str>) -> serde_json::Value {
    json!({"type": "error", "error": {"type": anthropic_type(status), "message": message}})
}

fn workers_envelope(status: StatusCode, message: &str, code: Option<&str>) -> serde_json::Value {
    json!({"result": null, "success": false, "messages": [],
           "errors": [{"code": workers_code(status, code), "message": message}]})
}

/// Re-renders an error response of the OpenAI surface (from a handler or a layer in front of
/// it: auth, body limits, routing) in Anthropic's envelope, keeping status and headers.
pub async fn to_anthropic(resp: Response) -> Response {
    rerender(resp, anthropic_envelope).await
}

/// The same in Cloudflare's envelope, for the Workers AI route.
pub async fn to_workers(resp: Response) -> Response {
    rerender(resp, workers_envelope).await
}

/// The same in OpenAI's own envelope, for the errors axum answers itself in plain text or
/// with no body (a method the route does not take, a path that is not UTF-8).
pub async fn to_openai(resp: Response) -> Response {
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let status = resp.status();
    if json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    rerender(resp, openai_envelope).await
}

fn openai_envelope(status: StatusCode, message: &str, _code: Option<&str>) -> serde_json::Value {
    let kind = match status.as_u16() {
        403 => "permission_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

async fn rerender(
    resp: Response,
    envelope: fn(StatusCode, &str, Option<&str>) -> serde_json::Value,
) -> Response {
    if resp.status().is_success() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let parsed = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
    let field = |f: &str| {
        parsed
            .as_ref()
            .and_then(|v| v["error"][f].as_str().map(str::to_string))
    };
    // Axum's own errors are text, or nothing at all (a 405): then the status says it.
    let message =
        field("message").unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
    let message = if message.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("Error")
            .to_string()
    } else {
        message
    };
    let body = envelope(parts.status, &message, field("code").as_deref()).to_string();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body))
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull => Self::overloaded(),
            SubmitError::ShuttingDown => Self::unavailable("The server is shutting down"),
        }
    }
}

/// The code of a request the engine failed or stalled with (it may be the cause).
const ENGINE_UNAVAILABLE: &str = "engine_unavailable";

/// Marks (in the response's extensions, never on the wire) an answer the engine failed or
/// stalled with: the batch worker counts such attempts, as it counts those the process did
/// not outlive, so a request that keeps failing or stalling the engine is given up.
#[derive(Debug, Clone, Copy)]
pub struct EngineUnavailable;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.code == Some(ENGINE_UNAVAILABLE) {
            resp.extensions_mut().insert(EngineUnavailable);
        }
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                resp.headers_mut().insert(name, v);
            }
        }
        resp
    }
}

/// A refused response format or tool grammar: the client's fault, naming its field.
impl From<crate::structured::StructuredError> for ApiError {
    fn from(e: crate::structured::StructuredError) -> Self {
        Self::invalid(e.param, e.message)
    }
}

/// Store failures are ours (500); a bad field or unknown key is the client's.
impl From<crate::gateway::GatewayError> for ApiError {
    fn from(e: crate::gateway::GatewayError) -> Self {
        use crate::gateway::GatewayError as G;
        match e {
            G::Invalid { ref field, .. } => Self::invalid(field.clone(), e.to_string()),
            G::UnknownKey => Self::not_found("No such key"),
            e => {
                tracing::error!(error = %e, "gateway store failed");
                Self::internal("The key and ledger store failed")
            }
        }
    }
}
