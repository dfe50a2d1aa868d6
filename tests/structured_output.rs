//! Structured output and tool calls through the real server and model: grammars that fail
//! closed, JSON that always parses, tool choices that hold, streamed calls that add up to the
//! whole call, a full tool round trip, and batching invariance with constrained and free
//! sequences in one batch.

mod common;

use std::time::Duration;

use common::server::Server;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 96});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
         "parameters": {"type": "object", "properties": {
             "city": {"type": "string", "maxLength": 40},
             "unit": {"enum": ["celsius", "fahrenheit"]}},
             "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "description": "Add two integers",
         "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

/// Checks a call's arguments against the declared schema of its function.
fn check_call(call: &Value) {
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {call}"));
    let obj = args.as_object().unwrap();
    match call["function"]["name"].as_str().unwrap() {
        "get_weather" => {
            assert_eq!(obj.len(), 2, "{args}");
            assert!(args["city"].as_str().unwrap().chars().count() <= 40);
            assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
        }
        "add" => {
            assert_eq!(obj.len(), 2, "{args}");
            for k in ["a", "b"] {
                assert!(args[k].as_f64().is_some_and(|f| f.fract() == 0.0), "{args}");
            }
        }
        other => panic!("undeclared function {other}"),
    }
}

#[test]
fn bad_grammars_are_refused_with_the_field_before_any_compute() {
    let s = Server::start(&[]);
    let schema = |schema: Value| json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
    let tool = |parameters: Value| json!([{"type": "function", "function": {"name": "f", "parameters": parameters}}]);
    let cases = [
        (
            json!({"response_format": schema(json!({"type": "object", "not": {"required": ["a"]}}))}),
            "response_format.json_schema",
        ),
        (
            json!({"response_format": schema(json!({"type": "object", "if": {}, "then": {}, "else": {}}))}),
            "response_format.json_schema",
        ),
        (
            json!({"response_format": schema(json!({"type": "array", "uniqueItems": true}))}),
            "response_format.json_schema",
        ),
        (
            json!({"response_format": schema(json!({"type": "object", "properties": 7}))}),
            "response_format.json_schema",
        ),
        (
            // A `oneOf` whose branches may overlap (2 is both) cannot be enforced.
            json!({"response_format": schema(json!({"type": "object", "properties": {"a":
                {"oneOf": [{"type": "integer"}, {"type": "number", "maximum": 5}]}}}))}),
            "response_format.json_schema",
        ),
        (
            json!({"response_format": schema(json!({"type": "object", "x-guidance": {"lenient": true}}))}),
            "response_format.json_schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true,
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}}),
            "response_format.json_schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "regex", "regex": "(unclosed"}}),
            "response_format.regex",
        ),
        (
            json!({"response_format": {"type": "lark", "lark": "start: ("}}),
            "response_format.lark",
        ),
        (
            json!({"tools": tool(json!({"type": "object", "properties": {"a": {"type": "nonsense"}}}))}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": tool(json!({"type": "object", "not": {}}))}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": tool(json!({"type": "string"}))}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": tools(), "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
            "function": {"name": "add", "arguments": "not json"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
    ];
    let computed = s.metric("edgeinfer_prompt_tokens_total");
    for (extra, param) in cases {
        let (status, r) = s.post(CHAT, &chat("Hello", extra.clone()));
        assert_eq!(status, 400, "{extra}: {r}");
        assert_eq!(r["error"]["param"], param, "{extra}: {r}");
        assert_eq!(r["error"]["type"], "invalid_request_error");
        assert!(!r["error"]["message"].as_str().unwrap().is_empty());
    }
    // Nothing reached the engine.
    assert_eq!(s.metric("edgeinfer_prompt_tokens_total"), computed);
    let (status, _) = s.post(CHAT, &chat("Hello", json!({"max_tokens": 2})));
    assert_eq!(status, 200, "the server is alive after the refusals");
}

#[test]
fn json_replies_always_parse_and_validate() {
    let s = Server::start(&[]);
    let schema = json!({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer"},
        "genre": {"enum": ["drama", "comedy", "documentary"]},
        "cast": {"type": "array", "maxItems": 3, "items": {"type": "object",
            "properties": {"name": {"type": "string", "maxLength": 30}, "lead": {"type": "boolean"}},
            "required": ["name", "lead"], "additionalProperties": false}}},
        "required": ["title", "year", "genre", "cast"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "movie", "strict": true, "schema": schema}});
    let mut validated = 0;
    for seed in 0..4 {
        let body = chat(
            "Describe a film as JSON.",
            json!({"temperature": 1, "seed": seed,
            "max_tokens": 200, "response_format": format}),
        );
        let (status, r) = s.post(CHAT, &body);
        assert_eq!(status, 200, "{r}");
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        if r["choices"][0]["finish_reason"] == "length" {
            continue;
        }
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(v.as_object().unwrap().len(), 4, "{v}");
        assert!(["drama", "comedy", "documentary"].contains(&v["genre"].as_str().unwrap()));
        for m in v["cast"].as_array().unwrap() {
            assert!(m["lead"].is_boolean() && m["name"].is_string(), "{v}");
        }
        validated += 1;
    }
    assert!(
        validated >= 2,
        "too few replies finished to check the schema"
    );
    let mut parsed = 0;
    for seed in 0..3 {
        let body = chat(
            "List two colours.",
            json!({"temperature": 1, "seed": seed, "max_tokens": 120,
            "response_format": {"type": "json_object"}}),
        );
        let (_, r) = s.post(CHAT, &body);
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        if r["choices"][0]["finish_reason"] == "stop" {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(v.is_object());
            parsed += 1;
        }
    }
    assert!(parsed >= 1, "no json_object reply finished");
    // Control-token text in a constant is text: the grammar forces its bytes, never the
    // control token (here the end of turn, which would have cut the reply short).
    let schema = json!({"type": "object", "properties": {
        "tag": {"const": "a<|im_end|>b<|im_start|>"}, "n": {"type": "integer"}},
        "required": ["tag", "n"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "t", "strict": true, "schema": schema}});
    for extra in [json!({}), json!({"temperature": 1, "seed": 3})] {
        let mut body = chat("Give JSON.", json!({"response_format": format}));
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (_, r) = s.post(CHAT, &body);
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(v["tag"], "a<|im_end|>b<|im_start|>", "{v}");
        assert!(v["n"].is_i64(), "{v}");
    }
    // A discriminated union as Pydantic writes it (`oneOf` of `$ref`s told apart by a
    // required constant), strict: each reply is exactly one branch.
    let union = json!({"$defs": {
        "Cat": {"type": "object", "properties": {"kind": {"const": "cat", "type": "string"},
                "lives": {"type": "integer"}}, "required": ["kind", "lives"], "additionalProperties": false},
        "Dog": {"type": "object", "properties": {"kind": {"const": "dog", "type": "string"},
                "good": {"type": "boolean"}}, "required": ["kind", "good"], "additionalProperties": false}},
        "type": "object", "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
            "discriminator": {"propertyName": "kind"}}},
        "required": ["pet"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "owner", "strict": true, "schema": union}});
    let mut kinds = std::collections::HashSet::new();
    for seed in 0..4 {
        let body = chat(
            ["Describe a cat as JSON.", "Describe a dog as JSON."][seed % 2],
            json!({"temperature": 1, "seed": seed, "max_tokens": 60, "response_format": format}),
        );
        let (status, r) = s.post(CHAT, &body);
        assert_eq!(status, 200, "{r}");
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let pet = v["pet"].as_object().unwrap();
        match pet["kind"].as_str().unwrap() {
            "cat" => assert!(pet.len() == 2 && pet["lives"].is_i64(), "{v}"),
            "dog" => assert!(pet.len() == 2 && pet["good"].is_boolean(), "{v}"),
            other => panic!("kind {other}: {v}"),
        }
        kinds.insert(pet["kind"].as_str().unwrap().to_string());
    }
    // Both branches are reachable (these prompts and seeds pick each at least once).
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    let body = chat(
        "Pick a number.",
        json!({"response_format": {"type": "regex", "regex": "[0-9]{3}"}}),
    );
    let (_, r) = s.post(CHAT, &body);
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.len() == 3 && text.bytes().all(|b| b.is_ascii_digit()),
        "{text:?}"
    );
}

