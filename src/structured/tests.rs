//! Grammar checks and generation over a one-byte-per-token vocabulary: every output a
//! constraint lets through is walked token by token, as the engine would.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::toolcall::{CallParser, Piece, ToolFormat};
use super::*;
use crate::engine::constraint::TokenConstraint;

/// 256 byte tokens, five specials, and `<|end|>` (261) as the stop token.
pub(super) fn grammars() -> Grammars {
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

pub(super) fn tool(name: &str, parameters: Value) -> ToolSpec {
    ToolSpec {
        name: name.into(),
        parameters,
        strict: false,
    }
}

/// Samples random allowed tokens until the stop token (or `limit` tokens): the output bytes.
pub(super) fn walk(c: &mut dyn TokenConstraint, seed: u64, limit: usize) -> Vec<u8> {
    let tokens = walk_tokens(c, seed, limit);
    assert!(tokens.iter().all(|&t| t < 256), "{tokens:?}");
    tokens.into_iter().map(|t| t as u8).collect()
}

/// [`walk`]'s tokens, the stop token left out.
pub(super) fn walk_tokens(c: &mut dyn TokenConstraint, seed: u64, limit: usize) -> Vec<u32> {
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
pub(super) fn is_integer(v: &Value) -> bool {
    v.as_f64().is_some_and(|f| f.fract() == 0.0)
}

pub(super) fn constraint(g: &Grammars, s: &ConstraintSpec) -> Box<dyn TokenConstraint> {
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
fn string_formats_llguidance_lacks_are_annotations_and_known_ones_are_kept() {
    // Pydantic's SecretStr (`password`) in a tool's parameters compiles; a `date` is still
    // enforced.
    let g = grammars();
    let schema = json!({"type": "object", "properties": {
        "pw": {"type": "string", "format": "password", "maxLength": 6},
        "day": {"type": "string", "format": "date"},
    }, "required": ["pw", "day"], "additionalProperties": false});
    let mut s = ConstraintSpec::text();
    s.tools = vec![tool("login", schema.clone())];
    assert!(g.constraint(&s).is_ok());
    for seed in 0..4 {
        let s = spec(OutputFormat::JsonSchema {
            schema: schema.clone(),
            strict: true,
        });
        let out = walk(constraint(&g, &s).as_mut(), seed, 4000);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let day = v["day"].as_str().unwrap();
        assert!(
            day.len() == 10 && day.as_bytes()[4] == b'-' && day.as_bytes()[7] == b'-',
            "{v}"
        );
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

pub(super) fn weather_tools() -> Vec<ToolSpec> {
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

pub(super) fn parse_all(text: &str) -> (String, Vec<super::toolcall::ParsedCall>) {
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
fn none_never_opens_a_call_and_auto_may_after_prose() {
    let g = grammars();
    // `auto` may go on into a call at the start or after some prose, `none` never may;
    // text that only looks like the marker's start is still text.
    for (lead, choice, call) in [
        ("", ToolChoice::None, false),
        ("", ToolChoice::Auto, true),
        ("Let me check. ", ToolChoice::None, false),
        ("Let me check. ", ToolChoice::Auto, true),
        // Not after whitespace alone (a call opens the reply, as it did).
        (" \n", ToolChoice::Auto, false),
    ] {
        let mut s = ConstraintSpec::text();
        s.tools = weather_tools();
        s.choice = choice;
        let mut c = constraint(&g, &s);
        for &b in format!("{lead}<tool_call").as_bytes() {
            assert!(c.allows(b as u32).unwrap(), "{lead:?}: {}", b as char);
            c.commit(b as u32).unwrap();
        }
        assert_eq!(
            c.allows(b'>' as u32).unwrap(),
            call,
            "{lead:?} {:?}",
            s.choice
        );
        assert!(c.allows(b'x' as u32).unwrap(), "{lead:?} {:?}", s.choice);
    }
}

#[test]
fn a_call_after_prose_follows_the_schema_and_the_prose_is_content() {
    let g = grammars();
    let mut s = ConstraintSpec::text();
    s.tools = weather_tools();
    for seed in 0..6 {
        s.parallel = seed % 2 == 0;
        let mut c = constraint(&g, &s);
        let lead = "Let me <b>check</b>.\n<tool_call>";
        for &b in lead.as_bytes() {
            c.commit(b as u32).unwrap();
        }
        let out = walk(c.as_mut(), seed, 6000);
        let text = format!("{lead}{}", String::from_utf8(out).unwrap());
        let (content, calls) = parse_all(&text);
        assert_eq!(content, "Let me <b>check</b>.", "{text:?}");
        assert!(
            !calls.is_empty() && (s.parallel || calls.len() == 1),
            "{text:?}"
        );
        for c in calls {
            let args: Value = serde_json::from_str(&c.arguments).unwrap();
            assert!(args.is_object(), "{text:?}");
        }
    }
    // No text after the calls.
    let mut c = constraint(&g, &s);
    let reply =
        "Sure.<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>";
    for &b in reply.as_bytes() {
        assert!(c.allows(b as u32).unwrap(), "{}", b as char);
        c.commit(b as u32).unwrap();
    }
    assert!(!c.allows(b'x' as u32).unwrap() && c.allows(END).unwrap());
}

#[test]
fn parameters_without_a_type_are_an_objects() {
    for (given, want) in [
        (None, json!({"type": "object", "properties": {}})),
        (Some(json!({})), json!({"type": "object"})),
        (
            Some(json!({"properties": {"x": {}}})),
            json!({"type": "object", "properties": {"x": {}}}),
        ),
        (Some(json!({"type": ["object"]})), json!({"type": "object"})),
        (Some(json!({"type": "string"})), json!({"type": "string"})),
    ] {
        assert_eq!(ToolSpec::parameters_of(given.as_ref()), want);
    }
    // So a call's arguments are an object even where the schema said nothing.
    let g = grammars();
    let mut s = ConstraintSpec::text();
    s.tools = vec![tool("f", ToolSpec::parameters_of(Some(&json!({}))))];
    s.choice = ToolChoice::Required;
    let mut c = constraint(&g, &s);
    for &b in b"<tool_call>\n{\"name\": \"f\", \"arguments\": " {
        c.commit(b as u32).unwrap();
    }
    assert!(!c.allows(b'n' as u32).unwrap() && !c.allows(b'1' as u32).unwrap());
    assert!(c.allows(b'{' as u32).unwrap());
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
fn compiled_grammars_are_cached() {
    let g = grammars();
    let s = spec(OutputFormat::JsonObject);
    g.constraint(&s).unwrap();
    let n = g.cache.lock().unwrap().1.len();
    g.constraint(&s).unwrap();
    assert_eq!(g.cache.lock().unwrap().1.len(), n);
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
