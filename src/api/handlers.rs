//! Route handlers: parse and validate, render and tokenize off the async threads, submit to
//! the engine, answer whole or streamed.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::gate::{
    add_headers, rate_headers, refusal_error, replay, Directives, Gate, Recorded, Tail,
};
use super::response::{respond, Meta, Surface};
use super::responses::ResponsesCtx;
use super::types::{
    from_value, parse_body, ChatCompletionRequest, CompletionRequest, PromptField, SamplingFields,
};
use super::{AppState, Ready, RequestId};
use crate::engine::constraint::TokenConstraint;
use crate::engine::request::{Event, GenerationRequest, UsageSink};
use crate::gateway::cache::{self, Cached, Lookup};
use crate::gateway::limits::Ask;
use crate::gateway::{Labels, Principal};
use crate::model::Message;
use crate::structured::toolcall;
use tokio::sync::oneshot;

pub(super) fn body_or_error(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::bad_request(format!("Cannot read the request body: {e}"))
        }
    })
}

/// The model must be the served one (404), and one the key may use (403).
fn check_model(state: &AppState, who: &Principal, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != state.model_name && !state.model_aliases.iter().any(|a| a == m) => {
            Err(ApiError::model_not_found(m))
        }
        _ => match who {
            Principal::Key(k) if !k.allows_model(&state.model_name) => Err(ApiError::forbidden(
                "model_not_allowed",
                format!("This key may not use the model `{}`", state.model_name),
            )),
            _ => Ok(()),
        },
    }
}

/// The common front of both completion endpoints: body, readiness, JSON, model name, the
/// gateway's headers.
fn accept<T: serde::de::DeserializeOwned>(
    state: &AppState,
    who: Principal,
    headers: &HeaderMap,
    route: &'static str,
    body: Result<Bytes, BytesRejection>,
    translate: impl FnOnce(Value) -> Result<Value, ApiError>,
    model: impl Fn(&T) -> Option<&str>,
) -> Result<(Ready, T, SamplingFields, Gate), ApiError> {
    let body = body_or_error(body, state.max_body_bytes)?;
    let ready = state.ready()?;
    // Full: refuse before parsing, rendering or tokenizing anything (a flood's 429s stay cheap).
    if !ready.engine.has_room() {
        return Err(ApiError::overloaded());
    }
    let body = translate(parse_body(&body)?)?;
    let req: T = from_value(&body)?;
    let sampling: SamplingFields = from_value(&body)?;
    check_model(state, &who, model(&req))?;
    let directives = Directives::from_headers(headers, state.default_cache_ttl)?;
    let gate = Gate {
        principal: who,
        directives,
        route,
        body,
    };
    Ok((ready, req, sampling, gate))
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    chat(&state, rid, who, &headers, body, Api::OpenAi).await
}

/// The API a request came in through: how its body translates into the shared request, and
/// the route it is ledgered under.
enum Api {
    OpenAi,
    Anthropic,
    /// Workers AI's `ai/run`, for the served model or one of its aliases.
    Workers {
        model: String,
    },
    /// OpenAI's Responses API, with the conversation so far.
    Responses(Arc<ResponsesCtx>),
}

impl Api {
    fn translate(&self, v: Value) -> Result<Value, ApiError> {
        match self {
            Api::OpenAi => Ok(v),
            Api::Anthropic => super::anthropic::to_chat_request(v, false),
            Api::Workers { model } => super::workers::to_openai(v, model),
            Api::Responses(ctx) => super::responses::to_chat_request(v, &ctx.context),
        }
    }

