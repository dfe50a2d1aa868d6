//! Tests of `responses.rs`: items to chat messages, and bad input named.

use super::*;

#[test]
fn items_become_chat_messages() {
    let body = json!({"input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "w", "arguments": "{\"c\":\"P\"}"},
        {"type": "function_call", "call_id": "call_2", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
    ], "instructions": "Be brief.", "max_output_tokens": 9,
       "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}],
       "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}});
    let items = input_items(&body).unwrap();
    let chat = to_chat_request(body, &items).unwrap();
    let m = chat["messages"].as_array().unwrap();
    assert_eq!(m.len(), 4, "{m:?}");
    assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
    assert_eq!(
        m[2]["tool_calls"].as_array().unwrap().len(),
        2,
        "consecutive calls merge"
    );
    assert_eq!(
        m[2]["content"], "Checking.",
        "the turn's text is the calls' message"
    );
    assert_eq!(
        m[3],
        json!({"role": "tool", "tool_call_id": "call_1", "content": "18 C"})
    );
    assert_eq!(chat["max_tokens"], 9);
    assert_eq!(chat["tools"][0]["function"]["name"], "w");
    assert_eq!(
        chat["response_format"]["json_schema"]["schema"],
        json!({"type": "object"})
    );
}

#[test]
fn bad_input_names_its_field() {
    for (body, param) in [
        (json!({}), "input"),
        (
            json!({"input": [{"role": "tool", "content": "x"}]}),
            "input[0].role",
        ),
        (
            json!({"input": [{"type": "web_search_call"}]}),
            "input[0].type",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
            "input[0].content[0]",
        ),
    ] {
        let e = input_items(&body).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{body}");
    }
    let e = to_chat_request(json!({"tools": [{"type": "web_search"}]}), &[]).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tools[0].type"));
    // Fields this server does not have are named, not dropped; null is not given.
    for field in ["conversation", "prompt", "max_tool_calls"] {
        let e = to_chat_request(json!({field: "x"}), &[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(field));
        assert!(to_chat_request(json!({"model": "m", field: null}), &[]).is_ok());
    }
    // Metadata is kept with a stored response: bounded as OpenAI bounds it.
    for bad in [
        json!("str"),
        json!([1]),
        json!({"k": "v".repeat(513)}),
        json!({"k": 1}),
    ] {
        let e = to_chat_request(json!({"metadata": bad}), &[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("metadata"), "{bad}");
    }
    // The echo keeps the API's fields of `text` and `reasoning`, nothing else sent.
    let e = echo(
        &json!({"text": {"format": {"type": "text"}, "junk": "x".repeat(99)},
                         "reasoning": {"effort": "low", "junk": 1}}),
    );
    assert_eq!(e["text"], json!({"format": {"type": "text"}}));
    assert_eq!(e["reasoning"], json!({"effort": "low", "summary": null}));
}

#[test]
fn a_cut_reply_has_only_its_last_item_incomplete() {
    use crate::engine::request::FinishReason;
    let items = || {
        vec![
            json!({"type": "function_call", "status": "completed", "arguments": "{}"}),
            json!({"type": "message", "status": "completed"}),
        ]
    };
    let mut cut = items();
    mark_cut(&mut cut, FinishReason::Length);
    assert_eq!(
        (&cut[0]["status"], &cut[1]["status"]),
        (&json!("completed"), &json!("incomplete"))
    );
    let mut whole = items();
    mark_cut(&mut whole, FinishReason::Stop);
    assert_eq!(whole, items());
}

#[test]
fn chat_errors_name_the_responses_fields() {
    let named = |p: &str| named_as_responses(ApiError::invalid(p, "x")).param.unwrap();
    assert_eq!(named("messages"), "input");
    assert_eq!(
        named("messages[1].tool_calls[0].function.arguments"),
        "input"
    );
    assert_eq!(named("tools[0].function.name"), "tools[0].name");
    assert_eq!(named("max_tokens"), "max_output_tokens");
    assert_eq!(named("response_format.json_schema"), "text.format");
    assert_eq!(
        named("response_format.json_schema.schema"),
        "text.format.schema"
    );
    assert_eq!(named("response_format"), "text.format");
    assert_eq!(named("temperature"), "temperature");
}
