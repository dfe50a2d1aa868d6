//! How tools and past calls are shown to a model: the generic (Hermes) rendering for a
//! chat template without tool support, and the 9-character call ids Mistral's templates
//! insist on.

use serde_json::Value;

use super::toolcall::ToolFormat;
use crate::model::Message;

/// The system text that shows the tools to a model whose template cannot (generic format).
fn generic_tools_prompt(tools: &[Value]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to help with the user's request. \
         The functions are described by JSON schemas inside <tools></tools>:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\n\nTo call a function, reply with a JSON object holding its name and arguments \
         inside <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \
         \"arguments\": <arguments-object>}\n</tool_call>",
    );
    s
}

/// Rewrites tool-call turns and tool results for a template without tool support (generic
/// format): calls become the assistant's text, consecutive tool results one user turn, and
/// the tool list joins (or becomes) the system turn.
pub fn generic_messages(messages: Vec<Message>, tools: &[Value]) -> Vec<Message> {
    let f = ToolFormat::HERMES;
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        out.push(Message::new("system", &generic_tools_prompt(tools)));
    }
    for m in messages {
        match m.role.as_str() {
            "system" if out.len() == 1 && !tools.is_empty() => {
                let tools_text = std::mem::take(&mut out[0].content);
                out[0].content = format!("{}\n\n{tools_text}", m.content);
            }
            "assistant" if m.tool_calls.is_some() => {
                let calls: Vec<String> = m
                    .tool_calls
                    .iter()
                    .flatten()
                    .map(|c| {
                        let name = c["function"]["name"].as_str().unwrap_or_default();
                        let args = &c["function"]["arguments"];
                        f.call_text(name, &args.to_string())
                    })
                    .collect();
                let mut text = m.content.clone();
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&calls.join(f.sep));
                out.push(Message::new("assistant", &text));
            }
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    Some(prev)
                        if prev.role == "user" && prev.content.ends_with("</tool_response>") =>
                    {
                        prev.content.push('\n');
                        prev.content.push_str(&block);
                    }
                    _ => out.push(Message::new("user", &block)),
                }
            }
            _ => out.push(Message {
                tool_calls: None,
                tool_call_id: None,
                ..m
            }),
        }
    }
    out
}

/// Whether `id` is what Mistral's templates accept: 9 ASCII letters and digits.
pub(super) fn is_short_id(id: &str) -> bool {
    id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A 9-character id standing for `id`, the same every time (FNV-1a, in base 62).
fn short_id(id: &str) -> String {
    if is_short_id(id) {
        return id.to_string();
    }
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0..9)
        .map(|_| {
            let d = DIGITS[(h % 62) as usize] as char;
            h /= 62;
            d
        })
        .collect()
}

/// Gives the calls and tool results of a conversation ids a short-id template accepts
/// (clients send back whatever ids they were given, or their own), keeping which result
/// answers which call.
pub fn with_short_ids(mut messages: Vec<Message>) -> Vec<Message> {
    for (i, m) in messages.iter_mut().enumerate() {
        for (j, c) in m.tool_calls.iter_mut().flatten().enumerate() {
            // A call sent without an id gets one from its place (no result can name it).
            let id = match c.get("id").and_then(Value::as_str) {
                Some(id) => short_id(id),
                None => short_id(&format!("{i}.{j}")),
            };
            c["id"] = Value::String(id);
        }
        if let Some(id) = &mut m.tool_call_id {
            *id = short_id(id);
        }
    }
    messages
}
