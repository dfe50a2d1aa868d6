//! OpenAI's Batch API: `/v1/files` (JSONL uploads and the output files batches leave) and
//! `/v1/batches`. A batch's requests are checked whole when it is created and stored; the
//! [`super::batch_worker`] runs them in the background. Files and batches belong to the key
//! that made them: another key gets 404.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::batch_input::{check_requests, requests};
use super::error::ApiError;
use super::AppState;
use crate::gateway::batches::{new_id, BatchQuery, Batches, Page, Quota};
use crate::gateway::{GatewayError, Principal};

/// The largest file `/v1/files` takes (OpenAI's limit for batch input).
pub const MAX_FILE_BYTES: usize = 200 * 1024 * 1024;
/// Routes a batch may run (each line's `url` must be the batch's `endpoint`).
pub const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];
/// How long a batch may take before it expires: OpenAI's only window.
const WINDOW_SECS: i64 = 86_400;

/// The Batch API's routes (`/v1/files` with a batch file's body limit).
pub(super) fn routes() -> axum::Router<Arc<AppState>> {
    use axum::extract::DefaultBodyLimit;
    use axum::routing::{get, post};
    axum::Router::new()
        .route(
            "/v1/files",
            post(upload)
                .get(files)
                .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)),
        )
        .route("/v1/files/{id}", get(file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create).get(batches))
        .route("/v1/batches/{id}", get(batch))
        .route("/v1/batches/{id}/cancel", post(cancel))
}

#[path = "batch_files.rs"]
mod files;
pub(super) use files::parts;
use files::{delete_file, file, file_content, files, upload};

/// The Batch API's settings.
pub struct BatchSettings {
    /// Batch requests running at once, at most.
    pub concurrency: usize,
    /// Bytes one key's files may hold (`--file-storage-per-key`; `None`: no limit).
    pub file_storage_per_key: Option<u64>,
}

/// Runs a store call off the async threads.
pub(super) async fn store<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Batches) -> Result<T, GatewayError> + Send + 'static,
) -> Result<T, ApiError> {
    super::gate::on_store(state, "batch", move |g| f(&g.batches)).await
}

/// Stores a batch made from a request's body (not from an uploaded file) and wakes the
/// worker. Its requests are held until it ends, so they count against the key's storage
/// (`--file-storage-per-key`) as files do.
pub(super) async fn create_held(
    state: &AppState,
    who: &Principal,
    object: Value,
    lines: Vec<crate::gateway::batches::Line>,
) -> Result<(), ApiError> {
    let (kind, owner) = who.owner();
    let (kind, owner) = (kind.to_string(), owner.to_string());
    let quota = state.batch.file_storage_per_key;
    store(state, move |b| {
        let bytes = lines.iter().map(|l| l.body.len() as u64).sum();
        let quota = quota.map(|limit| Quota {
            limit,
            bytes,
            field: "requests",
        });
        b.create_held(&kind, &owner, &object, lines, quota)
    })
    .await?;
    state.batch_wake.notify_one();
    Ok(())
}

/// The output lines of an ended batch (`object`, `owner`'s), output file first, then the
/// error file: 409 for a batch that failed (its results were not kept), 404 once its files
/// have expired or been deleted.
pub(super) async fn result_lines(
    state: &AppState,
    object: &Value,
    owner: &str,
) -> Result<Vec<Value>, ApiError> {
    let id = object["id"].as_str().unwrap_or_default();
    let mut lines = Vec::new();
    for file in result_files(object)? {
        let content = read_file(state, &file, owner).await?.ok_or_else(|| {
            ApiError::not_found(format!(
                "The results of '{id}' have expired or were deleted."
            ))
        })?;
        let text = String::from_utf8_lossy(&content);
        lines.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok()),
        );
    }
    Ok(lines)
}

/// The files that hold an ended batch's results, output file first: 409 for a batch that
/// failed (its results were not kept).
pub(super) fn result_files(object: &Value) -> Result<Vec<String>, ApiError> {
    if object["status"] == "failed" {
        let why = object["errors"]["data"][0]["message"]
            .as_str()
            .unwrap_or_default();
        return Err(ApiError::conflict(format!(
            "The batch failed and its results were not kept: {why}"
        )));
    }
    let files = ["output_file_id", "error_file_id"].map(|f| object[f].as_str());
    Ok(files.into_iter().flatten().map(str::to_string).collect())
}

/// A live file's whole content, read a chunk at a time so that the store is free between
/// chunks; `None` if `owner` has no such file (or it expired).
async fn read_file(state: &AppState, id: &str, owner: &str) -> Result<Option<Vec<u8>>, ApiError> {
    const CHUNK: usize = 8 << 20;
    let (key, o) = (id.to_string(), owner.to_string());
    let Some(meta) = store(state, move |b| b.file(&key, &o)).await? else {
        return Ok(None);
    };
    let size = meta.bytes.max(0) as usize;
    let mut content = Vec::with_capacity(size);
    while content.len() < size {
        let (key, o, at) = (id.to_string(), owner.to_string(), content.len());
        match store(state, move |b| b.file_chunk(&key, &o, at, CHUNK)).await? {
            Some(chunk) if !chunk.is_empty() => content.extend_from_slice(&chunk),
            // Deleted meanwhile.
            _ => return Ok(None),
        }
    }
    Ok(Some(content))
}

