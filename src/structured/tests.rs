//! Grammar checks and generation over a one-byte-per-token vocabulary: every output a
//! constraint lets through is walked token by token, as the engine would.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::toolcall::{generic_messages, CallParser, Piece, ToolFormat};
use super::*;
use crate::engine::constraint::TokenConstraint;
use crate::model::Message;

/// 256 byte tokens, five specials, and `<|end|>` (261) as the stop token.
fn grammars() -> Grammars {
    let env = llguidance::toktrie::ApproximateTokEnv::single_byte_env();
    Grammars::from_env(env, vec![261]).unwrap()
}

const END: u32 = 261;
const VOCAB: usize = 262;

fn spec(format: OutputFormat) -> ConstraintSpec {
    ConstraintSpec {
        format,
        ..ConstraintSpec::text()
    }
}

fn tool(name: &str, parameters: Value) -> ToolSpec {
    ToolSpec {
        name: name.into(),
        parameters,
        strict: false,
    }
}

/// Samples random allowed tokens until the stop token (or `limit` tokens): the output bytes.
fn walk(c: &mut dyn TokenConstraint, seed: u64, limit: usize) -> Vec<u8> {
    let tokens = walk_tokens(c, seed, limit);
    assert!(tokens.iter().all(|&t| t < 256), "{tokens:?}");
    tokens.into_iter().map(|t| t as u8).collect()
}

/// [`walk`]'s tokens, the stop token left out.
fn walk_tokens(c: &mut dyn TokenConstraint, seed: u64, limit: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..limit {
        // Digits less likely, so numbers stay short enough for serde_json's f64.
        let mut logits: Vec<f32> = (0..VOCAB)
            .map(|i| {
                rng.gen::<f32>()
                    * if i < 256 && (i as u8).is_ascii_digit() {
                        0.5
                    } else {
                        1.0
                    }
            })
            .collect();
        // Favour ending, so that walks finish.
        logits[END as usize] = 0.9;
        c.mask(&mut logits).unwrap();
        let tok = (0..VOCAB)
            .filter(|&i| logits[i] > f32::NEG_INFINITY)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32;
        assert!(
            c.allows(tok).unwrap(),
            "the mask let through a token it refuses"
        );
        c.commit(tok).unwrap();
        if tok == END {
            return out;
        }
        out.push(tok);
    }
    panic!("no stop token within {limit} tokens");
}

/// JSON Schema's integer: a number with no fractional part (of any size).
fn is_integer(v: &Value) -> bool {
    v.as_f64().is_some_and(|f| f.fract() == 0.0)
}

fn constraint(g: &Grammars, s: &ConstraintSpec) -> Box<dyn TokenConstraint> {
    g.constraint(s).unwrap().expect("a constraint")
}

#[test]
fn free_text_has_no_constraint() {
    assert!(grammars()
        .constraint(&ConstraintSpec::text())
        .unwrap()
        .is_none());
}

#[test]
fn json_object_output_is_an_object() {
    let g = grammars();
    for seed in 0..5 {
        let mut c = constraint(&g, &spec(OutputFormat::JsonObject));
        let out = walk(c.as_mut(), seed, 4000);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert!(v.is_object(), "{v}");
    }
}

#[test]
fn schema_output_validates_and_uses_one_layout() {
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["a", "b"]},
        "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    }, "required": ["name", "kind", "tags"], "additionalProperties": false});
    let g = grammars();
    for seed in 0..8 {
        let s = spec(OutputFormat::JsonSchema {
            schema: schema.clone(),
            strict: true,
        });
        let out = walk(constraint(&g, &s).as_mut(), seed, 4000);
        let text = String::from_utf8(out).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["name"].as_str().unwrap().chars().count() <= 8);
        assert!(["a", "b"].contains(&v["kind"].as_str().unwrap()), "{v}");
        assert!(v["tags"].as_array().unwrap().iter().all(is_integer), "{v}");
        assert_eq!(v.as_object().unwrap().len(), 3);
        assert!(text.starts_with("{\"name\": \""), "{text}");
    }
}

