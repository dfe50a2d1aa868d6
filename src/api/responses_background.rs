//! Responses run in the background (`background: true`, OpenAI's for long tasks): the
//! request is answered at once with the response `queued`, stored; the run goes on by
//! itself, through the same chat path as any request (limits, ledger, prefix cache), and
//! its end replaces the stored row. `GET /v1/responses/{id}` shows it `in_progress`, then
//! `completed` or `incomplete`, or `failed` with its error; `POST .../cancel` stops it
//! (`cancelled`, billed for what it computed). Refusals for the moment (a full queue, a
//! rate window) are waited out, as a batch's are. A run the node did not live to finish (a
//! restart) reads `failed`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::task::AbortHandle;

use super::error::ApiError;
use super::handlers::{chat, Api};
use super::responses::{object_of, ResponsesCtx};
use super::responses_events::{EventLog, Logs};
use super::{AppState, RequestId};
use crate::gateway::Principal;

/// How long a run waits out refusals for the moment before it is `failed`: a batch's window.
const PATIENCE: Duration = Duration::from_secs(24 * 3600);

/// The background responses this process is running, by id, and the events of those
/// streamed.
#[derive(Default)]
pub struct Running {
    runs: Mutex<HashMap<String, Run>>,
    pub(super) logs: Logs,
}

/// A run: whose it is, and its handle (`None` while its response is being stored: it counts
/// as running).
struct Run {
    owner: String,
    handle: Option<AbortHandle>,
}

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the run of `id` for `owner`, unless the node already runs `node_cap` or
    /// the owner `owner_cap` (a key's parallel requests): each holds a body, a conversation
    /// and its events for up to a day, so they are bounded as requests in flight are.
    fn enter(
        &self,
        id: &str,
        owner: &str,
        (node_cap, owner_cap): (usize, Option<u64>),
    ) -> Result<(), ApiError> {
        let mut runs = self.lock();
        let mine = runs.values().filter(|r| r.owner == owner).count() as u64;
        if runs.len() >= node_cap || owner_cap.is_some_and(|cap| mine >= cap) {
            let whose = if runs.len() >= node_cap {
                format!("this node's {node_cap}")
            } else {
                format!(
                    "this key's {} (`max_parallel_requests`)",
                    owner_cap.unwrap_or(0)
                )
            };
            return Err(ApiError::rate_limited(
                "rate_limit_exceeded",
                format!("Too many background responses in progress: at most {whose}. Retry when one has ended."),
                Some(Duration::from_secs(1)),
            ));
        }
        let run = Run {
            owner: owner.to_string(),
            handle: None,
        };
        runs.insert(id.to_string(), run);
        Ok(())
    }

    /// Stops the run of `id` (and its events end, also when it never started); whether one
    /// was running.
    pub(super) fn stop(&self, id: &str) -> bool {
        let run = self.lock().remove(id);
        let stopped = run
            .inspect(|r| r.handle.iter().for_each(AbortHandle::abort))
            .is_some();
        self.logs.end(id);
        stopped
    }

    fn is_running(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// Forgets `id`, whose run never started (its response was not stored, or is another's).
    fn forget(&self, id: &str) {
        self.lock().remove(id);
        self.logs.remove(id);
    }
}

/// Takes a run out of the registry however it ends (a panic included).
struct Leave(Arc<AppState>, String);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.background.lock().remove(&self.1);
        self.0.background.logs.end(&self.1);
    }
}

/// Whether a stored response has not ended yet.
pub(super) fn unfinished(response: &Value) -> bool {
    matches!(response["status"].as_str(), Some("queued" | "in_progress"))
}

/// Checks what a background request asks for: it is stored (its end is read from the store).
pub(super) fn check(body: &Value, store: bool) -> Result<bool, ApiError> {
    match body.get("background") {
        None | Some(Value::Null | Value::Bool(false)) => Ok(false),
        Some(Value::Bool(true)) if !store => Err(ApiError::invalid(
            "background",
            "`background: true` needs `store: true`: its end is read with GET /v1/responses/{id}",
        )),
        Some(Value::Bool(true)) => Ok(true),
        Some(_) => Err(ApiError::invalid(
            "background",
            "`background` must be a boolean",
        )),
    }
}