    fn route(&self, chat: bool) -> &'static str {
        match (self, chat) {
            (Api::OpenAi, true) => "/v1/chat/completions",
            (Api::OpenAi, false) => "/v1/completions",
            (Api::Anthropic, _) => "/v1/messages",
            (Api::Workers { .. }, _) => "/ai/run",
            (Api::Responses(_), _) => "/v1/responses",
        }
    }
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
    let owner = who.key_id().unwrap_or_default().to_string();
    let mut context = match v.get("previous_response_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(id)) => {
            state
                .gateway
                .conversations
                .get(id, &owner)
                .map_err(|e| ApiError::internal(e.to_string()))?
                .ok_or_else(|| previous_not_found(id))?
                .context
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "previous_response_id",
                "`previous_response_id` must be a string",
            ))
        }
    };
    context.extend(super::responses::input_items(&v)?);
    let store = match v.get("store") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("store", "`store` must be a boolean")),
    };
    let ctx = ResponsesCtx {
        id: format!("resp_{}", rid.0),
        owner,
        created_at: unix_now(),
        store,
        context,
        echo: super::responses::echo(&v),
        gateway: state.gateway.clone(),
    };
    let api = Api::Responses(Arc::new(ctx));
    chat(&state, rid, who, &headers, Ok(bytes), api).await
}

fn previous_not_found(id: &str) -> ApiError {
    ApiError {
        param: Some("previous_response_id".into()),
        ..ApiError::not_found(format!("Previous response with id '{id}' not found."))
    }
}

/// `GET /v1/responses/{id}`: a stored response, to the key that made it (404 otherwise).
pub async fn responses_get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let owner = who.key_id().unwrap_or_default();
    state
        .gateway
        .conversations
        .get(&id, owner)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map(|s| Json(s.response))
        .ok_or_else(|| ApiError::not_found(format!("No response found with id '{id}'.")))
}

/// `DELETE /v1/responses/{id}`.
pub async fn responses_delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let owner = who.key_id().unwrap_or_default();
    let deleted = state
        .gateway
        .conversations
        .delete(&id, owner)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if !deleted {
        return Err(ApiError::not_found(format!(
            "No response found with id '{id}'."
        )));
    }
    Ok(Json(
        json!({"id": id, "object": "response", "deleted": true}),
    ))
}

/// Workers AI's `POST /client/v4/accounts/{account_id}/ai/run/{model}`: a chat request
/// (`messages`, or `prompt` through the chat template) or, with `raw`, a completion; the
/// answer in Cloudflare's envelope (errors too, by the router's surface layer).
pub async fn workers_run(
    State(state): State<Arc<AppState>>,
    Path((_account, model)): Path<(String, String)>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_or_error(body, state.max_body_bytes)?;
    let raw = super::workers::is_raw_prompt(&parse_body(&bytes)?);
    let api = Api::Workers { model };
    if raw {
        completion(&state, rid, who, &headers, Ok(bytes), api).await
    } else {
        chat(&state, rid, who, &headers, Ok(bytes), api).await
    }
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

/// Anthropic's `POST /v1/messages/count_tokens`: the prompt's size as rendered for the model.
pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_or_error(body, state.max_body_bytes)?;
    let ready = state.ready()?;
    let body = super::anthropic::to_chat_request(parse_body(&body)?, true)?;
    let req: ChatCompletionRequest = from_value(&body)?;
    check_model(&state, &who, req.model.as_deref())?;
    let messages = req.validated_messages()?;
    let tools = req.tools_json();
    let prompt = tokio::task::spawn_blocking(move || render(&ready, messages, tools))
        .await
        .map_err(|e| ApiError::internal(format!("templating failed: {e}")))??;
    Ok(Json(json!({"input_tokens": prompt.len()})))
}