#[test]
fn a_rejected_token_is_refused_and_a_stop_only_when_complete() {
    let g = grammars();
    let mut c = constraint(&g, &spec(OutputFormat::JsonObject));
    assert!(!c.allows(b'x' as u32).unwrap());
    assert!(!c.allows(END).unwrap(), "an empty output is no JSON object");
    assert!(c.allows(b'{' as u32).unwrap());
    c.commit(b'{' as u32).unwrap();
    c.commit(b'}' as u32).unwrap();
    assert!(c.allows(END).unwrap());
}

#[test]
fn unsupported_keywords_and_bad_schemas_are_refused_naming_the_field() {
    let g = grammars();
    let bad = [
        json!({"type": "object", "not": {"type": "string"}}),
        json!({"type": "object", "if": {}, "then": {}, "else": {}}),
        json!({"type": "array", "uniqueItems": true}),
        json!({"type": 5}),
        json!({"type": "object", "x-guidance": {"lenient": true}}),
        json!({"type": "object", "properties": {"a": {"x-guidance": {}}}}),
        json!("not a schema"),
    ];
    for schema in bad {
        let s = spec(OutputFormat::JsonSchema {
            schema: schema.clone(),
            strict: false,
        });
        let e = g
            .constraint(&s)
            .err()
            .unwrap_or_else(|| panic!("accepted {schema}"));
        assert_eq!(e.param, "response_format.json_schema", "{schema}");
        let mut s = ConstraintSpec::text();
        s.tools = vec![
            tool("ok", json!({"type": "object"})),
            tool("f", schema.clone()),
        ];
        let e = g
            .constraint(&s)
            .err()
            .unwrap_or_else(|| panic!("accepted tool {schema}"));
        assert_eq!(e.param, "tools[1].function.parameters", "{schema}");
    }
}

#[test]
fn strict_mode_needs_closed_objects_with_every_property_required() {
    let g = grammars();
    let cases = [
        json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
        json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}),
        json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}}, "required": ["a"], "additionalProperties": false}),
        json!({"type": "array"}),
    ];
    for schema in cases {
        let s = spec(OutputFormat::JsonSchema {
            schema: schema.clone(),
            strict: true,
        });
        assert!(g.constraint(&s).is_err(), "strict accepted {schema}");
        let s = spec(OutputFormat::JsonSchema {
            schema,
            strict: false,
        });
        assert!(g.constraint(&s).is_ok());
    }
}

#[test]
fn tool_choice_must_name_a_declared_function() {
    let g = grammars();
    let mut s = ConstraintSpec::text();
    s.tools = vec![tool("get_weather", json!({"type": "object"}))];
    s.choice = ToolChoice::Named("nope".into());
    assert_eq!(g.constraint(&s).unwrap_err().param, "tool_choice");
    s.tools.clear();
    s.choice = ToolChoice::Required;
    assert_eq!(g.constraint(&s).unwrap_err().param, "tool_choice");
    let mut s = ConstraintSpec::text();
    s.tools = vec![tool("bad name!", json!({"type": "object"}))];
    assert_eq!(
        g.constraint(&s).unwrap_err().param,
        "tools[0].function.name"
    );
}

fn weather_tools() -> Vec<ToolSpec> {
    vec![
        tool(
            "get_weather",
            json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": false}),
        ),
        tool(
            "add",
            json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "additionalProperties": false}),
        ),
    ]
}

fn parse_all(text: &str) -> (String, Vec<super::toolcall::ParsedCall>) {
    let mut p = CallParser::new(ToolFormat::HERMES);
    let mut content = String::new();
    for piece in p.push(text).into_iter().chain(p.finish()) {
        if let Piece::Content(t) = piece {
            content.push_str(&t);
        }
    }
    (content, p.calls().to_vec())
}