/// Stores the response `queued` and starts its run; the answer to the request: the response,
/// or with `stream` the run's events (see `responses_events.rs`). A retry of a create (the
/// same `Idempotency-Key`, caller and body) is answered the response the first made, as it
/// stands (its events, when kept), and starts nothing.
pub(super) async fn start(
    state: Arc<AppState>,
    asked: (RequestId, Principal, HeaderMap),
    bytes: Bytes,
    ctx: Arc<ResponsesCtx>,
    model: String,
) -> Result<Response, ApiError> {
    // Carried through whatever its client does (a dropped request future is not polled
    // again): a create stored is a create that runs, never one left reserved, `queued`.
    tokio::spawn(begin(state, asked, bytes, ctx, model))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::internal(
                "the background response could not start",
            ))
        })
}

async fn begin(
    state: Arc<AppState>,
    (rid, who, mut headers): (RequestId, Principal, HeaderMap),
    bytes: Bytes,
    ctx: Arc<ResponsesCtx>,
    model: String,
) -> Result<Response, ApiError> {
    let queued = object_of(&ctx, &model, "queued", vec![], None);
    let idem = retry_key(&headers, &ctx.owner, &bytes)?;
    let streamed = serde_json::from_slice::<Value>(&bytes).is_ok_and(|b| b["stream"] == true);
    let keep_alive = state.sse_keep_alive;
    let owner_cap = match &who {
        Principal::Key(k) => k.limit_spec().max_parallel,
        _ => None,
    };
    let caps = (state.ready()?.engine.capacity(), owner_cap);
    // Running (and its events open) before its row is stored: a retry that finds the row
    // finds it running, never an unfinished row no run holds (which reads `failed`).
    let (earlier, log) = match (state.background.enter(&ctx.id, &ctx.owner, caps), idem) {
        (Err(full), None) => return Err(full),
        // At the cap, a retry of a create is still answered the first's response.
        (Err(full), Some(key)) => {
            let owner = ctx.owner.clone();
            let get = move |g: &crate::gateway::Gateway| g.conversations.get_once(&owner, &key);
            let earlier = super::gate::on_store(&state, "conversation", get).await?;
            (Some(earlier.ok_or(full)?), None)
        }
        (Ok(()), idem) => {
            let log = streamed.then(|| state.background.logs.open(&ctx.id));
            let (id, owner, row, context) = (
                ctx.id.clone(),
                ctx.owner.clone(),
                queued.clone(),
                ctx.context.clone(),
            );
            let earlier = super::gate::on_store(&state, "conversation", move |g| match idem {
                Some(key) => g.conversations.put_once(&id, &owner, &row, &context, &key),
                None => g
                    .conversations
                    .put(&id, &owner, &row, &context)
                    .map(|_| None),
            })
            .await
            .inspect_err(|_| state.background.forget(&ctx.id))?;
            (earlier, log)
        }
    };
    if let Some(earlier) = earlier {
        state.background.forget(&ctx.id);
        let now = current(&state, &ctx.owner, earlier).await;
        let replayed = [("idempotent-replayed", HeaderValue::from_static("true"))];
        if !streamed {
            return Ok((replayed, Json(now)).into_response());
        }
        // Its events, or (not all kept) the response as it stands.
        let id = now["id"].as_str().unwrap_or_default();
        let log = state.background.logs.get(id).filter(|l| l.whole());
        let log = log.unwrap_or_else(|| {
            let log = Arc::new(EventLog::default());
            log.push("response.created", json!({"response": now}));
            if let Some(end @ ("completed" | "incomplete" | "failed")) = now["status"].as_str() {
                log.push(&format!("response.{end}"), json!({"response": now}));
            }
            log.end();
            log
        });
        return Ok((replayed, log.follow(None, keep_alive)?).into_response());
    }
    if let Some(log) = &log {
        // As OpenAI's: the response `queued` first (the run may wait for room).
        log.push("response.created", json!({"response": queued}));
        log.push("response.queued", json!({"response": queued}));
    }
    // No deadline but the client's own: it takes as long as it takes (as a batch's
    // requests). The create's Idempotency-Key was used above: the run is not recorded as an
    // idempotent reply (whose generation would outlive a cancel).
    if !headers.contains_key("cf-aig-request-timeout") {
        headers.insert("cf-aig-request-timeout", HeaderValue::from_static("0"));
    }
    headers.remove("idempotency-key");
    // Registered before the run can end (it leaves under the same lock); stopped already
    // (cancelled or deleted while stored), it stops at once.
    let mut running = state.background.lock();
    let asked = (rid, who, headers);
    let task = tokio::spawn(run(
        state.clone(),
        asked,
        bytes,
        ctx.clone(),
        (model, log.clone()),
    ));
    match running.get_mut(&ctx.id) {
        Some(run) => run.handle = Some(task.abort_handle()),
        None => {
            task.abort();
            state.background.logs.end(&ctx.id);
        }
    }
    drop(running);
    match log {
        Some(log) => log.follow(None, keep_alive),
        None => Ok(Json(queued).into_response()),
    }
}