pub(super) fn owner(who: &Principal) -> String {
    who.owner().1.to_string()
}

/// The largest body `/v1/files` takes: a batch file and the form around it.
pub const MAX_UPLOAD_BYTES: usize = MAX_FILE_BYTES + (1 << 20);

#[derive(Deserialize)]
pub struct ListQuery {
    pub(super) after: Option<String>,
    limit: Option<String>,
    purpose: Option<String>,
    order: Option<String>,
}

pub(super) fn limit_of(q: &ListQuery, default: usize, max: usize) -> Result<usize, ApiError> {
    match q.limit.as_deref() {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    "limit",
                    format!("`limit` must be a whole number from 1 to {max}"),
                )
            }),
    }
}

/// A list's `order`: `desc` (newest first, the default) or `asc`; whether ascending.
pub(super) fn ascending(q: &ListQuery) -> Result<bool, ApiError> {
    match q.order.as_deref() {
        None | Some("desc") => Ok(false),
        Some("asc") => Ok(true),
        Some(o) => Err(ApiError::invalid(
            "order",
            format!("`order` must be 'asc' or 'desc', not '{o}'"),
        )),
    }
}

pub(super) fn list(page: Page<Value>) -> Json<Value> {
    let id = |v: Option<&Value>| v.map_or(Value::Null, |v| v["id"].clone());
    Json(json!({
        "object": "list",
        "first_id": id(page.items.first()),
        "last_id": id(page.items.last()),
        "has_more": page.has_more,
        "data": page.items,
    }))
}

pub(super) fn checked_metadata(v: Option<&Value>) -> Result<Value, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Value::Null),
        Some(Value::Object(m))
            if m.len() <= 16
                && m.iter().all(|(k, v)| {
                    k.len() <= 64 && v.as_str().is_some_and(|s| s.len() <= 512)
                }) =>
        {
            Ok(Value::Object(m.clone()))
        }
        _ => Err(ApiError::invalid(
            "metadata",
            "`metadata` must be an object of at most 16 string values (keys up to 64 characters, values up to 512)",
        )),
    }
}

/// `output_expires_after` (`{"anchor": "created_at", "seconds": N}`): how long after their
/// creation a batch's output and error files expire (`None`: kept until deleted).
fn output_expires_after(v: Option<&Value>) -> Result<Option<i64>, ApiError> {
    const FIELD: &str = "output_expires_after";
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => {
            let anchor = match m.get("anchor") {
                None => None,
                Some(Value::String(a)) => Some(a.as_str()),
                Some(_) => Err(ApiError::invalid(
                    format!("{FIELD}.anchor"),
                    format!("`{FIELD}.anchor` must be a string"),
                ))?,
            };
            let seconds = match m.get("seconds") {
                None => None,
                Some(n) => Some(n.as_i64().ok_or_else(|| {
                    ApiError::invalid(
                        format!("{FIELD}.seconds"),
                        format!("`{FIELD}.seconds` must be a whole number"),
                    )
                })?),
            };
            match files::expiry(anchor, seconds, FIELD)? {
                None => Err(ApiError::invalid(
                    FIELD,
                    format!("`{FIELD}` needs `anchor` and `seconds`"),
                )),
                s => Ok(s),
            }
        }
        Some(_) => Err(ApiError::invalid(
            FIELD,
            format!("`{FIELD}` must be an object: {{\"anchor\": \"created_at\", \"seconds\": N}}"),
        )),
    }
}

fn required_str<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a str, ApiError> {
    match body.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("`{field}` must be a string"),
        )),
        None => Err(ApiError::invalid(field, format!("`{field}` is required"))),
    }
}

