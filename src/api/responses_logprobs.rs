//! Token logprobs in the Responses API (`include: ["message.output_text.logprobs"]`, or
//! `top_logprobs` above 0): each `output_text` part carries its tokens' logprobs in OpenAI's
//! shape (`token`, `logprob`, `bytes`, `top_logprobs`), whole, stored, and in the stream's
//! `response.output_text.delta` and `.done` events. Only the message's tokens: not those of
//! a reasoning model's thinking or of the calls.

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::engine::request::LogprobInfo;

const LOGPROBS: &str = "message.output_text.logprobs";

/// What `include` may name (OpenAI's values). Apart from the logprobs, they name what this
/// node's responses never hold (searches, images, code runs, encrypted reasoning), so they
/// add nothing.
const INCLUDABLE: &[&str] = &[
    LOGPROBS,
    "reasoning.encrypted_content",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
];

/// Sets the chat request's `logprobs` and `top_logprobs` from a Responses body's `include`
/// and `top_logprobs` (a count above 0 asks for the logprobs too).
pub(super) fn to_chat(
    b: &Map<String, Value>,
    out: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    let mut asked = false;
    match b.get("include") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (i, v) in list.iter().enumerate() {
                match v.as_str() {
                    Some(LOGPROBS) => asked = true,
                    Some(s) if INCLUDABLE.contains(&s) => {}
                    _ => {
                        return Err(ApiError::invalid(
                            format!("include[{i}]"),
                            format!("`include` takes {}", INCLUDABLE.join(", ")),
                        ))
                    }
                }
            }
        }
        Some(_) => return Err(ApiError::invalid("include", "`include` must be a list")),
    }
    match b.get("top_logprobs") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= 20) => {
            asked |= n.as_u64() > Some(0);
            out.insert("top_logprobs".into(), Value::Number(n.clone()));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` must be an integer from 0 to 20",
            ))
        }
    }
    if asked {
        out.insert("logprobs".into(), Value::Bool(true));
    }
    Ok(())
}

/// The logprobs of the tokens that made `content`: `lps` are those of the reply `text` as
/// generated, in order, and `content` is its message text, found after its `reasoning`.
pub(super) fn of_content(
    text: &str,
    reasoning: Option<&str>,
    content: &str,
    lps: &[LogprobInfo],
) -> Vec<LogprobInfo> {
    let from = reasoning
        .and_then(|r| text.find(r).map(|at| at + r.len()))
        .unwrap_or(0);
    let start = text.get(from..).and_then(|t| t.find(content));
    let Some(start) = start.map(|at| from + at).filter(|_| !content.is_empty()) else {
        return Vec::new();
    };
    let end = start + content.len();
    let mut at = 0;
    lps.iter()
        .filter(|lp| {
            let (first, past) = (at, at + lp.chosen.bytes.len());
            at = past;
            first < end && past > start
        })
        .cloned()
        .collect()
}

/// A stream's logprobs: those of tokens whose text has not come out yet, then those of the
/// message being streamed.
#[derive(Default)]
pub(super) struct Streamed {
    pending: Vec<LogprobInfo>,
    message: Vec<LogprobInfo>,
}

impl Streamed {
    /// A token came, with its logprob when they were asked for.
    pub fn token(&mut self, lp: Option<LogprobInfo>) {
        self.pending.extend(lp);
    }

    /// Text came out of the message: the tokens pending made it, but for those wholly before
    /// it (a reasoning's close marker and the blank after it, which no piece shows).
    pub fn text(&mut self, delta: &str) -> Value {
        let bytes: Vec<u8> = (self.pending.iter())
            .flat_map(|lp| lp.chosen.bytes.iter().copied())
            .collect();
        let start = (bytes.windows(delta.len().max(1)))
            .position(|w| w == delta.as_bytes())
            .filter(|_| !delta.is_empty());
        if let Some(start) = start {
            let mut at = 0;
            self.pending.retain(|lp| {
                at += lp.chosen.bytes.len();
                at > start
            });
        }
        let lps = std::mem::take(&mut self.pending);
        self.message.extend(lps.iter().cloned());
        serde_json::to_value(lps).unwrap_or_default()
    }

    /// Something else came out (thinking, a call): the tokens pending made it.
    pub fn other(&mut self) {
        self.pending.clear();
    }

    /// The message ended: its logprobs.
    pub fn message(&mut self) -> Value {
        serde_json::to_value(std::mem::take(&mut self.message)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::TokenLogprob;

    fn lps(tokens: &[&str]) -> Vec<LogprobInfo> {
        let lp = |i: usize, t: &str| TokenLogprob {
            id: i as u32,
            token: t.into(),
            logprob: -(i as f32),
            bytes: t.as_bytes().to_vec(),
        };
        let info = |(i, t): (usize, &&str)| LogprobInfo {
            chosen: lp(i, t),
            top_logprobs: Vec::new(),
        };
        tokens.iter().enumerate().map(info).collect()
    }

    fn tokens(of: Vec<LogprobInfo>) -> Vec<String> {
        of.into_iter().map(|lp| lp.chosen.token).collect()
    }

    #[test]
    fn only_the_messages_tokens_are_its_logprobs() {
        let toks = [
            "<think>",
            "Hello",
            "</think>",
            "\n",
            "Hel",
            "lo",
            "<tool_call>",
            "{}",
            "</tool_call>",
        ];
        let text = toks.concat();
        // Its text after the thinking (which says the same), not the call.
        let mine = of_content(&text, Some("Hello"), "Hello", &lps(&toks));
        assert_eq!(tokens(mine), ["Hel", "lo"]);
        // A token the message's text is a part of (trimmed) counts.
        let toks = ["\n\n Hi", " there", "<tool_call>"];
        let mine = of_content(&toks.concat(), None, "Hi there", &lps(&toks));
        assert_eq!(tokens(mine), ["\n\n Hi", " there"]);
        // No text: none.
        assert!(of_content(&toks.concat(), None, "", &lps(&toks)).is_empty());
    }

    #[test]
    fn a_stream_gives_the_message_the_logprobs_of_its_own_tokens() {
        let mut s = Streamed::default();
        let feed =
            |s: &mut Streamed, toks: &[&str]| lps(toks).into_iter().for_each(|l| s.token(Some(l)));
        let names = |v: Value| -> Vec<String> {
            let v = v.as_array().unwrap().iter();
            v.map(|l| l["token"].as_str().unwrap().to_string())
                .collect()
        };
        // The thinking's tokens went with it; the close marker and the blank after it show
        // nothing, so they are still pending when the message's first text comes.
        feed(&mut s, &["<think>", "Hmm"]);
        s.other();
        feed(&mut s, &["</think>", "\n\n", "Hel", "lo"]);
        assert_eq!(names(s.text("Hello")), ["Hel", "lo"]);
        // Text held back and let out later: all its tokens; one the delta is part of counts.
        feed(&mut s, &[" wor", "ld"]);
        assert_eq!(names(s.text(" world")), [" wor", "ld"]);
        feed(&mut s, &["\n\n Hi"]);
        assert_eq!(names(s.text("Hi")), ["\n\n Hi"]);
        assert_eq!(names(s.message()), ["Hel", "lo", " wor", "ld", "\n\n Hi"]);
    }

    #[test]
    fn include_and_top_logprobs_ask_for_them_and_bad_values_are_named() {
        let chat = |b: Value| {
            let mut out = Map::new();
            to_chat(b.as_object().unwrap(), &mut out).map(|()| Value::Object(out))
        };
        let asked = chat(serde_json::json!({"include": [LOGPROBS]})).unwrap();
        assert_eq!(asked["logprobs"], true);
        let top = chat(serde_json::json!({"top_logprobs": 2})).unwrap();
        assert_eq!(
            (&top["logprobs"], &top["top_logprobs"]),
            (&Value::Bool(true), &2.into())
        );
        let other = chat(serde_json::json!({"include": ["reasoning.encrypted_content"]}));
        assert_eq!(other.unwrap().get("logprobs"), None);
        for bad in [
            serde_json::json!({"include": [3]}),
            serde_json::json!({"top_logprobs": -1}),
            serde_json::json!({"top_logprobs": 1.5}),
        ] {
            assert!(chat(bad).is_err());
        }
    }
}
