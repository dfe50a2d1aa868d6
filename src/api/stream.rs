//! Server-sent events in OpenAI's exact chunk shapes: a role delta first (chat), content or
//! tool-call deltas, a chunk with `finish_reason`, an optional usage chunk, then
//! `data: [DONE]`. Dropping the stream (the client left) drops the engine's receiver, which
//! cancels the request.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};

use super::error::ApiError;
use super::gate::Tail;
use super::response::{delta_json, finish_name, Meta};
use super::text_logprobs::{prompt_items, Item, TextLogprobs};
use crate::engine::request::{Event, EventReceiver};
use crate::structured::toolcall::CallParser;

struct State {
    rx: EventReceiver,
    meta: Meta,
    /// Chunks ready to send, in order.
    pending: VecDeque<Value>,
    /// Splits the text into content and tool-call deltas, when the reply may call tools.
    calls: Option<CallParser>,
    include_usage: bool,
    tail: Tail,
    /// The completions API's logprobs, whose offsets run on from chunk to chunk.
    text_logprobs: TextLogprobs,
    /// The engine has nothing more to send (finished, failed or gone).
    ended: bool,
    done_sent: bool,
}

pub fn sse_response(
    rx: EventReceiver,
    meta: Meta,
    include_usage: bool,
    tail: Tail,
    keep_alive: std::time::Duration,
) -> Response {
    let mut pending = VecDeque::new();
    if meta.chat {
        let delta = json!({"role": "assistant", "content": ""});
        pending.push_back(meta.chunk(delta, None, Value::Null));
    } else if let (Some(echo), false) = (&meta.echo, meta.logprobs) {
        // Echoed at once; with logprobs it waits for the prompt's scores.
        pending.push_back(meta.chunk(json!({"content": echo}), None, Value::Null));
    }
    let state = State {
        rx,
        calls: meta.call_parser(),
        meta,
        pending,
        include_usage,
        tail,
        text_logprobs: TextLogprobs::default(),
        ended: false,
        done_sent: false,
    };
    sse_of(events(state), keep_alive)
}

/// A streamed answer of any surface: a comment every `keep_alive` (`--sse-keep-alive`, 15 s)
/// keeps proxies from timing out a stream that waits in the queue or in a long prefill, and
/// nginx must not buffer it.
pub fn sse_of(
    events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
    keep_alive: std::time::Duration,
) -> Response {
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response();
    resp.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    resp
}

impl State {
    /// Turns one engine event into the chunks it makes.
    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Prompt { first, logprobs }) => {
                if let (Some(echo), true) = (&self.meta.echo, self.meta.logprobs) {
                    let lps = self.text_logprobs.value(prompt_items(&first, &logprobs));
                    let chunk = self.meta.chunk(json!({"content": echo}), None, lps);
                    self.pending.push_back(chunk);
                }
            }
            Some(Event::Token { text, logprob }) => {
                let mut logprobs = match (&logprob, self.meta.chat) {
                    (Some(info), false) if self.meta.logprobs => {
                        self.text_logprobs.value([Item::Scored(info)])
                    }
                    _ => self.meta.logprobs_value(logprob.as_ref()),
                };
                let deltas: Vec<Value> = match &mut self.calls {
                    None if text.is_empty() && logprob.is_none() => Vec::new(),
                    None => vec![json!({"content": text})],
                    Some(p) => p.push(&text).iter().map(delta_json).collect(),
                };
                for delta in deltas {
                    let chunk = self.meta.chunk(delta, None, std::mem::take(&mut logprobs));
                    self.pending.push_back(chunk);
                }
            }
            Some(Event::Finished { reason, usage, .. }) => {
                let mut made_calls = false;
                if let Some(p) = &mut self.calls {
                    for piece in p.finish() {
                        self.pending.push_back(self.meta.chunk(
                            delta_json(&piece),
                            None,
                            Value::Null,
                        ));
                    }
                    made_calls = !p.calls().is_empty();
                }
                let finish = finish_name(reason, made_calls);
                self.pending
                    .push_back(self.meta.chunk(json!({}), Some(finish), Value::Null));
                if self.include_usage {
                    self.pending.push_back(self.meta.usage_chunk(usage));
                }
                self.ended = true;
            }
            Some(Event::Failed(msg)) => {
                self.pending.push_back(ApiError::internal(msg).body());
                self.ended = true;
            }
            None => {
                self.pending.push_back(ApiError::engine_stopped().body());
                self.ended = true;
            }
        }
    }
}

fn data(v: Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

fn events(state: State) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(chunk) = s.pending.pop_front() {
                return Some((data(chunk), s));
            }
            if s.ended {
                if s.done_sent {
                    return None;
                }
                s.done_sent = true;
                return Some((Ok(SseEvent::default().data("[DONE]")), s));
            }
            let ev = s.rx.recv().await;
            if let Some(ev) = &ev {
                s.tail.observe(ev).await;
            }
            s.on_event(ev);
        }
    })
}
