//! The Workers AI REST shape: `POST /client/v4/accounts/{account_id}/ai/run/{model}`. Its
//! body (`messages` or `prompt`, `raw`, sampling settings with Workers AI's defaults, tools,
//! `response_format`) is translated into the shared chat or completion request; the answer
//! is rendered in Cloudflare's envelope `{"result", "success", "errors", "messages"}`, or
//! streamed as `data: {"response": ...}` lines, a usage event and `data: [DONE]`. Errors
//! get the envelope in [`super::error`]. Nothing of this shape reaches `/v1`.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::Event as SseEvent;
use axum::response::Response;
use futures_util::stream::{self, Stream};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::gate::Tail;
use super::response::Meta;
use crate::engine::request::{Event, EventReceiver, Usage};
use crate::structured::reasoning::{ReplyParser, Shown, ThinkSplitter};
use crate::structured::toolcall::{ParsedCall, Piece};

/// Workers AI's defaults for text generation.
const DEFAULT_MAX_TOKENS: u64 = 256;
const DEFAULT_TEMPERATURE: f64 = 0.6;

/// A body for an embedding model: `text`, without `messages` or `prompt`.
pub fn is_embedding(body: &Value) -> bool {
    body.get("text").is_some() && body.get("messages").is_none() && body.get("prompt").is_none()
}

/// True when the body asks for a raw prompt (no chat template): the completion path.
pub fn is_raw_prompt(body: &Value) -> bool {
    body.get("raw").and_then(Value::as_bool) == Some(true) && body.get("prompt").is_some()
}