#[test]
fn required_and_named_choices_always_call_with_valid_arguments() {
    let g = grammars();
    for (choice, parallel) in [
        (ToolChoice::Required, true),
        (ToolChoice::Required, false),
        (ToolChoice::Named("add".into()), true),
    ] {
        let mut s = ConstraintSpec::text();
        s.tools = weather_tools();
        s.choice = choice.clone();
        s.parallel = parallel;
        for seed in 0..6 {
            let out = walk(constraint(&g, &s).as_mut(), seed, 6000);
            let text = String::from_utf8(out).unwrap();
            let (content, calls) = parse_all(&text);
            assert!(content.is_empty(), "{text:?}");
            assert!(!calls.is_empty(), "{text:?}");
            assert!(parallel || calls.len() == 1);
            for c in calls {
                let args: Value = serde_json::from_str(&c.arguments).unwrap();
                match c.name.as_str() {
                    "get_weather" => assert!(args["city"].is_string()),
                    "add" => assert!(is_integer(&args["a"]) && is_integer(&args["b"]), "{args}"),
                    other => panic!("undeclared function {other}"),
                }
                if let ToolChoice::Named(n) = &choice {
                    assert_eq!(&c.name, n);
                }
            }
        }
    }
}

#[test]
fn none_and_auto_text_never_open_a_call() {
    let g = grammars();
    for choice in [ToolChoice::None, ToolChoice::Auto] {
        let mut s = ConstraintSpec::text();
        s.tools = weather_tools();
        s.choice = choice;
        let mut c = constraint(&g, &s);
        for &b in b"<tool_call" {
            assert!(c.allows(b as u32).unwrap());
            c.commit(b as u32).unwrap();
        }
        let l = b'>' as u32;
        // `auto` may go on into a call; `none` may not.
        assert_eq!(c.allows(l).unwrap(), s.choice == ToolChoice::Auto);
    }
}

#[test]
fn auto_calls_once_started_follow_the_schema() {
    let g = grammars();
    let mut s = ConstraintSpec::text();
    s.tools = weather_tools();
    let mut c = constraint(&g, &s);
    for &b in b"<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": " {
        assert!(c.allows(b as u32).unwrap(), "{}", b as char);
        c.commit(b as u32).unwrap();
    }
    assert!(
        !c.allows(b'"' as u32).unwrap(),
        "a string where an integer must be"
    );
    assert!(c.allows(b'7' as u32).unwrap());
}

#[test]
fn call_parser_gives_the_same_pieces_for_any_split() {
    let hermes = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"s\": \"}]{\\\"\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    // Mistral's list as the detokenizer shows it: the control token gone, its space kept.
    let mistral = " [{\"name\": \"add\", \"arguments\": {\"a\": 1, \"s\": \"}]{\\\"\"}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]";
    for (format, text) in [(ToolFormat::HERMES, hermes), (ToolFormat::MISTRAL, mistral)] {
        same_pieces_for_any_split(format, text);
    }
}

fn same_pieces_for_any_split(format: ToolFormat, text: &str) {
    let mut p = CallParser::new(format);
    let content: String = p
        .push(text)
        .into_iter()
        .chain(p.finish())
        .filter_map(|p| match p {
            Piece::Content(t) => Some(t),
            _ => None,
        })
        .collect();
    let whole = p.calls().to_vec();
    assert_eq!(content, "");
    assert_eq!(whole.len(), 2);
    assert_eq!(whole[0].arguments, "{\"a\": 1, \"s\": \"}]{\\\"\"}");
    assert_eq!(whole[1].name, "get_weather");
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..50 {
        let mut p = CallParser::new(format);
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        let mut args = vec![String::new(); 2];
        while i < chars.len() {
            let n = rng.gen_range(1..6).min(chars.len() - i);
            let piece: String = chars[i..i + n].iter().collect();
            i += n;
            for p in p.push(&piece) {
                if let Piece::Arguments { index, text } = p {
                    args[index].push_str(&text);
                }
            }
        }
        p.finish();
        let calls = p.calls();
        assert_eq!(calls.len(), 2);
        for (c, w) in calls.iter().zip(&whole) {
            assert_eq!((&c.name, &c.arguments), (&w.name, &w.arguments));
        }
        assert_eq!(args[0], whole[0].arguments);
        assert_eq!(args[1], whole[1].arguments);
    }
}

