//! Workers AI's asynchronous Batch API on its route. `POST .../ai/run/{model}?queueRequest=true`
//! with `{"requests": [input, ...]}` queues the inputs as one batch of this server's Batch API
//! (the same store, worker, limits, ledger and durability; it is listed in `/v1/batches` too,
//! with the route as its `endpoint`) and answers `{"status": "queued", "request_id",
//! "model"}`. A `POST` of `{"request_id"}` to the route polls it: `queued` or `running`
//! (HTTP 202) while it runs, then (200) `responses` in the inputs' order, each `{"id",
//! "result", "success", "external_reference"}`, and the batch's `usage`.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::batch_input::MAX_REQUESTS;
use super::batches::{create_held, new_object, result_lines, store};
use super::error::ApiError;
use super::workers::envelope;
use super::AppState;
use crate::gateway::batches::{Line, ACTIVE};
use crate::gateway::Principal;

/// The batch object's field that marks it as Workers AI's (holding the model's name).
const MARK: &str = "workers_ai";
/// The longest `external_reference` (as a Batch API `custom_id`).
const MAX_REFERENCE: usize = 512;
/// How long a finished batch's results are kept (its output files' expiry): a week.
const KEEP_SECS: i64 = 7 * 86_400;

/// Answers a queued batch's submission or poll; `None` for an ordinary request.
pub async fn route(
    state: &Arc<AppState>,
    who: &Principal,
    path: &str,
    model: &str,
    body: &Value,
    queued: bool,
) -> Option<Result<Response, ApiError>> {
    let b = body.as_object()?;
    let input = ["messages", "prompt", "text", "requests"];
    if let (Some(id), false) = (
        b.get("request_id"),
        input.iter().any(|f| b.contains_key(*f)),
    ) {
        return Some(poll(state, who, id).await);
    }
    match (b.get("requests"), queued) {
        (Some(requests), true) => Some(submit(state, who, path, model, requests).await),
        (Some(_), false) => Some(Err(ApiError::invalid(
            "requests",
            "a list of `requests` is queued with `?queueRequest=true` (Workers AI's Batch API)",
        ))),
        (None, true) => Some(Err(ApiError::invalid(
            "requests",
            "`?queueRequest=true` queues `requests`: a list of inputs",
        ))),
        (None, false) => None,
    }
}

/// The inputs as a batch's lines, each line's `custom_id` the JSON `[index,
/// external_reference]`; or what is wrong with them.
fn lines_of(path: &str, requests: &Value) -> Result<Vec<Line>, ApiError> {
    let items = match requests {
        Value::Array(items) if !items.is_empty() && items.len() <= MAX_REQUESTS => items,
        _ => {
            return Err(ApiError::invalid(
                "requests",
                format!("`requests` must be a list of 1 to {MAX_REQUESTS} inputs"),
            ))
        }
    };
    let mut lines = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let bad = |f: &str, why: &str| {
            let field = format!("requests[{i}]{f}");
            ApiError::invalid(field.clone(), format!("`{field}` {why}"))
        };
        let Value::Object(input) = item else {
            return Err(bad("", "must be a JSON object (an input)"));
        };
        let mut input: Map<String, Value> = input.clone();
        if !matches!(
            input.get("stream"),
            None | Some(Value::Bool(false) | Value::Null)
        ) {
            return Err(bad(".stream", "is not supported in a batch"));
        }
        // An input runs as the route takes one alone (never a poll, nor another batch).
        if ["request_id", "requests"]
            .iter()
            .any(|f| input.contains_key(*f))
            || !["messages", "prompt", "text"]
                .iter()
                .any(|f| input.contains_key(*f))
        {
            return Err(bad("", "must be an input: `messages`, `prompt` or `text`"));
        }
        let reference = match input.remove("external_reference") {
            None | Some(Value::Null) => Value::Null,
            Some(Value::String(r)) if r.len() <= MAX_REFERENCE => Value::String(r),
            Some(_) => {
                let why = format!("must be a string of at most {MAX_REFERENCE} bytes");
                return Err(bad(".external_reference", &why));
            }
        };
        lines.push(Line {
            line: i as i64,
            custom_id: json!([i, reference]).to_string(),
            url: path.to_string(),
            body: Value::Object(input).to_string(),
        });
    }
    Ok(lines)
}