#[test]
fn tool_choices_hold_and_streamed_calls_equal_whole_ones() {
    let s = Server::start(&[]);
    let prompts = [
        "What is the weather in Paris?",
        "Add 2 and 40.",
        "Tell me a story.",
    ];
    let mut checked = 0;
    for (i, p) in prompts.iter().enumerate() {
        for choice in [
            json!("required"),
            json!({"type": "function", "function": {"name": "add"}}),
        ] {
            let body = chat(
                p,
                json!({"tools": tools(), "tool_choice": choice, "temperature": 1, "seed": i}),
            );
            let (status, r) = s.post(CHAT, &body);
            assert_eq!(status, 200, "{r}");
            let c = &r["choices"][0];
            let calls = c["message"]["tool_calls"]
                .as_array()
                .unwrap_or_else(|| panic!("no call: {r}"));
            assert!(!calls.is_empty());
            if c["finish_reason"] != "length" {
                assert_eq!(c["finish_reason"], "tool_calls", "{r}");
                calls.iter().for_each(check_call);
                checked += 1;
            }
            if choice.is_object() {
                assert!(calls.iter().all(|c| c["function"]["name"] == "add"), "{r}");
            }
            assert!(c["message"]["content"].is_null(), "{r}");
        }
        let body = chat(
            p,
            json!({"tools": tools(), "tool_choice": "none", "temperature": 1, "seed": i}),
        );
        let (_, r) = s.post(CHAT, &body);
        let m = &r["choices"][0]["message"];
        assert!(m.get("tool_calls").is_none(), "{r}");
        assert!(!m["content"]
            .as_str()
            .unwrap()
            .trim_start()
            .starts_with("<tool_call>"));
    }
    assert!(checked >= 4, "too few finished calls to check ({checked})");
    // Streaming: OpenAI's deltas, adding up to exactly the non-streamed reply.
    for (choice, parallel) in [(json!("required"), true), (json!("auto"), false)] {
        let body = chat(
            "What is the weather in Paris?",
            json!({"tools": tools(), "tool_choice": choice,
            "parallel_tool_calls": parallel}),
        );
        let (_, whole) = s.post(CHAT, &body);
        let mut stream_body = body.clone();
        stream_body["stream"] = json!(true);
        let chunks: Vec<Value> = s
            .stream(CHAT, &stream_body)
            .iter()
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let mut calls: Vec<Value> = Vec::new();
        let mut content = String::new();
        let mut finish = Value::Null;
        for ch in &chunks {
            let choice = &ch["choices"][0];
            if !choice["finish_reason"].is_null() {
                finish = choice["finish_reason"].clone();
            }
            content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            for d in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let i = d["index"].as_u64().unwrap() as usize;
                if d.get("id").is_some() {
                    assert_eq!(i, calls.len(), "calls start in index order");
                    assert_eq!(d["type"], "function");
                    calls.push(json!({"name": d["function"]["name"], "arguments": ""}));
                }
                let args = d["function"]["arguments"].as_str().unwrap();
                let acc = calls[i]["arguments"].as_str().unwrap().to_string() + args;
                calls[i]["arguments"] = json!(acc);
            }
        }
        let w = &whole["choices"][0];
        assert_eq!(finish, w["finish_reason"]);
        assert_eq!(content, w["message"]["content"].as_str().unwrap_or(""));
        let want: Vec<Value> = w["message"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(
                |c| json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}),
            )
            .collect();
        assert_eq!(calls, want, "{whole}");
        assert!(parallel || calls.len() <= 1);
    }
}