#[test]
fn call_parser_keeps_plain_text_as_content() {
    for text in ["Hello <tool_call> there", "<tool", "  {\"a\": 1}", ""] {
        let (content, calls) = parse_all(text);
        assert_eq!(content, text);
        assert!(calls.is_empty());
    }
    // Text that starts like a call and then is not one (a JSON reply) is kept whole, its
    // leading whitespace too, in any split.
    for (format, text) in [
        (ToolFormat::MISTRAL, " [{\"a\": 1}]"),
        (ToolFormat::MISTRAL, "\n[{\"name\": \"x\", \"b\": 2}]"),
        (ToolFormat::LLAMA3_JSON, "  {\"title\": \"x\"}"),
        (ToolFormat::LLAMA3_JSON, "{\"name\": \"x\", \"kind\": 1}"),
        (ToolFormat::HERMES, "\n<tool_call>\n{\"nom\": 1}"),
    ] {
        for cut in 0..=text.len() {
            let mut p = CallParser::new(format);
            let content: String = p
                .push(&text[..cut])
                .into_iter()
                .chain(p.push(&text[cut..]))
                .chain(p.finish())
                .map(|piece| match piece {
                    Piece::Content(t) => t,
                    other => panic!("{other:?} in {text:?}"),
                })
                .collect();
            assert_eq!(content, text, "{format:?} cut at {cut}");
            assert!(p.calls().is_empty());
        }
    }
}

