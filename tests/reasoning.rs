//! Reasoning models through the real server: the default model served with a DeepSeek-R1
//! style chat template (`--chat-template-file`) whose generation prompt opens `<think>`.
//! The thinking comes back apart from the answer on the OpenAI, Anthropic and Responses
//! surfaces, the same text as the unsplit reply; a zero budget answers at once; reasoning
//! sent back is accepted.

mod common;

use common::server::Server;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

/// ChatML, as SmolLM2's own, but the assistant turn opens its reasoning, and past replies
/// lose theirs (as DeepSeek-R1's template does); `enable_thinking: false` closes it at once
/// (as Qwen3's template does).
const R1_STYLE: &str = "{% for message in messages %}{% set content = message['content'] %}\
{% if message['role'] == 'assistant' and '</think>' in content %}\
{% set content = content.split('</think>')[-1] | trim %}{% endif %}\
{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}\
{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}\
{% else %}{{ '<think>\n' }}{% endif %}{% endif %}";

fn server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r1.jinja");
    std::fs::write(&path, R1_STYLE).unwrap();
    let s = Server::start(&["--chat-template-file", path.to_str().unwrap()]);
    (dir, s)
}

fn ask(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "What is 2 + 2?"}],
                          "temperature": 0, "max_tokens": 24});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// What the split of a raw reply must be: (reasoning, answer).
fn expected_split(raw: &str) -> (String, String) {
    match raw.split_once("</think>") {
        Some((r, a)) => (r.trim().to_string(), a.trim_start().to_string()),
        None => (raw.trim().to_string(), String::new()),
    }
}

/// (reasoning, content) of a streamed chat reply, its deltas concatenated.
fn streamed(s: &Server, body: &Value) -> (String, String) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let (mut reasoning, mut content) = (String::new(), String::new());
    for data in s.stream(CHAT, &body) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        if let Some(d) = v["choices"].get(0).map(|c| &c["delta"]) {
            reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
            content.push_str(d["content"].as_str().unwrap_or(""));
        }
    }
    (reasoning, content)
}

