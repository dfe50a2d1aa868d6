//! The common front of the completion routes: the body read within its limit, readiness, a
//! full engine refused before any parsing, the model checked against the key, the gateway's
//! headers read, and the request's ledger labels.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

use crate::api::error::ApiError;
use crate::api::gate::{Directives, Gate};
use crate::api::types::{from_value, parse_body, without_nulls, SamplingFields};
use crate::api::{AppState, Ready, RequestId};
use crate::gateway::{Labels, Principal};

pub(in crate::api) fn body_or_error(
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

/// What a request runs on: the served model, or one of its LoRA adapters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// The name responses, the ledger and prices use: the served model's (for it or an
    /// alias), or the adapter's.
    pub name: String,
    /// The adapter's index in the model, if any.
    pub adapter: Option<usize>,
}

/// What `model` names: the served model (by its name, an alias, or none given) or a LoRA
/// adapter (by its name); 404 for anything else, 403 for a model the key may not use
/// (an adapter is a model of its own in a key's `models`).
pub(in crate::api) fn check_model(
    state: &AppState,
    who: &Principal,
    model: Option<&str>,
) -> Result<Served, ApiError> {
    authorize(state, who, resolve_model(state, model)?)
}

/// What `model` names (404 for nothing served), whoever asks.
fn resolve_model(state: &AppState, model: Option<&str>) -> Result<Served, ApiError> {
    let served = match model {
        None => None,
        Some(m) if m == state.model_name || state.model_aliases.iter().any(|a| a == m) => None,
        Some(m) => match state.adapters.iter().position(|a| a == m) {
            Some(i) => Some(i),
            None => return Err(ApiError::model_not_found(m)),
        },
    };
    Ok(Served {
        name: served
            .map_or(&state.model_name, |i| &state.adapters[i])
            .clone(),
        adapter: served,
    })
}

/// `served`, if the key may use it (403 otherwise).
fn authorize(state: &AppState, who: &Principal, served: Served) -> Result<Served, ApiError> {
    match may_use(state, who, &served.name) {
        false => Err(ApiError::forbidden(
            "model_not_allowed",
            format!("This key may not use the model `{}`", served.name),
        )),
        true => Ok(served),
    }
}

/// Whether `who` may use the model or adapter `name`: a key's `models` may name the served
/// model by any of its names (an alias too), an adapter by its own.
pub(in crate::api) fn may_use(state: &AppState, who: &Principal, name: &str) -> bool {
    let Principal::Key(k) = who else {
        return true;
    };
    if name != state.model_name {
        return k.allows_model(name);
    }
    let mut names = std::iter::once(&state.model_name).chain(&state.model_aliases);
    names.any(|n| k.allows_model(n))
}

/// `cf-aig-custom-cost` prices a request for the ledger, and so for budgets: a key with a
/// budget may not set its own (403), or the budget would bind nothing.
fn may_set_price(who: &Principal, d: &Directives) -> Result<(), ApiError> {
    match who {
        Principal::Key(k) if k.max_budget_micros.is_some() && d.custom_cost.is_some() => {
            Err(ApiError::forbidden(
                "custom_cost_not_allowed",
                "This key has a budget, so it may not price its own requests: drop the `cf-aig-custom-cost` header",
            ))
        }
        _ => Ok(()),
    }
}

/// The `lora` field: Workers AI's (an adapter's name: the fine-tune of the model the path
/// names), or llama-server's (`[{"id": 0, "scale": 1.0}]`, ids as `--lora` flags are
/// ordered: one adapter at scale 1, as an adapter's alpha sets its scale, or none: an empty
/// list, or scales of 0). Not with a `model` that names an adapter already.
fn lora_field(state: &AppState, served: Served, lora: &Value) -> Result<Served, ApiError> {
    let bad = |m: String| ApiError::invalid("lora", m);
    let mut chosen = None;
    let entries: &[Value] = match lora {
        Value::String(name) => {
            chosen = Some(state.adapters.iter().find(|a| *a == name).ok_or_else(|| {
                bad(format!(
                    "`lora`: this server has no adapter `{name}` (`--lora NAME=PATH`)"
                ))
            })?);
            &[]
        }
        Value::Array(entries) => entries,
        _ => {
            return Err(bad(
                "`lora` must be an adapter's name or a list of `{\"id\", \"scale\"}`".into(),
            ))
        }
    };
    for e in entries {
        let id = e.get("id").and_then(Value::as_u64);
        let scale = e.get("scale").map_or(Some(1.0), Value::as_f64);
        let (Some(id), Some(scale)) = (id, scale) else {
            return Err(bad(format!(
                "`lora` entry {e} needs an integer `id` and a numeric `scale`"
            )));
        };
        let Some(name) = state.adapters.get(id as usize) else {
            return Err(bad(format!(
                "`lora` names adapter {id}; this server has {}",
                state.adapters.len()
            )));
        };
        if scale == 0.0 {
            continue;
        }
        if scale != 1.0 {
            return Err(bad(format!("`lora` scale {scale}: adapters run at scale 1 (their alpha sets their scale) or 0 (off)")));
        }
        if chosen.replace(name).is_some() {
            return Err(bad(
                "`lora`: a request runs with one adapter at a time".into()
            ));
        }
    }
    match chosen {
        _ if served.adapter.is_some() && (chosen.is_some() || !entries.is_empty()) => {
            Err(bad(format!(
                "`model` names the adapter `{}` already: send `lora` or that `model`, not both",
                served.name
            )))
        }
        None => Ok(served),
        Some(name) => resolve_model(state, Some(name)),
    }
}

