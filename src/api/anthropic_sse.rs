//! Anthropic's Messages API as an event stream: `message_start`, `ping`, per block
//! `content_block_start`, deltas and `content_block_stop`, then `message_delta` and
//! `message_stop`.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::Event as SseEvent;
use axum::response::Response;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};

use super::anthropic::{stop_fields, usage_json};
use super::error::ApiError;
use super::gate::Tail;
use super::response::Meta;
use crate::engine::request::{Event, EventReceiver};
use crate::structured::reasoning::ReplyParser;
use crate::structured::toolcall::Piece;

/// Streams Anthropic's events: `message_start`, `ping`, per block `content_block_start`,
/// deltas (`text_delta`, `input_json_delta`) and `content_block_stop`, then `message_delta`
/// (stop reason, usage) and `message_stop`; an error after the headers is an `error` event.
/// Dropping the stream cancels the request, as on the OpenAI surface.
pub fn sse(
    rx: EventReceiver,
    meta: Meta,
    prompt_tokens: usize,
    tail: Tail,
    keep_alive: std::time::Duration,
) -> Response {
    let mut pending = VecDeque::new();
    pending.push_back((
        "message_start",
        json!({"type": "message_start", "message": {
            "id": meta.id, "type": "message", "role": "assistant", "model": meta.model,
            "content": [], "stop_reason": Value::Null, "stop_sequence": Value::Null,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
        }}),
    ));
    pending.push_back(("ping", json!({"type": "ping"})));
    let state = State {
        rx,
        calls: meta.call_parser(),
        pending,
        open: None,
        blocks: 0,
        tail,
        ended: false,
    };
    super::stream::sse_of(events(state), keep_alive)
}

#[derive(Clone, Copy, PartialEq)]
enum Open {
    Thinking,
    Text,
    /// A tool_use block for the parser's call `n`.
    Call(usize),
}

struct State {
    rx: EventReceiver,
    calls: Option<ReplyParser>,
    pending: VecDeque<(&'static str, Value)>,
    /// The block being streamed.
    open: Option<Open>,
    /// Blocks started so far (the next block's index).
    blocks: usize,
    tail: Tail,
    ended: bool,
}

impl State {
    fn close(&mut self) {
        if self.open.take().is_some() {
            let index = self.blocks - 1;
            self.pending.push_back((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn start(&mut self, open: Open, block: Value) {
        self.close();
        self.pending.push_back((
            "content_block_start",
            json!({"type": "content_block_start", "index": self.blocks, "content_block": block}),
        ));
        self.blocks += 1;
        self.open = Some(open);
    }

    fn delta(&mut self, delta: Value) {
        let index = self.blocks - 1;
        self.pending.push_back((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }

    fn piece(&mut self, piece: Piece) {
        match piece {
            Piece::Reasoning(text) => {
                if self.open != Some(Open::Thinking) {
                    let block = json!({"type": "thinking", "thinking": "", "signature": ""});
                    self.start(Open::Thinking, block);
                }
                self.delta(json!({"type": "thinking_delta", "thinking": text}));
            }
            Piece::Content(text) if text.is_empty() => {}
            Piece::Content(text) => {
                if self.open != Some(Open::Text) {
                    self.start(Open::Text, json!({"type": "text", "text": ""}));
                }
                self.delta(json!({"type": "text_delta", "text": text}));
            }
            Piece::CallStart { index, id, name } => self.start(
                Open::Call(index),
                json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
            ),
            Piece::Arguments { text, .. } => {
                self.delta(json!({"type": "input_json_delta", "partial_json": text}))
            }
        }
    }

    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            // Only the completions API asks for the prompt's scores; embeddings are not text.
            Some(Event::Prompt { .. } | Event::Embedding(_)) => {}
            Some(Event::Token { text, .. }) => {
                let pieces = match &mut self.calls {
                    None => vec![Piece::Content(text)],
                    Some(p) => p.push(&text),
                };
                pieces.into_iter().for_each(|p| self.piece(p));
            }
            Some(Event::Finished {
                reason,
                usage,
                stop_sequence,
                ..
            }) => {
                let mut made_calls = false;
                if let Some(mut p) = self.calls.take() {
                    p.finish().into_iter().for_each(|piece| self.piece(piece));
                    made_calls = !p.calls().is_empty();
                }
                self.close();
                let (stop_reason, stop_sequence) = stop_fields(reason, stop_sequence, made_calls);
                self.pending.push_back((
                    "message_delta",
                    json!({"type": "message_delta",
                           "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                           "usage": usage_json(usage)}),
                ));
                self.pending
                    .push_back(("message_stop", json!({"type": "message_stop"})));
                self.ended = true;
            }
            Some(Event::Failed(f)) => {
                self.pending
                    .push_back(("error", ApiError::engine(f).anthropic_body()));
                self.ended = true;
            }
            None => {
                self.pending
                    .push_back(("error", ApiError::engine_stopped().anthropic_body()));
                self.ended = true;
            }
        }
    }
}

fn events(state: State) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some((name, v)) = s.pending.pop_front() {
                return Some((Ok(SseEvent::default().event(name).data(v.to_string())), s));
            }
            if s.ended {
                return None;
            }
            let ev = s.rx.recv().await;
            if let Some(ev) = &ev {
                s.tail.observe(ev).await;
            }
            s.on_event(ev);
        }
    })
}