#[test]
fn stop_strings_do_not_cut_a_forced_call() {
    let s = Server::start(&[]);
    // Every call's JSON holds a quote; a stop string of one would cut it at its name.
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "add"}}),
    ] {
        let body = chat(
            "Add 2 and 40.",
            json!({"tools": tools(), "tool_choice": choice, "stop": ["\"", "}"]}),
        );
        let (status, r) = s.post(CHAT, &body);
        assert_eq!(status, 200, "{r}");
        let c = &r["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{r}");
        c["message"]["tool_calls"]
            .as_array()
            .unwrap_or_else(|| panic!("no call: {r}"))
            .iter()
            .for_each(check_call);
    }
    // With `auto` they hold for the text as asked.
    let (status, r) = s.post(
        CHAT,
        &chat(
            "Say hello.",
            json!({"tools": tools(), "tool_choice": "auto", "stop": ["l"]}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(!text.contains('l'), "{r}");
}

#[test]
fn under_auto_stop_strings_end_where_a_call_opens() {
    // This model does not call under `auto` by itself: its output is fed through the stop
    // matching token by token, as a reply that opens a call in the model's format would be.
    use edgeinfer::engine::sequence::{OutputState, TokenOutcome};
    use edgeinfer::engine::stop::{Aside, StopsEnd};
    use edgeinfer::model::{GgufFile, Tokenizer};
    use edgeinfer::structured::toolcall::ToolFormat;
    let f = GgufFile::open(&common::default_model_path()).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    // Its template takes no tools: the generic (Hermes) format, `<tool_call>` first.
    let format = ToolFormat::HERMES;
    let call = format.call_text("add", r#"{"a": 2, "b": 40}"#);
    let run = |reply: &str, end: Option<StopsEnd>| {
        let ids = tok.encode(reply, false).unwrap();
        let mut out = OutputState::new(vec!["\"".into(), "}".into()], ids.len(), &[]).ending(end);
        let mut text = String::new();
        for id in ids {
            match out.push(&tok, id).unwrap() {
                TokenOutcome::Continue { emit } => text += &emit,
                TokenOutcome::Finished { emit, stop, .. } => return (text + &emit, stop),
            }
        }
        unreachable!("the budget ends it")
    };
    let end = || {
        Some(StopsEnd {
            text: format.trigger(),
            anywhere: format.calls_after_text(),
            aside: None,
        })
    };
    // A call after some prose, and one alone: whole, the stops on the prose only.
    for reply in [format!("Let me add them.\n{call}"), call.clone()] {
        assert_eq!(run(&reply, end()), (reply.clone(), None));
        // Without the end the call was cut at its name.
        let (cut, stop) = run(&reply, None);
        assert_eq!(stop.as_deref(), Some("\""), "{cut}");
    }
    // A stop in the prose before the call still ends the reply there.
    let (text, stop) = run(&format!("Say \"hi\".\n{call}"), end());
    assert_eq!((text.as_str(), stop.as_deref()), ("Say ", Some("\"")));

    // A reasoning model's reply opens with its thinking: the stops end only at a call after
    // it, in a format with a marker (one the thinking mentions opens nothing)...
    let think = |format: ToolFormat| {
        Some(StopsEnd {
            text: format.trigger(),
            anywhere: format.calls_after_text(),
            aside: Some(Aside {
                open: "<think>".into(),
                close: "</think>".into(),
                inside: false,
            }),
        })
    };
    let mused = "<think>\nA <tool_call> would do it.\n</think>\n\n";
    let reply = format!("{mused}Say \"hi\".\n{call}");
    let (text, stop) = run(&reply, think(format));
    assert_eq!(
        (text.as_str(), stop.as_deref()),
        (&*format!("{mused}Say "), Some("\""))
    );
    let reply = format!("{mused}{call}");
    assert_eq!(run(&reply, think(format)), (reply.clone(), None));
    // Without the thinking known, the marker in it turned the stops off.
    let (_, stop) = run(&format!("{mused}Say \"hi\".\n{call}"), end());
    assert_eq!(stop, None);
    // ...and in a format without one (Llama 3's bare JSON), at the start after it.
    let json = ToolFormat::LLAMA3_JSON;
    let reply = format!(
        "<think>\nAdd them.\n</think>\n\n{}",
        json.call_text("add", "{\"a\": 2}")
    );
    assert_eq!(run(&reply, think(json)), (reply.clone(), None));
    let unaware = Some(StopsEnd {
        aside: None,
        ..think(json).unwrap()
    });
    let (cut, stop) = run(&reply, unaware);
    assert_eq!(stop.as_deref(), Some("\""), "{cut}");
}

#[test]
fn a_tool_round_trip_renders_calls_and_results() {
    let s = Server::start(&[]);
    let user = json!({"role": "user", "content": "What is the weather in Paris?"});
    let body = json!({"messages": [user], "tools": tools(), "tool_choice": "required",
        "parallel_tool_calls": false, "temperature": 0, "max_tokens": 96});
    let (_, r) = s.post(CHAT, &body);
    let call = r["choices"][0]["message"]["tool_calls"][0].clone();
    check_call(&call);
    let first_prompt = r["usage"]["prompt_tokens"].as_u64().unwrap();
    let messages = json!([
        user,
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 18, \"sky\": \"sunny\"}"}
    ]);
    let body = json!({"messages": messages, "tools": tools(), "tool_choice": "none",
        "temperature": 0, "max_tokens": 48});
    let (status, r) = s.post(CHAT, &body);
    assert_eq!(status, 200, "{r}");
    let c = &r["choices"][0];
    assert!(c["message"].get("tool_calls").is_none());
    assert!(!c["message"]["content"].as_str().unwrap().is_empty());
    assert_ne!(c["finish_reason"], "tool_calls");
    // The model saw the call and the result: the prompt grew, and its head came from the
    // cache of the first turn (same tool list, same user turn).
    let u = &r["usage"];
    assert!(
        u["prompt_tokens"].as_u64().unwrap() > first_prompt + 20,
        "{u}"
    );
    assert!(
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{u}"
    );
    // `auto` after the result may answer in text or call again; either way it is well formed.
    let mut auto = body.clone();
    auto["tool_choice"] = json!("auto");
    let (_, r) = s.post(CHAT, &auto);
    for call in r["choices"][0]["message"]["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
    {
        check_call(call);
    }
}

#[test]
fn auto_may_call_after_some_prose_which_is_the_content() {
    // Earlier turns where the assistant said a sentence and then called: the model follows
    // the pattern on some seeds. The prose is the content, never the call's markup.
    let s = Server::start(&[]);
    let mut messages = Vec::new();
    for (city, t) in [("Paris", "18C"), ("Oslo", "3C"), ("Rome", "25C")] {
        let call = json!({"id": format!("call_{city}"), "type": "function", "function": {
            "name": "get_weather", "arguments": json!({"city": city, "unit": "celsius"}).to_string()}});
        messages.extend([
            json!({"role": "user", "content": format!("What is the weather in {city}?")}),
            json!({"role": "assistant", "content": format!("Let me check the weather in {city}."), "tool_calls": [call]}),
            json!({"role": "tool", "tool_call_id": format!("call_{city}"), "content": t}),
            json!({"role": "assistant", "content": format!("It is {t} in {city}.")}),
        ]);
    }
    messages.push(json!({"role": "user", "content": "What is the weather in Berlin?"}));
    let mut both = None;
    for seed in 0..8 {
        let body = json!({"messages": messages, "tools": tools(), "tool_choice": "auto",
            "temperature": 1, "seed": seed, "max_tokens": 80});
        let (status, r) = s.post(CHAT, &body);
        assert_eq!(status, 200, "{r}");
        let m = &r["choices"][0]["message"];
        let content = m["content"].as_str().unwrap_or("");
        assert!(!content.contains("<tool_call>"), "{r}");
        let calls = m["tool_calls"].as_array().cloned().unwrap_or_default();
        if r["choices"][0]["finish_reason"] == "tool_calls" {
            calls.iter().for_each(check_call);
            if !content.is_empty() {
                assert_eq!(content, content.trim_end(), "{r}");
                both = Some(body);
            }
        }
    }
    let body = both.expect("no seed wrote prose and then a call");
    // Streamed: the prose's deltas, then the call's, adding up to the whole reply.
    let (_, whole) = s.post(CHAT, &body);
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let (mut content, mut args, mut saw_call) = (String::new(), String::new(), false);
    for d in s
        .stream(CHAT, &stream_body)
        .iter()
        .filter(|d| *d != "[DONE]")
    {
        let ch: Value = serde_json::from_str(d).unwrap();
        let delta = &ch["choices"][0]["delta"];
        if let Some(t) = delta["content"].as_str() {
            assert!(!saw_call || t.is_empty(), "text after the call: {d}");
            content.push_str(t);
        }
        if let Some(calls) = delta["tool_calls"].as_array() {
            saw_call = true;
            args.push_str(calls[0]["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    let m = &whole["choices"][0]["message"];
    assert_eq!(content, m["content"].as_str().unwrap());
    assert_eq!(
        args,
        m["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap()
    );
}

#[test]
fn constrained_and_free_sequences_batch_without_changing_outputs() {
    let s = Server::start(&["--max-batch-size", "8", "--max-batch-tokens", "64"]);
    let schema = json!({"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object",
        "properties": {"colour": {"type": "string", "maxLength": 20}, "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
        "required": ["colour", "hex"]}}});
    let bodies = [
        chat("Name a colour.", json!({"response_format": schema})),
        chat("What is the capital of France?", json!({"max_tokens": 24})),
        chat(
            "What is the weather in Rome?",
            json!({"tools": tools(), "tool_choice": "required"}),
        ),
        chat("Write a haiku about the sea.", json!({"max_tokens": 30})),
        chat(
            "Give me a JSON object about a cat.",
            json!({"response_format": {"type": "json_object"}}),
        ),
        chat(
            "Add 3 and 4.",
            json!({"tools": tools(), "tool_choice": "auto", "seed": 1, "temperature": 0.7}),
        ),
        chat(
            "Count to five.",
            json!({"max_tokens": 20, "seed": 7, "temperature": 0.9}),
        ),
    ];
    let answer = |r: &Value| {
        let m = &r["choices"][0]["message"];
        let calls: Vec<Value> = m["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["function"].clone())
            .collect();
        (
            m["content"].clone(),
            calls,
            r["choices"][0]["finish_reason"].clone(),
        )
    };
    let solo: Vec<_> = bodies
        .iter()
        .map(|b| {
            let (status, r) = s.post(CHAT, b);
            assert_eq!(status, 200, "{r}");
            answer(&r)
        })
        .collect();
    let together: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| {
                let s = &s;
                scope.spawn(move || answer(&s.post(CHAT, b).1))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, solo, "batching changed an output");
    // The constrained replies are what they were asked to be.
    let json: Value = serde_json::from_str(solo[0].0.as_str().unwrap()).unwrap();
    assert!(json["hex"].as_str().is_some_and(|h| h.len() == 7), "{json}");
    assert!(!solo[2].1.is_empty(), "`required` made no call");
    assert!(s.wait_idle(Duration::from_secs(10)));
}

/// The lines a GBNF grammar below allows, as a check written apart from it.
fn is_plate(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 8
        && b[..3].iter().all(u8::is_ascii_uppercase)
        && b[3] == b'-'
        && b[4..].iter().all(u8::is_ascii_digit)
}

#[test]
fn gbnf_grammars_shape_replies_on_every_completion_endpoint() {
    let s = Server::start(&[]);
    // llama.cpp's GBNF: rules, classes, a repetition count, a comment, a `-` in a name.
    let plate = "root ::= letters \"-\" [0-9]{4} # a number plate\nletters ::= [A-Z]{3}";
    let computed = s.metric("edgeinfer_prompt_tokens_total");
    // Chat: sampled choices, each following the grammar to its end.
    let (status, r) = s.post(
        CHAT,
        &chat(
            "Make up a number plate.",
            json!({"grammar": plate, "temperature": 1, "seed": 3, "n": 3, "max_tokens": 20}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    for c in r["choices"].as_array().unwrap() {
        let text = c["message"]["content"].as_str().unwrap();
        assert!(is_plate(text), "{text:?}: {r}");
        assert_eq!(c["finish_reason"], "stop", "{r}");
    }
    // Streamed, the pieces add up to a plate.
    let mut body = chat(
        "A plate:",
        json!({"grammar": plate, "max_tokens": 20, "stream": true}),
    );
    body["stream"] = json!(true);
    let text: String = s
        .stream(CHAT, &body)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(is_plate(&text), "{text:?}");
    // Completions: several prompts, each choice constrained; `response_format` there too.
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"prompt": ["Plate one:", "Plate two:"], "grammar": plate, "n": 2,
                "temperature": 1, "seed": 5, "max_tokens": 20}),
    );
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{r}");
    for c in choices {
        assert!(is_plate(c["text"].as_str().unwrap()), "{r}");
    }
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"prompt": "A JSON object:", "max_tokens": 60, "temperature": 0,
                "response_format": {"type": "json_object"}}),
    );
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with('{'), "{r}");
    if r["choices"][0]["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v.is_object(), "{r}");
    }
    // llama-server's own endpoint, and Lark when it says it is llguidance's.
    let (status, r) = s.post(
        "/completion",
        &json!({"prompt": "Plate:", "grammar": plate, "n_predict": 20, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    assert!(is_plate(r["content"].as_str().unwrap()), "{r}");
    assert_eq!(r["stop_type"], "eos", "{r}");
    let lark = "%llguidance {}\nstart: PLATE\nPLATE: /[A-Z]{3}-[0-9]{4}/";
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"prompt": "Plate:", "grammar": lark, "max_tokens": 20}),
    );
    assert_eq!(status, 200, "{r}");
    assert!(is_plate(r["choices"][0]["text"].as_str().unwrap()), "{r}");
    let spent = s.metric("edgeinfer_prompt_tokens_total");
    // Refused before any compute, naming `grammar` (with GBNF's line and column).
    let cases = [
        (CHAT, chat("Hi", json!({"grammar": "root ::= [a-z"}))),
        (CHAT, chat("Hi", json!({"grammar": "root ::= x\nx ::= y"}))),
        (CHAT, chat("Hi", json!({"grammar": "root ::= <nope>"}))),
        (CHAT, chat("Hi", json!({"grammar": 7}))),
        (
            CHAT,
            chat(
                "Hi",
                json!({"grammar": plate, "response_format": {"type": "json_object"}}),
            ),
        ),
        (
            CHAT,
            chat("Hi", json!({"grammar": plate, "tools": tools()})),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "grammar": "root ::= \"a\" )"}),
        ),
        (
            "/completion",
            json!({"prompt": "Hi", "grammar": "start ::= \"a\""}),
        ),
    ];
    for (path, body) in [
        (
            CHAT,
            chat("Hi", json!({"grammar": plate, "grammar_lazy": true})),
        ),
        (
            "/completion",
            json!({"prompt": "Hi", "grammar": plate, "grammar_lazy": true}),
        ),
    ] {
        let (status, r) = s.post(path, &body);
        assert_eq!(status, 400, "{body}: {r}");
        assert_eq!(r["error"]["param"], "grammar_lazy", "{body}: {r}");
    }
    for (path, body) in cases {
        let (status, r) = s.post(path, &body);
        assert_eq!(status, 400, "{body}: {r}");
        assert_eq!(r["error"]["param"], "grammar", "{body}: {r}");
    }
    let (_, r) = s.post(
        CHAT,
        &chat("Hi", json!({"grammar": "root ::= \"a\"\n  | \"b\""})),
    );
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("line 2, column 3"), "{r}");
    assert_eq!(s.metric("edgeinfer_prompt_tokens_total"), spent);
    assert!(spent > computed);
    // An empty grammar is none, as in llama.cpp.
    let (status, r) = s.post(CHAT, &chat("Hi", json!({"grammar": "", "max_tokens": 2})));
    assert_eq!(status, 200, "{r}");
}

#[test]
fn vllms_guided_fields_shape_replies() {
    let s = Server::start(&[]);
    let colours = json!(["red", "green", "blue"]);
    let one_of = |t: &str| ["red", "green", "blue"].contains(&t);
    for (n, extra) in [
        json!({"guided_choice": colours}),
        json!({"structured_outputs": {"choice": colours, "disable_any_whitespace": true}}),
    ]
    .into_iter()
    .enumerate()
    {
        let body = chat(
            "Pick a colour.",
            json!({"temperature": 1, "seed": n, "n": 3, "max_tokens": 8}),
        );
        let mut body = body;
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, r) = s.post(CHAT, &body);
        assert_eq!(status, 200, "{r}");
        for c in r["choices"].as_array().unwrap() {
            assert!(one_of(c["message"]["content"].as_str().unwrap()), "{r}");
        }
    }
    // A regex on the completions API, and a GBNF grammar under vLLM's name.
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"prompt": "Three digits:", "guided_regex": "[0-9]{3}", "max_tokens": 8}),
    );
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(
        text.len() == 3 && text.bytes().all(|b| b.is_ascii_digit()),
        "{r}"
    );
    let plate = "root ::= [A-Z]{3} \"-\" [0-9]{4}";
    let (status, r) = s.post(
        CHAT,
        &chat(
            "A plate.",
            json!({"structured_outputs": {"grammar": plate}, "max_tokens": 20}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    assert!(
        is_plate(r["choices"][0]["message"]["content"].as_str().unwrap()),
        "{r}"
    );
    // A schema sent as a string, as vLLM's clients may.
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}},
                        "required": ["ok"], "additionalProperties": false});
    let (status, r) = s.post(
        CHAT,
        &chat(
            "Answer as JSON.",
            json!({"guided_json": schema.to_string(), "max_tokens": 40}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    let v: Value = serde_json::from_str(r["choices"][0]["message"]["content"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {r}"));
    assert!(v["ok"].is_boolean(), "{r}");
    // On the completions API too, every choice.
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"prompt": "A colour:", "guided_choice": ["red", "green", "b\u{7f}lue"], "n": 2,
                "temperature": 1, "seed": 4, "max_tokens": 8}),
    );
    assert_eq!(status, 200, "{r}");
    for c in r["choices"].as_array().unwrap() {
        assert!(
            ["red", "green", "b\u{7f}lue"].contains(&c["text"].as_str().unwrap()),
            "{r}"
        );
    }
    // llama.cpp's top-level `json_schema`, and `json_object` with its `schema`.
    for extra in [
        json!({"json_schema": schema}),
        json!({"response_format": {"type": "json_object", "schema": schema}}),
    ] {
        let mut body = chat("Answer as JSON.", json!({"max_tokens": 40}));
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, r) = s.post(CHAT, &body);
        assert_eq!(status, 200, "{r}");
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {r}"));
        assert!(v["ok"].is_boolean(), "{r}");
    }
    // Mistakes name vLLM's field.
    let cases = [
        (json!({"guided_regex": "("}), "guided_regex"),
        (json!({"guided_regex": 5}), "guided_regex"),
        (json!({"guided_json": "not json"}), "guided_json"),
        (json!({"guided_json": {"type": 5}}), "guided_json"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_grammar": "root ::= ["}), "guided_grammar"),
        (json!({"guided_grammar": "start: ("}), "guided_grammar"),
        (
            json!({"structured_outputs": {"json": {"type": "object", "not": {}}}}),
            "structured_outputs.json",
        ),
        (
            json!({"structured_outputs": {"structural_tag": {"type": "x"}}}),
            "structured_outputs.structural_tag",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
            "guided_regex",
        ),
        (
            json!({"guided_choice": ["a"], "tools": tools()}),
            "guided_choice",
        ),
        (
            json!({"guided_regex": "a", "structured_outputs": {"regex": "b"}}),
            "structured_outputs.regex",
        ),
        (
            json!({"guided_whitespace_pattern": " *"}),
            "guided_whitespace_pattern",
        ),
        (
            json!({"structured_outputs": {"json": {}, "disable_additional_properties": true}}),
            "structured_outputs.disable_additional_properties",
        ),
        (json!({"json_schema": {"type": "nope"}}), "json_schema"),
        (
            json!({"response_format": {"type": "json_object", "schema": {"type": "nope"}}}),
            "response_format.schema",
        ),
        (
            json!({"guided_grammar": "start: /a+/ X\nX[stop=\"\"]: /b*/"}),
            "guided_grammar",
        ),
        // llguidance refuses an empty `suffix` itself.
        (
            json!({"guided_grammar": "start: /a+/ X\nX[suffix=\"\"]: /b*/"}),
            "guided_grammar",
        ),
    ];
    for (extra, param) in cases {
        let (status, r) = s.post(CHAT, &chat("Hi", extra.clone()));
        assert_eq!(status, 400, "{extra}: {r}");
        assert_eq!(r["error"]["param"], param, "{extra}: {r}");
    }
    // Tools that may not be called leave the reply to a format that starts at once (it was
    // dropped for free text), as vLLM takes it.
    for seed in 0..3 {
        let extra = json!({"guided_choice": ["red", "green"], "tools": tools(),
            "tool_choice": "none", "temperature": 1, "seed": seed, "max_tokens": 8});
        let (status, r) = s.post(CHAT, &chat("Pick a color.", extra));
        assert_eq!(status, 200, "{r}");
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(["red", "green"].contains(&text), "{r}");
    }
}