/// What a request is ledgered as, and at what price: the model it runs on (an adapter
/// without a price of its own costs its base model's), or the price its headers set.
pub(in crate::api) fn ledger_terms(
    state: &AppState,
    gate: &Gate,
    request_id: &str,
) -> (Labels, crate::gateway::price::Price) {
    let d = &gate.directives;
    let labels = Labels {
        attempt: gate.attempt.clone(),
        ..labels(&gate.served.name, request_id, gate.route, Some(d))
    };
    let models = [gate.served.name.as_str(), state.model_name.as_str()];
    (labels, state.gateway.price(&models, d.custom_cost))
}

/// A request's ledger labels: its id, the model it runs on (the served model or an
/// adapter), the route, and the session and metadata headers when they parsed.
pub(in crate::api) fn labels(
    model: &str,
    request_id: &str,
    route: &str,
    d: Option<&Directives>,
) -> Labels {
    Labels {
        request_id: request_id.to_string(),
        model: model.to_string(),
        route: route.to_string(),
        session_id: d.and_then(|d| d.session_id.clone()),
        metadata: d.and_then(|d| d.metadata.clone()),
        attempt: None,
    }
}

/// The common front of both completion endpoints: body, readiness, JSON, model name, the
/// gateway's headers.
#[allow(clippy::too_many_arguments)]
pub(in crate::api) fn accept<T: serde::de::DeserializeOwned>(
    state: &AppState,
    rid: &RequestId,
    who: Principal,
    headers: &HeaderMap,
    route: &'static str,
    body: Result<Bytes, BytesRejection>,
    translate: impl FnOnce(Value) -> Result<Value, ApiError>,
    model: impl Fn(&T) -> Option<&str>,
) -> Result<(Ready, T, SamplingFields, Gate), ApiError> {
    let front = (route, true);
    accept_with(state, rid, who, headers, front, body, translate, model)
}

/// [`accept`]; `(route, refuse_full)`: whether a full node refuses it here (not a request
/// only checked, to run later when there is room).
#[allow(clippy::too_many_arguments)]
pub(in crate::api) fn accept_with<T: serde::de::DeserializeOwned>(
    state: &AppState,
    rid: &RequestId,
    who: Principal,
    headers: &HeaderMap,
    (route, refuse_full): (&'static str, bool),
    body: Result<Bytes, BytesRejection>,
    translate: impl FnOnce(Value) -> Result<Value, ApiError>,
    model: impl Fn(&T) -> Option<&str>,
) -> Result<(Ready, T, SamplingFields, Gate), ApiError> {
    let body = body_or_error(body, state.max_body_bytes)?;
    // The request timeout counts from here: parsing, templating and grammars included.
    let arrived = Instant::now();
    let ready = state.ready()?;
    // Full: refuse before parsing, rendering or tokenizing anything (a flood's 429s stay cheap).
    // A retry with an `Idempotency-Key` is parsed first: its reply may be there to replay.
    let refuse = |who: &Principal, model: &str| {
        let directives = Directives::from_headers(headers, state.directive_defaults).ok();
        let labels = Labels {
            attempt: rid.1.clone(),
            ..labels(model, &rid.0, route, directives.as_ref())
        };
        state
            .gateway
            .record_rejected(who.key_id(), &labels, Instant::now());
        ApiError::overloaded()
    };
    let idempotent = headers.contains_key("idempotency-key");
    if refuse_full && !ready.engine.has_room() && !idempotent {
        return Err(refuse(&who, &state.model_name));
    }
    let body = translate(without_nulls(parse_body(&body)?))?;
    let req: T = from_value(&body)?;
    let sampling: SamplingFields = from_value(&body)?;
    // The model named (404), then the adapter `lora` picks, then whether the key may use
    // what it comes to (403).
    let mut served = resolve_model(state, model(&req))?;
    if let Some(lora) = body.get("lora").filter(|v| !v.is_null()) {
        served = lora_field(state, served, lora)?;
    }
    let served = authorize(state, &who, served)?;
    let directives = Directives::from_headers(headers, state.directive_defaults)?;
    may_set_price(&who, &directives)?;
    let gate = Gate {
        served,
        principal: who,
        directives,
        route,
        body,
        arrived,
        attempt: rid.1.clone(),
    };
    if refuse_full && idempotent && !ready.engine.has_room() {
        let held = gate
            .idempotency_key(&ready.model_hash, &ready.template_hash)
            .is_some_and(|k| state.idempotency.holds(k));
        if !held {
            return Err(refuse(&gate.principal, &gate.served.name));
        }
    }
    Ok((ready, req, sampling, gate))
}
