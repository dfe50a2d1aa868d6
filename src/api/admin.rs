//! Admin routes shaped like LiteLLM's (`/key/generate`, `/key/info`, `/key/update`,
//! `/key/delete`, `/key/list`), guarded by the master key, and `GET /v1/usage`, which a key
//! may read for itself. Changes take effect on the next request, without a restart.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Query, State};
use axum::Json;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::handlers::body_or_error;
use super::types::parse_body;
use super::AppState;
use crate::gateway::keys::KeyRecord;
use crate::gateway::usage::UsageFilter;
use crate::gateway::Principal;

fn require_master(p: &Principal) -> Result<(), ApiError> {
    match p {
        Principal::Master => Ok(()),
        Principal::Key(_) => Err(ApiError::forbidden(
            "admin_only",
            "This route needs the master key",
        )),
        Principal::Anonymous => Err(ApiError::unauthorized(
            "This route needs the master key (start the server with --master-key)",
        )),
    }
}

fn fields(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let body = body_or_error(body, state.max_body_bytes)?;
    match parse_body(&body)? {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad_request(
            "The request body must be a JSON object",
        )),
    }
}

/// A key's settings plus its spend in the current budget period (USD).
fn info(state: &AppState, rec: &KeyRecord) -> Value {
    let mut v = rec.info();
    let start = rec.budget_period_start(crate::gateway::db::unix_now());
    let spend = (state.gateway.spend(&rec.id, start))
        .or_else(|| state.gateway.ledger.spent(&rec.id, start).ok());
    v["spend"] = json!(spend.map(|m| m as f64 / 1e6));
    v
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("the key store task failed: {e}")))?
}

pub async fn generate(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    require_master(&p)?;
    let fields = fields(&state, body)?;
    blocking(move || {
        let (key, rec) = state.gateway.keys.generate(&fields)?;
        let mut v = info(&state, &rec);
        v["key"] = json!(key);
        Ok(Json(v))
    })
    .await
}

pub async fn key_info(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let rec = match (q.get("key"), &p) {
            // A key may read its own settings.
            (None, Principal::Key(k)) => k.clone(),
            (Some(name), Principal::Key(k))
                if state
                    .gateway
                    .keys
                    .resolve(name)?
                    .is_some_and(|r| r.id == k.id) =>
            {
                k.clone()
            }
            (Some(name), _) => {
                require_master(&p)?;
                state
                    .gateway
                    .keys
                    .resolve(name)?
                    .ok_or_else(|| ApiError::not_found("No such key"))?
            }
            (None, _) => return Err(ApiError::invalid("key", "Pass the key as `?key=`")),
        };
        Ok(Json(json!({"key": rec.id, "info": info(&state, &rec)})))
    })
    .await
}

pub async fn update(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    require_master(&p)?;
    let fields = fields(&state, body)?;
    let Some(Value::String(name)) = fields.get("key").cloned() else {
        return Err(ApiError::invalid(
            "key",
            "`key` (the key, its token or its alias) is required",
        ));
    };
    blocking(move || {
        let rec = state.gateway.keys.update(&name, &fields)?;
        Ok(Json(info(&state, &rec)))
    })
    .await
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    require_master(&p)?;
    let fields = fields(&state, body)?;
    let mut names = Vec::new();
    for field in ["keys", "key_aliases"] {
        match fields.get(field) {
            None => {}
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                names.extend(a.iter().filter_map(|v| v.as_str().map(str::to_string)))
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    field,
                    format!("`{field}` must be an array of strings"),
                ))
            }
        }
    }
    if names.is_empty() {
        return Err(ApiError::invalid(
            "keys",
            "`keys` (or `key_aliases`) must name at least one key",
        ));
    }
    blocking(move || {
        state.gateway.keys.revoke(&names)?;
        Ok(Json(json!({"deleted_keys": names})))
    })
    .await
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    require_master(&p)?;
    blocking(move || {
        let keys: Vec<Value> = state
            .gateway
            .keys
            .list()?
            .iter()
            .map(|r| info(&state, r))
            .collect();
        Ok(Json(json!({"keys": keys})))
    })
    .await
}

/// `GET /v1/usage[?key=..][&start_date=YYYY-MM-DD][&end_date=YYYY-MM-DD]`: totals by day,
/// model and key. A key sees only its own rows.
pub async fn usage(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    for (field, v) in [
        ("start_date", q.get("start_date")),
        ("end_date", q.get("end_date")),
    ] {
        if let Some(v) = v {
            if !crate::gateway::usage::is_day(v) {
                return Err(ApiError::invalid(
                    field,
                    format!("`{field}` must be a date YYYY-MM-DD"),
                ));
            }
        }
    }
    blocking(move || {
        let key_id = match (&p, q.get("key")) {
            (Principal::Key(k), None) => Some(k.id.clone()),
            (Principal::Key(k), Some(name)) => match state.gateway.keys.resolve(name)? {
                Some(r) if r.id == k.id => Some(k.id.clone()),
                _ => {
                    return Err(ApiError::forbidden(
                        "admin_only",
                        "A key may read only its own usage",
                    ))
                }
            },
            (_, Some(name)) => Some(
                state
                    .gateway
                    .keys
                    .resolve(name)?
                    .map(|r| r.id.clone())
                    // A revoked key, by its token or by the key itself.
                    .unwrap_or_else(|| crate::gateway::keys::id_of_unknown(name)),
            ),
            (_, None) => None,
        };
        let filter = UsageFilter {
            key_id,
            start: q.get("start_date").cloned(),
            end: q.get("end_date").cloned(),
        };
        let lines = state.gateway.ledger.usage(&filter)?;
        let data: Vec<Value> = lines
            .iter()
            .map(|l| {
                let mut v = serde_json::to_value(l).unwrap_or(Value::Null);
                v["cost_usd"] = json!(l.cost_micros as f64 / 1e6);
                v
            })
            .collect();
        Ok(Json(json!({"object": "list", "data": data})))
    })
    .await
}
