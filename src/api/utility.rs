//! The small routes: the model list, health, metrics, tokenize and detokenize, and the
//! fallback 404.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::handlers::body_or_error;
use super::types::{from_value, parse_body};
use super::AppState;

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