/// The chat prompt as token ids: the template applied to the messages and tools (through
/// the generic tool prompt when the template has no tool support).
fn render(r: &Ready, messages: Vec<Message>, tools: Vec<Value>) -> Result<Vec<u32>, ApiError> {
    let (messages, native) = if tools.is_empty() || r.native_tools {
        (messages, !tools.is_empty())
    } else {
        (toolcall::generic_messages(messages, &tools), false)
    };
    let text = r
        .template
        .render_with_tools(&messages, true, native.then_some(tools.as_slice()))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    r.tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Both chat surfaces: OpenAI's chat completions and Anthropic's messages (by `route`).
async fn chat(
    state: &AppState,
    rid: RequestId,
    who: Principal,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, ApiError> {
    let anthropic = matches!(api, Api::Anthropic);
    let (ready, req, sampling, gate) = accept(
        state,
        who,
        headers,
        api.route(true),
        body,
        |v| api.translate(v),
        |r: &ChatCompletionRequest| r.model.as_deref(),
    )?;
    let messages = req.validated_messages()?;
    let spec = req.constraint_spec(ready.tool_format)?;
    let tools = req.tools_json();
    let top = req.top_logprobs.unwrap_or(0);
    if top > 0 && !req.logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` requires `logprobs: true`",
        ));
    }
    if top > 20 {
        return Err(ApiError::invalid(
            "top_logprobs",
            format!("`top_logprobs` must be at most 20, got {top}"),
        ));
    }
    let r = ready.clone();
    let tools_active = spec.calls_tools();
    // Render, tokenize and compile the grammar off the async threads; a grammar error is
    // the client's (400 naming the field), before anything is queued.
    let (prompt, constraint) = tokio::task::spawn_blocking(move || {
        let prompt = render(&r, messages, tools)?;
        let constraint = r.grammars.constraint(&spec)?;
        Ok::<_, ApiError>((prompt, constraint))
    })
    .await
    .map_err(|e| ApiError::internal(format!("templating failed: {e}")))??;
    let meta = Meta {
        id: if anthropic {
            format!("msg_{}", rid.0)
        } else {
            format!("chatcmpl-{}", rid.0)
        },
        created: unix_now(),
        model: state.model_name.clone(),
        chat: true,
        logprobs: req.logprobs,
        tools: tools_active.then_some(ready.tool_format),
        surface: match api {
            Api::OpenAi => Surface::OpenAi,
            Api::Anthropic => Surface::Anthropic {
                prompt_tokens: prompt.len(),
            },
            Api::Workers { .. } => Surface::Workers {
                json: req
                    .response_format
                    .as_ref()
                    .is_some_and(|f| f.kind == "json_object" || f.kind == "json_schema"),
            },
            Api::Responses(ctx) => Surface::Responses(ctx.clone()),
        },
    };
    let out = Output {
        logprobs: req.logprobs,
        top_logprobs: top as usize,
        constraint,
    };
    run(state, &ready, prompt, &sampling, out, meta, &rid.0, gate).await
}

/// What to produce besides text: logprobs, and the grammar the text must follow.
struct Output {
    logprobs: bool,
    top_logprobs: usize,
    constraint: Option<Box<dyn TokenConstraint>>,
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    completion(&state, rid, who, &headers, body, Api::OpenAi).await
}

async fn completion(
    state: &AppState,
    rid: RequestId,
    who: Principal,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, ApiError> {
    let (ready, req, sampling, gate) = accept(
        state,
        who,
        headers,
        api.route(false),
        body,
        |v| api.translate(v),
        |r: &CompletionRequest| r.model.as_deref(),
    )?;
    let one = || ApiError::invalid("prompt", "exactly one prompt per request is supported");
    let prompt = match req.prompt {
        PromptField::Text(t) => Ok(t),
        PromptField::Many(v) if v.is_empty() => Err(Vec::new()),
        PromptField::Many(v) if v.len() == 1 => Ok(v.into_iter().next().unwrap_or_default()),
        PromptField::Ids(ids) => Err(ids),
        PromptField::ManyIds(v) if v.len() == 1 => Err(v.into_iter().next().unwrap_or_default()),
        PromptField::Many(_) | PromptField::ManyIds(_) => return Err(one()),
    };
    for (field, set) in [
        ("echo", req.echo == Some(true)),
        ("suffix", req.suffix.is_some()),
        ("best_of", req.best_of.is_some_and(|b| b != 1)),
    ] {
        if set {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` is not supported yet"),
            ));
        }
    }
    let top = req.logprobs.unwrap_or(0);
    if top > 5 {
        return Err(ApiError::invalid(
            "logprobs",
            format!("`logprobs` must be at most 5, got {top}"),
        ));
    }
    // Token ids are taken as given (checked against the vocabulary in `run`).
    let ids = match prompt {
        Err(ids) => ids,
        Ok(text) => {
            let r = ready.clone();
            tokio::task::spawn_blocking(move || r.tokenizer.encode(&text, true))
                .await
                .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
                .map_err(|e| ApiError::bad_request(e.to_string()))?
        }
    };
    let meta = Meta {
        id: format!("cmpl-{}", rid.0),
        created: unix_now(),
        model: state.model_name.clone(),
        chat: false,
        logprobs: req.logprobs.is_some(),
        tools: None,
        surface: match api {
            Api::Workers { .. } => Surface::Workers { json: false },
            _ => Surface::OpenAi,
        },
    };
    let out = Output {
        logprobs: req.logprobs.is_some(),
        top_logprobs: top as usize,
        constraint: None,
    };
    run(state, &ready, ids, &sampling, out, meta, &rid.0, gate).await
}