#[test]
fn generic_rendering_shows_tools_calls_and_results() {
    let tools = vec![
        json!({"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}),
    ];
    let mut call = Message::new("assistant", "");
    call.tool_calls = Some(vec![
        json!({"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}),
    ]);
    let mut result = Message::new("tool", "3");
    result.tool_call_id = Some("c1".into());
    let msgs = generic_messages(
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", "1+2?"),
            call,
            result.clone(),
            result,
        ],
        &tools,
    );
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    assert_eq!(msgs[0].role, "system");
    assert!(msgs[0].content.starts_with("Be brief.\n\n# Tools"));
    assert!(msgs[0].content.contains("\"name\":\"add\""));
    assert_eq!(
        msgs[2].content,
        "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\":1}}\n</tool_call>"
    );
    assert_eq!(msgs[3].role, "user");
    assert_eq!(
        msgs[3]
            .content
            .matches("<tool_response>\n3\n</tool_response>")
            .count(),
        2
    );
}

#[test]
fn compiled_grammars_are_cached() {
    let g = grammars();
    let s = spec(OutputFormat::JsonObject);
    g.constraint(&s).unwrap();
    let n = g.cache.lock().unwrap().1.len();
    g.constraint(&s).unwrap();
    assert_eq!(g.cache.lock().unwrap().1.len(), n);
}

#[test]
fn the_tool_format_follows_the_template() {
    assert_eq!(
        ToolFormat::for_template("{{ messages }}"),
        (ToolFormat::HERMES, false)
    );
    let qwen = "{% if tools %}<tools>{% endif %}<tool_call>";
    assert_eq!(ToolFormat::for_template(qwen), (ToolFormat::HERMES, true));
    let llama = "{% if tools %}{\"name\": ..., \"parameters\": ...}{% endif %}<|python_tag|>";
    assert_eq!(
        ToolFormat::for_template(llama),
        (ToolFormat::LLAMA3_JSON, true)
    );
    let mistral = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}{{ '[TOOL_CALLS] [' }}";
    assert_eq!(
        ToolFormat::for_template(mistral),
        (ToolFormat::MISTRAL, true)
    );
    let nemo = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}{{ '[TOOL_CALLS][' }}";
    assert_eq!(
        ToolFormat::for_template(nemo),
        (ToolFormat::MISTRAL_NEMO, true)
    );
    // Tools referenced in a format we do not parse: the generic rendering.
    for other in [
        "{% if tools %}<|tool▁calls▁begin|>{% endif %}",
        "{% if tools %}[TOOL_CALLS]{% endif %}",
        // Mistral Small 3.2 and later: `[TOOL_CALLS]name[ARGS]{...}`.
        "{% if tools %}[AVAILABLE_TOOLS]{% endif %}{{ '[TOOL_CALLS][' }}{{ name }}[ARGS]{{ args }}",
    ] {
        assert_eq!(
            ToolFormat::for_template(other),
            (ToolFormat::HERMES, false),
            "{other}"
        );
    }
    // The opening control token is looked up; a vocabulary without it cannot be served.
    let found = ToolFormat::MISTRAL.resolve(|t| (t == "[TOOL_CALLS]").then_some(5));
    assert_eq!(found.and_then(|f| f.special_id), Some(5));
    assert_eq!(ToolFormat::MISTRAL.resolve(|_| None), None);
    assert_eq!(
        ToolFormat::HERMES.resolve(|_| None),
        Some(ToolFormat::HERMES)
    );
}

#[test]
fn mistral_calls_open_with_the_control_token_and_parse_as_a_list() {
    let g = grammars();
    // The single-byte vocabulary's `<|tool|>` (256) stands for `[TOOL_CALLS]`.
    let format = ToolFormat::MISTRAL.resolve(|_| Some(256)).unwrap();
    let mut s = ConstraintSpec::text();
    s.tools = weather_tools();
    s.tool_format = format;
    s.parallel = true;
    for choice in [ToolChoice::Required, ToolChoice::Auto] {
        s.choice = choice.clone();
        let mut calls_seen = 0;
        for seed in 0..6 {
            let mut c = constraint(&g, &s);
            if choice == ToolChoice::Required {
                // Nothing but the control token may start the reply: it and the list's
                // opening are forced (and so drafted when speculating).
                assert!(c.allows(256).unwrap());
                let forced = c.forced();
                assert_eq!(forced[..4], [256, b' ' as u32, b'[' as u32, b'{' as u32]);
                assert!(!c.allows(b'[' as u32).unwrap() && !c.allows(b' ' as u32).unwrap());
            } else {
                // Text may not spell a call without the token.
                let mut t = constraint(&g, &s);
                t.commit(b'[' as u32).unwrap();
                assert!(!t.allows(b'{' as u32).unwrap());
                // Text would rarely end in a walk: take the call.
                assert!(c.allows(256).unwrap());
                c.commit(256).unwrap();
            }
            let mut tokens = walk_tokens(c.as_mut(), seed, 6000);
            if choice == ToolChoice::Auto {
                tokens.insert(0, 256);
            }
            assert_eq!(tokens[0], 256);
            assert!(tokens[1..].iter().all(|&t| t < 256), "{tokens:?}");
            // The engine's detokenizer drops control tokens: the parser sees the rest.
            let text = String::from_utf8(
                tokens
                    .iter()
                    .filter(|&&t| t < 256)
                    .map(|&t| t as u8)
                    .collect(),
            )
            .unwrap();
            let mut p = CallParser::new(format);
            let pieces: Vec<Piece> = p.push(&text).into_iter().chain(p.finish()).collect();
            let content: String = pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Content(t) => Some(t.as_str()),
                    _ => None,
                })
                .collect();
            assert!(
                text.starts_with(" [{\"name\": \"") && text.ends_with("}]"),
                "{text:?}"
            );
            assert!(content.is_empty(), "{text:?}");
            let list: Value = serde_json::from_str(&text).unwrap();
            let list = list.as_array().unwrap();
            assert_eq!(list.len(), p.calls().len(), "{text:?}");
            for (whole, call) in list.iter().zip(p.calls()) {
                assert_eq!(whole["name"], call.name.as_str());
                let args: Value = serde_json::from_str(&call.arguments).unwrap();
                assert_eq!(whole["arguments"], args);
                assert!(call.id.len() == 9 && call.id.bytes().all(|b| b.is_ascii_alphanumeric()));
            }
            calls_seen += list.len();
        }
        // Some replies hold several calls.
        assert!(calls_seen > 6, "{choice:?}");
    }
}

#[test]
fn short_ids_keep_which_result_answers_which_call() {
    let mut call = Message::new("assistant", "");
    call.tool_calls = Some(vec![
        json!({"id": "call_0123456789abcdef", "type": "function", "function": {"name": "f", "arguments": {}}}),
        json!({"id": "abcDEF123", "type": "function", "function": {"name": "g", "arguments": {}}}),
        json!({"id": "call_0123456789abcdeg", "type": "function", "function": {"name": "h", "arguments": {}}}),
    ]);
    let result = |id: &str| {
        let mut m = Message::new("tool", "42");
        m.tool_call_id = Some(id.into());
        m
    };
    let out = super::toolcall::with_short_ids(vec![
        call,
        result("call_0123456789abcdef"),
        result("abcDEF123"),
        result("call_0123456789abcdeg"),
    ]);
    let ids: Vec<&str> = out[0]
        .tool_calls
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    for (k, id) in ids.iter().enumerate() {
        assert!(
            id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
            "{id}"
        );
        assert_eq!(out[k + 1].tool_call_id.as_deref(), Some(*id));
    }
    assert_eq!(ids[1], "abcDEF123", "an id the template accepts is kept");
    assert_ne!(ids[0], ids[2]);
}