/// What a background create's `Idempotency-Key` is stored under: the key with its caller
/// and body (a different body under the same key is a different request).
fn retry_key(headers: &HeaderMap, owner: &str, body: &[u8]) -> Result<Option<[u8; 32]>, ApiError> {
    let Some(key) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 256);
    let Some(key) = key else {
        return Err(ApiError::invalid(
            "idempotency-key",
            "header `idempotency-key` must have 1 to 256 characters",
        ));
    };
    // As any reply's key reads a body.
    let body = super::gate::reply_body(&serde_json::from_slice(body).unwrap_or_default());
    Ok(Some(crate::gateway::cache::cache_key(&[
        "responses-background",
        owner,
        key,
        &body,
    ])))
}

/// The run: `in_progress`, then the chat path, whose end replaces the stored row; refusals
/// for the moment are waited out, and a request that could not run stores `failed` with
/// its error.
async fn run(
    state: Arc<AppState>,
    (rid, who, headers): (RequestId, Principal, HeaderMap),
    bytes: Bytes,
    ctx: Arc<ResponsesCtx>,
    (model, log): (String, Option<Arc<EventLog>>),
) {
    let _leave = Leave(state.clone(), ctx.id.clone());
    mark(&state, &ctx, &model, "in_progress", None).await;
    let since = Instant::now();
    let mut who = who;
    let answer = loop {
        let api = Api::Responses(ctx.clone());
        let (rid, asker, body) = (rid.clone(), who.clone(), Ok(bytes.clone()));
        let answer = chat(&state, rid, asker, &headers, body, api)
            .await
            .unwrap_or_else(IntoResponse::into_response);
        match wait_for_retry(&answer) {
            Some(wait) if since.elapsed() + wait < PATIENCE => tokio::time::sleep(wait).await,
            _ => break answer,
        }
        // Each attempt runs as its key stands now (revoked, expired, its models or limits
        // changed meanwhile), as a batch's do.
        let (kind, owner) = who.owner();
        match state.gateway.principal_of(kind, owner) {
            Ok(now) => who = now,
            // The key store could not be read: the next attempt, as the key stood.
            Err(crate::gateway::AuthError::Unavailable) => {}
            Err(_) => {
                let gone = "The key that created this response was revoked or has expired (or the server's keys changed); it was not run.";
                break ApiError::unauthorized(gone).into_response();
            }
        }
    };
    let ok = answer.status().is_success();
    if let Some(log) = log.as_ref().filter(|_| ok) {
        // The renderer stores the end, as for a whole answer; a stream that failed (its
        // `error` event) stored none, and the response failed.
        super::responses_events::record(answer.into_body(), log).await;
        let error = json!({"code": "server_error",
                           "message": "the response failed before it finished; create it again"});
        mark(&state, &ctx, &model, "failed", Some(error)).await;
        return;
    }
    let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    if !ok {
        let e: Value = serde_json::from_slice(&body).unwrap_or_default();
        let error = json!({
            "code": e["error"]["code"].as_str().or(e["error"]["type"].as_str()).unwrap_or("server_error"),
            "message": e["error"]["message"].as_str().unwrap_or("the response could not be run"),
        });
        let failed = mark(&state, &ctx, &model, "failed", Some(error)).await;
        if let Some(log) = log {
            log.push("response.failed", json!({"response": failed}));
        }
    }
}

