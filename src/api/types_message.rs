//! A chat message on the wire into the engine's [`Message`]: its role, its text (parts
//! joined), its tool calls and the tool result it answers.

use serde_json::Value;

use super::{ApiError, ChatMessage, Content};
use crate::model::Message;

/// Adds a text part to a message's text: parts are joined by a line break, as llama.cpp
/// joins them (glued, "Summarize" and "this" would read "Summarizethis").
pub(crate) fn push_part(text: &mut String, part: &str) {
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(part);
}

impl ChatMessage {
    pub(super) fn to_message(&self, i: usize) -> Result<Message, ApiError> {
        if !["system", "user", "assistant", "developer", "tool"].contains(&self.role.as_str()) {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                format!(
                    "unsupported role `{}`: use system, user, assistant or tool",
                    self.role
                ),
            ));
        }
        let content = match &self.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => push_part(&mut text, t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                format!(
                                    "content part of type `{}` is not supported; only `text`",
                                    p.kind
                                ),
                            ))
                        }
                    }
                }
                text
            }
        };
        let role = if self.role == "developer" {
            "system"
        } else {
            &self.role
        };
        let mut msg = Message::new(role, &content);
        if self.role == "tool" {
            msg.tool_call_id = Some(self.tool_call_id.clone().ok_or_else(|| {
                ApiError::invalid(
                    format!("messages[{i}].tool_call_id"),
                    "a `tool` message needs `tool_call_id`",
                )
            })?);
        }
        if let Some(calls) = &self.tool_calls {
            if self.role != "assistant" {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls"),
                    "only assistant messages carry `tool_calls`",
                ));
            }
            let mut out = Vec::with_capacity(calls.len());
            for (j, c) in calls.iter().enumerate() {
                let args: Value = serde_json::from_str(&c.function.arguments)
                    .ok()
                    .filter(Value::is_object)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("messages[{i}].tool_calls[{j}].function.arguments"),
                            "`arguments` must be a JSON object's text",
                        )
                    })?;
                out.push(serde_json::json!({
                    "id": c.id, "type": c.kind.as_deref().unwrap_or("function"),
                    "function": {"name": c.function.name, "arguments": args},
                }));
            }
            msg.tool_calls = Some(out);
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_parts_are_joined_by_line_breaks() {
        let m: ChatMessage = serde_json::from_value(json!({"role": "user", "content": [
            {"type": "text", "text": "Summarize"}, {"type": "text", "text": "this"}]}))
        .unwrap();
        assert_eq!(m.to_message(0).unwrap().content, "Summarize\nthis");
        // An empty first part adds no line.
        let m: ChatMessage = serde_json::from_value(json!({"role": "user", "content": [
            {"type": "text", "text": ""}, {"type": "text", "text": "this"}]}))
        .unwrap();
        assert_eq!(m.to_message(0).unwrap().content, "this");
    }
}
