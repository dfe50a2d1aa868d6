//! OpenAI response shapes: the envelope every chunk and response of one request shares,
//! usage, tool calls, and the whole (non-streamed) answer.

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::gate::Tail;
use super::text_logprobs::{prompt_items, Item, TextLogprobs};
use crate::engine::request::FinishReason;
use crate::engine::request::{Event, EventReceiver, LogprobInfo, Usage};
use crate::structured::toolcall::{CallParser, ParsedCall, Piece};
use crate::structured::ToolFormat;

/// Fields shared by every chunk or response of one request.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub chat: bool,
    pub logprobs: bool,
    /// The completions API's `echo`: the prompt's text, put before the completion's.
    pub echo: Option<String>,
    /// Set when the reply may hold tool calls: the text is parsed for them in this format.
    pub tools: Option<ToolFormat>,
    /// The API shape the answer is rendered in.
    pub surface: Surface,
}

/// The API shape of an answer: each renders the same engine events.
#[derive(Clone)]
pub enum Surface {
    OpenAi,
    /// Anthropic's Messages API; its stream announces the prompt's size first.
    Anthropic {
        prompt_tokens: usize,
    },
    /// Workers AI's `ai/run`; `json`: the reply was constrained to JSON, which its
    /// `response` then carries as a value.
    Workers {
        json: bool,
    },
    /// OpenAI's Responses API, with what its answer echoes and stores.
    Responses(std::sync::Arc<super::responses::ResponsesCtx>),
}

impl Surface {
    /// The highest `temperature` the surface's API documents.
    pub fn max_temperature(&self) -> f32 {
        match self {
            Surface::OpenAi | Surface::Responses(_) => 2.0,
            Surface::Anthropic { .. } => 1.0,
            Surface::Workers { .. } => 5.0,
        }
    }
}

/// The answer to one request in its surface's shape, whole or streamed.
pub async fn respond(
    rx: EventReceiver,
    meta: Meta,
    stream: bool,
    include_usage: bool,
    tail: Tail,
    keep_alive: std::time::Duration,
) -> Result<Response, ApiError> {
    match (meta.surface.clone(), stream) {
        (Surface::OpenAi, true) => Ok(super::stream::sse_response(
            rx,
            meta,
            include_usage,
            tail,
            keep_alive,
        )),
        (Surface::Anthropic { prompt_tokens }, true) => Ok(super::anthropic::sse(
            rx,
            meta,
            prompt_tokens,
            tail,
            keep_alive,
        )),
        (Surface::Workers { .. }, true) => Ok(super::workers::sse(rx, meta, tail, keep_alive)),
        (Surface::Responses(ctx), true) => {
            Ok(super::responses_sse::sse(rx, meta, ctx, tail, keep_alive))
        }
        (_, false) => collect(rx, meta, tail).await,
    }
}

