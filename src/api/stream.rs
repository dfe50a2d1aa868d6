//! Server-sent events in OpenAI's exact chunk shapes: a role delta first (chat), content or
//! tool-call deltas, a chunk with `finish_reason`, an optional usage chunk, then
//! `data: [DONE]`. Dropping the stream (the client left) drops the engine's receiver, which
//! cancels the request.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, SelectAll, Stream};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::choices::Choice;
use super::error::ApiError;
use super::gate::Tail;
use super::response::{add_usage, delta_json, finish_name, set_reasoning_tokens, Meta};
use super::text_logprobs::{prompt_items, Item, TextLogprobs};
use crate::engine::request::{Event, EventReceiver, Usage};
use crate::structured::reasoning::ReplyParser;

/// One choice's part of the stream.
struct ChoiceState {
    /// Splits the text into content and tool-call deltas, when the reply may call tools.
    calls: Option<ReplyParser>,
    /// The completions API's logprobs, whose offsets run on from chunk to chunk.
    text_logprobs: TextLogprobs,
    /// The text `echo` puts first, until it is sent.
    echo: Option<String>,
    /// Whether its usage counts its prompt (see `add_usage`).
    counts_prompt: bool,
    finished: bool,
}

/// Every choice's events, merged: `(choice, None)` once its channel closes.
type Merged = SelectAll<BoxStream<'static, (usize, Option<Event>)>>;

struct State {
    rx: Merged,
    meta: Meta,
    /// Chunks ready to send, in order.
    pending: VecDeque<Value>,
    choices: Vec<ChoiceState>,
    /// The finished choices' usage, summed.
    usage: Usage,
    include_usage: bool,
    tail: Tail,
    /// The engine has nothing more to send (finished, failed or gone).
    ended: bool,
    done_sent: bool,
}

/// The events of one choice, then `None` when its channel closes.
fn tagged(index: usize, rx: EventReceiver) -> BoxStream<'static, (usize, Option<Event>)> {
    stream::unfold(Some(rx), move |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(ev) => Some(((index, Some(ev)), Some(rx))),
            None => Some(((index, None), None)),
        }
    })
    .boxed()
}