async fn submit(
    state: &Arc<AppState>,
    who: &Principal,
    path: &str,
    model: &str,
    requests: &Value,
) -> Result<Response, ApiError> {
    // The model is checked now (404, 403), as each input will be again when it runs.
    super::handlers::check_model(state, who, Some(model))?;
    let lines = lines_of(path, requests)?;
    let now = crate::gateway::db::unix_now();
    let total = lines.len();
    let mut object = new_object(path, Value::Null, total, json!({}), Some(KEEP_SECS), now);
    object[MARK] = json!({"model": model});
    let id = object["id"].as_str().unwrap_or_default().to_string();
    create_held(state, who, object, lines).await?;
    let queued = json!({"status": "queued", "request_id": id, "model": model});
    Ok(Json(envelope(queued)).into_response())
}

async fn poll(state: &Arc<AppState>, who: &Principal, id: &Value) -> Result<Response, ApiError> {
    let Some(id) = id.as_str().map(str::to_string) else {
        return Err(ApiError::invalid(
            "request_id",
            "`request_id` must be a string",
        ));
    };
    let owner = who.owner().1.to_string();
    let (key, o) = (id.clone(), owner.clone());
    let object = store(state, move |b| b.batch(&key, &o))
        .await?
        .filter(|object| object.get(MARK).is_some())
        .ok_or_else(|| ApiError::not_found(format!("No queued request found with id '{id}'.")))?;
    let mark = &object[MARK];
    let status = object["status"].as_str().unwrap_or_default();
    if ACTIVE.contains(&status) {
        let counts = &object["request_counts"];
        let answered =
            counts["completed"].as_u64().unwrap_or(0) + counts["failed"].as_u64().unwrap_or(0);
        let word = if answered > 0 || status != "in_progress" {
            "running"
        } else {
            "queued"
        };
        let body = envelope(json!({"status": word, "request_id": id, "model": mark["model"]}));
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let lines = result_lines(state, &object, &owner).await?;
    let total = object["request_counts"]["total"].as_u64().unwrap_or(0) as usize;
    let mut responses: Vec<Value> = (0..total)
        .map(|i| {
            let message = "The batch ended before this request ran.";
            failed(i, workers_error(&Value::Null, message), &Value::Null)
        })
        .collect();
    for line in &lines {
        let key = line["custom_id"]
            .as_str()
            .and_then(|c| serde_json::from_str::<Value>(c).ok());
        let Some(i) = key.as_ref().and_then(|k| k[0].as_u64()).map(|i| i as usize) else {
            continue;
        };
        if let Some(slot) = responses.get_mut(i) {
            let reference = key.as_ref().map_or(Value::Null, |k| k[1].clone());
            *slot = answered(i, line, &reference);
        }
    }
    let usage = &object["usage"];
    let (input, output) = (
        usage["input_tokens"].as_u64().unwrap_or(0),
        usage["output_tokens"].as_u64().unwrap_or(0),
    );
    let usage = json!({"prompt_tokens": input, "completion_tokens": output,
        "total_tokens": input + output});
    Ok(Json(envelope(json!({"responses": responses, "usage": usage}))).into_response())
}

/// One input's entry from its line in the batch's output or error file.
fn answered(i: usize, line: &Value, reference: &Value) -> Value {
    let response = &line["response"];
    if response.is_null() {
        let message = line["error"]["message"]
            .as_str()
            .unwrap_or("The request was not run.");
        return failed(i, workers_error(&line["error"]["code"], message), reference);
    }
    let body = &response["body"];
    let ok = response["status_code"]
        .as_u64()
        .is_some_and(|s| (200..300).contains(&s));
    if ok {
        return json!({"id": i, "result": body["result"], "success": true,
            "external_reference": reference});
    }
    let errors = match &body["errors"] {
        Value::Array(e) => Value::Array(e.clone()),
        _ => json!([{"code": 5000, "message": body.to_string()}]),
    };
    failed(i, errors, reference)
}

fn failed(i: usize, errors: Value, reference: &Value) -> Value {
    json!({"id": i, "result": null, "success": false, "errors": errors,
        "external_reference": reference})
}

/// Cloudflare's error list for a request that got no answer (`batch_cancelled`,
/// `batch_expired`, ...): its code as a number, and the message.
fn workers_error(code: &Value, message: &str) -> Value {
    let number = match code.as_str() {
        Some("batch_expired") => 3007,
        _ => 5000,
    };
    json!([{"code": number, "message": message}])
}
