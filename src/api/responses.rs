//! OpenAI's Responses API: `POST /v1/responses` (input as text or items, `instructions`,
//! function tools and their outputs, `text.format`, streaming with its typed events),
//! `store` and `previous_response_id` (the node keeps the conversation, so a turn sends only
//! its new items and the prefix cache makes it cost only its new tokens), and
//! `GET` / `DELETE /v1/responses/{id}` for the key that made it.
//!
//! The request becomes the shared chat request (items -> messages); the answer is rendered
//! here and, when stored, written with the conversation through its output.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::response::Meta;
use super::responses_logprobs::of_content;
use super::types::push_part;
use crate::engine::request::{FinishReason, LogprobInfo, Usage};
use crate::gateway::Gateway;
use crate::structured::toolcall::ParsedCall;

/// What a Responses request carries into its answer: identity, the conversation so far
/// (previous items plus this input), the request's settings to echo, where to store it.
#[derive(Clone)]
pub struct ResponsesCtx {
    pub id: String,
    pub owner: String,
    pub created_at: u64,
    pub store: bool,
    pub context: Vec<Value>,
    /// `truncation: "auto"`: the oldest turns go when the conversation leaves no room for
    /// the reply (see `truncation.rs`); the stored conversation keeps them.
    pub truncate: bool,
    /// Run in the background: stored `queued` first, its end replaces that row (unless it
    /// was cancelled or deleted meanwhile).
    pub background: bool,
    /// The request's settings as the response object echoes them.
    pub echo: Map<String, Value>,
    pub gateway: Arc<Gateway>,
    /// Only checked (a background create, before it is stored): the chat path refuses what
    /// it would refuse, then answers 204 before anything is admitted, reserved or run.
    pub check_only: bool,
}

/// The request's input as items: a string is one user message.
pub fn input_items(body: &Value) -> Result<Vec<Value>, ApiError> {
    match body.get("input") {
        Some(Value::String(s)) => Ok(vec![json!({"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": s}]})]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, it)| normalize_item(it, i))
            .collect(),
        _ => Err(ApiError::invalid(
            "input",
            "`input` is required: a string or a list of items",
        )),
    }
}

/// An error from the chat path a Responses request runs through, its `param` named as the
/// Responses API names it: the conversation is `input`, a tool's fields are its own (no
/// `function` object), the budget is `max_output_tokens`, the format `text.format`.
pub fn named_as_responses(mut e: ApiError) -> ApiError {
    e.param = e.param.take().map(|p| {
        if p == "messages" || p.starts_with("messages[") {
            "input".into()
        } else if p == "max_tokens" || p == "max_completion_tokens" {
            "max_output_tokens".into()
        } else if p.starts_with("tools[") {
            p.replacen(".function.", ".", 1)
        } else if let Some(rest) = p
            .strip_prefix("response_format.json_schema")
            .or_else(|| p.strip_prefix("response_format"))
        {
            // Responses' format holds the schema's fields itself.
            format!("text.format{rest}")
        } else {
            p
        }
    });
    e
}

/// Each new `function_call_output` (from `first_new` on) answers a call made before it in
/// the conversation: OpenAI refuses an orphan (a client that sent the item's `id` for its
/// `call_id`, or forgot `previous_response_id`), which a model would read as a result of
/// nothing it asked.
pub fn check_call_outputs(context: &[Value], first_new: usize) -> Result<(), ApiError> {
    for (i, it) in context.iter().enumerate().skip(first_new) {
        if it["type"] != "function_call_output" {
            continue;
        }
        let id = &it["call_id"];
        let called = context[..i]
            .iter()
            .any(|c| c["type"] == "function_call" && c["call_id"] == *id);
        if !called {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "No tool call found for function call output with call_id {}.",
                    id.as_str().unwrap_or_default()
                ),
            ));
        }
    }
    Ok(())
}

