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
use crate::api::types::{from_value, parse_body, SamplingFields};
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

/// The model must be the served one (404), and one the key may use (403).
pub(in crate::api) fn check_model(
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
pub(in crate::api) fn labels(
    state: &AppState,
    request_id: &str,
    route: &str,
    d: Option<&Directives>,
) -> Labels {
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
    let body = body_or_error(body, state.max_body_bytes)?;
    // The request timeout counts from here: parsing, templating and grammars included.
    let arrived = Instant::now();
    let ready = state.ready()?;
    // Full: refuse before parsing, rendering or tokenizing anything (a flood's 429s stay cheap).
    // A retry with an `Idempotency-Key` is parsed first: its reply may be there to replay.
    let refuse = |who: &Principal| {
        let directives = Directives::from_headers(headers, state.directive_defaults).ok();
        let labels = labels(state, &rid.0, route, directives.as_ref());
        state
            .gateway
            .record_rejected(who.key_id(), &labels, Instant::now());
        ApiError::overloaded()
    };
    let idempotent = headers.contains_key("idempotency-key");
    if !ready.engine.has_room() && !idempotent {
        return Err(refuse(&who));
    }
    let body = translate(parse_body(&body)?)?;
    let req: T = from_value(&body)?;
    let sampling: SamplingFields = from_value(&body)?;
    check_model(state, &who, model(&req))?;
    let directives = Directives::from_headers(headers, state.directive_defaults)?;
    let gate = Gate {
        principal: who,
        directives,
        route,
        body,
        arrived,
    };
    if idempotent && !ready.engine.has_room() {
        let held = gate
            .idempotency_key(&ready.model_hash, &ready.template_hash)
            .is_some_and(|k| state.idempotency.holds(k));
        if !held {
            return Err(refuse(&gate.principal));
        }
    }
    Ok((ready, req, sampling, gate))
}
