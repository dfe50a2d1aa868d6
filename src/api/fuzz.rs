//! Entry points for the fuzz targets in `fuzz/` (and their seed tests): the request path
//! (JSON bytes -> typed request -> validation -> chat template) and the SSE encoder. Each
//! returns normally on any input; a panic is the bug the fuzzer looks for. Not a public API.

use serde_json::Value;

use super::error::ApiError;
use super::response::Meta;
use super::types::{from_value, parse_body, ChatCompletionRequest, SamplingFields};
use crate::engine::request::FinishReason;
use crate::engine::request::{Event, Usage};
use crate::model::ChatTemplate;
use crate::structured::reasoning::{Shown, ThinkSyntax};
use crate::structured::{toolcall, ToolFormat};

/// What the chat route does with a body before the engine: parse, type, validate every
/// field, and render the prompt with `template`. The rendered prompt, or the 4xx.
pub fn chat_request(data: &[u8], template: &ChatTemplate) -> Result<String, ApiError> {
    let body = parse_body(data)?;
    let req: ChatCompletionRequest = from_value(&body)?;
    let sampling: SamplingFields = from_value(&body)?;
    sampling.sampling_params(2.0)?;
    sampling.stops(4)?;
    sampling.max_tokens(false)?;
    let messages = req.validated_messages()?;
    req.constraint_spec(ToolFormat::HERMES)?;
    let tools = req.tools_json();
    let messages = if tools.is_empty() {
        messages
    } else {
        toolcall::generic_messages(messages, &tools)
    };
    template
        .render_with_tools(&messages, true, None)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// The SSE body a chat stream of these token texts sends (ending `stop`), as bytes on the
/// wire. `mode`'s bits: 1, the texts are parsed for tool calls, Hermes-style or with 2,
/// Mistral's `[TOOL_CALLS]name[ARGS]{...}`; 4, a `<think>` reasoning is split off first,
/// with 8 as if the prompt opened it, with 16 left inline.
pub fn sse_body(texts: &[String], mode: u8) -> String {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for t in texts {
        let _ = tx.send(Event::Token {
            text: t.clone(),
            logprob: None,
            at: std::time::Instant::now(),
        });
    }
    let _ = tx.send(Event::Finished {
        reason: FinishReason::Stop,
        usage: Usage::default(),
        stop_sequence: None,
        end_logprob: None,
    });
    drop(tx);
    let meta = Meta {
        id: "chatcmpl-fuzz".into(),
        created: 0,
        model: "m".into(),
        chat: true,
        logprobs: false,
        tools: (mode & 1 == 1).then_some(if mode & 2 == 2 {
            ToolFormat::MISTRAL_ARGS
        } else {
            ToolFormat::HERMES
        }),
        reasoning: (mode & 4 == 4).then_some(super::response::Reasoning {
            syntax: ThinkSyntax::TAGS,
            opened: mode & 8 == 8,
            shown: if mode & 16 == 16 {
                Shown::Inline
            } else {
                Shown::Apart
            },
        }),
        surface: super::response::Surface::OpenAi,
        pick: None,
    };
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
    }
    let bytes = RUNTIME.with(|rt| {
        rt.block_on(async {
            let choice = super::choices::Choice::new(rx, None, true);
            let resp = super::stream::sse_response(
                vec![choice],
                meta,
                true,
                super::gate::Tail::default(),
                std::time::Duration::from_secs(15),
            );
            axum::body::to_bytes(resp.into_body(), usize::MAX).await
        })
    });
    let bytes = bytes.expect("an in-memory body");
    String::from_utf8(bytes.to_vec()).expect("SSE bodies are UTF-8")
}

/// The `data:` payloads of an SSE body, checking the framing on the way: every event is
/// `data: ...` lines (or a comment) ended by a blank line, and every payload is JSON but
/// the last, `[DONE]`. An error names what broke.
pub fn sse_payloads(body: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut done = false;
    if !body.ends_with("\n\n") {
        return Err("the body does not end with a blank line".into());
    }
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        if done {
            return Err("events after [DONE]".into());
        }
        let mut data = String::new();
        for line in event.split('\n') {
            if line.starts_with(':') {
                continue;
            }
            let Some(d) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) else {
                return Err(format!("a line that is not data: {line:?}"));
            };
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d);
        }
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).map_err(|e| format!("{e}: {data:?}"))?;
        out.push(v);
    }
    if !done {
        return Err("no [DONE]".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_content_adds_up_to_the_tokens() {
        let texts: Vec<String> = ["He", "llo\n\n", "", "data: x\r\n", "\u{0}é😀"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let body = sse_body(&texts, 0);
        let events = sse_payloads(&body).unwrap();
        let content: String = events
            .iter()
            .filter_map(|v| v["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, texts.concat());
        assert_eq!(events.last().unwrap()["usage"]["total_tokens"], 0);
    }

    #[test]
    fn sse_reasoning_and_named_calls_come_apart() {
        let texts: Vec<String> = [
            "<thi",
            "nk>a ",
            "b</th",
            "ink>\n",
            "[TOOL_CALLS]f[AR",
            "GS]{}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let events = sse_payloads(&sse_body(&texts, 1 | 2 | 4)).unwrap();
        let field = |f: &str| -> String {
            let deltas = events.iter().map(|v| &v["choices"][0]["delta"]);
            deltas.filter_map(|d| d[f].as_str()).collect()
        };
        assert_eq!(field("reasoning_content"), "a b");
        assert_eq!(field("content"), "");
        let call = events
            .iter()
            .find_map(|v| v["choices"][0]["delta"]["tool_calls"].get(0));
        assert_eq!(call.unwrap()["function"]["name"], "f");
    }

    #[test]
    fn the_request_path_refuses_without_panicking() {
        let t = ChatTemplate::new(ChatTemplate::fallback_source(|_| true), "", "").unwrap();
        let ok = chat_request(br#"{"messages":[{"role":"user","content":"Hi"}]}"#, &t).unwrap();
        assert!(ok.contains("Hi"), "{ok}");
        for bad in [&b""[..], b"{", b"[]", br#"{"messages":[],"n":1e999}"#] {
            assert!(chat_request(bad, &t).unwrap_err().status.is_client_error());
        }
    }
}