pub fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// OpenAI's finish reason; a reply that made calls and stopped by itself says `tool_calls`.
pub fn finish_name(r: FinishReason, made_calls: bool) -> &'static str {
    match r {
        FinishReason::Stop if made_calls => "tool_calls",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn tool_call_json(c: &ParsedCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

/// The chat delta of one parsed piece, in OpenAI's streaming shape.
pub fn delta_json(piece: &Piece) -> Value {
    match piece {
        Piece::Content(text) => json!({"content": text}),
        Piece::CallStart { index, id, name } => json!({"tool_calls": [{
            "index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": ""},
        }]}),
        Piece::Arguments { index, text } => {
            json!({"tool_calls": [{"index": index, "function": {"arguments": text}}]})
        }
    }
}

impl Meta {
    pub fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, true) => "chat.completion.chunk",
            (true, false) => "chat.completion",
            (false, _) => "text_completion",
        }
    }

    /// A parser for this reply's tool calls, when it may make any.
    pub fn call_parser(&self) -> Option<CallParser> {
        self.tools.map(CallParser::new)
    }

    /// One streamed chunk. `delta` is the chat delta (for text completions its `content`
    /// becomes `text`).
    pub fn chunk(&self, delta: Value, finish: Option<&str>, logprobs: Value) -> Value {
        let choice = if self.chat {
            json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        } else {
            let text = delta.get("content").cloned().unwrap_or(json!(""));
            json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish})
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "system_fingerprint": Value::Null, "choices": [choice]})
    }

    pub fn usage_chunk(&self, usage: Usage) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "choices": [], "usage": usage_json(usage)})
    }

    /// Chat logprobs for one token (`{"content": [...]}`), or null when not requested.
    pub fn logprobs_value(&self, info: Option<&LogprobInfo>) -> Value {
        match info {
            Some(info) if self.logprobs => json!({"content": [info]}),
            _ => Value::Null,
        }
    }

    /// The whole answer, once the engine finished. `prompt`: the prompt's first token and
    /// the logprobs of the others, when asked for (`echo` with `logprobs`).
    fn whole(
        &self,
        text: String,
        lps: Vec<LogprobInfo>,
        prompt: Option<(String, Vec<LogprobInfo>)>,
        reason: FinishReason,
        usage: Usage,
    ) -> Value {
        let logprobs = match (self.logprobs, self.chat) {
            (false, _) => Value::Null,
            (true, true) => json!({"content": lps}),
            (true, false) => {
                let prompt = prompt.iter().flat_map(|(f, p)| prompt_items(f, p));
                TextLogprobs::default().value(prompt.chain(lps.iter().map(Item::Scored)))
            }
        };
        let text = match &self.echo {
            Some(echo) => format!("{echo}{text}"),
            None => text,
        };
        let choice = if self.chat {
            let (content, calls) = match self.call_parser() {
                None => (Some(text), Vec::new()),
                Some(mut p) => {
                    let mut content = String::new();
                    for piece in p.push(&text).into_iter().chain(p.finish()) {
                        if let Piece::Content(t) = piece {
                            content.push_str(&t);
                        }
                    }
                    let calls: Vec<Value> = p.calls().iter().map(tool_call_json).collect();
                    (
                        (calls.is_empty() || !content.is_empty()).then_some(content),
                        calls,
                    )
                }
            };
            let mut message = json!({"role": "assistant", "content": content});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls.clone());
            }
            json!({"index": 0, "message": message, "logprobs": logprobs,
                   "finish_reason": finish_name(reason, !calls.is_empty())})
        } else {
            json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_name(reason, false)})
        };
        json!({"id": self.id, "object": self.object(false), "created": self.created,
               "model": self.model, "system_fingerprint": Value::Null,
               "choices": [choice], "usage": usage_json(usage)})
    }
}

/// Collects every event of one request into the whole answer.
async fn collect(mut rx: EventReceiver, meta: Meta, mut tail: Tail) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    let mut prompt = None;
    while let Some(ev) = rx.recv().await {
        tail.observe(&ev).await;
        match ev {
            Event::Prompt { first, logprobs } => prompt = Some((first, logprobs)),
            Event::Token { text: t, logprob } => {
                text.push_str(&t);
                lps.extend(logprob);
            }
            Event::Failed(msg) => return Err(ApiError::internal(msg)),
            Event::Finished {
                reason,
                usage,
                stop_sequence,
            } => {
                let whole = match &meta.surface {
                    Surface::OpenAi => meta.whole(text, lps, prompt, reason, usage),
                    Surface::Anthropic { .. } => {
                        super::anthropic::whole(&meta, text, reason, stop_sequence, usage)
                    }
                    Surface::Workers { json } => super::workers::whole(&meta, text, *json, usage),
                    Surface::Responses(ctx) => {
                        super::responses::whole(&meta, ctx, text, reason, usage)
                    }
                };
                return Ok(Json(whole).into_response());
            }
        }
    }
    Err(ApiError::engine_stopped())
}