/// The choices' chunks interleave as their tokens come; each choice's carry its `index`.
pub fn sse_response(
    choices: Vec<Choice>,
    meta: Meta,
    include_usage: bool,
    tail: Tail,
    keep_alive: std::time::Duration,
) -> Response {
    let mut pending = VecDeque::new();
    let mut states = Vec::new();
    let mut streams = Vec::new();
    for (i, c) in choices.into_iter().enumerate() {
        if meta.chat {
            let delta = json!({"role": "assistant", "content": ""});
            pending.push_back(meta.chunk(i, delta, None, Value::Null));
        }
        let mut echo = c.echo;
        if !meta.logprobs {
            // Echoed at once; with logprobs it waits for the prompt's scores.
            if let Some(echo) = echo.take() {
                pending.push_back(meta.chunk(i, json!({"content": echo}), None, Value::Null));
            }
        }
        states.push(ChoiceState {
            calls: meta.call_parser(),
            text_logprobs: TextLogprobs::default(),
            echo,
            counts_prompt: c.counts_prompt,
            finished: false,
        });
        streams.push(tagged(i, c.rx));
    }
    let state = State {
        rx: stream::select_all(streams),
        meta,
        pending,
        choices: states,
        usage: Usage::default(),
        include_usage,
        tail,
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

/// How a stream of `surface` tells an error after its headers went out: one SSE event.
pub fn error_event_of(surface: &super::response::Surface) -> fn(&ApiError) -> String {
    use super::response::Surface;
    match surface {
        Surface::Anthropic { .. } => |e| format!("event: error\ndata: {}\n\n", e.anthropic_body()),
        Surface::Workers { .. } => |e| format!("data: {}\n\n", e.workers_body()),
        Surface::Responses(_) => |e| {
            let data = json!({"type": "error", "code": e.code.unwrap_or(e.kind),
                              "message": e.message, "param": e.param});
            format!("event: error\ndata: {data}\n\n")
        },
        Surface::OpenAi => |e| format!("data: {}\n\ndata: [DONE]\n\n", e.body()),
        Surface::LlamaCpp(_) => |e| format!("data: {}\n\n", e.body()),
    }
}

/// A stream whose events are not ready yet (an idempotent retry waiting for the first
/// attempt's reply): answered at once, a comment every `keep_alive` while `later` runs, then
/// the body of the response it gives; an error then is one event as `error_event` writes it.
pub fn sse_when_ready(
    later: impl std::future::Future<Output = Result<Response, ApiError>> + Send + 'static,
    keep_alive: std::time::Duration,
    error_event: fn(&ApiError) -> String,
) -> Response {
    use axum::body::{Body, Bytes};
    use axum::http::header;
    type Chunk = Result<Bytes, axum::Error>;
    enum Phase {
        Waiting(
            futures_util::future::BoxFuture<'static, Result<Response, ApiError>>,
            tokio::time::Interval,
        ),
        Body(BoxStream<'static, Chunk>),
    }
    let first_tick = tokio::time::Instant::now() + keep_alive;
    let waiting = Phase::Waiting(
        Box::pin(later),
        tokio::time::interval_at(first_tick, keep_alive),
    );
    let body = stream::unfold(waiting, move |phase| async move {
        let mut rest = match phase {
            Phase::Waiting(mut later, mut tick) => tokio::select! {
                _ = tick.tick() => {
                    let alive: Chunk = Ok(Bytes::from_static(b": keep-alive\n\n"));
                    return Some((alive, Phase::Waiting(later, tick)));
                }
                answer = &mut later => match answer {
                    Ok(resp) => resp.into_body().into_data_stream().boxed(),
                    Err(e) => {
                        let event = error_event(&e);
                        stream::once(async move { Ok(Bytes::from(event)) }).boxed()
                    }
                },
            },
            Phase::Body(rest) => rest,
        };
        let chunk = rest.next().await?;
        Some((chunk, Phase::Body(rest)))
    });
    let mut resp = Body::from_stream(body).into_response();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache"),
        (header::HeaderName::from_static("x-accel-buffering"), "no"),
    ] {
        resp.headers_mut()
            .insert(name, axum::http::HeaderValue::from_static(value));
    }
    resp
}

impl State {
    /// Whether `ev` ends the last choice still running.
    fn ends_all(&self, i: usize, ev: &Event) -> bool {
        matches!(ev, Event::Finished { .. })
            && self
                .choices
                .iter()
                .enumerate()
                .all(|(j, c)| c.finished || j == i)
    }

    /// Turns one engine event of choice `i` into the chunks it makes.
    fn on_event(&mut self, i: usize, ev: Option<Event>) {
        let meta = &self.meta;
        let c = &mut self.choices[i];
        if let Some(echo) = c.echo.take() {
            // The prompt's scores come first; a reply recorded without them (a custom cache
            // key) still echoes the prompt.
            let lps = match &ev {
                Some(Event::Prompt { first, logprobs }) => {
                    c.text_logprobs.value(prompt_items(first, logprobs, &echo))
                }
                _ => Value::Null,
            };
            self.pending
                .push_back(meta.chunk(i, json!({"content": echo}), None, lps));
        }
        match ev {
            Some(Event::Prompt { .. } | Event::Embedding(_)) => {}
            Some(Event::Token { text, logprob, .. }) => {
                let mut logprobs = match (&logprob, meta.chat) {
                    (Some(info), false) if meta.logprobs => {
                        c.text_logprobs.value([Item::Scored(info)])
                    }
                    _ => meta.logprobs_value(logprob.as_ref()),
                };
                let mut deltas: Vec<Value> = match &mut c.calls {
                    None if text.is_empty() && logprob.is_none() => Vec::new(),
                    None => vec![json!({"content": text})],
                    Some(p) => p.push(&text).iter().map(delta_json).collect(),
                };
                // A token whose text the parser holds back still reports its logprob.
                if deltas.is_empty() && !logprobs.is_null() {
                    deltas.push(json!({"content": ""}));
                }
                for delta in deltas {
                    let chunk = meta.chunk(i, delta, None, std::mem::take(&mut logprobs));
                    self.pending.push_back(chunk);
                }
            }
            Some(Event::Finished {
                reason, mut usage, ..
            }) => {
                let mut made_calls = false;
                if let Some(p) = &mut c.calls {
                    set_reasoning_tokens(&mut usage, p.reasoning_tokens());
                    for piece in p.finish() {
                        let chunk = meta.chunk(i, delta_json(&piece), None, Value::Null);
                        self.pending.push_back(chunk);
                    }
                    made_calls = !p.calls().is_empty();
                }
                c.finished = true;
                let finish = finish_name(reason, made_calls);
                self.pending
                    .push_back(meta.chunk(i, json!({}), Some(finish), Value::Null));
                add_usage(&mut self.usage, usage, c.counts_prompt);
                if self.choices.iter().all(|c| c.finished) {
                    if self.include_usage {
                        self.pending.push_back(self.meta.usage_chunk(self.usage));
                    }
                    self.ended = true;
                }
            }
            Some(Event::Failed(mut f)) => {
                // With `include_usage`, what was computed (and billed) comes first, with the
                // choices that finished before it.
                if let Some(usage) = f.usage.take().filter(|_| self.include_usage) {
                    add_usage(&mut self.usage, usage, c.counts_prompt);
                    self.pending.push_back(self.meta.usage_chunk(self.usage));
                }
                self.pending.push_back(ApiError::engine(f).body());
                self.ended = true;
            }
            None if c.finished => {}
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
            if let Some(mut chunk) = s.pending.pop_front() {
                // OpenAI: with `include_usage` every other chunk carries `"usage": null`.
                if let Some(c) = chunk.as_object_mut().filter(|c| c.contains_key("choices")) {
                    if s.include_usage {
                        c.entry("usage").or_insert(Value::Null);
                    }
                }
                return Some((data(chunk), s));
            }
            if s.ended {
                if s.done_sent {
                    return None;
                }
                s.done_sent = true;
                return Some((Ok(SseEvent::default().data("[DONE]")), s));
            }
            let Some((i, ev)) = s.rx.next().await else {
                // Every channel closed (cannot happen before every choice ended).
                s.ended = true;
                continue;
            };
            // One choice: every event (the response cache records them); several: the end
            // of the last, which waits for the one ledger row.
            if let Some(ev) = ev
                .as_ref()
                .filter(|ev| s.choices.len() == 1 || s.ends_all(i, ev))
            {
                s.tail.observe(ev).await;
            }
            s.on_event(i, ev);
        }
    })
}
