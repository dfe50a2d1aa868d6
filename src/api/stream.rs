//! Server-sent events in OpenAI's exact chunk shapes: a role delta first (chat), content
//! deltas, a chunk with `finish_reason`, an optional usage chunk, then `data: [DONE]`.
//! Dropping the stream (the client left) drops the engine's receiver, which cancels the request.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};

use super::error::ApiError;
use super::handlers::{finish_name, Meta};
use crate::engine::request::{Event, EventReceiver, Usage};

enum Phase {
    Start,
    Body,
    UsageChunk(Usage),
    Done,
    End,
}

struct State {
    rx: EventReceiver,
    meta: Meta,
    phase: Phase,
    include_usage: bool,
}

pub fn sse_response(rx: EventReceiver, meta: Meta, include_usage: bool) -> Response {
    let state = State {
        rx,
        meta,
        phase: Phase::Start,
        include_usage,
    };
    Sse::new(events(state))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn data(v: Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

fn events(state: State) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(state, |mut s| async move {
        loop {
            match std::mem::replace(&mut s.phase, Phase::End) {
                Phase::Start => {
                    s.phase = Phase::Body;
                    if s.meta.chat {
                        let delta = json!({"role": "assistant", "content": ""});
                        return Some((data(s.meta.chunk(delta, None, Value::Null)), s));
                    }
                }
                Phase::Body => match s.rx.recv().await {
                    Some(Event::Token { text, logprob }) => {
                        s.phase = Phase::Body;
                        if text.is_empty() && logprob.is_none() {
                            continue;
                        }
                        let logprobs = s.meta.logprobs_value(logprob.as_ref());
                        let chunk = s.meta.chunk(json!({"content": text}), None, logprobs);
                        return Some((data(chunk), s));
                    }
                    Some(Event::Finished { reason, usage }) => {
                        s.phase = if s.include_usage {
                            Phase::UsageChunk(usage)
                        } else {
                            Phase::Done
                        };
                        let chunk = s
                            .meta
                            .chunk(json!({}), Some(finish_name(reason)), Value::Null);
                        return Some((data(chunk), s));
                    }
                    Some(Event::Failed(msg)) => {
                        s.phase = Phase::Done;
                        return Some((data(ApiError::internal(msg).body()), s));
                    }
                    None => {
                        s.phase = Phase::Done;
                        let err =
                            ApiError::unavailable("The engine stopped before the request finished");
                        return Some((data(err.body()), s));
                    }
                },
                Phase::UsageChunk(usage) => {
                    s.phase = Phase::Done;
                    return Some((data(s.meta.usage_chunk(usage)), s));
                }
                Phase::Done => {
                    s.phase = Phase::End;
                    return Some((Ok(SseEvent::default().data("[DONE]")), s));
                }
                Phase::End => return None,
            }
        }
    })
}
