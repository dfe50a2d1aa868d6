//! Tool calls in Mistral's own formats, end to end: a synthetic model with Mistral's control
//! tokens and a chat template in Mistral v0.3's format, or in Mistral Small 3.2's, served
//! over HTTP. The grammar makes the model open its calls with the `[TOOL_CALLS]` token and
//! write them as a JSON list (v0.3), or write each as `[TOOL_CALLS]name[ARGS]{...}` (3.2);
//! the answer is OpenAI's `tool_calls`; call ids sent back in any form render.

mod common;

use common::server::Server;
use common::synthetic::{self, Spec};
use serde_json::{json, Value};

fn mistral_server(args: bool) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mistral.gguf");
    synthetic::write(
        &path,
        &Spec {
            spm: true,
            mistral: true,
            mistral_args: args,
            // The tool list is mostly byte tokens in this small vocabulary.
            context: 1024,
            ..Spec::default()
        },
    );
    let server = Server::spawn(&["--model", path.to_str().unwrap()], &[]);
    server.wait_ready();
    (dir, server)
}

fn tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                       "required": ["city"], "additionalProperties": false},
    }}])
}

fn is_short_id(id: &str) -> bool {
    id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// (name, arguments) of each call in a whole reply.
fn calls_of(body: &Value) -> Vec<(String, String)> {
    body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool calls: {body}"))
        .iter()
        .map(|c| {
            let id = c["id"].as_str().unwrap();
            assert!(
                is_short_id(id),
                "Mistral's call ids are 9 alphanumerics: {id}"
            );
            (
                c["function"]["name"].as_str().unwrap().to_string(),
                c["function"]["arguments"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The tokens of a reply's logprobs.
fn tokens_of(body: &Value) -> Vec<String> {
    body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs: {body}"))
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn mistral_models_call_tools_in_their_own_format() {
    calls_in_own_format(false);
}

#[test]
fn mistral_small_3_2_models_call_tools_as_name_args() {
    calls_in_own_format(true);
}

fn calls_in_own_format(args_format: bool) {
    let (_dir, server) = mistral_server(args_format);
    let ask = json!({
        "messages": [{"role": "user", "content": "hello world"}],
        "tools": tools(),
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "temperature": 0,
        "max_tokens": 120,
        "logprobs": true,
    });
    let (status, body) = server.post("/v1/chat/completions", &ask);
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert!(choice["message"]["content"].is_null(), "{body}");
    let calls = calls_of(&body);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "get_weather");
    let args: Value = serde_json::from_str(&calls[0].1).unwrap();
    assert!(
        args["city"]
            .as_str()
            .is_some_and(|c| c.chars().count() <= 6),
        "{args}"
    );
    // The model wrote the control token Mistral models open their calls with.
    let tokens = tokens_of(&body);
    assert_eq!(tokens[0], "[TOOL_CALLS]", "{body}");
    if args_format {
        // Then the name's tokens, perhaps `[CALL_ID]` and an id (this vocabulary has it),
        // `[ARGS]` and the arguments' object.
        let at = tokens.iter().position(|t| t == "[ARGS]");
        let at = at.unwrap_or_else(|| panic!("no [ARGS]: {tokens:?}"));
        let head = tokens[1..at].concat();
        let (name, id) = match head.split_once("[CALL_ID]") {
            Some((name, id)) => (name.to_string(), Some(id.to_string())),
            None => (head, None),
        };
        assert_eq!(name, "get_weather", "{tokens:?}");
        if let Some(id) = id {
            // The model's own id is the call's.
            let call_id = &body["choices"][0]["message"]["tool_calls"][0]["id"];
            assert_eq!(call_id, id.as_str(), "{body}");
        }
        assert_eq!(tokens[at + 1], "{", "{tokens:?}");
    }

    // Streamed, the same call arrives in deltas.
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let (mut name, mut arguments, mut finish) = (String::new(), String::new(), Value::Null);
    for data in server.stream("/v1/chat/completions", &streamed) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        assert!(
            choice["delta"]["content"]
                .as_str()
                .is_none_or(str::is_empty),
            "{v}"
        );
        for c in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(id) = c["id"].as_str() {
                assert!(is_short_id(id), "{id}");
            }
            name.push_str(c["function"]["name"].as_str().unwrap_or(""));
            arguments.push_str(c["function"]["arguments"].as_str().unwrap_or(""));
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    assert_eq!((name, arguments), calls[0]);
    assert_eq!(finish, "tool_calls");

    // The next turn sends the call and its result back, with an OpenAI-style id the template
    // would refuse as it is (it insists on 9 characters): it renders, and answers in text.
    let turn = json!({
        "messages": [
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_0123456789abcdef", "type": "function",
                "function": {"name": "get_weather", "arguments": calls[0].1}}]},
            {"role": "tool", "tool_call_id": "call_0123456789abcdef", "content": "sunny"},
        ],
        "tools": tools(),
        "tool_choice": "none",
        "temperature": 0,
        "max_tokens": 8,
    });
    let (status, body) = server.post("/v1/chat/completions", &turn);
    assert_eq!(status, 200, "{body}");
    assert!(
        body["choices"][0]["message"]["tool_calls"].is_null(),
        "{body}"
    );
    // Several calls in one reply (parallel calls allowed), each a whole call.
    let mut several = ask.clone();
    several["parallel_tool_calls"] = json!(true);
    several["max_tokens"] = json!(400);
    let (status, reply) = server.post("/v1/chat/completions", &several);
    assert_eq!(status, 200, "{reply}");
    let calls = calls_of(&reply);
    let whole = reply["choices"][0]["finish_reason"] == "tool_calls";
    for (name, args) in &calls[..calls.len() - usize::from(!whole)] {
        assert_eq!(name, "get_weather");
        serde_json::from_str::<Value>(args).unwrap();
    }
    if args_format {
        // Each call opens with its own `[TOOL_CALLS]` (one more if cut short before its
        // name ended).
        let opened = tokens_of(&reply)
            .iter()
            .filter(|t| *t == "[TOOL_CALLS]")
            .count();
        assert!(
            opened == calls.len() || !whole && opened == calls.len() + 1,
            "{reply}"
        );
    }
    assert!(
        reply["choices"][0]["message"]["content"].is_null(),
        "no marker or call text leaks into the content: {reply}"
    );
    // Anthropic's surface: `tool_use` blocks from the same format.
    let msg = json!({
        "model": reply["model"], "max_tokens": 120, "temperature": 0,
        "messages": [{"role": "user", "content": "hello world"}],
        "tools": [{"name": "get_weather", "description": "The weather in a city",
                   "input_schema": tools()[0]["function"]["parameters"]}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
    });
    let (status, reply) = server.post("/v1/messages", &msg);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["stop_reason"], "tool_use", "{reply}");
    let block = reply["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap_or_else(|| panic!("{reply}"));
    assert_eq!(block["name"], "get_weather");
    assert!(block["input"]["city"].is_string(), "{reply}");
    assert!(is_short_id(block["id"].as_str().unwrap()), "{reply}");

    // The history is in the prompt: more tokens than the first turn's.
    let (_, first) = server.post("/v1/chat/completions", &ask);
    assert!(
        body["usage"]["prompt_tokens"].as_u64() > first["usage"]["prompt_tokens"].as_u64(),
        "{body}"
    );
}

#[test]
fn past_calls_render_in_the_shape_the_model_writes_them() {
    use edgeinfer::model::{ChatTemplate, Message};
    // A Mistral v0.3-style template shows a past call as `function | tojson` less its last
    // brace, then the id: with Python's `json.dumps` and the call's own key order that is
    // exactly how the grammar has the model write a call.
    let t = ChatTemplate::new(synthetic::MISTRAL_TEMPLATE, "<s>", "</s>").unwrap();
    let mut call = Message::new("assistant", "");
    // As the server builds it from OpenAI's wire shape.
    call.tool_calls = Some(vec![json!({"id": "abcDEF123", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}})]);
    let mut result = Message::new("tool", "sunny");
    result.tool_call_id = Some("abcDEF123".into());
    let tools: Vec<Value> = tools().as_array().unwrap().clone();
    let text = t
        .render_with_tools(
            &[Message::new("user", "hi"), call, result],
            true,
            Some(&tools),
        )
        .unwrap();
    assert!(
        text.contains(r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}, "id": "abcDEF123"}]</s>"#),
        "{text}"
    );
    assert!(
        text.contains(r#"[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather", "description": "#),
        "{text}"
    );
}

#[test]
fn past_name_args_calls_render_as_the_model_writes_them() {
    use edgeinfer::model::{ChatTemplate, Message};
    // Mistral Small 3.2's shape: `[TOOL_CALLS]name[ARGS]` then the arguments through
    // `tojson`, which is the layout the grammar has the model write.
    let t = ChatTemplate::new(synthetic::MISTRAL_ARGS_TEMPLATE, "<s>", "</s>").unwrap();
    let mut call = Message::new("assistant", "");
    call.tool_calls = Some(vec![
        json!({"id": "abcDEF123", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}),
        json!({"id": "abcDEF124", "type": "function",
            "function": {"name": "get_time", "arguments": {}}}),
    ]);
    let mut result = Message::new("tool", "sunny");
    result.tool_call_id = Some("abcDEF123".into());
    let tools: Vec<Value> = tools().as_array().unwrap().clone();
    let text = t
        .render_with_tools(
            &[Message::new("user", "hi"), call, result],
            true,
            Some(&tools),
        )
        .unwrap();
    assert!(
        text.contains(r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "C"}[TOOL_CALLS]get_time[ARGS]{}</s>[TOOL_RESULTS]sunny[/TOOL_RESULTS]"#),
        "{text}"
    );
}

#[test]
fn shown_markers_keep_their_place_and_never_match_a_stop() {
    use edgeinfer::engine::sequence::{OutputState, TokenOutcome};
    use edgeinfer::model::{GgufFile, Tokenizer};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let spec = Spec {
        spm: true,
        mistral: true,
        mistral_args: true,
        ..Spec::default()
    };
    synthetic::write(&path, &spec);
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let marker = tok.token_id("[TOOL_CALLS]").unwrap();
    let mut ids = tok.encode("hello", false).unwrap();
    ids.push(marker);
    ids.push(tok.token_id("▁world").unwrap());
    // `lo!` holds `lo` back until the marker; `[TOOL` and `S] ` would match across it.
    for (stops, text, stopped) in [
        (
            vec!["lo!", "[TOOL", "S] "],
            "hello[TOOL_CALLS] world",
            false,
        ),
        (vec![" wor"], "hello[TOOL_CALLS]", true),
    ] {
        let stops = stops.into_iter().map(String::from).collect();
        let mut out = OutputState::new(stops, 100, &[]).showing(vec![marker]);
        let mut emitted = String::new();
        let mut ended = false;
        for &id in &ids {
            match out.push(&tok, id).unwrap() {
                TokenOutcome::Continue { emit } => emitted.push_str(&emit),
                TokenOutcome::Finished { emit, .. } => {
                    emitted.push_str(&emit);
                    ended = true;
                    break;
                }
            }
        }
        assert_eq!((emitted.as_str(), ended), (text, stopped));
    }
    // Not shown, the marker decodes to nothing.
    let mut out = OutputState::new(Vec::new(), 100, &[]);
    let emitted: String = ids
        .iter()
        .map(|&id| match out.push(&tok, id).unwrap() {
            TokenOutcome::Continue { emit } | TokenOutcome::Finished { emit, .. } => emit,
        })
        .collect();
    assert_eq!(emitted, "hello world");
}

#[test]
fn magistral_thinking_is_split_and_budgeted_by_its_control_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("magistral.gguf");
    let spec = Spec {
        spm: true,
        mistral: true,
        mistral_think: true,
        context: 1024,
        ..Spec::default()
    };
    synthetic::write(&path, &spec);
    let server = Server::spawn(&["--model", path.to_str().unwrap()], &[]);
    server.wait_ready();
    let ask = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hello world"}],
                              "temperature": 0, "max_tokens": 12, "logprobs": true});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    // The prompt opened the reasoning; three tokens of it, then `[/THINK]` is forced by id.
    let (status, reply) = server.post("/v1/chat/completions", &ask(json!({"reasoning_budget": 3})));
    assert_eq!(status, 200, "{reply}");
    let tokens = tokens_of(&reply);
    assert_eq!(tokens[3], "[/THINK]", "{tokens:?}");
    // The three and the marker.
    let details = &reply["usage"]["completion_tokens_details"];
    assert_eq!(details["reasoning_tokens"], 4, "{reply}");
    // Unsplit, the marker is in the text where the engine showed it, and the split reply
    // is that text's two sides.
    let (_, raw) = server.post(
        "/v1/chat/completions",
        &ask(json!({"reasoning_budget": 3, "reasoning_format": "none"})),
    );
    let text = raw["choices"][0]["message"]["content"].as_str().unwrap();
    // (Byte tokens: the text is their bytes together.)
    let bytes: Vec<u8> = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()[..3]
        .iter()
        .flat_map(|t| {
            t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
        })
        .collect();
    let thought = String::from_utf8_lossy(&bytes).into_owned();
    let rest = text.strip_prefix(&format!("{thought}[/THINK]"));
    let rest = rest.unwrap_or_else(|| panic!("{raw}"));
    let message = &reply["choices"][0]["message"];
    assert_eq!(
        message["reasoning_content"].as_str().unwrap_or_default(),
        thought.trim()
    );
    assert_eq!(message["content"], rest.trim_start(), "{reply}");
    // JSON after a budgeted reasoning.
    let (status, reply) = server.post(
        "/v1/chat/completions",
        &ask(json!({"reasoning_budget": 2, "max_tokens": 60,
                    "response_format": {"type": "json_object"}})),
    );
    assert_eq!(status, 200, "{reply}");
    // After two tokens, or as soon after as a character the tokens split is whole.
    let at = tokens_of(&reply).iter().position(|t| t == "[/THINK]");
    assert!(at.is_some_and(|at| (2..=5).contains(&at)), "{reply}");
    if reply["choices"][0]["finish_reason"] == "stop" {
        let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
        serde_json::from_str::<Value>(content).unwrap_or_else(|e| panic!("{e}: {reply}"));
    }
}
