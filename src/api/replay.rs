//! Answers from a kept reply: a response-cache hit or an `Idempotency-Key` replay, whole
//! or streamed, and a streamed retry that waits for the first attempt's reply to be kept.

use std::time::{Duration, Instant};

use axum::response::Response;

use super::choices::Choice;
use super::error::ApiError;
use super::gate::{add_headers, rate_headers, refusal_error, replay, Gate, Recorded, Tail};
use super::response::{respond, Meta};
use super::AppState;
use crate::engine::request::Event;
use crate::gateway::cache::{self, Cached};
use crate::gateway::price::Price;
use crate::gateway::Labels;

/// How to render a reply.
pub(super) struct Reply {
    pub meta: Meta,
    pub echo: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Answers from a cached reply: metered as `cached` at its own price, no tokens reserved.
pub(super) async fn replay_hit(
    (gateway, keep_alive): (&crate::gateway::Gateway, Duration),
    gate: &Gate,
    hit: &Cached<Recorded>,
    (price, replayed): (Price, bool),
    labels: &Labels,
    reply: Reply,
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
    let committed = gateway
        .admit_cache_hit(&gate.principal, usage, price, replayed, labels, received)
        .map_err(|(refusal, rate)| {
            refusal_error(refusal, usage.prompt_tokens, usage.completion_tokens, rate)
        })?;
    if !matches!(committed.await, Ok(true)) {
        tracing::error!("the ledger row of a cache hit was not committed");
    }
    let choice = Choice::new(replay(&hit.value), reply.echo, true);
    let mut resp = respond(
        vec![choice],
        reply.meta,
        reply.stream,
        reply.include_usage,
        Tail::default(),
        keep_alive,
        None,
    )
    .await?;
    let mut headers = rate_headers(gateway.rate_info(&gate.principal));
    if replayed {
        headers.push(("idempotent-replayed", "true".into()));
    } else {
        headers.push(("cf-aig-cache-status", "HIT".into()));
        headers.push(("age", hit.age().to_string()));
    }
    add_headers(&mut resp, headers);
    Ok(resp)
}

/// A streamed retry of an idempotent request still running must not generate again: it is
/// answered at once and kept alive (`--sse-keep-alive`) until the first attempt's reply is
/// kept, then replayed. Its headers say what a replay's would (free: the key's windows stand
/// as they are); should the first attempt fail, its stream ends with an error event.
pub(super) fn when_replayed(
    state: &AppState,
    gate: Gate,
    first: tokio::sync::watch::Receiver<Option<std::sync::Arc<Cached<Recorded>>>>,
    (price, labels, received): (Price, Labels, Instant),
    reply: Reply,
) -> Response {
    let mut headers = rate_headers(state.gateway.rate_info(&gate.principal));
    headers.push(("idempotent-replayed", "true".into()));
    let render = super::stream::error_event_of(&reply.meta.surface);
    let (gateway, keep_alive) = (state.gateway.clone(), state.sse_keep_alive);
    let later = async move {
        let Some(hit) = cache::wait(first).await else {
            return Err(ApiError::unavailable(
                "the first request with this Idempotency-Key failed before it finished; send it again",
            ));
        };
        let at = (&*gateway, keep_alive);
        replay_hit(at, &gate, &hit, (price, true), &labels, reply, received).await
    };
    let mut resp = super::stream::sse_when_ready(later, keep_alive, render);
    add_headers(&mut resp, headers);
    resp
}
