//! Handlers of the API surfaces beside OpenAI's chat and completions: Anthropic's messages,
//! Workers AI's `ai/run`, and the Responses API with its stored conversations. Each
//! translates its request and runs the shared chat or completion path with its [`Api`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, Query, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::handlers::{body_or_error, chat, check_model, completion, render, unix_now, Api};
use super::responses::ResponsesCtx;
use super::responses_background as background;
use super::types::{from_value, parse_body, without_nulls, ChatCompletionRequest};
use super::{AppState, RequestId};
use crate::gateway::conversations::Conversations;
use crate::gateway::{GatewayError, Principal};

/// Runs `f` on the stored conversations on a blocking thread: reading a large conversation
/// must not hold an async worker.
async fn stored<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Conversations) -> Result<T, GatewayError> + Send + 'static,
) -> Result<T, ApiError> {
    super::gate::on_store(state, "conversation", move |g| f(&g.conversations)).await
}

/// OpenAI's `POST /v1/responses`: the conversation is the stored one named by
/// `previous_response_id` (the key's own) plus this input; the answer is stored with it
/// unless `store` is false.
pub async fn responses_create(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_or_error(body, state.max_body_bytes)?;
    let v = parse_body(&bytes)?;
    // The master key's apart from the key-less caller's, as its batches are.
    let owner = who.owner().1.to_string();
    let mut context = match v.get("previous_response_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(id)) => {
            let (key, who) = (id.clone(), owner.clone());
            let previous = stored(&state, move |c| c.get(&key, &who))
                .await?
                .ok_or_else(|| previous_not_found(id))?;
            let response = background::current(&state, &owner, previous.response).await;
            if background::unfinished(&response) {
                return Err(ApiError::invalid(
                    "previous_response_id",
                    format!("Previous response '{id}' has not finished; wait for it (GET /v1/responses/{id})"),
                ));
            }
            previous.context
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "previous_response_id",
                "`previous_response_id` must be a string",
            ))
        }
    };
    let first_new = context.len();
    context.extend(super::responses::input_items(&v)?);
    super::responses::check_call_outputs(&context, first_new)?;
    let store = match v.get("store") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("store", "`store` must be a boolean")),
    };
    let in_background = background::check(&v, store)?;
    let truncate = match v.get("truncation") {
        None | Some(Value::Null) => false,
        Some(t) if t == "disabled" => false,
        Some(t) if t == "auto" => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "truncation",
                "`truncation` must be auto or disabled",
            ))
        }
    };
    let ctx = ResponsesCtx {
        // Never the client's x-request-id: ids must not collide across keys.
        id: format!("resp_{}", super::new_id()),
        owner,
        created_at: unix_now(),
        store,
        context,
        truncate,
        background: in_background,
        echo: super::responses::echo(&v),
        gateway: state.gateway.clone(),
        check_only: false,
    };
    if in_background {
        // What would refuse it at once (but a full node: it waits for room) is refused
        // now, not stored as its failure: the chat path checks it, and stops there.
        let model = check_model(&state, &who, v["model"].as_str())?.name;
        let checked = Api::Responses(Arc::new(ResponsesCtx {
            check_only: true,
            ..ctx.clone()
        }));
        let body = Ok(bytes.clone());
        chat(&state, rid.clone(), who.clone(), &headers, body, checked)
            .await
            .map_err(super::responses::named_as_responses)?;
        let asked = (rid, who, headers);
        return background::start(state.clone(), asked, bytes, Arc::new(ctx), model).await;
    }
    let api = Api::Responses(Arc::new(ctx));
    chat(&state, rid, who, &headers, Ok(bytes), api)
        .await
        .map_err(super::responses::named_as_responses)
}

/// OpenAI's answer for a previous response that is not there (or is another key's: the
/// same answer, so it tells nothing): a 400 whose `code` clients read to resend the history.
fn previous_not_found(id: &str) -> ApiError {
    ApiError {
        code: Some("previous_response_not_found"),
        ..ApiError::invalid(
            "previous_response_id",
            format!("Previous response with id '{id}' not found."),
        )
    }
}

/// `GET /v1/responses/{id}`'s query: `stream=true` joins a background response's stream,
/// after the event `starting_after`.
#[derive(serde::Deserialize)]
pub struct GetQuery {
    #[serde(default)]
    stream: bool,
    starting_after: Option<u64>,
}

/// `GET /v1/responses/{id}`: a stored response, to the key that made it (404 otherwise); with
/// `stream=true`, the events of one created in the background with `stream`, while kept.
pub async fn responses_get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Extension(who): Extension<Principal>,
    Query(q): Query<GetQuery>,
) -> Result<Response, ApiError> {
    let stored = super::responses_items::owned(&state, &who, &id).await?;
    if q.stream {
        let Some(log) = state.background.logs.get(&id) else {
            return Err(ApiError::invalid(
                "stream",
                "this response's events are not kept: only one created with `background` and `stream` can be streamed again, until the node restarts",
            ));
        };
        return log.follow(q.starting_after, state.sse_keep_alive);
    }
    let now = background::current(&state, who.owner().1, stored.response).await;
    Ok(Json(now).into_response())
}