/// Validates budgets, answers from the response cache or reserves the request's tokens,
/// submits, and answers whole or streamed.
#[allow(clippy::too_many_arguments)]
async fn run(
    state: &AppState,
    ready: &Ready,
    prompt: Vec<u32>,
    fields: &SamplingFields,
    out: Output,
    meta: Meta,
    request_id: &str,
    gate: Gate,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let sampling = fields.sampling_params(meta.surface.max_temperature())?;
    let stop = fields.stops()?;
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= ready.vocab_size) {
        // Only a --tokenizer larger than the model's vocabulary can produce this.
        return Err(ApiError::bad_request(format!(
            "the prompt has token id {bad}, outside the model's vocabulary of {}",
            ready.vocab_size
        )));
    }
    let limit = ready.context_length.min(ready.engine.kv_capacity);
    let requested = fields.max_tokens()?;
    let max_tokens = match requested {
        Some(m) if prompt.len().saturating_add(m) > limit => {
            return Err(ApiError::context_length(format!(
                "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({} in the messages, {m} in the completion). Please reduce the length of the messages or completion.",
                prompt.len().saturating_add(m),
                prompt.len()
            )))
        }
        Some(m) => m,
        None if prompt.len() >= limit => {
            return Err(ApiError::context_length(format!(
                "This model's maximum context length is {limit} tokens. However, your messages resulted in {} tokens. Please reduce the length of the messages.",
                prompt.len()
            )))
        }
        None => limit - prompt.len(),
    };
    let labels = Labels {
        request_id: request_id.to_string(),
        model: state.model_name.clone(),
        route: gate.route.to_string(),
        session_id: gate.directives.session_id.clone(),
        metadata: gate.directives.metadata.clone(),
    };
    let price = state
        .gateway
        .price(&state.model_name, gate.directives.custom_cost);
    let include_usage = fields.include_usage();

    // The response cache: replay a hit, wait for an identical request under way, or lead.
    let deterministic = sampling.temperature == 0.0 || sampling.seed.is_some();
    let mut leader = None;
    if let Some(key) = gate.cache_key(deterministic, &ready.model_hash, &ready.template_hash) {
        let ttl = gate.directives.cache_ttl.unwrap_or_default();
        loop {
            let hit = match state.cache.lookup(key, ttl) {
                Lookup::Hit(hit) => hit,
                Lookup::Wait(rx) => match cache::wait(rx).await {
                    Some(hit) => hit,
                    None => continue, // its leader gave up: look again
                },
                Lookup::Lead(l) => {
                    leader = Some(l);
                    break;
                }
            };
            return replay_hit(
                state,
                &gate,
                &hit,
                price,
                &labels,
                meta,
                fields.stream,
                include_usage,
                received,
            )
            .await;
        }
    }

    // Reserve the prompt plus the completion budget against every window that applies.
    let ask = Ask {
        prompt: prompt.len() as u64,
        max_tokens: max_tokens as u64,
        explicit: requested.is_some(),
        price,
    };
    let meter = state
        .gateway
        .admit(&gate.principal, ask, labels)
        .map_err(|(refusal, rate)| refusal_error(refusal, prompt.len(), max_tokens, rate))?;
    let max_tokens = meter.max_tokens() as usize;
    let mut headers = rate_headers(meter.rate);
    if leader.is_some() {
        headers.push(("cf-aig-cache-status", "MISS".into()));
    }
    let (committed_tx, committed) = oneshot::channel();
    let req = GenerationRequest {
        prompt,
        max_tokens,
        sampling,
        stop,
        top_logprobs: out.top_logprobs,
        logprobs: out.logprobs,
        request_id: request_id.to_string(),
        received,
        cache_prompt: fields.cache_prompt.unwrap_or(true),
        constraint: out.constraint,
        on_end: Some(UsageSink::new(move |report| {
            meter.finish(report, Some(committed_tx))
        })),
    };
    // Refused by the queue: the request (and its meter) is dropped, which gives back its
    // reservation.
    let rx = ready.engine.submit(req)?;
    let tail = Tail::new(committed, leader);
    let mut resp = respond(
        rx,
        meta,
        fields.stream,
        include_usage,
        tail,
        state.sse_keep_alive,
    )
    .await?;
    add_headers(&mut resp, headers);
    Ok(resp)
}