/// `POST /v1/batches`: `input_file_id`, `endpoint`, `completion_window` (`24h`), `metadata`,
/// `output_expires_after`.
/// A file whose requests do not all check out makes a batch that has `failed`, listing why.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: Map<String, Value> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("The body must be a JSON object: {e}")))?;
    let input = required_str(&body, "input_file_id")?.to_string();
    let endpoint = required_str(&body, "endpoint")?;
    if !ENDPOINTS.contains(&endpoint) {
        return Err(ApiError::invalid(
            "endpoint",
            format!("`endpoint` must be one of {}", ENDPOINTS.join(", ")),
        ));
    }
    if required_str(&body, "completion_window")? != "24h" {
        return Err(ApiError::invalid(
            "completion_window",
            "`completion_window` must be 24h",
        ));
    }
    let metadata = checked_metadata(body.get("metadata"))?;
    let output_expiry = output_expires_after(body.get("output_expires_after"))?;
    let (kind, owner) = who.owner();
    let (kind, owner) = (kind.to_string(), owner.to_string());
    let (o, key) = (owner.clone(), input.clone());
    let content = store(&state, move |b| {
        Ok(match b.file(&key, &o)? {
            Some(f) if f.purpose == "batch" => b.file_content(&key, &o)?.map(Ok),
            Some(f) => Some(Err(f.purpose)),
            None => None,
        })
    })
    .await?
    .ok_or_else(|| ApiError::invalid("input_file_id", format!("No such File object: {input}")))?
    .map_err(|purpose| {
        ApiError::invalid(
            "input_file_id",
            format!("File {input} has purpose '{purpose}'; a batch's input needs purpose 'batch'"),
        )
    })?;
    let now = crate::gateway::db::unix_now();
    // Reading up to 50,000 requests takes a while: off the async threads.
    let target = endpoint.to_string();
    let (content, checked) = tokio::task::spawn_blocking(move || {
        let checked = check_requests(&content, &target);
        (content, checked)
    })
    .await
    .map_err(|e| ApiError::internal(format!("checking the input file failed: {e}")))?;
    let total = *checked.as_ref().unwrap_or(&0);
    let mut object = new_object(endpoint, json!(input), total, metadata, output_expiry, now);
    let keep = match checked {
        Ok(_) => usize::MAX,
        Err(errors) => {
            object["status"] = "failed".into();
            object["in_progress_at"] = Value::Null;
            object["failed_at"] = now.into();
            object["errors"] = json!({"object": "list", "data": errors});
            0
        }
    };
    let (saved, target) = (object.clone(), endpoint.to_string());
    let quota = state.batch.file_storage_per_key;
    store(&state, move |b| {
        let quota = quota.map(|limit| Quota {
            limit,
            bytes: (requests(&content, &target).take(keep))
                .map(|l| l.body.len() as u64)
                .sum(),
            field: "input_file_id",
        });
        let lines = requests(&content, &target).take(keep);
        b.create_held(&kind, &owner, &saved, lines, quota)
    })
    .await?;
    state.batch_wake.notify_one();
    Ok(Json(object))
}

/// A new batch's object, `in_progress` from `now` (its requests stored with it).
pub(super) fn new_object(
    endpoint: &str,
    input_file_id: Value,
    total: usize,
    metadata: Value,
    output_expiry: Option<i64>,
    now: i64,
) -> Value {
    let mut object = json!({
        "id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": null,
        "input_file_id": input_file_id, "completion_window": "24h", "status": "in_progress",
        "output_file_id": null, "error_file_id": null, "created_at": now,
        "in_progress_at": now, "expires_at": now + WINDOW_SECS, "finalizing_at": null,
        "completed_at": null, "failed_at": null, "expired_at": null, "cancelling_at": null,
        "cancelled_at": null,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "metadata": metadata,
    });
    if let Some(seconds) = output_expiry {
        object["output_expires_after"] = json!({"anchor": "created_at", "seconds": seconds});
    }
    object
}

fn no_batch(id: &str) -> ApiError {
    ApiError::not_found(format!("No batch found with id '{id}'."))
}

/// `GET /v1/batches/{id}`.
pub async fn batch(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (owner, key) = (owner(&who), id.clone());
    store(&state, move |b| b.batch(&key, &owner))
        .await?
        .map(Json)
        .ok_or_else(|| no_batch(&id))
}

/// `GET /v1/batches` (`after`, `limit` up to 100).
pub async fn batches(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = limit_of(&q, 20, 100)?;
    let owner = owner(&who);
    let page = store(&state, move |b| {
        let query = BatchQuery {
            after: q.after.as_deref(),
            limit,
            ..BatchQuery::default()
        };
        b.batches(&owner, &query)
    })
    .await?;
    Ok(list(page))
}

/// `POST /v1/batches/{id}/cancel`: a running batch stops starting requests, drops the ones
/// running, and ends `cancelled` with the results it has.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    cancel_batch(&state, &who, &id).await.map(Json)
}

/// Asks `who`'s batch `id` to stop (see [`cancel`]); its object as it is now.
pub(super) async fn cancel_batch(
    state: &AppState,
    who: &Principal,
    id: &str,
) -> Result<Value, ApiError> {
    let (owner, key) = (owner(who), id.to_string());
    let object = store(state, move |b| {
        let Some(mut object) = b.batch(&key, &owner)? else {
            return Ok(Err(no_batch(&key)));
        };
        let status = object["status"].as_str().unwrap_or_default().to_string();
        match status.as_str() {
            "in_progress" | "finalizing" => {
                object["status"] = "cancelling".into();
                object["cancelling_at"] = crate::gateway::db::unix_now().into();
                if !b.save(&object, &status)? {
                    // It moved on meanwhile: report it as it is now.
                    return Ok(b.batch(&key, &owner)?.ok_or_else(|| no_batch(&key)));
                }
                Ok(Ok(object))
            }
            "cancelling" => Ok(Ok(object)),
            s => Ok(Err(ApiError::conflict(format!(
                "Cannot cancel a batch with status '{s}'."
            )))),
        }
    })
    .await??;
    state.batch_wake.notify_one();
    Ok(object)
}
