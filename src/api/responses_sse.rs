//! The Responses API's stream: typed events (`response.created`, `response.output_item.added`,
//! `response.output_text.delta`, `response.function_call_arguments.delta`, ...,
//! `response.completed` or `response.incomplete`), each with a `sequence_number`; the final
//! response is stored like a whole one.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::Event as SseEvent;
use axum::response::Response;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};

use super::error::ApiError;
use super::gate::Tail;
use super::response::Meta;
use super::responses::{finish, message_id, message_item, object, reasoning_item, ResponsesCtx};
use super::responses_logprobs::Streamed;
use crate::engine::request::FinishReason;
use crate::engine::request::{Event, EventReceiver};
use crate::structured::reasoning::ReplyParser;
use crate::structured::toolcall::Piece;

/// Streams the Responses API's typed events, each with a `sequence_number`.
pub fn sse(
    rx: EventReceiver,
    meta: Meta,
    ctx: Arc<ResponsesCtx>,
    tail: Tail,
    keep_alive: std::time::Duration,
) -> Response {
    let mut s = State {
        rx,
        calls: meta.call_parser(),
        pending: VecDeque::new(),
        seq: 0,
        reasoning: None,
        text: None,
        call: None,
        output: Vec::new(),
        item_status: "completed",
        lps: Streamed::default(),
        tail,
        ended: false,
        meta,
        ctx,
    };
    let created = object(&s.ctx, &s.meta, "in_progress", Vec::new(), None);
    s.emit("response.created", json!({"response": created}));
    s.emit("response.in_progress", json!({"response": created}));
    super::stream::sse_of(events(s), keep_alive)
}

struct State {
    rx: EventReceiver,
    calls: Option<ReplyParser>,
    /// The reasoning item being streamed: its text so far.
    reasoning: Option<String>,
    pending: VecDeque<(&'static str, Value)>,
    seq: u64,
    /// The message item being streamed: its text so far.
    text: Option<String>,
    /// The call item being streamed: (id, call id, name, arguments so far).
    call: Option<(String, String, String, String)>,
    output: Vec<Value>,
    /// The status items get when they close: `incomplete` once the token budget ran out.
    item_status: &'static str,
    /// The logprobs of the text to come and of the message (none unless asked for).
    lps: Streamed,
    tail: Tail,
    ended: bool,
    meta: Meta,
    ctx: Arc<ResponsesCtx>,
}

impl State {
    fn emit(&mut self, kind: &'static str, mut data: Value) {
        data["type"] = Value::from(kind);
        data["sequence_number"] = Value::from(self.seq);
        self.seq += 1;
        self.pending.push_back((kind, data));
    }

    /// Opens the message item text goes into, unless one is open.
    fn open_text(&mut self) {
        if self.text.is_some() {
            return;
        }
        self.close();
        let item = message_item(&self.ctx, self.output.len(), "", "in_progress");
        self.announce(
            item,
            json!({"type": "output_text", "text": "", "annotations": []}),
        );
        self.text = Some(String::new());
    }

