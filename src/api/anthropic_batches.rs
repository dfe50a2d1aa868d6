//! Anthropic's Message Batches API: `/v1/messages/batches` (create, list), `/{id}`
//! (retrieve, delete), `/{id}/cancel` and `/{id}/results` (JSONL). A message batch is a batch
//! of this server's Batch API whose requests run through `/v1/messages` (the same store,
//! background worker at low priority, limits, ledger and restart safety), shown in
//! Anthropic's shapes: `processing_status`, `request_counts` that move from `processing`
//! only when the batch ends, RFC 3339 times, and a `results_url` once it has.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::batch_results::result_body;
use super::batches::{cancel_batch, create_held, new_object, owner, store};
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
                // The body guard (body.rs) enforces the limit, up to MAX_CREATE_BYTES.
                .layer(axum::extract::DefaultBodyLimit::disable()),
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

/// The requests as a batch's lines, or what is wrong with them. A request whose `params`
/// are larger than a request may be (`max_bytes`) could never run: refused now.
fn lines_of(body: &Map<String, Value>, max_bytes: usize) -> Result<Vec<Line>, ApiError> {
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
        let body = Value::Object(params.clone()).to_string();
        if body.len() > max_bytes {
            let why = format!(
                "is {} bytes, over the {max_bytes} a request may be (`--max-body-bytes`)",
                body.len()
            );
            return Err(bad(".params", &why));
        }
        lines.push(Line {
            line: i as i64,
            custom_id,
            url: ENDPOINT.to_string(),
            body,
        });
    }
    Ok(lines)
}

/// `POST /v1/messages/batches`: `{"requests": [{"custom_id", "params"}, ...]}`.
async fn create(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    // Up to 32 MiB of JSON: read off the async threads.
    let max_bytes = state.max_body_bytes;
    let lines = tokio::task::spawn_blocking(move || {
        let body: Map<String, Value> = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("The body must be a JSON object: {e}")))?;
        lines_of(&body, max_bytes)
    })
    .await
    .map_err(|e| ApiError::internal(format!("reading the batch failed: {e}")))??;
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
    create_held(&state, &who, object.clone(), lines).await?;
    Ok(Json(render(&object)))
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
) -> Result<Json<Value>, ApiError> {
    let object = fetch(&state, &who, &id).await?;
    Ok(Json(render(&object)))
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
            names: ("after_id", "before_id"),
        };
        b.batches(&owner, &query)
    })
    .await?;
    let data: Vec<Value> = page.items.iter().map(render).collect();
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
) -> Result<Json<Value>, ApiError> {
    let object = fetch(&state, &who, &id).await?;
    if !ACTIVE.contains(&object["status"].as_str().unwrap_or_default()) {
        return Err(ApiError::conflict(format!(
            "Message batch '{id}' has already ended; there is nothing to cancel."
        )));
    }
    let object = cancel_batch(&state, &who, &id).await?;
    Ok(Json(render(&object)))
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
    let body = result_body(state, &object, owner(&who), result_line).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-jsonl")], body).into_response())
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

/// A stored batch in Anthropic's shape. `results_url` is a path: the SDK joins it to its base
/// URL (a prefix included), so it holds behind any proxy.
fn render(o: &Value) -> Value {
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
        .then(|| format!("/v1/messages/batches/{id}/results"));
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
    fn every_stored_status_has_its_processing_status_and_counts() {
        let at = |status: &str, completed: u64, failed: u64| {
            let o = json!({"id": "msgbatch_x", "status": status, "created_at": 0,
                "expires_at": 86_400, "cancelling_at": null, "completed_at": null,
                "cancelled_at": null, "expired_at": null, "failed_at": null,
                "request_counts": {"total": 10, "completed": completed, "failed": failed}});
            let mut o = o;
            let ending = match status {
                "completed" => "completed_at",
                "cancelled" => "cancelled_at",
                "expired" => "expired_at",
                "failed" => "failed_at",
                _ => "none",
            };
            o[ending] = json!(60);
            render(&o)
        };
        let counts = |p, s, e, c, x| json!({"processing": p, "succeeded": s, "errored": e, "canceled": c, "expired": x});
        for (status, processing) in [("in_progress", "in_progress"), ("cancelling", "canceling")] {
            let r = at(status, 4, 1);
            assert_eq!(r["processing_status"], processing);
            assert_eq!(r["request_counts"], counts(10, 0, 0, 0, 0));
            assert_eq!(
                (&r["results_url"], &r["ended_at"]),
                (&Value::Null, &Value::Null)
            );
        }
        let ended = [
            ("completed", counts(0, 7, 3, 0, 0)),
            ("cancelled", counts(0, 4, 1, 5, 0)),
            ("expired", counts(0, 4, 1, 0, 5)),
            ("failed", counts(0, 4, 6, 0, 0)),
        ];
        for (status, want) in ended {
            let (completed, failed) = if status == "completed" {
                (7, 3)
            } else {
                (4, 1)
            };
            let r = at(status, completed, failed);
            assert_eq!(r["processing_status"], "ended", "{status}");
            assert_eq!(r["request_counts"], want, "{status}");
            assert_eq!(r["ended_at"], "1970-01-01T00:01:00Z", "{status}");
            let url = (status != "failed").then_some("/v1/messages/batches/msgbatch_x/results");
            assert_eq!(r["results_url"], json!(url), "{status}");
        }
    }

    #[test]
    fn results_say_how_each_request_ended() {
        let line = |response: Value, error: Value| {
            result_line(&json!({"custom_id": "c", "response": response, "error": error}))
        };
        let ok = line(
            json!({"status_code": 200, "body": {"type": "message"}}),
            Value::Null,
        );
        assert_eq!(
            ok,
            json!({"custom_id": "c", "result": {"type": "succeeded",
            "message": {"type": "message"}}})
        );
        let refusal =
            json!({"type": "error", "error": {"type": "not_found_error", "message": "m"}});
        let bad = line(json!({"status_code": 404, "body": refusal}), Value::Null);
        assert_eq!(bad["result"], json!({"type": "errored", "error": refusal}));
        for (code, kind) in [
            ("batch_cancelled", "canceled"),
            ("batch_expired", "expired"),
        ] {
            let r = line(Value::Null, json!({"code": code, "message": "m"}));
            assert_eq!(r["result"], json!({"type": kind}));
        }
        let lost = line(
            Value::Null,
            json!({"code": "internal_error", "message": "m"}),
        );
        assert_eq!(lost["result"]["error"]["error"]["type"], "api_error");
    }

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
