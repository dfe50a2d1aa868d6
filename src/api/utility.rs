//! The small routes: the model list, the probes (health, ready), metrics, tokenize,
//! detokenize and the tokenizer's description, and the fallback 404.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::handlers::body_or_error;
use super::types::{from_value, parse_body};
use super::AppState;
use crate::gateway::Principal;

/// The served model and its LoRA adapters, each unless the caller's key may not use it
/// (as a completion with that key would answer 403).
pub async fn models(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
) -> Json<Value> {
    let visible = |name: &str| super::handlers::may_use(&state, &who, name);
    let data: Vec<Value> = std::iter::once(&state.model_name)
        .chain(&state.adapters)
        .filter(|n| visible(n))
        .map(|n| model_object(&state, n))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// A model's object; an adapter's names the served model as its `parent` (as vLLM's do).
fn model_object(state: &AppState, name: &str) -> Value {
    let ctx = state.ready.get().map(|r| r.context_length);
    let mut o = json!({
        "id": name, "object": "model", "created": state.started,
        "owned_by": "edgeinfer", "context_length": ctx,
    });
    if name != state.model_name {
        o["parent"] = json!(state.model_name);
    }
    o
}

/// OpenAI's `GET /v1/models/{model}`: the served model by its name or an alias; 404
/// `model_not_found` otherwise (and for a key that may not use it, as the list hides it).
pub async fn model(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    let served = super::handlers::check_model(&state, &who, Some(&name))
        .map_err(|_| ApiError::model_not_found(&name))?;
    let mut o = model_object(&state, &served.name);
    // An alias is named as asked (clients compare the two), as OpenAI's retrieve answers.
    o["id"] = json!(name);
    Ok(Json(o))
}

/// Liveness: 200 while the process and its engine thread are alive, also while the model
/// loads and while draining; 503 once the engine has failed or has held work without
/// finishing a step for longer than `--stall-timeout` (a restart is the cure for both).
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let Some(r) = state.ready.get() else {
        return Json(json!({"status": "loading"})).into_response();
    };
    let silent = r.engine.silent_for();
    let engine = json!({"silent_seconds": silent.as_secs_f64(), "in_flight": r.engine.in_flight()});
    let (code, status) = if r.engine.has_failed() {
        (StatusCode::SERVICE_UNAVAILABLE, "engine_failed")
    } else if silent > state.stall_timeout {
        (StatusCode::SERVICE_UNAVAILABLE, "engine_stalled")
    } else if state.shutting_down() {
        (StatusCode::OK, "draining")
    } else {
        (StatusCode::OK, "ok")
    };
    (code, Json(json!({"status": status, "engine": engine}))).into_response()
}

/// Readiness: 200 once the model is loaded and warmed (a forward pass has run), 503 before,
/// from SIGTERM on, and while liveness fails: a balancer sends nothing here then.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let status = match state.ready.get() {
        None => "loading",
        Some(r) if r.engine.has_failed() => "engine_failed",
        Some(r) if state.stalled(r) => "engine_stalled",
        Some(_) if state.shutting_down() => "shutting_down",
        Some(_) => return Json(json!({"status": "ready"})).into_response(),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": status})),
    )
        .into_response()
}