/// `DELETE /v1/responses/{id}`.
pub async fn responses_delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let owner = who.owner().1.to_string();
    let key = id.clone();
    // The owner's background run stops with it (its end is never stored once the row is
    // gone); another key's request stops nothing (404 below).
    super::responses_items::owned(&state, &who, &id).await?;
    state.background.stop(&id);
    state.background.logs.remove(&id);
    let deleted = stored(&state, move |c| c.delete(&key, &owner)).await?;
    if !deleted {
        return Err(super::responses_items::no_response(&id));
    }
    Ok(Json(
        json!({"id": id, "object": "response", "deleted": true}),
    ))
}

/// Workers AI's `POST /client/v4/accounts/{account_id}/ai/run/{model}` (and the same through
/// AI Gateway's URL, `POST /v1/{account_id}/{gateway_id}/workers-ai/{model}`): a chat request
/// (`messages`, or `prompt` through the chat template) or, with `raw`, a completion; the
/// answer in Cloudflare's envelope (errors too, by the router's surface layer). With
/// `?queueRequest=true` and `requests`, or with a `request_id`: its asynchronous Batch API
/// ([`super::workers_batch`]).
#[allow(clippy::too_many_arguments)]
pub async fn workers_run(
    State(state): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
    uri: axum::http::Uri,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let model = params.get("model").cloned().unwrap_or_default();
    let bytes = body_or_error(body, state.max_body_bytes)?;
    let parsed = parse_body(&bytes)?;
    let queued = query
        .unwrap_or_default()
        .split('&')
        .any(|kv| kv == "queueRequest=true");
    let batch = super::workers_batch::route(&state, &who, uri.path(), &model, &parsed, queued);
    if let Some(reply) = batch.await {
        return reply;
    }
    if super::workers::is_embedding(&parsed) {
        let shape = super::embeddings::Shape::Workers { model };
        return super::embeddings::serve(&state, rid, who, &headers, Ok(bytes), shape).await;
    }
    let raw = super::workers::is_raw_prompt(&parsed);
    let api = Api::Workers { model };
    if raw {
        completion(&state, rid, who, &headers, Ok(bytes), api).await
    } else {
        chat(&state, rid, who, &headers, Ok(bytes), api).await
    }
}

/// AI Gateway's universal OpenAI-compatible endpoint,
/// `POST /v1/{account_id}/{gateway_id}/compat/chat/completions`: models are named
/// `provider/model` (`workers-ai/@cf/meta/llama-3.1-8b-instruct`); the provider is dropped
/// and the rest names ours (or an alias).
pub async fn gateway_compat(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_or_error(body, state.max_body_bytes)?;
    let mut v = parse_body(&bytes)?;
    let bytes = match v.get_mut("model") {
        Some(Value::String(m)) if m.contains('/') => {
            *m = m.split_once('/').map_or("", |(_, rest)| rest).to_string();
            Bytes::from(serde_json::to_vec(&v).map_err(|e| ApiError::internal(e.to_string()))?)
        }
        _ => bytes,
    };
    chat(&state, rid, who, &headers, Ok(bytes), Api::OpenAi).await
}

/// Anthropic's `POST /v1/messages`: the chat path with the request translated and the
/// answer rendered in Anthropic's shapes (errors too, by the router's surface layer).
pub async fn messages(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    chat(&state, rid, who, &headers, body, Api::Anthropic).await
}

/// llama-server's `POST /apply-template`: a chat request's prompt as the template renders
/// it (tools and `chat_template_kwargs` included), without generating.
pub async fn apply_template(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_or_error(body, state.max_body_bytes)?;
    let ready = state.ready()?;
    let req: ChatCompletionRequest = from_value(&without_nulls(parse_body(&body)?))?;
    check_model(&state, &who, req.model.as_deref().filter(|m| !m.is_empty()))?;
    let mut messages = req.validated_messages()?;
    let continues = req.continues(&mut messages)?;
    let tools = req.tools_json();
    let kwargs = req.template_kwargs()?;
    let prompt = state
        .side_work
        .run(move || super::handlers::render_text(&ready, messages, tools, &kwargs, continues))
        .await??;
    Ok(Json(json!({"prompt": prompt})))
}

/// Anthropic's `POST /v1/messages/count_tokens`: the prompt's size as rendered for the model.
pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_or_error(body, state.max_body_bytes)?;
    let ready = state.ready()?;
    let body = super::anthropic::to_chat_request(without_nulls(parse_body(&body)?), true)?;
    let req: ChatCompletionRequest = from_value(&body)?;
    check_model(&state, &who, req.model.as_deref())?;
    let mut messages = req.validated_messages()?;
    let continues = req.continues(&mut messages)?;
    let tools = req.tools_json();
    let kwargs = req.template_kwargs()?;
    let prompt = state
        .side_work
        .run(move || render(&ready, messages, tools, &kwargs, continues))
        .await??;
    Ok(Json(json!({"input_tokens": prompt.0.len()})))
}