/// Answers from a cached reply: metered as `cached` at its own price, no tokens reserved.
#[allow(clippy::too_many_arguments)]
async fn replay_hit(
    state: &AppState,
    gate: &Gate,
    hit: &Cached<Recorded>,
    price: crate::gateway::price::Price,
    labels: &Labels,
    meta: Meta,
    stream: bool,
    include_usage: bool,
    received: Instant,
) -> Result<Response, ApiError> {
    let usage = hit
        .value
        .iter()
        .find_map(|e| match e {
            Event::Finished { usage, .. } => Some(*usage),
            _ => None,
        })
        .unwrap_or_default();
    let committed = state
        .gateway
        .record_cache_hit(&gate.principal, usage, price, labels, received);
    if !matches!(committed.await, Ok(true)) {
        tracing::error!("the ledger row of a cache hit was not committed");
    }
    let rx = replay(&hit.value);
    let mut resp = respond(
        rx,
        meta,
        stream,
        include_usage,
        Tail::default(),
        state.sse_keep_alive,
    )
    .await?;
    let mut headers = rate_headers(state.gateway.rate_info(&gate.principal));
    headers.push(("cf-aig-cache-status", "HIT".into()));
    headers.push(("age", hit.age().to_string()));
    add_headers(&mut resp, headers);
    Ok(resp)
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let ctx = state.ready.get().map(|r| r.context_length);
    Json(json!({"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": state.started, "owned_by": "edgeinfer",
        "context_length": ctx,
    }]}))
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.shutting_down() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting_down"})),
        )
            .into_response();
    }
    match state.ready.get() {
        Some(r) if r.engine.has_failed() => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "engine_failed"})),
        )
            .into_response(),
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Req {
        content: String,
        #[serde(default)]
        add_special: bool,
    }
    let body = body_or_error(body, state.max_body_bytes)?;
    let ready = state.ready()?;
    let req: Req = from_value(&parse_body(&body)?)?;
    let ids =
        tokio::task::spawn_blocking(move || ready.tokenizer.encode(&req.content, req.add_special))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(json!({"tokens": ids})))
}

pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Req {
        tokens: Vec<u32>,
    }
    let body = body_or_error(body, state.max_body_bytes)?;
    let ready = state.ready()?;
    let req: Req = from_value(&parse_body(&body)?)?;
    let vocab = ready.tokenizer.vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let text = tokio::task::spawn_blocking(move || ready.tokenizer.decode(&req.tokens))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(json!({"content": text})))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        ..ApiError::bad_request("Unknown route")
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
