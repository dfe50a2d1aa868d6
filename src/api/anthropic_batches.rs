//! Anthropic's Message Batches API: `/v1/messages/batches` (create, list), `/{id}`
//! (retrieve, delete), `/{id}/cancel` and `/{id}/results` (JSONL). A message batch is a batch
//! of this server's Batch API whose requests run through `/v1/messages` (the same store,
//! background worker at low priority, limits, ledger and restart safety), shown in
//! Anthropic's shapes: `processing_status`, `request_counts` that move from `processing`
//! only when the batch ends, RFC 3339 times, and a `results_url` once it has.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::batches::{cancel_batch, new_object, owner, read_file, store};
use super::error::ApiError;
use super::AppState;
use crate::gateway::batches::{new_id, BatchQuery, Deleted, Line, ACTIVE};
use crate::gateway::Principal;

/// The route every request of a message batch runs through.
const ENDPOINT: &str = "/v1/messages";
/// Anthropic's limit on requests in one batch.
const MAX_REQUESTS: usize = 100_000;
/// The largest batch `POST /v1/messages/batches` takes (bigger work goes through `/v1/files`
/// and `/v1/batches`, which read a file line by line instead of whole).
pub(super) const MAX_CREATE_BYTES: usize = 32 << 20;
/// How long results are kept after the batch ends (Anthropic's 29 days).
const KEEP_SECS: i64 = 29 * 86_400;

/// The Message Batches routes.
pub(super) fn routes() -> axum::Router<Arc<AppState>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route(
            "/v1/messages/batches",
            post(create)
                .get(list)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_CREATE_BYTES)),
        )
        .route("/v1/messages/batches/{id}", get(retrieve).delete(delete))
        .route("/v1/messages/batches/{id}/cancel", post(cancel))
        .route("/v1/messages/batches/{id}/results", get(results))
}

/// `custom_id`: 1 to 64 of `[a-zA-Z0-9_-]`.
fn good_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The requests as a batch's lines, or what is wrong with them.
fn lines_of(body: &Map<String, Value>) -> Result<Vec<Line>, ApiError> {
    let items = match body.get("requests") {
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_REQUESTS => items,
        _ => {
            return Err(ApiError::invalid(
                "requests",
                format!("requests: must be a list of 1 to {MAX_REQUESTS} requests"),
            ))
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut lines = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let bad = |f: &str, why: &str| {
            let field = format!("requests.{i}{f}");
            ApiError::invalid(field.clone(), format!("{field}: {why}"))
        };
        let custom_id = match &item["custom_id"] {
            Value::String(c) if good_custom_id(c) => c.clone(),
            _ => {
                return Err(bad(
                    ".custom_id",
                    "must be 1 to 64 letters, digits, `_` or `-`",
                ))
            }
        };
        if !seen.insert(custom_id.clone()) {
            let why = format!("'{custom_id}' is used twice; each request needs its own");
            return Err(bad(".custom_id", &why));
        }
        let Value::Object(params) = &item["params"] else {
            return Err(bad(
                ".params",
                "must be an object: the Messages API's request",
            ));
        };
        if !matches!(
            params.get("stream"),
            None | Some(Value::Bool(false) | Value::Null)
        ) {
            return Err(bad(".params.stream", "is not supported in a batch"));
        }
        lines.push(Line {
            line: i as i64,
            custom_id,
            url: ENDPOINT.to_string(),
            body: Value::Object(params.clone()).to_string(),
        });
    }
    Ok(lines)
}

/// `POST /v1/messages/batches`: `{"requests": [{"custom_id", "params"}, ...]}`.
async fn create(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: Map<String, Value> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("The body must be a JSON object: {e}")))?;
    let lines = lines_of(&body)?;
    let now = crate::gateway::db::unix_now();
    let mut object = new_object(
        ENDPOINT,
        Value::Null,
        lines.len(),
        json!({}),
        Some(KEEP_SECS),
        now,
    );
    object["id"] = new_id("msgbatch_").into();
    let (kind, owner) = who.owner();
    let (kind, owner) = (kind.to_string(), owner.to_string());
    // The requests are held until the batch ends: they count against the key's storage.
    let bytes: u64 = lines.iter().map(|l| l.body.len() as u64).sum();
    let quota = state.batch.file_storage_per_key;
    let saved = object.clone();
    store(&state, move |b| {
        if let Some(quota) = quota {
            let used = b.storage_used(&owner)?;
            if used + bytes > quota {
                return Err(crate::gateway::GatewayError::Invalid {
                    field: "requests".into(),
                    reason: format!("({bytes} bytes) do not fit: this key's files hold {used} of the {quota} bytes it may store (`--file-storage-per-key`)"),
                });
            }
        }
        b.create(&kind, &owner, &saved, lines)
    })
    .await?;
    state.batch_wake.notify_one();
    Ok(Json(render(&object, &base_url(&headers))))
}

