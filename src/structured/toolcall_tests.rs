//! Tool-call formats: the streaming parser in any split, the generic rendering, each
//! template's format, Mistral's list after its control token, Mistral Small 3.2's
//! `[TOOL_CALLS]name[ARGS]{...}`, Llama 3.1's JSON calls.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::tests::{constraint, grammars, parse_all, walk, walk_tokens, weather_tools};
use super::toolcall::{generic_messages, CallParser, Piece, ToolFormat};
use super::*;
use crate::model::Message;

#[test]
fn call_parser_gives_the_same_pieces_for_any_split() {
    let hermes = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"s\": \"}]{\\\"\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    // Mistral's list as the detokenizer shows it: the control token gone, its space kept.
    let mistral = " [{\"name\": \"add\", \"arguments\": {\"a\": 1, \"s\": \"}]{\\\"\"}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]";
    // Mistral Small 3.2's calls, both control tokens shown as their text.
    let named = "[TOOL_CALLS]add[ARGS]{\"a\": 1, \"s\": \"}]{\\\"\"}[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}";
    // The same with a call id (a vocabulary with `[CALL_ID]`).
    let with_id = ToolFormat {
        call_id_token_id: Some(9),
        ..ToolFormat::MISTRAL_ARGS
    };
    let named_id = "[TOOL_CALLS]add[CALL_ID]abcDEF123[ARGS]{\"a\": 1, \"s\": \"}]{\\\"\"}[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}";
    for (format, text) in [
        (ToolFormat::HERMES, hermes),
        (ToolFormat::MISTRAL, mistral),
        (ToolFormat::MISTRAL_ARGS, named),
        (with_id, named_id),
    ] {
        same_pieces_for_any_split(format, text, "");
    }
    // Calls after some prose, in the formats whose calls open with a marker: the prose is
    // the content, the whitespace before the marker the template's.
    for (format, text) in [
        (ToolFormat::HERMES, hermes),
        (ToolFormat::MISTRAL_ARGS, named),
        (with_id, named_id),
    ] {
        let prose = "Let me <tool check [TOOL that.";
        same_pieces_for_any_split(format, &format!("{prose} \n{text}"), prose);
        same_pieces_for_any_split(format, &format!("{prose}{text}"), prose);
    }
}