/// How long to wait before asking again, for a refusal for the moment (a 429 or 503 not
/// marked final: a full queue, a rate window, a node starting or stopping).
fn wait_for_retry(answer: &Response) -> Option<Duration> {
    let header = |name: &str| answer.headers().get(name).and_then(|v| v.to_str().ok());
    let retried = matches!(answer.status().as_u16(), 429 | 503);
    if !retried || header("x-should-retry") == Some("false") {
        return None;
    }
    let wait = header("retry-after-ms")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .or_else(|| {
            header("retry-after")
                .and_then(|v| v.parse().ok())
                .map(Duration::from_secs)
        })
        .unwrap_or(Duration::from_secs(1));
    Some(wait.clamp(Duration::from_millis(100), Duration::from_secs(60)))
}

/// Writes the response `status` (with `error`) while it has not ended; the response so.
async fn mark(
    state: &AppState,
    ctx: &ResponsesCtx,
    model: &str,
    status: &str,
    error: Option<Value>,
) -> Value {
    let mut r = object_of(ctx, model, status, vec![], None);
    if let Some(e) = error {
        r["error"] = e;
    }
    let (id, owner, row) = (ctx.id.clone(), ctx.owner.clone(), r.clone());
    let written = super::gate::on_store(state, "conversation", move |g| {
        g.conversations.update_unfinished(&id, &owner, &row, None)
    })
    .await;
    if let Err(e) = written {
        tracing::error!(error = %e.message, "a background response's state could not be stored");
    }
    r
}

/// A stored background response as it stands: one left unfinished by a run this process
/// does not hold (the node restarted) has failed, and is stored so. One whose run ended
/// since it was read is read again.
pub(super) async fn current(state: &AppState, owner: &str, mut response: Value) -> Value {
    let id = response["id"].as_str().unwrap_or_default().to_string();
    if !unfinished(&response) || state.background.is_running(&id) {
        return response;
    }
    response["status"] = json!("failed");
    response["error"] = json!({"code": "server_error",
        "message": "the node stopped before the response finished; create it again"});
    let (row, who) = (response.clone(), owner.to_string());
    let now = super::gate::on_store(state, "conversation", move |g| {
        if g.conversations.update_unfinished(&id, &who, &row, None)? {
            return Ok(Some(row));
        }
        Ok(g.conversations.get(&id, &who)?.map(|s| s.response))
    })
    .await;
    match now {
        Ok(Some(now)) => now,
        _ => response,
    }
}

/// `POST /v1/responses/{id}/cancel` of a background response: stores it `cancelled`, then
/// stops its run (an end stored first wins; none stored after replaces it); the response
/// as it stands. One that already ended is a 400; cancelling again answers the same.
pub(super) async fn cancel(
    state: &AppState,
    owner: &str,
    mut response: Value,
) -> Result<Value, ApiError> {
    let id = response["id"].as_str().unwrap_or_default().to_string();
    if state.background.is_running(&id) && unfinished(&response) {
        response["status"] = json!("cancelled");
        let (row, who, key) = (response.clone(), owner.to_string(), id.clone());
        let cancelled = super::gate::on_store(state, "conversation", move |g| {
            g.conversations.update_unfinished(&key, &who, &row, None)
        })
        .await?;
        if cancelled {
            state.background.stop(&id);
            return Ok(response);
        }
    }
    let (key, who) = (id.clone(), owner.to_string());
    let now = super::gate::on_store(state, "conversation", move |g| {
        g.conversations.get(&key, &who)
    })
    .await?
    .map_or(response, |s| s.response);
    let now = current(state, owner, now).await;
    match now["status"].as_str() {
        Some("cancelled") => Ok(now),
        status => Err(ApiError::bad_request(format!(
            "Cannot cancel a response that is {}",
            status.unwrap_or("finished")
        ))),
    }
}