#[test]
fn reasoning_comes_back_apart_on_every_surface() {
    let (_dir, s) = server();
    // Unsplit, the reply is the model's text as written.
    let (status, raw) = s.post(CHAT, &ask(json!({"reasoning_format": "none"})));
    assert_eq!(status, 200, "{raw}");
    assert!(raw["choices"][0]["message"]["reasoning_content"].is_null());
    let raw_text = raw["choices"][0]["message"]["content"].as_str().unwrap();
    let (thought, answer) = expected_split(raw_text);
    assert!(!thought.is_empty(), "{raw}");
    // Split (the default), the same tokens.
    let (status, split) = s.post(CHAT, &ask(json!({})));
    assert_eq!(status, 200, "{split}");
    let message = &split["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], thought.as_str(), "{split}");
    assert_eq!(message["content"], answer.as_str(), "{split}");
    assert_eq!(
        split["usage"]["completion_tokens"],
        raw["usage"]["completion_tokens"]
    );
    // Its tokens, all of them when the reasoning never closed.
    let reasoning_tokens = |v: &Value| v["completion_tokens_details"]["reasoning_tokens"].clone();
    let used = split["usage"]["completion_tokens"].as_u64().unwrap();
    let thinking = reasoning_tokens(&split["usage"]).as_u64().unwrap();
    if answer.is_empty() {
        assert_eq!(thinking, used, "{split}");
    } else {
        assert!(thinking > 0 && thinking < used, "{split}");
    }
    // Counted however the thinking is shown.
    assert_eq!(
        reasoning_tokens(&raw["usage"]),
        reasoning_tokens(&split["usage"])
    );
    // Streamed, the deltas add up to the same.
    assert_eq!(
        streamed(&s, &ask(json!({}))),
        (thought.clone(), answer.clone())
    );

    // Anthropic's Messages: a thinking block when thinking is enabled; otherwise none, as
    // Claude's replies have none then.
    let plain = json!({"model": split["model"], "max_tokens": 24, "temperature": 0,
                       "messages": [{"role": "user", "content": "What is 2 + 2?"}]});
    let (status, reply) = s.post("/v1/messages", &plain);
    assert_eq!(status, 200, "{reply}");
    let blocks = reply["content"].as_array().unwrap();
    assert!(blocks.iter().all(|b| b["type"] == "text"), "{reply}");
    let mut msg = plain.clone();
    msg["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    let (status, reply) = s.post("/v1/messages", &msg);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["content"][0]["type"], "thinking", "{reply}");
    assert_eq!(reply["content"][0]["thinking"], thought.as_str(), "{reply}");
    let mut off = msg.clone();
    off["thinking"] = json!({"type": "disabled"});
    let (status, reply) = s.post("/v1/messages", &off);
    assert_eq!(status, 200, "{reply}");
    let blocks = reply["content"].as_array().unwrap();
    assert!(blocks.iter().all(|b| b["type"] != "thinking"), "{reply}");
    assert_eq!(blocks[0]["type"], "text", "{reply}");
    // The next turn sends the thinking back: accepted, and not shown to the model.
    let next = json!({"model": split["model"], "max_tokens": 4, "messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": thought, "signature": ""},
                                          {"type": "text", "text": "4"}]},
        {"role": "user", "content": "And 3 + 3?"}]});
    let (status, reply) = s.post("/v1/messages", &next);
    assert_eq!(status, 200, "{reply}");
    // Streamed: thinking deltas, then text.
    let mut streamed_msg = msg.clone();
    streamed_msg["stream"] = json!(true);
    let mut thinking = String::new();
    for data in s.stream("/v1/messages", &streamed_msg) {
        let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        if v["delta"]["type"] == "thinking_delta" {
            thinking.push_str(v["delta"]["thinking"].as_str().unwrap());
        }
    }
    assert_eq!(thinking, thought);

    // The Responses API: a reasoning item first; sent back in `input`, it is accepted.
    let req = json!({"model": split["model"], "input": "What is 2 + 2?",
                     "max_output_tokens": 24, "temperature": 0});
    let (status, resp) = s.post("/v1/responses", &req);
    assert_eq!(status, 200, "{resp}");
    let item = &resp["output"][0];
    assert_eq!(item["type"], "reasoning", "{resp}");
    assert_eq!(item["content"][0]["text"], thought.as_str(), "{resp}");
    let mut input = resp["output"].as_array().unwrap().clone();
    input.insert(0, json!({"role": "user", "content": "What is 2 + 2?"}));
    input.push(json!({"role": "user", "content": "And 3 + 3?"}));
    let (status, reply) = s.post(
        "/v1/responses",
        &json!({"model": split["model"], "input": input, "max_output_tokens": 4}),
    );
    assert_eq!(status, 200, "{reply}");
    // A follow-up by id: the stored conversation keeps no reasoning item.
    let (status, reply) = s.post(
        "/v1/responses",
        &json!({"model": split["model"], "previous_response_id": resp["id"],
                "input": "And 3 + 3?", "max_output_tokens": 4}),
    );
    assert_eq!(status, 200, "{reply}");
    // Streamed: reasoning text deltas add up to the item.
    let mut streamed_req = req.clone();
    streamed_req["stream"] = json!(true);
    let mut deltas = String::new();
    let mut done = Value::Null;
    let mut kinds = Vec::new();
    for data in s.stream("/v1/responses", &streamed_req) {
        let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        if v["output_index"] == 0 {
            kinds.push(v["type"].as_str().unwrap_or("").to_string());
        }
        match v["type"].as_str() {
            Some("response.reasoning_text.delta") => deltas.push_str(v["delta"].as_str().unwrap()),
            Some("response.completed" | "response.incomplete") => done = v,
            _ => {}
        }
    }
    assert_eq!(deltas, thought);
    // The reasoning item's events in OpenAI's order.
    kinds.dedup();
    let expected = [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ];
    assert_eq!(kinds, expected);
    assert_eq!(done["response"]["output"][0]["type"], "reasoning", "{done}");
    let details = &done["response"]["usage"]["output_tokens_details"];
    assert_eq!(
        details["reasoning_tokens"],
        resp["usage"]["output_tokens_details"]["reasoning_tokens"]
    );
    assert!(details["reasoning_tokens"].as_u64() > Some(0), "{done}");

    // Bad requests name their field.
    let (status, e) = s.post(CHAT, &ask(json!({"reasoning_format": "raw"})));
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("reasoning_format"))
    );
    let (status, e) = s.post(CHAT, &ask(json!({"reasoning_budget": -2})));
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("reasoning_budget"))
    );
    let (status, e) = s.post(CHAT, &ask(json!({"reasoning_budget": -1})));
    assert_eq!(status, 200, "{e}");
    let mut bad = msg.clone();
    bad["thinking"] = json!({"type": "enabled"});
    let (status, e) = s.post("/v1/messages", &bad);
    assert_eq!(status, 400, "{e}");
}