fn same_pieces_for_any_split(format: ToolFormat, text: &str, prose: &str) {
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
    assert_eq!(content, prose);
    assert_eq!(whole.len(), 2);
    assert_eq!(whole[0].arguments, "{\"a\": 1, \"s\": \"}]{\\\"\"}");
    assert_eq!(whole[1].name, "get_weather");
    // A call id the model wrote is the call's.
    let model_id = text.contains("[CALL_ID]abcDEF123");
    if model_id {
        assert_eq!(whole[0].id, "abcDEF123");
    }
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..50 {
        let mut p = CallParser::new(format);
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        let mut args = vec![String::new(); 2];
        let mut content = String::new();
        let mut take = |pieces: Vec<Piece>| {
            for p in pieces {
                match p {
                    Piece::Arguments { index, text } => args[index].push_str(&text),
                    Piece::Content(t) => content.push_str(&t),
                    _ => {}
                }
            }
        };
        while i < chars.len() {
            let n = rng.gen_range(1..6).min(chars.len() - i);
            let piece: String = chars[i..i + n].iter().collect();
            i += n;
            take(p.push(&piece));
        }
        take(p.finish());
        assert_eq!(content, prose);
        let calls = p.calls();
        assert_eq!(calls.len(), 2);
        for (c, w) in calls.iter().zip(&whole) {
            assert_eq!((&c.name, &c.arguments), (&w.name, &w.arguments));
        }
        if model_id {
            assert_eq!(calls[0].id, "abcDEF123");
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
        // The marker after prose, then not a call; whitespace that no call follows.
        (
            ToolFormat::HERMES,
            "Hi \n<tool_call>\n{\"nom\": 1} <tool_call>x  \n",
        ),
        (ToolFormat::MISTRAL_ARGS, "Hi [TOOL_CALLS] hello [ARGS] "),
        // Text spelling the marker, then not a name.
        (ToolFormat::MISTRAL_ARGS, "[TOOL_CALLS] hello [ARGS]"),
        (ToolFormat::MISTRAL_ARGS, " [TOOL_CALLS]{\"a\": 1}"),
        (
            ToolFormat::MISTRAL_ARGS,
            "[TOOL_CALLS]f[CALL_ID]abc[ARGS]{}",
        ),
        // A name longer than any function's, whole or in pieces.
        (
            ToolFormat::MISTRAL_ARGS,
            "[TOOL_CALLS]aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa[ARGS]{}",
        ),
        (
            ToolFormat {
                call_id_token_id: Some(9),
                ..ToolFormat::MISTRAL_ARGS
            },
            "[TOOL_CALLS]f[CALL_ID]ab-c[ARGS]{}",
        ),
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
    // Mistral Small 3.2 and later: `[TOOL_CALLS]name[ARGS]{...}`.
    let named = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}{{ '[TOOL_CALLS]' + name + '[ARGS]' }}";
    assert_eq!(
        ToolFormat::for_template(named),
        (ToolFormat::MISTRAL_ARGS, true)
    );
    // Tools referenced in a format we do not parse: the generic rendering.
    for other in [
        "{% if tools %}<|tool▁calls▁begin|>{% endif %}",
        "{% if tools %}[TOOL_CALLS]{% endif %}",
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
    // The named format needs both of its tokens, and shows them; the others show none.
    let both = ToolFormat::MISTRAL_ARGS.resolve(|t| match t {
        "[TOOL_CALLS]" => Some(5),
        "[ARGS]" => Some(9),
        _ => None,
    });
    assert_eq!(both.map(|f| f.shown_tokens()), Some(vec![5, 9]));
    let with_id = ToolFormat::MISTRAL_ARGS.resolve(|t| match t {
        "[TOOL_CALLS]" => Some(5),
        "[ARGS]" => Some(9),
        "[CALL_ID]" => Some(11),
        _ => None,
    });
    assert_eq!(with_id.map(|f| f.shown_tokens()), Some(vec![5, 9, 11]));
    let one = ToolFormat::MISTRAL_ARGS.resolve(|t| (t == "[TOOL_CALLS]").then_some(5));
    assert_eq!(one, None);
    assert_eq!(found.map(|f| f.shown_tokens()), Some(Vec::new()));
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
fn mistral_named_calls_open_each_call_with_the_token_and_parse() {
    let g = grammars();
    // The single-byte vocabulary's specials 256, 257 and 258 stand for `[TOOL_CALLS]`,
    // `[ARGS]` and `[CALL_ID]`.
    let format = ToolFormat::MISTRAL_ARGS
        .resolve(|t| match t {
            "[TOOL_CALLS]" => Some(256),
            "[ARGS]" => Some(257),
            "[CALL_ID]" => Some(258),
            _ => None,
        })
        .unwrap();
    let mut s = ConstraintSpec::text();
    s.tools = weather_tools();
    s.tool_format = format;
    s.parallel = true;
    let names: Vec<&str> = s.tools.iter().map(|t| t.name.as_str()).collect();
    let (mut calls_seen, mut ids_seen) = (0, 0);
    for choice in [ToolChoice::Required, ToolChoice::Auto] {
        s.choice = choice.clone();
        for seed in 0..6 {
            let mut c = constraint(&g, &s);
            if choice == ToolChoice::Required {
                // Only the control token may start the reply.
                assert_eq!(c.forced().first(), Some(&256));
                assert!(!c.allows(257).unwrap() && !c.allows(b'g' as u32).unwrap());
            } else {
                // Text may hold no `[ARGS]`; a call may follow it.
                let mut t = constraint(&g, &s);
                t.commit(b'h' as u32).unwrap();
                assert!(t.allows(256).unwrap() && !t.allows(257).unwrap());
                c.commit(256).unwrap();
            }
            let mut tokens = walk_tokens(c.as_mut(), seed, 6000);
            if choice == ToolChoice::Auto {
                tokens.insert(0, 256);
            }
            // The engine shows both tokens as their text.
            let mut text = String::new();
            for &t in &tokens {
                match t {
                    256 => text.push_str("[TOOL_CALLS]"),
                    257 => text.push_str("[ARGS]"),
                    258 => text.push_str("[CALL_ID]"),
                    t => text.push(char::from(t as u8)),
                }
            }
            let expected: Vec<(&str, Option<&str>, Value)> = text
                .split("[TOOL_CALLS]")
                .skip(1)
                .map(|call| {
                    let (head, args) = call.split_once("[ARGS]").expect(&text);
                    let (name, id) = match head.split_once("[CALL_ID]") {
                        Some((name, id)) => (name, Some(id)),
                        None => (head, None),
                    };
                    (name, id, serde_json::from_str(args).expect(&text))
                })
                .collect();
            let mut p = CallParser::new(format);
            let pieces: Vec<Piece> = p.push(&text).into_iter().chain(p.finish()).collect();
            assert!(
                pieces.iter().all(|p| !matches!(p, Piece::Content(_))),
                "{text:?}"
            );
            assert_eq!(p.calls().len(), expected.len(), "{text:?}");
            for ((name, id, args), call) in expected.iter().zip(p.calls()) {
                assert!(names.contains(name), "{text:?}");
                assert_eq!(call.name, *name);
                // The model's own id, when it wrote one.
                if let Some(id) = id {
                    assert_eq!(call.id, *id);
                    ids_seen += 1;
                }
                let parsed: Value = serde_json::from_str(&call.arguments).unwrap();
                assert_eq!(&parsed, args);
                assert!(call.id.len() == 9 && call.id.bytes().all(|b| b.is_ascii_alphanumeric()));
            }
            calls_seen += expected.len();
        }
    }
    assert!(calls_seen > 12, "some replies hold several calls");
    assert!(
        ids_seen > 0 && ids_seen < calls_seen,
        "{ids_seen} of {calls_seen}"
    );
}

#[test]
fn a_models_call_id_is_used_once_per_reply() {
    let format = ToolFormat {
        call_id_token_id: Some(9),
        ..ToolFormat::MISTRAL_ARGS
    };
    let text = "[TOOL_CALLS]f[CALL_ID]abcDEF123[ARGS]{}[TOOL_CALLS]g[CALL_ID]abcDEF123[ARGS]{}";
    let mut p = CallParser::new(format);
    p.push(text);
    p.finish();
    let calls = p.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].id, "abcDEF123");
    assert_ne!(calls[1].id, "abcDEF123");
    assert_eq!(calls[1].id.len(), 9);
}