    /// Announces an item that parts of text go into: `output_item.added`, empty, then its
    /// first part's `content_part.added`.
    fn announce(&mut self, mut item: Value, part: Value) {
        let index = self.output.len();
        let id = item["id"].clone();
        item["content"] = json!([]);
        self.emit(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        self.emit(
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        );
    }

    fn close(&mut self) {
        let index = self.output.len();
        if let Some(text) = self.reasoning.take() {
            let item = reasoning_item(&self.ctx, index, &text, self.item_status);
            self.emit(
                "response.reasoning_text.done",
                json!({"item_id": item["id"], "output_index": index, "content_index": 0,
                       "text": text}),
            );
            self.emit(
                "response.content_part.done",
                json!({"item_id": item["id"], "output_index": index, "content_index": 0,
                       "part": {"type": "reasoning_text", "text": text}}),
            );
            self.emit(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
            self.output.push(item);
        }
        if let Some(text) = self.text.take() {
            let mut item = message_item(&self.ctx, index, &text, self.item_status);
            let id = item["id"].clone();
            let mut part = json!({"type": "output_text", "text": text, "annotations": []});
            let lps = self.lps.message();
            if self.meta.logprobs {
                part["logprobs"] = lps.clone();
                item["content"][0]["logprobs"] = lps.clone();
            }
            self.emit(
                "response.output_text.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "text": text,
                       "logprobs": lps}),
            );
            self.emit(
                "response.content_part.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            );
            self.emit(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
            self.output.push(item);
        }
        if let Some((id, call_id, name, args)) = self.call.take() {
            let item = json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
                              "arguments": args, "status": self.item_status});
            self.emit(
                "response.function_call_arguments.done",
                json!({"item_id": id, "output_index": index, "name": name, "arguments": args}),
            );
            self.emit(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
            self.output.push(item);
        }
    }

    fn piece(&mut self, piece: Piece) {
        let index = self.output.len();
        if !matches!(piece, Piece::Content(_)) {
            self.lps.other();
        }
        match piece {
            Piece::Reasoning(t) => {
                if self.reasoning.is_none() {
                    self.close();
                    let item = reasoning_item(&self.ctx, self.output.len(), "", "in_progress");
                    self.announce(item, json!({"type": "reasoning_text", "text": ""}));
                    self.reasoning = Some(String::new());
                }
                let index = self.output.len();
                let item = reasoning_item(&self.ctx, index, "", "in_progress");
                self.emit(
                    "response.reasoning_text.delta",
                    json!({"item_id": item["id"], "output_index": index, "content_index": 0,
                           "delta": t}),
                );
                if let Some(r) = &mut self.reasoning {
                    r.push_str(&t);
                }
            }
            Piece::Content(t) if t.is_empty() => {}
            Piece::Content(t) => {
                self.open_text();
                let index = self.output.len();
                let id = message_id(&self.ctx, index);
                let lps = self.lps.text(&t);
                self.emit(
                    "response.output_text.delta",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "delta": t,
                           "logprobs": lps}),
                );
                if let Some(text) = &mut self.text {
                    text.push_str(&t);
                }
            }
            Piece::CallStart { id, name, .. } => {
                self.close();
                let index = self.output.len();
                let item_id = format!("fc_{}", id.trim_start_matches("call_"));
                self.emit(
                    "response.output_item.added",
                    json!({"output_index": index, "item": {
                    "type": "function_call", "id": item_id, "call_id": id, "name": name,
                    "arguments": "", "status": "in_progress"}}),
                );
                self.call = Some((item_id, id, name, String::new()));
            }
            Piece::Arguments { text, .. } => {
                if let Some((item_id, _, _, args)) = &mut self.call {
                    args.push_str(&text);
                    let item_id = item_id.clone();
                    self.emit(
                        "response.function_call_arguments.delta",
                        json!({"item_id": item_id, "output_index": index, "delta": text}),
                    );
                }
            }
        }
    }

    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            // Only the completions API asks for the prompt's scores; embeddings are not text.
            Some(Event::Prompt { .. } | Event::Embedding(_)) => {}
            Some(Event::Token { text, logprob, .. }) => {
                self.lps.token(logprob);
                let pieces = match &mut self.calls {
                    None => vec![Piece::Content(text)],
                    Some(p) => p.push(&text),
                };
                pieces.into_iter().for_each(|p| self.piece(p));
            }
            Some(Event::Finished {
                reason, mut usage, ..
            }) => {
                if let Some(mut p) = self.calls.take() {
                    p.finish().into_iter().for_each(|piece| self.piece(piece));
                    super::response::set_reasoning_tokens(&mut usage, p.reasoning_tokens());
                }
                if reason == FinishReason::Length {
                    self.item_status = "incomplete";
                }
                // A reply with nothing in it is an empty message, announced as any other
                // (a call alone, still open here, is something).
                if self.output.is_empty() && self.reasoning.is_none() && self.call.is_none() {
                    self.open_text();
                }
                self.close();
                let r = finish(
                    &self.ctx,
                    &self.meta,
                    std::mem::take(&mut self.output),
                    reason,
                    usage,
                );
                let kind = match reason {
                    FinishReason::Length => "response.incomplete",
                    FinishReason::Stop => "response.completed",
                };
                self.emit(kind, json!({"response": r}));
                self.ended = true;
            }
            Some(Event::Failed(f)) => self.fail(f.message),
            None => self.fail(ApiError::engine_stopped().message),
        }
    }

    /// The reply cannot go on: an `error` event, then `response.failed` with the response
    /// as far as it got, so a client waiting for the final response event gets one.
    fn fail(&mut self, msg: String) {
        self.emit(
            "error",
            json!({"code": "server_error", "message": msg, "param": null}),
        );
        self.item_status = "incomplete";
        self.close();
        let output = std::mem::take(&mut self.output);
        let mut r = object(&self.ctx, &self.meta, "failed", output, None);
        r["error"] = json!({"code": "server_error", "message": msg});
        self.emit("response.failed", json!({"response": r}));
        self.ended = true;
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
