//! Responses run in the background (`background: true`, OpenAI's for long tasks): the
//! request is answered at once with the response `queued`, stored; the run goes on by
//! itself, through the same chat path as any request (limits, ledger, prefix cache), and
//! stores its end as any stored response. `GET /v1/responses/{id}` shows it `in_progress`,
//! then `completed` or `incomplete`, or `failed` with its error; `POST .../cancel` stops it
//! (`cancelled`, billed for what it computed). A run the node did not live to finish (a
//! restart) reads `failed`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::task::AbortHandle;

use super::error::ApiError;
use super::handlers::{chat, Api};
use super::responses::{object_of, ResponsesCtx};
use super::{AppState, RequestId};
use crate::gateway::Principal;

/// The background responses this process is running, by id.
#[derive(Default)]
pub struct Running(Mutex<HashMap<String, AbortHandle>>);

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AbortHandle>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the run of `id`; whether one was running.
    pub(super) fn stop(&self, id: &str) -> bool {
        self.lock().remove(id).inspect(AbortHandle::abort).is_some()
    }

    fn is_running(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }
}

/// Whether a stored response has not ended yet.
pub(super) fn unfinished(response: &Value) -> bool {
    matches!(response["status"].as_str(), Some("queued" | "in_progress"))
}

/// Checks what a background request asks for: it is stored (its end is read from the store)
/// and not streamed (its events are not kept to be streamed again).
pub(super) fn check(body: &Value, store: bool) -> Result<bool, ApiError> {
    match body.get("background") {
        None | Some(Value::Null | Value::Bool(false)) => Ok(false),
        Some(Value::Bool(true)) if !store => Err(ApiError::invalid(
            "background",
            "`background: true` needs `store: true`: its end is read with GET /v1/responses/{id}",
        )),
        Some(Value::Bool(true)) if body["stream"] == true => Err(ApiError::invalid(
            "background",
            "a background response is not streamed here: poll GET /v1/responses/{id} for its end",
        )),
        Some(Value::Bool(true)) => Ok(true),
        Some(_) => Err(ApiError::invalid(
            "background",
            "`background` must be a boolean",
        )),
    }
}

/// Stores the response `queued` and starts its run; the answer to the request.
pub(super) async fn start(
    state: Arc<AppState>,
    (rid, who, headers): (RequestId, Principal, HeaderMap),
    bytes: Bytes,
    ctx: Arc<ResponsesCtx>,
    model: String,
) -> Result<Response, ApiError> {
    let queued = object_of(&ctx, &model, "queued", vec![], None);
    let (id, owner, row, context) = (
        ctx.id.clone(),
        ctx.owner.clone(),
        queued.clone(),
        ctx.context.clone(),
    );
    super::gate::on_store(&state, "conversation", move |g| {
        g.conversations.put(&id, &owner, &row, &context)
    })
    .await?;
    // Registered before the run can end (its end takes the same lock to leave).
    let mut running = state.background.lock();
    let task = tokio::spawn(run(
        state.clone(),
        (rid, who, headers),
        bytes,
        ctx.clone(),
        model,
    ));
    running.insert(ctx.id.clone(), task.abort_handle());
    drop(running);
    Ok(Json(queued).into_response())
}

/// The run: `in_progress`, then the chat path, which stores a reply as it ends; a request
/// that could not run stores `failed` with its error.
async fn run(
    state: Arc<AppState>,
    (rid, who, headers): (RequestId, Principal, HeaderMap),
    bytes: Bytes,
    ctx: Arc<ResponsesCtx>,
    model: String,
) {
    mark(&state, &ctx, &model, "in_progress", None).await;
    let answer = chat(
        &state,
        rid,
        who,
        &headers,
        Ok(bytes),
        Api::Responses(ctx.clone()),
    )
    .await
    .unwrap_or_else(IntoResponse::into_response);
    let ok = answer.status().is_success();
    let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    if !ok {
        let e: Value = serde_json::from_slice(&body).unwrap_or_default();
        let error = json!({
            "code": e["error"]["code"].as_str().or(e["error"]["type"].as_str()).unwrap_or("server_error"),
            "message": e["error"]["message"].as_str().unwrap_or("the response could not be run"),
        });
        mark(&state, &ctx, &model, "failed", Some(error)).await;
    }
    state.background.lock().remove(&ctx.id);
}

/// Writes the response `status` (with `error`) while it has not ended.
async fn mark(
    state: &AppState,
    ctx: &ResponsesCtx,
    model: &str,
    status: &str,
    error: Option<Value>,
) {
    let mut r = object_of(ctx, model, status, vec![], None);
    if let Some(e) = error {
        r["error"] = e;
    }
    let (id, owner) = (ctx.id.clone(), ctx.owner.clone());
    let written = super::gate::on_store(state, "conversation", move |g| {
        g.conversations.update_unfinished(&id, &owner, &r)
    })
    .await;
    if let Err(e) = written {
        tracing::error!(error = %e.message, "a background response's state could not be stored");
    }
}

/// A stored background response as it stands: one left unfinished by a run this process
/// does not hold (the node restarted) has failed, and is stored so.
pub(super) async fn current(state: &AppState, owner: &str, mut response: Value) -> Value {
    let id = response["id"].as_str().unwrap_or_default().to_string();
    if !unfinished(&response) || state.background.is_running(&id) {
        return response;
    }
    response["status"] = json!("failed");
    response["error"] = json!({"code": "server_error",
        "message": "the node stopped before the response finished; create it again"});
    let (row, owner) = (response.clone(), owner.to_string());
    let _ = super::gate::on_store(state, "conversation", move |g| {
        g.conversations.update_unfinished(&id, &owner, &row)
    })
    .await;
    response
}

/// `POST /v1/responses/{id}/cancel` of a background response: stops its run and stores it
/// `cancelled`; the response as it stands. One that already ended is a 400.
pub(super) async fn cancel(
    state: &AppState,
    owner: &str,
    mut response: Value,
) -> Result<Value, ApiError> {
    let id = response["id"].as_str().unwrap_or_default().to_string();
    if state.background.stop(&id) && unfinished(&response) {
        response["status"] = json!("cancelled");
        let (row, who) = (response.clone(), owner.to_string());
        let key = id.clone();
        let cancelled = super::gate::on_store(state, "conversation", move |g| {
            g.conversations.update_unfinished(&key, &who, &row)
        })
        .await?;
        if cancelled {
            return Ok(response);
        }
    }
    // Ended before the stop (its end stored), or cancelled before: as it stands.
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