fn normalize_item(it: &Value, i: usize) -> Result<Value, ApiError> {
    let at = |f: &str| format!("input[{i}]{f}");
    let kind = it.get("type").and_then(Value::as_str).unwrap_or("message");
    match kind {
        "message" => {
            let role = it.get("role").and_then(Value::as_str).unwrap_or_default();
            if !["user", "assistant", "system", "developer"].contains(&role) {
                return Err(ApiError::invalid(
                    at(".role"),
                    format!("`role` must be user, assistant, system or developer, got `{role}`"),
                ));
            }
            let text = match it.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (
                                Some("input_text" | "output_text" | "text"),
                                Some(Value::String(t)),
                            ) => push_part(&mut text, t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    at(&format!(".content[{j}]")),
                                    format!(
                                        "content of type `{}` is not supported; only text",
                                        kind.unwrap_or("?")
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(ApiError::invalid(
                        at(".content"),
                        "`content` must be a string or a list of text parts",
                    ))
                }
            };
            let part = if role == "assistant" {
                "output_text"
            } else {
                "input_text"
            };
            Ok(json!({"type": "message", "role": role, "content": [{"type": part, "text": text}]}))
        }
        "function_call" => {
            let (Some(call_id), Some(name), Some(args)) = (
                it.get("call_id").and_then(Value::as_str),
                it.get("name").and_then(Value::as_str),
                it.get("arguments").and_then(Value::as_str),
            ) else {
                return Err(ApiError::invalid(
                    at(""),
                    "a function_call item needs `call_id`, `name` and `arguments`",
                ));
            };
            Ok(
                json!({"type": "function_call", "call_id": call_id, "name": name, "arguments": args}),
            )
        }
        "function_call_output" => {
            let Some(call_id) = it.get("call_id").and_then(Value::as_str) else {
                return Err(ApiError::invalid(
                    at(".call_id"),
                    "a function_call_output item needs `call_id`",
                ));
            };
            let output = match it.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            Ok(json!({"type": "function_call_output", "call_id": call_id, "output": output}))
        }
        // A reasoning model's earlier thinking, sent back: kept out of the prompt, as
        // reasoning models' templates keep it.
        "reasoning" => Ok(json!({"type": "reasoning"})),
        other => Err(ApiError::invalid(
            at(".type"),
            format!("input items of type `{other}` are not supported"),
        )),
    }
}

