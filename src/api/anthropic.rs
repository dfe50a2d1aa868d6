//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`): the
//! request is translated into the chat path's (OpenAI-shaped) request, which the shared path
//! validates, renders and runs; the answer is rendered here in Anthropic's shapes, whole or
//! as its event stream. Errors get Anthropic's envelope in [`super::error`].

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::response::Meta;
use super::types::{push_part, MAX_STOP_BYTES};
use crate::engine::request::FinishReason;
use crate::engine::request::Usage;

/// Translates a Messages request (`count`: a count_tokens request, which has no
/// `max_tokens`) into a chat-completions request.
pub fn to_chat_request(body: Value, count: bool) -> Result<Value, ApiError> {
    let Value::Object(b) = body else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object",
        ));
    };
    let mut out = Map::new();
    match b.get("model") {
        Some(Value::String(m)) => {
            out.insert("model".into(), Value::from(m.clone()));
        }
        _ => return Err(ApiError::invalid("model", "`model` is required (a string)")),
    }
    if !count {
        match b.get("max_tokens").and_then(Value::as_u64) {
            Some(m) if m >= 1 => {
                out.insert("max_tokens".into(), Value::from(m));
            }
            _ => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    "`max_tokens` is required (an integer of at least 1)",
                ))
            }
        }
    }
    // Ours (as vLLM and llama.cpp take them): template variables and the prefix cache.
    for field in [
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "chat_template_kwargs",
        "cache_prompt",
    ] {
        if let Some(v) = b.get(field) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(t) = b.get("temperature").and_then(Value::as_f64) {
        if !(0.0..=1.0).contains(&t) {
            return Err(ApiError::invalid(
                "temperature",
                format!("`temperature` must be between 0 and 1, got {t}"),
            ));
        }
    }
    if let Some(s) = b.get("stop_sequences") {
        let ok = s
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x.as_str().is_some_and(|x| !x.is_empty())));
        if !ok {
            return Err(ApiError::invalid(
                "stop_sequences",
                "`stop_sequences` must be a list of non-empty strings",
            ));
        }
        let longest = s.as_array().into_iter().flatten().filter_map(Value::as_str);
        if longest.map(str::len).max().unwrap_or(0) > MAX_STOP_BYTES {
            return Err(ApiError::invalid(
                "stop_sequences",
                format!("a stop sequence may be at most {MAX_STOP_BYTES} bytes long"),
            ));
        }
        out.insert("stop".into(), s.clone());
    }
    // Extended thinking: enabled, a reasoning model thinks at most `budget_tokens`; disabled,
    // it answers at once. A model that does not reason answers as it would anyway.
    match b.get("thinking") {
        None | Some(Value::Null) => {}
        Some(t) => {
            let budget = match (
                t.get("type").and_then(Value::as_str),
                t.get("budget_tokens"),
            ) {
                (Some("enabled"), Some(n)) => n.as_i64().filter(|&n| n >= 1),
                (Some("disabled"), _) => Some(0),
                _ => None,
            };
            let Some(budget) = budget else {
                return Err(ApiError::invalid(
                    "thinking",
                    "`thinking` must be `{\"type\": \"enabled\", \"budget_tokens\": N}` or \
                     `{\"type\": \"disabled\"}`",
                ));
            };
            out.insert("reasoning_budget".into(), Value::from(budget));
            if budget != 0 {
                // Thinking blocks are returned only when asked for.
                out.insert("reasoning_format".into(), Value::from("auto"));
            }
        }
    }
    for field in ["mcp_servers", "container"] {
        if b.get(field).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` is not supported by this server"),
            ));
        }
    }
    let mut messages = Vec::new();
    if let Some(system) = b.get("system").filter(|s| !s.is_null()) {
        let text = text_of(system, "system")?;
        messages.push(json!({"role": "system", "content": text}));
    }
    let Some(Value::Array(input)) = b.get("messages") else {
        return Err(ApiError::invalid(
            "messages",
            "`messages` is required (a list)",
        ));
    };
    for (i, m) in input.iter().enumerate() {
        translate_message(m, i, &mut messages)?;
    }
    let messages = merge_turns(messages);
    // A last assistant turn is a prefill: the reply continues it.
    let prefill = input.last().is_some_and(|m| m["role"] == "assistant")
        && messages
            .last()
            .is_some_and(|m| m["role"] == "assistant" && m.get("tool_calls").is_none());
    if prefill {
        let text = messages
            .last()
            .and_then(|m| m["content"].as_str())
            .unwrap_or("");
        if text.ends_with(char::is_whitespace) {
            return Err(ApiError::invalid(
                "messages",
                "final assistant content cannot end with trailing whitespace",
            ));
        }
        out.insert("continue_final_message".into(), Value::Bool(true));
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = b.get("tools") {
        out.insert("tools".into(), translate_tools(tools)?);
    }
    if let Some(choice) = b.get("tool_choice") {
        let (choice, parallel) = translate_tool_choice(choice)?;
        out.insert("tool_choice".into(), choice);
        if !parallel {
            out.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    // A system prompt alone is no conversation (the system turn is in `messages` by now).
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    Ok(Value::Object(out))
}

/// A string, or a list of text blocks, as one string.
fn text_of(v: &Value, field: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for (j, blk) in blocks.iter().enumerate() {
                match (blk.get("type").and_then(Value::as_str), blk.get("text")) {
                    (Some("text"), Some(Value::String(t))) => push_part(&mut text, t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!("{field}[{j}]"),
                            format!(
                                "block type `{}` is not supported here; only `text`",
                                kind.unwrap_or("?")
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid(
            field,
            format!("`{field}` must be a string or a list of text blocks"),
        )),
    }
}

/// Consecutive turns of one role are one turn, as Anthropic takes them (templates that
/// insist on alternating roles, Mistral's and Llama 2's, would refuse them apart): their
/// texts joined by a blank line. Turns with tool calls or results stay as they are. (The
/// Responses API's items too: `instructions` and a developer item are one system turn.)
pub(super) fn merge_turns(messages: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::with_capacity(messages.len());
    for m in messages {
        let plain = |m: &Value| {
            matches!(m["role"].as_str(), Some("system" | "user" | "assistant"))
                && m.get("tool_calls").is_none()
                && m["content"].is_string()
        };
        match out.last_mut() {
            Some(prev) if plain(prev) && plain(&m) && prev["role"] == m["role"] => {
                let (a, b) = (
                    prev["content"].as_str().unwrap_or(""),
                    m["content"].as_str().unwrap_or(""),
                );
                let joined = match (a.is_empty(), b.is_empty()) {
                    (true, _) => b.to_string(),
                    (_, true) => a.to_string(),
                    _ => format!("{a}\n\n{b}"),
                };
                prev["content"] = Value::String(joined);
            }
            _ => out.push(m),
        }
    }
    out
}

fn translate_message(m: &Value, i: usize, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
    if role != "user" && role != "assistant" {
        return Err(ApiError::invalid(
            format!("messages[{i}].role"),
            format!("`role` must be `user` or `assistant`, got `{role}`"),
        ));
    }
    let blocks = match m.get("content") {
        Some(Value::String(s)) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(ApiError::invalid(
                format!("messages[{i}].content"),
                "`content` must be a string or a list of blocks",
            ))
        }
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, blk) in blocks.iter().enumerate() {
        let at = || format!("messages[{i}].content[{j}]");
        let kind = blk.get("type").and_then(Value::as_str).unwrap_or_default();
        match (role, kind) {
            (_, "text") => match blk.get("text") {
                Some(Value::String(t)) => push_part(&mut text, t),
                _ => return Err(ApiError::invalid(at(), "a text block needs `text`")),
            },
            ("assistant", "tool_use") => {
                let (Some(id), Some(name), Some(input)) = (
                    blk.get("id").and_then(Value::as_str),
                    blk.get("name").and_then(Value::as_str),
                    blk.get("input").filter(|v| v.is_object()),
                ) else {
                    return Err(ApiError::invalid(
                        at(),
                        "a tool_use block needs `id`, `name` and an object `input`",
                    ));
                };
                calls.push(json!({"id": id, "type": "function",
                    "function": {"name": name, "arguments": input.to_string()}}));
            }
            // Past reasoning is not shown again (reasoning models' templates drop it too).
            ("assistant", "thinking" | "redacted_thinking") => {}
            ("user", "tool_result") => {
                let Some(id) = blk.get("tool_use_id").and_then(Value::as_str) else {
                    return Err(ApiError::invalid(
                        at(),
                        "a tool_result block needs `tool_use_id`",
                    ));
                };
                let mut content = match blk.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(c) => text_of(c, &format!("{}.content", at()))?,
                };
                if blk.get("is_error").and_then(Value::as_bool) == Some(true) {
                    content = format!("Error: {content}");
                }
                out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            _ => {
                return Err(ApiError::invalid(
                    at(),
                    format!("a {role} block of type `{kind}` is not supported"),
                ))
            }
        }
    }
    if role == "assistant" {
        let mut msg = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(calls);
        }
        out.push(msg);
    } else if !text.is_empty() || !out.last().is_some_and(|m| m["role"] == "tool") {
        out.push(json!({"role": "user", "content": text}));
    }
    Ok(())
}

fn translate_tools(tools: &Value) -> Result<Value, ApiError> {
    let Some(list) = tools.as_array() else {
        return Err(ApiError::invalid("tools", "`tools` must be a list"));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if let Some(kind) = t.get("type").and_then(Value::as_str) {
            if kind != "custom" {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!("tool type `{kind}` is not supported; only client tools"),
                ));
            }
        }
        let Some(name) = t.get("name").and_then(Value::as_str) else {
            return Err(ApiError::invalid(
                format!("tools[{i}].name"),
                "a tool needs `name`",
            ));
        };
        let Some(schema) = t.get("input_schema").filter(|s| s.is_object()) else {
            return Err(ApiError::invalid(
                format!("tools[{i}].input_schema"),
                "a tool needs an object `input_schema`",
            ));
        };
        let mut f = json!({"name": name, "parameters": schema});
        if let Some(d) = t.get("description") {
            f["description"] = d.clone();
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(out))
}

/// OpenAI's `tool_choice`, and whether calls may come in parallel.
fn translate_tool_choice(c: &Value) -> Result<(Value, bool), ApiError> {
    let parallel = c.get("disable_parallel_tool_use").and_then(Value::as_bool) != Some(true);
    let choice = match c.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => match c.get("name").and_then(Value::as_str) {
            Some(name) => json!({"type": "function", "function": {"name": name}}),
            None => {
                return Err(ApiError::invalid(
                    "tool_choice.name",
                    "`tool_choice` of type `tool` needs `name`",
                ))
            }
        },
        _ => {
            return Err(ApiError::invalid(
                "tool_choice.type",
                "`tool_choice.type` must be auto, any, tool or none",
            ))
        }
    };
    Ok((choice, parallel))
}

/// Anthropic's `stop_reason` and `stop_sequence`: a stop string that ended the message is
/// named (`stop_sequence`), else the end of the turn, a tool call or the token budget.
pub(super) fn stop_fields(
    r: FinishReason,
    stop: Option<String>,
    made_calls: bool,
) -> (&'static str, Value) {
    match (r, stop) {
        (FinishReason::Stop, Some(s)) => ("stop_sequence", Value::String(s)),
        (FinishReason::Stop, None) if made_calls => ("tool_use", Value::Null),
        (FinishReason::Stop, None) => ("end_turn", Value::Null),
        (FinishReason::Length, _) => ("max_tokens", Value::Null),
    }
}

pub(super) fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens.saturating_sub(u.cached_tokens),
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": u.completion_tokens,
    })
}

/// A call's arguments as the object Anthropic's `input` is (`{}` if they were cut short).
fn input_of(arguments: &str) -> Value {
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}))
}

/// The whole message.
pub fn whole(
    meta: &Meta,
    text: String,
    reason: FinishReason,
    stop: Option<String>,
    usage: Usage,
) -> Value {
    let mut content = Vec::new();
    let mut made_calls = false;
    match meta.call_parser() {
        None => {
            if !text.is_empty() {
                content.push(json!({"type": "text", "text": text}));
            }
        }
        Some(p) => {
            let (reasoning, text, calls) = p.whole(&text);
            // The reasoning first, as Claude's extended thinking is (no signature: it is not
            // Anthropic's to verify).
            if let Some(r) = reasoning {
                content.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
            }
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                content.push(json!({"type": "text", "text": t}));
            }
            for c in &calls {
                made_calls = true;
                content.push(json!({"type": "tool_use", "id": c.id, "name": c.name,
                    "input": input_of(&c.arguments)}));
            }
        }
    }
    let (stop_reason, stop_sequence) = stop_fields(reason, stop, made_calls);
    json!({"id": meta.id, "type": "message", "role": "assistant", "model": meta.model,
           "content": content, "stop_reason": stop_reason,
           "stop_sequence": stop_sequence, "usage": usage_json(usage)})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_round_trip_translates_to_chat_messages() {
        let body = json!({
            "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
            "stop_sequences": ["END"],
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"}]},
            ],
        });
        let chat = to_chat_request(body, false).unwrap();
        assert_eq!(chat["max_tokens"], 64);
        assert_eq!(chat["stop"], json!(["END"]));
        assert_eq!(chat["tool_choice"], "required");
        assert_eq!(chat["parallel_tool_calls"], false);
        assert_eq!(chat["tools"][0]["function"]["name"], "get_weather");
        let m = chat["messages"].as_array().unwrap();
        assert_eq!(m.len(), 4, "{m:?}");
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"})
        );
    }

    #[test]
    fn consecutive_turns_of_one_role_are_one() {
        let body = json!({"model": "m", "max_tokens": 8, "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": [{"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
        ]});
        let chat = to_chat_request(body, false).unwrap();
        assert_eq!(
            chat["messages"],
            json!([{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"},
                   {"role": "user", "content": "d"}])
        );
    }

    #[test]
    fn bad_requests_name_their_field() {
        let cases = [
            (json!({"max_tokens": 5, "messages": []}), "model"),
            (json!({"model": "m", "messages": []}), "max_tokens"),
            (json!({"model": "m", "max_tokens": 5}), "messages"),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "temperature": 1.5, "messages": []}),
                "temperature",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [], "tools": [{"name": "t"}]}),
                "tools[0].input_schema",
            ),
        ];
        for (body, param) in cases {
            let e = to_chat_request(body.clone(), false).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        let hi = json!([{"role": "user", "content": "hi"}]);
        // A null system prompt is no system prompt.
        let chat = to_chat_request(
            json!({"model": "m", "max_tokens": 5, "system": null, "messages": hi}),
            false,
        )
        .unwrap();
        assert_eq!(chat["messages"], hi);
        // count_tokens takes no max_tokens.
        assert!(to_chat_request(json!({"model": "m", "messages": hi}), true).is_ok());
        // A system prompt alone is no conversation, for either.
        for count in [false, true] {
            let body =
                json!({"model": "m", "max_tokens": 5, "system": "Be terse.", "messages": []});
            let e = to_chat_request(body, count).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("messages"));
        }
        // A stop sequence past what the engine looks for.
        let long = "x".repeat(MAX_STOP_BYTES + 1);
        let body = json!({"model": "m", "max_tokens": 5, "messages": hi, "stop_sequences": [long]});
        let e = to_chat_request(body, false).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop_sequences"));
    }

    #[test]
    fn text_blocks_are_joined_by_line_breaks() {
        // As llama.cpp joins parts: a system prompt's blocks, a message's, a tool result's.
        let blocks =
            json!([{"type": "text", "text": "Summarize"}, {"type": "text", "text": "this"}]);
        let chat = to_chat_request(
            json!({"model": "m", "max_tokens": 5, "system": blocks, "messages": [
                {"role": "user", "content": blocks},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": blocks}]},
            ]}),
            false,
        )
        .unwrap();
        let m = &chat["messages"];
        assert_eq!(m[0]["content"], "Summarize\nthis");
        assert_eq!(m[1]["content"], "Summarize\nthis");
        assert_eq!(m[3]["content"], "Summarize\nthis", "{m}");
    }
}