#[test]
fn an_answer_after_the_reasoning_is_content() {
    let (_dir, s) = server();
    // A regex constrains the whole reply from its first token, so no reasoning is open
    // then, whatever the prompt opened: its text is all content.
    let body = ask(json!({"response_format": {"type": "regex", "regex": "yes|no"}}));
    let (status, reply) = s.post(CHAT, &body);
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert!(message["reasoning_content"].is_null(), "{reply}");
    assert!(
        ["yes", "no"].contains(&message["content"].as_str().unwrap()),
        "{reply}"
    );
    // One that writes a reasoning of its own, close marker included, is split.
    let regex = r"<think>Two and two\. Four\.\n</think>\n\nIt is 4\.";
    let body = ask(json!({"max_tokens": 40,
                          "response_format": {"type": "regex", "regex": regex}}));
    let (status, reply) = s.post(CHAT, &body);
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert_eq!(
        message["reasoning_content"], "Two and two. Four.",
        "{reply}"
    );
    assert_eq!(message["content"], "It is 4.", "{reply}");
    assert_eq!(
        streamed(&s, &body),
        ("Two and two. Four.".into(), "It is 4.".into())
    );
    // Some of its tokens were the reasoning's, not all.
    let usage = &reply["usage"];
    let thinking = usage["completion_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        thinking > 5 && thinking < usage["completion_tokens"].as_u64().unwrap(),
        "{reply}"
    );
    // Streamed with usage, the same count.
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let last = s.stream(CHAT, &body).into_iter().rev().nth(1).unwrap();
    let last: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["usage"], reply["usage"], "{last}");
}

