//! A stored response's input items (`GET /v1/responses/{id}/input_items`, as OpenAI's SDKs
//! page them) and `POST /v1/responses/{id}/cancel`, which stops a response run in the
//! background and, as OpenAI does, refuses one that was not.

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::Json;
use serde_json::{json, Value};

use super::batches::{ascending, limit_of, list, ListQuery};
use super::error::ApiError;
use super::responses::carried_on;
use super::AppState;
use crate::gateway::batches::Page;
use crate::gateway::conversations::Stored;
use crate::gateway::Principal;

/// The stored response `id` if `who` made it (404 otherwise, as for one that never was).
pub(super) async fn owned(state: &AppState, who: &Principal, id: &str) -> Result<Stored, ApiError> {
    let (key, owner) = (id.to_string(), who.owner().1.to_string());
    super::gate::on_store(state, "conversation", move |g| {
        g.conversations.get(&key, &owner)
    })
    .await?
    .ok_or_else(|| no_response(id))
}

pub(super) fn no_response(id: &str) -> ApiError {
    ApiError::not_found(format!("No response found with id '{id}'."))
}

/// The items the model was given for a stored response: the conversation through its
/// `previous_response_id` chain and its own input, without its output; newest first unless
/// `order=asc`, `limit` (1 to 100, 20) a page, `after` an item id of the page before.
pub async fn input_items(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Extension(who): Extension<Principal>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = limit_of(&q, 20, 100)?;
    let ascending = ascending(&q)?;
    let stored = owned(&state, &who, &id).await?;
    // The conversation's items end with those of this response's output that were kept.
    let outputs = stored.response["output"]
        .as_array()
        .map_or(0, |o| o.iter().filter(|it| carried_on(it)).count());
    let inputs = stored.context.len().saturating_sub(outputs);
    let mut items: Vec<Value> = stored.context[..inputs]
        .iter()
        .enumerate()
        .map(|(i, it)| shown(it, &id, i))
        .collect();
    if !ascending {
        items.reverse();
    }
    let start = match q.after.as_deref() {
        None => 0,
        Some(after) => {
            1 + items
                .iter()
                .position(|it| it["id"] == after)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "after",
                        format!("`after`: no item '{after}' in this response's input"),
                    )
                })?
        }
    };
    let has_more = items.len() > start + limit;
    let items = items.into_iter().skip(start).take(limit).collect();
    Ok(list(Page { items, has_more }))
}

/// A stored item as OpenAI lists it: with an id (the `i`th of response `id`'s input, so
/// ids are unique and `after` pages by them) and a status.
fn shown(it: &Value, id: &str, i: usize) -> Value {
    let tag = id.trim_start_matches("resp_");
    let mut it = it.clone();
    let item_id = match it["type"].as_str() {
        Some("function_call") => format!("fc_{tag}_{i}"),
        Some("function_call_output") => format!("fco_{tag}_{i}"),
        Some("reasoning") => {
            it["summary"] = json!([]);
            format!("rs_{tag}_{i}")
        }
        _ => {
            if it["role"] == "assistant" {
                if let Some(part) = it["content"].get_mut(0) {
                    part["annotations"] = json!([]);
                }
            }
            format!("msg_{tag}_in{i}")
        }
    };
    it["id"] = json!(item_id);
    it["status"] = json!("completed");
    it
}

/// `POST /v1/responses/{id}/cancel`: only a response run in the background may be
/// cancelled (see `responses_background`).
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let stored = owned(&state, &who, &id).await?;
    if stored.response["background"] != true {
        return Err(ApiError::bad_request(
            "Only responses created with `background: true` can be cancelled; this one was answered in its request, so it has already finished",
        ));
    }
    let owner = who.owner().1.to_string();
    super::responses_background::cancel(&state, &owner, stored.response)
        .await
        .map(Json)
}