/// `who`'s message batch `id` (another's, or a batch of another API, is 404).
async fn fetch(state: &AppState, who: &Principal, id: &str) -> Result<Value, ApiError> {
    let (owner, key) = (owner(who), id.to_string());
    store(state, move |b| b.batch(&key, &owner))
        .await?
        .filter(|o| o["endpoint"] == ENDPOINT)
        .ok_or_else(|| ApiError::not_found(format!("No message batch found with id '{id}'.")))
}

async fn retrieve(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let object = fetch(&state, &who, &id).await?;
    Ok(Json(render(&object, &base_url(&headers))))
}

#[derive(Deserialize)]
struct ListQuery {
    after_id: Option<String>,
    before_id: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/messages/batches` (`limit` 1 to 1,000, default 20; `after_id`, `before_id`),
/// newest first.
async fn list(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.limit.as_deref() {
        None => 20,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::invalid("limit", "limit: must be 1 to 1000"))?,
    };
    if q.after_id.is_some() && q.before_id.is_some() {
        return Err(ApiError::invalid(
            "before_id",
            "send either after_id or before_id, not both",
        ));
    }
    let owner = owner(&who);
    let page = store(&state, move |b| {
        let query = BatchQuery {
            after: q.after_id.as_deref(),
            before: q.before_id.as_deref(),
            endpoint: Some(ENDPOINT),
            limit,
        };
        b.batches(&owner, &query)
    })
    .await?;
    let base = base_url(&headers);
    let data: Vec<Value> = page.items.iter().map(|o| render(o, &base)).collect();
    let id = |v: Option<&Value>| v.map_or(Value::Null, |v| v["id"].clone());
    Ok(Json(json!({
        "data": data, "has_more": page.has_more,
        "first_id": id(data.first()), "last_id": id(data.last()),
    })))
}

/// `POST /v1/messages/batches/{id}/cancel`: the batch stops starting requests and drops
/// those running; it ends with the results it has.
async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    fetch(&state, &who, &id).await?;
    let object = cancel_batch(&state, &who, &id).await?;
    Ok(Json(render(&object, &base_url(&headers))))
}

/// `DELETE /v1/messages/batches/{id}`: an ended batch and its results.
async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    fetch(&state, &who, &id).await?;
    let (owner, key) = (owner(&who), id.clone());
    match store(&state, move |b| b.delete_batch(&key, &owner)).await? {
        Deleted::Yes => Ok(Json(json!({"id": id, "type": "message_batch_deleted"}))),
        Deleted::Running => Err(ApiError::bad_request(format!(
            "Message batch '{id}' is still processing: cancel it, and delete it once it has ended."
        ))),
        Deleted::NoSuchBatch => Err(ApiError::not_found(format!(
            "No message batch found with id '{id}'."
        ))),
    }
}

/// `GET /v1/messages/batches/{id}/results`: one JSON line per request, once the batch has
/// ended: `{"custom_id", "result": {"type": "succeeded", "message"}}`, or `errored` (with
/// the error the request got), `canceled` or `expired`.
async fn results(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let object = fetch(&state, &who, &id).await?;
    let status = object["status"].as_str().unwrap_or_default();
    if ACTIVE.contains(&status) {
        return Err(ApiError::bad_request(format!(
            "Message batch '{id}' is still processing; its results come once it has ended."
        )));
    }
    if status == "failed" {
        let why = object["errors"]["data"][0]["message"]
            .as_str()
            .unwrap_or_default();
        return Err(ApiError::conflict(format!(
            "The batch failed and its results were not kept: {why}"
        )));
    }
    let owner = owner(&who);
    let mut out = Vec::new();
    for field in ["output_file_id", "error_file_id"] {
        let Some(file) = object[field].as_str() else {
            continue;
        };
        let content = read_file(&state, file, &owner).await?.ok_or_else(|| {
            ApiError::not_found(format!(
                "The results of '{id}' have expired or were deleted."
            ))
        })?;
        for line in String::from_utf8_lossy(&content).lines() {
            if let Ok(line) = serde_json::from_str::<Value>(line) {
                out.extend_from_slice(result_line(&line).to_string().as_bytes());
                out.push(b'\n');
            }
        }
    }
    Ok(([(header::CONTENT_TYPE, "application/x-jsonl")], out).into_response())
}

/// A request's result from its line in the batch's output or error file.
fn result_line(line: &Value) -> Value {
    let response = &line["response"];
    let result = if response.is_null() {
        match line["error"]["code"].as_str() {
            Some("batch_cancelled") => json!({"type": "canceled"}),
            Some("batch_expired") => json!({"type": "expired"}),
            _ => json!({"type": "errored", "error": {"type": "error", "error": {
                "type": "api_error", "message": line["error"]["message"]}}}),
        }
    } else if response["status_code"]
        .as_u64()
        .is_some_and(|s| (200..300).contains(&s))
    {
        json!({"type": "succeeded", "message": response["body"]})
    } else {
        json!({"type": "errored", "error": response["body"]})
    };
    json!({"custom_id": line["custom_id"], "result": result})
}

/// Where this server was reached (`results_url` is absolute, as Anthropic's is): the
/// `Host` header, over `X-Forwarded-Proto` or plain HTTP.
fn base_url(headers: &HeaderMap) -> String {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    match text(header::HOST.as_str()) {
        Some(host) => {
            let proto = text("x-forwarded-proto").unwrap_or("http");
            format!("{proto}://{host}")
        }
        None => String::new(),
    }
}

/// Unix seconds as RFC 3339 (UTC); `null` for none.
fn rfc3339(t: &Value) -> Value {
    let Some(t) = t.as_i64() else {
        return Value::Null;
    };
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let (y, m, d) = crate::model::template::civil_from_days(days);
    let (h, min, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}Z").into()
}

/// A stored batch in Anthropic's shape.
fn render(o: &Value, base: &str) -> Value {
    let status = o["status"].as_str().unwrap_or_default();
    let processing = match status {
        "in_progress" | "finalizing" => "in_progress",
        "cancelling" => "canceling",
        _ => "ended",
    };
    let count = |f: &str| o["request_counts"][f].as_u64().unwrap_or(0);
    let (total, succeeded, errored) = (count("total"), count("completed"), count("failed"));
    let rest = total.saturating_sub(succeeded + errored);
    let counts = match status {
        _ if processing != "ended" => json!({"processing": total, "succeeded": 0,
            "errored": 0, "canceled": 0, "expired": 0}),
        "cancelled" => json!({"processing": 0, "succeeded": succeeded, "errored": errored,
            "canceled": rest, "expired": 0}),
        "expired" => json!({"processing": 0, "succeeded": succeeded, "errored": errored,
            "canceled": 0, "expired": rest}),
        _ => json!({"processing": 0, "succeeded": succeeded, "errored": errored + rest,
            "canceled": 0, "expired": 0}),
    };
    let ended = ["completed_at", "cancelled_at", "expired_at", "failed_at"]
        .iter()
        .map(|f| &o[*f])
        .find(|t| !t.is_null())
        .unwrap_or(&Value::Null);
    let id = o["id"].as_str().unwrap_or_default();
    let results_url = (processing == "ended" && status != "failed")
        .then(|| format!("{base}/v1/messages/batches/{id}/results"));
    json!({
        "id": id, "type": "message_batch", "processing_status": processing,
        "request_counts": counts, "ended_at": rfc3339(ended),
        "created_at": rfc3339(&o["created_at"]), "expires_at": rfc3339(&o["expires_at"]),
        "archived_at": null, "cancel_initiated_at": rfc3339(&o["cancelling_at"]),
        "results_url": results_url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_and_custom_ids_are_checked() {
        assert_eq!(rfc3339(&json!(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(&json!(1_796_540_212)), "2026-12-06T06:56:52Z");
        assert_eq!(rfc3339(&Value::Null), Value::Null);
        assert!(good_custom_id("req-1_A"));
        for bad in ["", "a b", "é", &"x".repeat(65)] {
            assert!(!good_custom_id(bad), "{bad}");
        }
    }
}