#[test]
fn llama3_json_calls_are_generated_and_parsed() {
    let g = grammars();
    let mut s = ConstraintSpec::text();
    s.tools = weather_tools();
    s.choice = ToolChoice::Required;
    s.tool_format = ToolFormat::LLAMA3_JSON;
    s.parallel = false;
    for seed in 0..4 {
        let text = String::from_utf8(walk(constraint(&g, &s).as_mut(), seed, 6000)).unwrap();
        assert!(text.starts_with("{\"name\": \""), "{text}");
        let whole: Value = serde_json::from_str(&text).unwrap();
        let mut p = CallParser::new(ToolFormat::LLAMA3_JSON);
        let pieces: Vec<Piece> = p.push(&text).into_iter().chain(p.finish()).collect();
        assert!(
            pieces.iter().all(|p| !matches!(p, Piece::Content(_))),
            "{text}"
        );
        let calls = p.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(whole["name"], calls[0].name.as_str());
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(whole["parameters"], args);
    }
}

#[test]
fn a_schema_forces_its_keys_as_drafts() {
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["alpha", "beta"]},
    }, "required": ["name", "kind"], "additionalProperties": false});
    let g = grammars();
    let s = spec(OutputFormat::JsonSchema {
        schema,
        strict: true,
    });
    let mut c = constraint(&g, &s);
    let text = |t: Vec<u32>| String::from_utf8(t.iter().map(|&b| b as u8).collect()).unwrap();
    // The start is forced up to the first value; asking does not advance.
    let forced = c.forced();
    assert!(
        text(forced.clone()).starts_with("{\"name\": \""),
        "{forced:?}"
    );
    assert_eq!(c.forced(), forced);
    for &t in &forced {
        c.commit(t).unwrap();
    }
    // Inside a free string nothing is forced.
    assert!(c.forced().is_empty());
    for b in "ab\", \"kind\": \"b".bytes() {
        c.commit(b as u32).unwrap();
    }
    // "beta" is the only enum value starting with "b".
    assert!(text(c.forced()).starts_with("eta\""), "{:?}", c.forced());
}

#[test]
fn forced_tokens_spell_the_grammars_bytes() {
    // A toy tokenizer over single bytes: 300 is a control token read from "<e>", and with
    // `space` it puts a space token (301) before its input, as SentencePiece does.
    let encode = |space: bool| {
        move |text: &str| {
            let mut ids: Vec<u32> = if space { vec![301] } else { vec![] };
            let mut rest = text;
            while !rest.is_empty() {
                if let Some(after) = rest.strip_prefix("<e>") {
                    ids.push(300);
                    rest = after;
                } else {
                    ids.push(rest.as_bytes()[0] as u32);
                    rest = &rest[1..];
                }
            }
            Some(ids)
        }
    };
    let spell = |ids: &[u32]| -> Vec<u8> {
        ids.iter()
            .flat_map(|&t| match t {
                300 => vec![0xff, b'e'],
                301 => vec![b' '],
                t => vec![t as u8],
            })
            .collect()
    };
    let ab: Vec<u32> = vec![b'a' as u32, b'b' as u32];
    assert_eq!(canonical(b"ab", encode(false), spell), Some(ab.clone()));
    // The leading space is avoided, the text's own tokens kept.
    assert_eq!(canonical(b"ab", encode(true), spell), Some(ab));
    // Control-token text never becomes the control token: no canonical split (greedy then).
    assert_eq!(canonical(b"a<e>", encode(false), spell), None);
    assert_eq!(canonical(b"a<e>", encode(true), spell), None);
}
