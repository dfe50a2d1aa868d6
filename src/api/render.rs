//! The chat prompt: the template applied to the messages and tools, and a continued
//! assistant message cut where the template wrote it.

use serde_json::Value;

use super::super::error::ApiError;
use super::super::Ready;
use crate::model::Message;
use crate::structured::toolcall;
use crate::structured::{ConstraintSpec, OutputFormat, ToolChoice};

/// The chat prompt as token ids: the template applied to the messages and tools (through
/// the generic tool prompt when the template has no tool support); and whether it opened a
/// reasoning model's thinking.
pub(in crate::api) fn render(
    r: &Ready,
    messages: Vec<Message>,
    tools: Vec<Value>,
    kwargs: &serde_json::Map<String, Value>,
    continues: bool,
) -> Result<(Vec<u32>, bool), ApiError> {
    let text = render_text(r, messages, tools, kwargs, continues)?;
    let opened = r.reasoner.is_some_and(|x| x.syntax.opened_by(&text));
    let ids = r
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok((ids, opened))
}

/// The chat prompt as text (see [`render`]). `continues`: it ends inside the last message
/// (an assistant's), where the reply goes on, not at a new turn.
pub(in crate::api) fn render_text(
    r: &Ready,
    mut messages: Vec<Message>,
    tools: Vec<Value>,
    kwargs: &serde_json::Map<String, Value>,
    continues: bool,
) -> Result<String, ApiError> {
    let mut continued = String::new();
    if let Some(last) = messages.last_mut().filter(|_| continues) {
        continued = last.content.clone();
        last.content.push_str(CONTINUE_MARK);
    }
    // A conversation with calls in it is rendered as one with tools, whether or not this
    // request sends them (a follow-up after the calls often does not): a template without
    // tool support would drop the calls and choke on the results.
    let history_of_calls = messages
        .iter()
        .any(|m| m.tool_calls.is_some() || m.role == "tool");
    let (messages, native) = if (tools.is_empty() && !history_of_calls) || r.native_tools {
        let messages = if r.tool_format.short_ids {
            toolcall::with_short_ids(messages)
        } else {
            messages
        };
        (messages, !tools.is_empty())
    } else {
        (toolcall::generic_messages(messages, &tools), false)
    };
    let text = r
        .template
        .render_with(
            &messages,
            !continues,
            native.then_some(tools.as_slice()),
            kwargs,
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !continues {
        return Ok(text);
    }
    cut_at_mark(text, &continued)
}

/// A continued message is text the reply goes on from, so nothing may start the reply
/// afresh: an output format, a forced tool call, or thinking before it (Anthropic refuses a
/// prefill with thinking too).
pub(super) fn refuse_shaped_continuation(
    spec: &ConstraintSpec,
    thinking: Option<u64>,
    anthropic: bool,
) -> Result<(), ApiError> {
    let forced = spec.calls_tools() && !matches!(spec.choice, ToolChoice::Auto);
    let thinks = anthropic && thinking.is_some_and(|b| b > 0);
    if matches!(spec.format, OutputFormat::Text) && !forced && !thinks {
        return Ok(());
    }
    let field = if anthropic {
        "messages"
    } else {
        "continue_final_message"
    };
    Err(ApiError::invalid(
        field,
        "a reply that continues the last assistant message cannot also have an output format, a forced tool call or thinking, which start it afresh",
    ))
}

/// Follows the text of a message to be continued: the rendered prompt is cut where the
/// template wrote it, right after the message's own text (a template that trims a message
/// trims nothing before the mark), and the turn's end goes. Private-use characters, which
/// no text means.
const CONTINUE_MARK: &str = "\u{f8ff}edgeinfer:continue\u{f8ff}";

/// The prompt up to the continued message's mark. A template that does not write the
/// message's text as sent (its whitespace aside: some lay out a thinking block anew) before
/// it cannot continue it: some drop an assistant message's thinking, and the reply would go
/// on from what is left.
fn cut_at_mark(mut text: String, continued: &str) -> Result<String, ApiError> {
    // Compared from the end, whitespace skipped on both sides: only the prompt's tail is read.
    let bare = |s: &str| {
        s.chars()
            .rev()
            .filter(|c| !c.is_whitespace())
            .collect::<Vec<_>>()
    };
    let tail_is = |before: &str| {
        let want = bare(continued);
        let got = before.chars().rev().filter(|c| !c.is_whitespace());
        got.take(want.len()).eq(want.iter().copied())
    };
    let at = text.rfind(CONTINUE_MARK).filter(|&at| tail_is(&text[..at]));
    let Some(at) = at else {
        return Err(ApiError::invalid(
            "messages",
            "the chat template does not write the last assistant message's text as sent, so the reply cannot continue it",
        ));
    };
    text.truncate(at);
    Ok(text)
}
