//! Route handlers: parse and validate, render and tokenize off the async threads, submit to
//! the engine, answer whole or streamed.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::Value;

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
pub(super) fn check_model(
    state: &AppState,
    who: &Principal,
    model: Option<&str>,
) -> Result<(), ApiError> {
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

/// A request's ledger labels: its id, the served model, the route, and the session and
/// metadata headers when they parsed.
fn labels(state: &AppState, request_id: &str, route: &str, d: Option<&Directives>) -> Labels {
    Labels {
        request_id: request_id.to_string(),
        model: state.model_name.clone(),
        route: route.to_string(),
        session_id: d.and_then(|d| d.session_id.clone()),
        metadata: d.and_then(|d| d.metadata.clone()),
    }
}

/// The common front of both completion endpoints: body, readiness, JSON, model name, the
/// gateway's headers.
#[allow(clippy::too_many_arguments)]
fn accept<T: serde::de::DeserializeOwned>(
    state: &AppState,
    rid: &RequestId,
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
        let directives = Directives::from_headers(headers, state.default_cache_ttl).ok();
        let labels = labels(state, &rid.0, route, directives.as_ref());
        state
            .gateway
            .record_rejected(who.key_id(), &labels, Instant::now());
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
pub(super) enum Api {
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

/// The chat prompt as token ids: the template applied to the messages and tools (through
/// the generic tool prompt when the template has no tool support).
pub(super) fn render(
    r: &Ready,
    messages: Vec<Message>,
    tools: Vec<Value>,
) -> Result<Vec<u32>, ApiError> {
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
pub(super) async fn chat(
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
        &rid,
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
        echo: None,
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
        prompt_logprobs: false,
        echo: false,
        constraint,
    };
    run(state, &ready, prompt, &sampling, out, meta, &rid.0, gate).await
}

/// What to produce besides text: logprobs, and the grammar the text must follow.
struct Output {
    logprobs: bool,
    top_logprobs: usize,
    /// Score the prompt's tokens too (`echo` with `logprobs`), with `top_logprobs` each.
    prompt_logprobs: bool,
    /// `echo`: `max_tokens` may be 0.
    echo: bool,
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

pub(super) async fn completion(
    state: &AppState,
    rid: RequestId,
    who: Principal,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, ApiError> {
    let (ready, req, sampling, gate) = accept(
        state,
        &rid,
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
    let echo = req.echo == Some(true);
    // Token ids are taken as given (checked against the vocabulary in `run`); echoed, they
    // come back as their text.
    let r = ready.clone();
    let (ids, echo) = tokio::task::spawn_blocking(move || match prompt {
        Err(ids) if echo => {
            let ids_ok = ids.iter().all(|&t| (t as usize) < r.vocab_size);
            let text = if ids_ok {
                r.tokenizer.decode_with_control(&ids).ok()
            } else {
                None
            };
            Ok((ids, text))
        }
        Err(ids) => Ok((ids, None)),
        Ok(text) => {
            let ids = r.tokenizer.encode(&text, true);
            Ok((ids?, echo.then_some(text)))
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
    .map_err(|e: crate::error::ModelError| ApiError::bad_request(e.to_string()))?;
    let meta = Meta {
        id: format!("cmpl-{}", rid.0),
        created: unix_now(),
        model: state.model_name.clone(),
        chat: false,
        logprobs: req.logprobs.is_some(),
        echo,
        tools: None,
        surface: match api {
            Api::Workers { .. } => Surface::Workers { json: false },
            _ => Surface::OpenAi,
        },
    };
    let out = Output {
        logprobs: req.logprobs.is_some(),
        top_logprobs: top as usize,
        prompt_logprobs: req.echo == Some(true) && req.logprobs.is_some(),
        echo: req.echo == Some(true),
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
    if let Some(&(bad, _)) = sampling
        .logit_bias
        .last()
        .filter(|(id, _)| *id as usize >= ready.vocab_size)
    {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "`logit_bias` names token {bad}, outside the model's vocabulary of {}",
                ready.vocab_size
            ),
        ));
    }
    let limit = ready.context_length.min(ready.engine.kv_capacity);
    let requested = fields.max_tokens(out.echo)?;
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
    let labels = labels(state, request_id, gate.route, Some(&gate.directives));
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
        prompt_logprobs: out.prompt_logprobs.then_some(out.top_logprobs),
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
        .admit_cache_hit(&gate.principal, usage, price, labels, received)
        .map_err(|(refusal, rate)| {
            refusal_error(refusal, usage.prompt_tokens, usage.completion_tokens, rate)
        })?;
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

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