/// Translates a Workers AI body for `model` into an OpenAI chat request, or a completion
/// request when `raw` is set with a `prompt`.
pub fn to_openai(body: Value, model: &str) -> Result<Value, ApiError> {
    let raw = is_raw_prompt(&body);
    let Value::Object(b) = body else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object",
        ));
    };
    let mut out = Map::new();
    out.insert("model".into(), Value::from(model));
    // A fine-tune of the model: the LoRA adapter of that name (`--lora NAME=PATH`), which
    // the intake picks once the model is checked.
    match b.get("lora") {
        None | Some(Value::Null) => {}
        Some(Value::String(name)) if !name.is_empty() => {
            out.insert("lora".into(), json!(name));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "lora",
                "`lora` must name a LoRA adapter this server serves (`--lora NAME=PATH`)",
            ))
        }
    }
    for field in ["functions", "image"] {
        if b.get(field).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` is not supported by this server"),
            ));
        }
    }
    match (b.get("messages"), b.get("prompt")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "send either `messages` or `prompt`, not both",
            ))
        }
        (_, Some(p)) if !p.is_string() => {
            return Err(ApiError::invalid("prompt", "`prompt` must be a string"))
        }
        (None, Some(p)) if raw => {
            for field in ["response_format", "tools"] {
                if b.get(field).is_some_and(|v| !v.is_null()) {
                    return Err(ApiError::invalid(
                        field,
                        format!("`{field}` needs a chat request: send it without `raw`"),
                    ));
                }
            }
            out.insert("prompt".into(), p.clone());
        }
        (None, Some(p)) => {
            out.insert("messages".into(), json!([{"role": "user", "content": p}]));
        }
        (Some(Value::Array(msgs)), None) => {
            // Workers AI names a tool result by the tool; the chat path wants an id.
            let msgs = msgs
                .iter()
                .map(|m| {
                    let mut m = m.clone();
                    if m["role"] == "tool" && m.get("tool_call_id").is_none() {
                        m["tool_call_id"] = m.get("name").cloned().unwrap_or(json!("tool"));
                    }
                    m
                })
                .collect();
            out.insert("messages".into(), Value::Array(msgs));
        }
        (Some(_), None) => return Err(ApiError::invalid("messages", "`messages` must be a list")),
        (None, None) => {
            return Err(ApiError::invalid(
                "messages",
                "one of `messages` or `prompt` is required",
            ))
        }
    }
    let max_tokens = match b.get("max_tokens") {
        None | Some(Value::Null) => DEFAULT_MAX_TOKENS,
        Some(v) => v.as_u64().filter(|&m| m >= 1).ok_or_else(|| {
            ApiError::invalid(
                "max_tokens",
                "`max_tokens` must be an integer of at least 1",
            )
        })?,
    };
    out.insert("max_tokens".into(), Value::from(max_tokens));
    let temperature = b
        .get("temperature")
        .cloned()
        .unwrap_or(json!(DEFAULT_TEMPERATURE));
    out.insert("temperature".into(), temperature);
    for field in [
        "top_p",
        "top_k",
        "seed",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "stream",
        // Not in Workers AI's schema; taken as in OpenAI's for code that forces a call.
        "tool_choice",
        // Ours (as vLLM and llama.cpp take them): template variables and the prefix cache.
        "chat_template_kwargs",
        "cache_prompt",
    ] {
        if let Some(v) = b.get(field) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(tools) = b.get("tools") {
        let Some(list) = tools.as_array() else {
            return Err(ApiError::invalid("tools", "`tools` must be a list"));
        };
        // Workers AI takes OpenAI's shape or the bare function (`name`, `parameters`).
        let tools = list
            .iter()
            .map(|t| {
                if t.get("function").is_some() {
                    t.clone()
                } else {
                    json!({"type": "function", "function": t})
                }
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(f) = b.get("response_format") {
        let mut f = f.clone();
        // Workers AI's `json_schema` is the schema itself; OpenAI's wraps it.
        if f["type"] == "json_schema" && f["json_schema"].get("schema").is_none() {
            let schema = f["json_schema"].take();
            f["json_schema"] = json!({"name": "response", "schema": schema});
        }
        out.insert("response_format".into(), f);
    }
    Ok(Value::Object(out))
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    })
}

fn call_json(c: &ParsedCall) -> Value {
    let arguments = serde_json::from_str::<Value>(&c.arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    json!({"id": c.id, "name": c.name, "arguments": arguments})
}

pub fn envelope(result: Value) -> Value {
    json!({"result": result, "success": true, "errors": [], "messages": []})
}

/// The whole answer. `json`: the reply was constrained to JSON, so `response` is its value.
pub fn whole(meta: &Meta, text: String, json: bool, usage: Usage) -> Value {
    let (text, calls) = match meta.call_parser() {
        None => (text, Vec::new()),
        Some(p) => {
            let (_, content, calls) = p.whole(&text);
            let calls = calls.iter().map(call_json).collect();
            (content.unwrap_or_default(), calls)
        }
    };
    // JSON mode: `response` is the value, which a reasoning model writes after its thinking.
    let value = json.then(|| match meta.reasoning {
        Some(r) => {
            let think = ThinkSplitter::new(r.syntax, r.opened).shown(Shown::Dropped);
            let (_, answer, _) = ReplyParser::new(Some(think), None).whole(&text);
            serde_json::from_str::<Value>(&answer.unwrap_or_default()).ok()
        }
        None => serde_json::from_str::<Value>(&text).ok(),
    });
    let response = value.flatten().unwrap_or_else(|| Value::from(text));
    envelope(json!({"response": response, "tool_calls": calls, "usage": usage_json(usage)}))
}

/// Streams `data: {"response": TEXT}` per piece of text, the calls (if any) in one event, a
/// final `{"response": "", "usage": ...}`, then `data: [DONE]`.
pub fn sse(rx: EventReceiver, meta: Meta, tail: Tail, keep_alive: std::time::Duration) -> Response {
    let state = State {
        rx,
        calls: meta.call_parser(),
        pending: VecDeque::new(),
        tail,
        ended: false,
        done_sent: false,
    };
    super::stream::sse_of(events(state), keep_alive)
}

struct State {
    rx: EventReceiver,
    calls: Option<ReplyParser>,
    pending: VecDeque<Value>,
    tail: Tail,
    ended: bool,
    done_sent: bool,
}

impl State {
    fn text(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            if let Piece::Content(t) = piece {
                if !t.is_empty() {
                    self.pending.push_back(json!({"response": t}));
                }
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
                self.text(pieces);
            }
            Some(Event::Finished { usage, .. }) => {
                if let Some(mut p) = self.calls.take() {
                    let rest = p.finish();
                    self.text(rest);
                    if !p.calls().is_empty() {
                        let calls: Vec<Value> = p.calls().iter().map(call_json).collect();
                        self.pending
                            .push_back(json!({"response": "", "tool_calls": calls}));
                    }
                }
                self.pending
                    .push_back(json!({"response": "", "usage": usage_json(usage)}));
                self.ended = true;
            }
            Some(Event::Failed(f)) => {
                self.pending.push_back(ApiError::engine(f).workers_body());
                self.ended = true;
            }
            None => {
                self.pending
                    .push_back(ApiError::engine_stopped().workers_body());
                self.ended = true;
            }
        }
    }
}

fn events(state: State) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(v) = s.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(v.to_string())), s));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_prompt_tools_and_schema_translate() {
        let chat = to_openai(json!({"prompt": "Hi"}), "m").unwrap();
        assert_eq!(chat["messages"], json!([{"role": "user", "content": "Hi"}]));
        assert_eq!(chat["max_tokens"], 256);
        assert_eq!(chat["temperature"], 0.6);
        assert_eq!(chat["model"], "m");
        let raw = to_openai(json!({"prompt": "Once", "raw": true}), "m").unwrap();
        assert_eq!(raw["prompt"], "Once");
        assert!(raw.get("messages").is_none());
        let t = to_openai(
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "name": "f", "content": "1"}],
                   "tools": [{"name": "f", "parameters": {"type": "object"}}],
                   "response_format": {"type": "json_schema", "json_schema": {"type": "object"}}}),
            "m",
        )
        .unwrap();
        assert_eq!(t["tools"][0]["type"], "function");
        assert_eq!(t["tools"][0]["function"]["name"], "f");
        assert_eq!(t["messages"][1]["tool_call_id"], "f");
        assert_eq!(
            t["response_format"]["json_schema"]["schema"],
            json!({"type": "object"})
        );
    }

    #[test]
    fn a_fine_tune_runs_as_the_adapter_of_its_name() {
        let t = to_openai(json!({"prompt": "a", "lora": "sql"}), "m").unwrap();
        assert_eq!((&t["model"], &t["lora"]), (&json!("m"), &json!("sql")));
        let t = to_openai(json!({"prompt": "a", "lora": null}), "m").unwrap();
        assert_eq!((&t["model"], t.get("lora")), (&json!("m"), None));
    }

    #[test]
    fn bad_bodies_name_their_field() {
        for (body, param) in [
            (json!({}), "messages"),
            (json!({"prompt": 5}), "prompt"),
            (json!({"prompt": "a", "messages": []}), "prompt"),
            (json!({"prompt": "a", "max_tokens": 0}), "max_tokens"),
            (json!({"prompt": "a", "lora": 3}), "lora"),
            (json!({"messages": "hi"}), "messages"),
            (
                json!({"prompt": "a", "raw": true, "response_format": {"type": "json_object"}}),
                "response_format",
            ),
        ] {
            let e = to_openai(body.clone(), "m").unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }
}