/// Chat messages for a conversation's items: consecutive function calls become one
/// assistant message with `tool_calls`; outputs become `tool` messages.
fn messages(items: &[Value], instructions: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(i) = instructions {
        out.push(json!({"role": "system", "content": i}));
    }
    for it in items {
        match it["type"].as_str() {
            Some("function_call") => {
                let call = json!({"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]}});
                // A turn's text and its calls are one assistant message, as the model
                // wrote them (prose, then the calls).
                let turn = out
                    .last_mut()
                    .filter(|m: &&mut Value| m["role"] == "assistant");
                match turn {
                    Some(m) => match m["tool_calls"].as_array_mut() {
                        Some(calls) => calls.push(call),
                        None => m["tool_calls"] = json!([call]),
                    },
                    None => {
                        out.push(json!({"role": "assistant", "content": "", "tool_calls": [call]}))
                    }
                }
            }
            Some("function_call_output") => out.push(
                json!({"role": "tool", "tool_call_id": it["call_id"], "content": it["output"]}),
            ),
            Some("reasoning") => {}
            _ => {
                let role = if it["role"] == "developer" {
                    "system"
                } else {
                    it["role"].as_str().unwrap_or("user")
                };
                out.push(json!({"role": role, "content": it["content"][0]["text"]}));
            }
        }
    }
    out
}

/// The chat request for a Responses body whose conversation is `context`.
pub fn to_chat_request(body: Value, context: &[Value]) -> Result<Value, ApiError> {
    let Value::Object(b) = body else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object",
        ));
    };
    let mut out = Map::new();
    // OpenAI's fields this server does not have, which would change the reply if dropped
    // (no history, no instructions, calls past a limit): refused by name.
    for field in ["conversation", "prompt", "max_tool_calls"] {
        if b.get(field).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` is not supported by this server"),
            ));
        }
    }
    // Kept with a stored response: bounded as OpenAI bounds it (a 400 otherwise).
    super::batches::checked_metadata(b.get("metadata"))?;
    let instructions = match b.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            return Err(ApiError::invalid(
                "instructions",
                "`instructions` must be a string",
            ))
        }
    };
    out.insert(
        "messages".into(),
        Value::Array(super::anthropic::merge_turns(messages(
            context,
            instructions,
        ))),
    );
    for field in [
        "model",
        "temperature",
        "top_p",
        "stream",
        "parallel_tool_calls",
        "seed",
        // Ours (as vLLM and llama.cpp take them): template variables and the prefix cache.
        "chat_template_kwargs",
        "cache_prompt",
    ] {
        if let Some(v) = b.get(field) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(effort) = b.get("reasoning").and_then(|r| r.get("effort")) {
        out.insert("reasoning_effort".into(), effort.clone());
    }
    super::responses_logprobs::to_chat(&b, &mut out)?;
    if let Some(m) = b.get("max_output_tokens").filter(|v| !v.is_null()) {
        out.insert("max_tokens".into(), m.clone());
    }
    if let Some(tools) = b.get("tools") {
        let Some(list) = tools.as_array() else {
            return Err(ApiError::invalid("tools", "`tools` must be a list"));
        };
        let mut chat_tools = Vec::new();
        for (i, t) in list.iter().enumerate() {
            if t["type"] != "function" {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!(
                        "tool type `{}` is not supported; only `function`",
                        t["type"].as_str().unwrap_or("?")
                    ),
                ));
            }
            let mut f = Map::new();
            for k in ["name", "description", "parameters", "strict"] {
                if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                    f.insert(k.into(), v.clone());
                }
            }
            chat_tools.push(json!({"type": "function", "function": f}));
        }
        out.insert("tools".into(), Value::Array(chat_tools));
    }
    if let Some(c) = b.get("tool_choice") {
        let choice = match c {
            Value::String(_) => c.clone(),
            _ if c["type"] == "function" => {
                json!({"type": "function", "function": {"name": c["name"]}})
            }
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "`tool_choice` must be none, auto, required or a function",
                ))
            }
        };
        out.insert("tool_choice".into(), choice);
    }
    if let Some(f) = b.get("text").and_then(|t| t.get("format")) {
        let format = match f["type"].as_str() {
            Some("text") => json!({"type": "text"}),
            Some("json_object") => json!({"type": "json_object"}),
            Some("json_schema") => json!({"type": "json_schema", "json_schema": {
                "name": f["name"], "schema": f["schema"], "strict": f["strict"]}}),
            _ => {
                return Err(ApiError::invalid(
                    "text.format.type",
                    "`text.format.type` must be text, json_object or json_schema",
                ))
            }
        };
        out.insert("response_format".into(), format);
    }
    Ok(Value::Object(out))
}

/// The settings a response object echoes from its request.
pub fn echo(body: &Value) -> Map<String, Value> {
    let mut e = Map::new();
    let get = |k: &str, default: Value| body.get(k).cloned().unwrap_or(default);
    e.insert("instructions".into(), get("instructions", Value::Null));
    e.insert(
        "max_output_tokens".into(),
        get("max_output_tokens", Value::Null),
    );
    // Metadata was checked (`to_chat_request`); of `text` and `reasoning`, the fields the
    // API has, not whatever a request sent (a stored response keeps its echo).
    let metadata = body.get("metadata").filter(|m| m.is_object());
    e.insert("metadata".into(), metadata.cloned().unwrap_or(json!({})));
    e.insert(
        "parallel_tool_calls".into(),
        get("parallel_tool_calls", json!(true)),
    );
    e.insert(
        "previous_response_id".into(),
        get("previous_response_id", Value::Null),
    );
    e.insert("temperature".into(), get("temperature", json!(1.0)));
    e.insert("top_p".into(), get("top_p", json!(1.0)));
    e.insert("top_logprobs".into(), get("top_logprobs", json!(0)));
    e.insert("tool_choice".into(), get("tool_choice", json!("auto")));
    e.insert("tools".into(), get("tools", json!([])));
    let text = body.get("text");
    let format = text.and_then(|t| t.get("format")).cloned();
    let mut t = json!({"format": format.unwrap_or(json!({"type": "text"}))});
    if let Some(v) = text.and_then(|t| t.get("verbosity")) {
        t["verbosity"] = v.clone();
    }
    e.insert("text".into(), t);
    e.insert("store".into(), get("store", json!(true)));
    e.insert("truncation".into(), get("truncation", json!("disabled")));
    e.insert("background".into(), get("background", json!(false)));
    let reasoning = body.get("reasoning");
    let field = |k: &str| {
        reasoning
            .and_then(|r| r.get(k))
            .cloned()
            .unwrap_or(Value::Null)
    };
    e.insert(
        "reasoning".into(),
        json!({"effort": field("effort"), "summary": field("summary")}),
    );
    e
}

fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.total_tokens,
    })
}

/// The id of the message item at `index` of a response's output.
pub(super) fn message_id(ctx: &ResponsesCtx, index: usize) -> String {
    format!("msg_{}_{index}", ctx.id.trim_start_matches("resp_"))
}

pub(super) fn message_item(ctx: &ResponsesCtx, index: usize, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": message_id(ctx, index), "status": status,
           "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

/// A reasoning model's thinking, as OpenAI's reasoning models' items carry it.
pub(super) fn reasoning_item(ctx: &ResponsesCtx, index: usize, text: &str, status: &str) -> Value {
    json!({"type": "reasoning", "id": format!("rs_{}_{index}", ctx.id.trim_start_matches("resp_")),
           "status": status, "summary": [],
           "content": [{"type": "reasoning_text", "text": text}]})
}

fn call_item(c: &ParsedCall, status: &str) -> Value {
    json!({"type": "function_call", "id": format!("fc_{}", c.id.trim_start_matches("call_")),
           "call_id": c.id, "name": c.name, "arguments": c.arguments, "status": status})
}

/// The response object: `output` as given, `usage` when finished.
pub(super) fn object(
    ctx: &ResponsesCtx,
    meta: &Meta,
    status: &str,
    output: Vec<Value>,
    end: Option<(FinishReason, Usage)>,
) -> Value {
    object_of(ctx, &meta.model, status, output, end)
}

/// The response object of `model` (see [`object`]).
pub(super) fn object_of(
    ctx: &ResponsesCtx,
    model: &str,
    status: &str,
    output: Vec<Value>,
    end: Option<(FinishReason, Usage)>,
) -> Value {
    let mut r = ctx.echo.clone();
    r.insert("id".into(), Value::from(ctx.id.clone()));
    r.insert("object".into(), json!("response"));
    r.insert("created_at".into(), Value::from(ctx.created_at));
    r.insert("status".into(), Value::from(status));
    r.insert("model".into(), Value::from(model));
    r.insert("output".into(), Value::Array(output));
    r.insert("error".into(), Value::Null);
    let incomplete = matches!(end, Some((FinishReason::Length, _)));
    r.insert(
        "incomplete_details".into(),
        if incomplete {
            json!({"reason": "max_output_tokens"})
        } else {
            Value::Null
        },
    );
    r.insert(
        "usage".into(),
        end.map_or(Value::Null, |(_, u)| usage_json(u)),
    );
    Value::Object(r)
}

/// A reply the budget cut (`Length`) has its last item `incomplete`: those before it were
/// whole (and a stream said so as each closed).
pub(super) fn mark_cut(output: &mut [Value], reason: FinishReason) {
    if reason == FinishReason::Length {
        if let Some(it) = output.last_mut() {
            it["status"] = json!("incomplete");
        }
    }
}

/// The finished response: rendered, and stored with its conversation when asked.
pub(super) fn finish(
    ctx: &ResponsesCtx,
    meta: &Meta,
    output: Vec<Value>,
    reason: FinishReason,
    usage: Usage,
) -> Value {
    let status = match reason {
        FinishReason::Length => "incomplete",
        FinishReason::Stop => "completed",
    };
    let mut output = output;
    mark_cut(&mut output, reason);
    let r = object(ctx, meta, status, output.clone(), Some((reason, usage)));
    if ctx.store {
        let mut context = ctx.context.clone();
        for it in output.iter().filter(|it| carried_on(it)) {
            context.push(match it["type"].as_str() {
                Some("function_call") => json!({"type": "function_call", "call_id": it["call_id"],
                    "name": it["name"], "arguments": it["arguments"]}),
                _ => json!({"type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": it["content"][0]["text"]}]}),
            });
        }
        let put = || {
            let stored = &ctx.gateway.conversations;
            if ctx.background {
                stored
                    .update_unfinished(&ctx.id, &ctx.owner, &r, Some(&context))
                    .map(|_| ())
            } else {
                stored.put(&ctx.id, &ctx.owner, &r, &context)
            }
        };
        // A blocking write: on a multi-threaded runtime its worker's other tasks move
        // elsewhere while it runs (the answer is sent only once it is stored, so that a
        // follow-up naming it finds it).
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let stored = if multi {
            tokio::task::block_in_place(put)
        } else {
            put()
        };
        if let Err(e) = stored {
            tracing::error!(error = %e, "a response could not be stored");
        }
    }
    r
}

/// Whether an output item goes on into its conversation: not reasoning (as reasoning
/// models' templates leave it out), nor a call cut short, whose arguments are no JSON
/// (kept, it would make every later turn of the conversation a 400).
pub(super) fn carried_on(it: &Value) -> bool {
    match it["type"].as_str() {
        Some("reasoning") => false,
        Some("function_call") => it["arguments"]
            .as_str()
            .is_some_and(|a| serde_json::from_str::<Value>(a).is_ok()),
        _ => true,
    }
}

/// The whole response; `lps`: the reply's logprobs, when asked for.
pub fn whole(
    meta: &Meta,
    ctx: &ResponsesCtx,
    (text, lps): (String, Option<&[LogprobInfo]>),
    reason: FinishReason,
    usage: Usage,
) -> Value {
    let (reasoning, parsed, calls) = match meta.call_parser() {
        None => (None, None, Vec::new()),
        Some(p) => {
            let (reasoning, content, calls) = p.whole(&text);
            (reasoning, Some(content.unwrap_or_default()), calls)
        }
    };
    // Without a parser the message is the whole text.
    let content = parsed.as_deref().unwrap_or(&text);
    let mut output = Vec::new();
    if let Some(r) = &reasoning {
        output.push(reasoning_item(ctx, 0, r, "completed"));
    }
    // As the stream does: a message when there is text, or when nothing else came.
    if !content.is_empty() || (calls.is_empty() && output.is_empty()) {
        let mut item = message_item(ctx, output.len(), content, "completed");
        if let Some(lps) = lps {
            let mine = of_content(&text, reasoning.as_deref(), content, lps);
            item["content"][0]["logprobs"] = serde_json::to_value(mine).unwrap_or_default();
        }
        output.push(item);
    }
    output.extend(calls.iter().map(|c| call_item(c, "completed")));
    finish(ctx, meta, output, reason, usage)
}

#[cfg(test)]
#[path = "responses_tests.rs"]
mod tests;