#[test]
fn a_zero_budget_answers_at_once() {
    let (_dir, s) = server();
    // Unsplit, the reply opens with the close marker the grammar forced.
    let (status, raw) = s.post(
        CHAT,
        &ask(json!({"reasoning_budget": 0, "reasoning_format": "none"})),
    );
    assert_eq!(status, 200, "{raw}");
    let text = raw["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("</think>"), "{raw}");
    let (status, reply) = s.post(CHAT, &ask(json!({"reasoning_budget": 0})));
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert!(message["reasoning_content"].is_null(), "{reply}");
    assert_eq!(
        message["content"],
        expected_split(text).1.as_str(),
        "{reply}"
    );
    // OpenAI's `reasoning_effort: none` is the same; the other efforts think.
    let (_, none) = s.post(CHAT, &ask(json!({"reasoning_effort": "none"})));
    assert_eq!(
        none["choices"][0]["message"],
        reply["choices"][0]["message"]
    );
    let (_, high) = s.post(CHAT, &ask(json!({"reasoning_effort": "high"})));
    assert!(
        high["choices"][0]["message"]["reasoning_content"].is_string(),
        "{high}"
    );
    let (status, e) = s.post(CHAT, &ask(json!({"reasoning_effort": "max"})));
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("reasoning_effort"))
    );
    // And the Responses API's `reasoning.effort`, echoed.
    let (status, resp) = s.post(
        "/v1/responses",
        &json!({"input": "What is 2 + 2?", "max_output_tokens": 24,
                "reasoning": {"effort": "none"}}),
    );
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["output"][0]["type"], "message", "{resp}");
    assert_eq!(resp["reasoning"]["effort"], "none", "{resp}");
    // A JSON answer and a tool call, each at once.
    let schema = json!({"type": "object", "properties": {"sum": {"type": "integer"}},
                        "required": ["sum"], "additionalProperties": false});
    let (status, reply) = s.post(
        CHAT,
        &ask(json!({"reasoning_budget": 0, "max_tokens": 40, "response_format":
            {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": true}}})),
    );
    assert_eq!(status, 200, "{reply}");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {reply}"));
    assert!(v["sum"].is_number(), "{reply}");
    let tools = json!([{"type": "function", "function": {"name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}},
                       "required": ["a"], "additionalProperties": false}}}]);
    let (status, reply) = s.post(
        CHAT,
        &ask(
            json!({"reasoning_budget": 0, "max_tokens": 40, "tools": tools,
                    "tool_choice": "required"}),
        ),
    );
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert_eq!(
        message["tool_calls"][0]["function"]["name"], "add",
        "{reply}"
    );
    assert!(message["reasoning_content"].is_null(), "{reply}");
    // Unsplit, the reasoning stays content and the call after it is still parsed.
    let (status, reply) = s.post(
        CHAT,
        &ask(
            json!({"reasoning_budget": 0, "max_tokens": 40, "tools": tools,
                    "tool_choice": "required", "reasoning_format": "none",
                    "parallel_tool_calls": false}),
        ),
    );
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert_eq!(
        message["tool_calls"][0]["function"]["name"], "add",
        "{reply}"
    );
    assert_eq!(message["content"], "</think>", "{reply}");
    assert_eq!(
        reply["choices"][0]["finish_reason"], "tool_calls",
        "{reply}"
    );
}

#[test]
fn a_budget_cuts_the_reasoning_short() {
    let (_dir, s) = server();
    // Unbudgeted, this model thinks past 40 tokens (it never closes on its own).
    let body = ask(json!({"max_tokens": 40, "reasoning_budget": 8}));
    let (status, reply) = s.post(CHAT, &body);
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert!(message["reasoning_content"].is_string(), "{reply}");
    // Eight tokens of thinking and the close marker's few.
    let details = &reply["usage"]["completion_tokens_details"];
    let thinking = details["reasoning_tokens"].as_u64().unwrap();
    assert!((9..=16).contains(&thinking), "{reply}");
    // Unsplit, the marker is where the budget ran out.
    let mut raw = body.clone();
    raw["reasoning_format"] = json!("none");
    let (_, raw) = s.post(CHAT, &raw);
    let text = raw["choices"][0]["message"]["content"].as_str().unwrap();
    let (thought, answer) = expected_split(text);
    assert_eq!(message["reasoning_content"], thought.as_str(), "{raw}");
    assert_eq!(message["content"], answer.as_str(), "{raw}");
    // Anthropic's `budget_tokens` is the same budget.
    let msg = json!({"model": reply["model"], "max_tokens": 40, "temperature": 0,
                     "thinking": {"type": "enabled", "budget_tokens": 8},
                     "messages": [{"role": "user", "content": "What is 2 + 2?"}]});
    let (status, m) = s.post("/v1/messages", &msg);
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["content"][0]["thinking"], thought.as_str(), "{m}");
}

#[test]
fn template_kwargs_reach_the_template() {
    let (_dir, s) = server();
    let off = ask(json!({"chat_template_kwargs": {"enable_thinking": false}}));
    let (status, reply) = s.post(CHAT, &off);
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert!(message["reasoning_content"].is_null(), "{reply}");
    assert!(!message["content"].as_str().unwrap().is_empty(), "{reply}");
    let details = &reply["usage"]["completion_tokens_details"];
    assert_eq!(details["reasoning_tokens"], 0, "{reply}");
    // The prompt is longer by the closed reasoning.
    let (_, on) = s.post(CHAT, &ask(json!({})));
    let prompt = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt(&reply) > prompt(&on), "{reply} {on}");
    // The variables the server sets cannot be passed.
    let bad = ask(json!({"chat_template_kwargs": {"add_generation_prompt": false}}));
    let (status, e) = s.post(CHAT, &bad);
    assert_eq!(status, 400, "{e}");
    assert_eq!(
        e["error"]["param"],
        "chat_template_kwargs.add_generation_prompt"
    );
    let (status, _) = s.post(CHAT, &ask(json!({"chat_template_kwargs": [1]})));
    assert_eq!(status, 400);
    // The other surfaces pass them on: the same longer prompt.
    let kwargs = json!({"enable_thinking": false});
    let user = json!([{"role": "user", "content": "Why is the sky blue?"}]);
    let (status, a) = s.post(
        "/v1/messages",
        &json!({"model": reply["model"], "max_tokens": 4, "messages": user, "chat_template_kwargs": kwargs}),
    );
    assert_eq!(status, 200, "{a}");
    let (_, a_on) = s.post(
        "/v1/messages",
        &json!({"model": reply["model"], "max_tokens": 4, "messages": user}),
    );
    let input = |v: &Value| {
        v["usage"]["input_tokens"].as_u64().unwrap()
            + v["usage"]["cache_read_input_tokens"].as_u64().unwrap_or(0)
    };
    assert!(input(&a) > input(&a_on), "{a} {a_on}");
    let (status, r) = s.post(
        "/v1/responses",
        &json!({"input": "Why is the sky blue?", "max_output_tokens": 4, "store": false,
                "chat_template_kwargs": kwargs}),
    );
    assert_eq!(status, 200, "{r}");
    let (_, r_on) = s.post(
        "/v1/responses",
        &json!({"input": "Why is the sky blue?", "max_output_tokens": 4, "store": false}),
    );
    let input = |v: &Value| v["usage"]["input_tokens"].as_u64().unwrap();
    assert!(input(&r) > input(&r_on), "{r} {r_on}");
}

#[test]
fn a_model_that_does_not_reason_has_no_reasoning() {
    let s = Server::start(&[]);
    let (status, reply) = s.post(CHAT, &ask(json!({"reasoning_budget": 0})));
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert!(message.get("reasoning_content").is_none(), "{reply}");
    assert!(!message["content"].as_str().unwrap().is_empty(), "{reply}");
}