/// Text to token ids. Takes llama-server's body (`content`, `add_special`, `parse_special`,
/// `with_pieces`) or vLLM's (`prompt`, `add_special_tokens`), and answers both: `tokens`,
/// `count`, `max_model_len`.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Req {
        content: Option<String>,
        add_special: Option<bool>,
        prompt: Option<String>,
        add_special_tokens: Option<bool>,
        /// llama-server's: `false` reads control-token spellings as text.
        parse_special: Option<bool>,
        /// llama-server's: each token as `{"id", "piece"}` (its text, or its bytes when they
        /// are not UTF-8 on their own).
        with_pieces: Option<bool>,
    }
    let body = body_or_error(body, state.max_body_bytes)?;
    let ready = state.ready()?;
    let req: Req = from_value(&parse_body(&body)?)?;
    // Each server's default: llama-server adds no special tokens unless asked, vLLM does.
    let (text, special) = match (req.content, req.prompt) {
        (Some(text), _) => (text, req.add_special.unwrap_or(false)),
        (None, Some(text)) => (text, req.add_special_tokens.unwrap_or(true)),
        (None, None) => {
            return Err(ApiError::invalid(
                "content",
                "`content` (or `prompt`) is required",
            ))
        }
    };
    let r = ready.clone();
    let parse = req.parse_special.unwrap_or(true);
    let ids = state
        .side_work
        .run(move || {
            let mut ids = if parse {
                r.tokenizer.encode(&text, false)?
            } else {
                r.tokenizer.encode_plain(&text)?
            };
            if special {
                if let Some(bos) = r.tokenizer.bos.filter(|_| r.tokenizer.add_bos) {
                    ids.insert(0, bos);
                }
            }
            Ok::<_, crate::error::ModelError>(ids)
        })
        .await?
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let tokens: Value = if req.with_pieces == Some(true) {
        let tok = &ready.tokenizer;
        ids.iter()
            .map(|&id| {
                let bytes = tok.token_bytes_of(id);
                let piece = match String::from_utf8(bytes) {
                    Ok(text) => json!(text),
                    Err(e) => json!(e.into_bytes()),
                };
                json!({"id": id, "piece": piece})
            })
            .collect()
    } else {
        json!(ids)
    };
    Ok(Json(json!({
        "tokens": tokens, "count": ids.len(), "max_model_len": ready.context_length,
    })))
}

/// What a client needs to tokenize as the server does (vLLM's `/tokenizer_info`, which
/// lm-evaluation-harness reads to use the server's tokenizer instead of downloading one):
/// the special tokens, the chat template, the context length.
pub async fn tokenizer_info(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let ready = state.ready()?;
    let tok = &ready.tokenizer;
    let text = |id: Option<u32>| id.and_then(|id| tok.token_text(id));
    Ok(Json(json!({
        "tokenizer_class": "edgeinfer",
        "bos_token": text(tok.bos),
        "eos_token": text(tok.eos),
        "pad_token": Value::Null,
        "add_bos_token": tok.add_bos,
        "chat_template": ready.template.source(),
        "model_max_length": ready.context_length,
        "vocab_size": tok.vocab_size(),
    })))
}

/// llama-server's `GET /props`, which its clients read for the context window and the
/// template: the parts that describe this node (no paths, no settings that do not apply).
pub async fn props(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let ready = state.ready()?;
    let tok = &ready.tokenizer;
    let text = |id: Option<u32>| id.and_then(|id| tok.token_text(id));
    let n_ctx = ready.context_length.min(ready.engine.kv_capacity);
    Ok(Json(json!({
        "default_generation_settings": {
            "n_ctx": n_ctx,
            "params": {"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95,
                       "min_p": 0.05, "repeat_penalty": 1.0, "seed": -1,
                       "n_indent": 0, "t_max_predict_ms": 0},
        },
        "total_slots": ready.engine.max_batch_size,
        "model_alias": state.model_name,
        "modalities": {"vision": false, "video": false, "audio": false},
        "chat_template": ready.template.source(),
        "bos_token": text(tok.bos),
        "eos_token": text(tok.eos),
        "build_info": concat!("edgeinfer ", env!("CARGO_PKG_VERSION")),
        "is_sleeping": false,
        "endpoint_slots": false,
        "endpoint_props": false,
        "endpoint_metrics": true,
        "infill": tok.fim.is_some(),
    })))
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
    // Control tokens written out, as llama-server and vLLM answer: `/tokenize` then
    // `/detokenize` gives the text back.
    let text = state
        .side_work
        .run(move || ready.tokenizer.decode_with_control(&req.tokens))
        .await?
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    // `content` as llama-server answers, `prompt` as vLLM does.
    Ok(Json(json!({"content": text, "prompt": text})))
}

/// Prometheus text. With `--metrics-key`, only for that key (or the master key) as a bearer
/// token: the gateway series show each key's volumes.
pub async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(want) = &state.metrics_key {
        let got = super::gate::presented_key(&headers);
        let ok = got.as_deref().is_some_and(|k| {
            crate::gateway::keys::secrets_equal(k, want) || state.gateway.is_master(Some(k))
        });
        if !ok {
            return ApiError::unauthorized(
                "/metrics needs the metrics key (or the master key): `Authorization: Bearer KEY`",
            )
            .into_response();
        }
    }
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
