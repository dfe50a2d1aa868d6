//! Reasoning: the splitter in any split, with and without tool calls, and grammars that let
//! a model think (within a budget) before the constrained part.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::reasoning::{Marker, ReplyParser, Shown, ThinkSpec, ThinkSplitter, ThinkSyntax};
use super::tests::{constraint, grammars, is_integer, walk, weather_tools};
use super::toolcall::{Piece, ToolFormat};
use super::*;

/// (reasoning, content) of `text` fed in random splits; asserts every split agrees.
fn split(text: &str, opened: bool) -> (String, String) {
    let whole = |pieces: Vec<Piece>| {
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            match p {
                Piece::Reasoning(t) => r.push_str(&t),
                Piece::Content(t) => c.push_str(&t),
                other => panic!("{other:?}"),
            }
        }
        (r, c)
    };
    let mut p = ReplyParser::new(Some(ThinkSplitter::new(ThinkSyntax::TAGS, opened)), None);
    let expected = whole(p.push(text).into_iter().chain(p.finish()).collect());
    let chars: Vec<char> = text.chars().collect();
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..40 {
        let mut p = ReplyParser::new(Some(ThinkSplitter::new(ThinkSyntax::TAGS, opened)), None);
        let mut pieces = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let n = rng.gen_range(1..5).min(chars.len() - i);
            pieces.extend(p.push(&chars[i..i + n].iter().collect::<String>()));
            i += n;
        }
        pieces.extend(p.finish());
        assert!(pieces.iter().all(|p| match p {
            Piece::Reasoning(t) | Piece::Content(t) => !t.is_empty(),
            _ => true,
        }));
        assert_eq!(whole(pieces), expected, "{text:?}");
    }
    expected
}

#[test]
fn reasoning_splits_from_the_answer_in_any_split() {
    let s = |r: &str, c: &str| (r.to_string(), c.to_string());
    let cases = [
        // The model opens its reasoning.
        (
            "  <think>\n Let me see.\n\nTwo steps. </think>\n\nIt is 4.",
            false,
            s("Let me see.\n\nTwo steps.", "It is 4."),
        ),
        // The prompt opened it (DeepSeek-R1's template).
        (
            "Hmm, </thi is not the end.\n</think>\nDone",
            true,
            s("Hmm, </thi is not the end.", "Done"),
        ),
        // No reasoning: all of it is content, leading whitespace too.
        ("  Hello <think>", false, s("", "  Hello <think>")),
        ("<thi", false, s("", "<thi")),
        ("", false, s("", "")),
        // Cut short inside the reasoning.
        ("<think>abc  </thi", false, s("abc  </thi", "")),
        ("\n\n", true, s("", "")),
        // An empty reasoning.
        ("<think></think>Hi", false, s("", "Hi")),
    ];
    for (text, opened, expected) in cases {
        assert_eq!(split(text, opened), expected, "{text:?}");
    }
}

#[test]
fn calls_after_reasoning_are_parsed() {
    let text = "<think>I should look.</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
    let think = ThinkSplitter::new(ThinkSyntax::TAGS, false);
    let (reasoning, content, calls) =
        ReplyParser::new(Some(think), Some(ToolFormat::HERMES)).whole(text);
    assert_eq!(reasoning.as_deref(), Some("I should look."));
    assert_eq!(content, None);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].arguments, "{\"city\": \"Oslo\"}");
    // Mistral's markers as the engine shows them.
    let think = ThinkSplitter::new(ThinkSyntax::MISTRAL, false);
    let (reasoning, content, _) = ReplyParser::new(Some(think), None).whole("[THINK]a[/THINK]b");
    assert_eq!(
        (reasoning.as_deref(), content.as_deref()),
        (Some("a"), Some("b"))
    );
}

#[test]
fn reasoning_markers_come_from_the_template_or_vocabulary() {
    let r1 = "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}{{ c.split('</think>')[-1] }}";
    assert_eq!(ThinkSyntax::detect(r1, |_| false), Some(ThinkSyntax::TAGS));
    assert_eq!(
        ThinkSyntax::detect("[/THINK]", |_| false),
        Some(ThinkSyntax::MISTRAL)
    );
    assert_eq!(
        ThinkSyntax::detect("{{ m }}", |t| t == "</think>"),
        Some(ThinkSyntax::TAGS)
    );
    assert_eq!(ThinkSyntax::detect("{{ m }}", |_| false), None);
    assert!(ThinkSyntax::TAGS.opened_by("<|Assistant|><think>\n"));
    assert!(!ThinkSyntax::TAGS.opened_by("<think>\n\n</think>\n\n"));
}

fn think(opened: bool, budget: Option<u64>) -> ThinkSpec {
    ThinkSpec {
        open: Marker::Text("<think>"),
        close: Marker::Text("</think>"),
        opened,
        budget,
    }
}

/// A walk that thinks `thought` (committed token by token), closes with `</think>`, then
/// goes on at random: the whole output's text.
fn think_then_walk(
    c: &mut dyn crate::engine::constraint::TokenConstraint,
    thought: &str,
    seed: u64,
) -> String {
    let mut text = String::new();
    for b in thought.bytes().chain("</think>".bytes()) {
        assert!(c.allows(b as u32).unwrap(), "{text:?} then {:?}", b as char);
        c.commit(b as u32).unwrap();
        text.push(b as char);
    }
    text + &String::from_utf8(walk(c, seed, 6000)).unwrap()
}

#[test]
fn a_grammar_lets_the_model_think_first() {
    let g = grammars();
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}},
                        "required": ["n"], "additionalProperties": false});
    let mut s = ConstraintSpec::text();
    s.format = OutputFormat::JsonSchema {
        schema,
        strict: true,
    };
    s.think = Some(think(true, None));
    for seed in 0..4 {
        let mut c = constraint(&g, &s);
        // Nothing but thinking is forced: the JSON's `{` is not allowed yet... as text.
        assert!(c.forced().is_empty());
        let text = think_then_walk(c.as_mut(), "Let me count {\"n\": 1} </thin", seed);
        let (reasoning, answer) = text.split_once("</think>").expect(&text);
        assert!(reasoning.ends_with("</thin"), "{text:?}");
        let v: Value = serde_json::from_str(answer.trim_start()).expect(&text);
        assert!(is_integer(&v["n"]), "{text:?}");
    }
    // Not opened: the model may think first, or answer at once.
    s.think = Some(think(false, None));
    let mut c = constraint(&g, &s);
    c.commit(b'{' as u32).unwrap();
    let answer = format!(
        "{{{}",
        String::from_utf8(walk(c.as_mut(), 1, 6000)).unwrap()
    );
    let mut c = constraint(&g, &s);
    for b in "<think>".bytes() {
        c.commit(b as u32).unwrap();
    }
    let thought = think_then_walk(c.as_mut(), "hmm", 1);
    for text in [answer.as_str(), &thought[..]] {
        let json = text.rsplit_once("</think>").map_or(text, |(_, a)| a);
        serde_json::from_str::<Value>(json.trim_start()).expect(text);
    }
    // Tools: reasoning, then the calls.
    let mut s = ConstraintSpec::text();
    s.tools = weather_tools();
    s.choice = ToolChoice::Required;
    s.think = Some(think(true, None));
    for seed in 0..4 {
        let text = think_then_walk(constraint(&g, &s).as_mut(), "I should call.", seed);
        let think = ThinkSplitter::new(ThinkSyntax::TAGS, true);
        let (reasoning, content, calls) =
            ReplyParser::new(Some(think), Some(ToolFormat::HERMES)).whole(&text);
        assert_eq!(reasoning.as_deref(), Some("I should call."));
        assert!(!calls.is_empty() && content.is_none(), "{text:?}");
    }
}

#[test]
fn a_zero_budget_answers_at_once() {
    let g = grammars();
    let schema = json!({"type": "object"});
    let mut s = ConstraintSpec::text();
    s.format = OutputFormat::JsonSchema {
        schema,
        strict: false,
    };
    // Opened by the prompt: the close marker is forced, then the answer.
    s.think = Some(think(true, Some(0)));
    let mut c = constraint(&g, &s);
    let forced: Vec<u8> = c.forced().iter().map(|&t| t as u8).collect();
    assert!(
        forced.starts_with(b"</think>"),
        "{:?}",
        String::from_utf8_lossy(&forced)
    );
    let text = String::from_utf8(walk(c.as_mut(), 2, 6000)).unwrap();
    serde_json::from_str::<Value>(text["</think>".len()..].trim_start()).expect(&text);
    // Free text too gets a grammar for it.
    let mut s = ConstraintSpec::text();
    s.think = Some(think(true, Some(0)));
    let forced: Vec<u8> = constraint(&g, &s)
        .forced()
        .iter()
        .map(|&t| t as u8)
        .collect();
    assert_eq!(forced, b"</think>");
    // Not opened: it may not open one (text may start `<think`, not `<think>`).
    s.think = Some(think(false, Some(0)));
    let mut c = constraint(&g, &s);
    for b in "  <think".bytes() {
        c.commit(b as u32).unwrap();
    }
    assert!(!c.allows(b'>' as u32).unwrap());
    assert!(c.allows(b'!' as u32).unwrap());
    // A control-token marker is written by id.
    let mut s = ConstraintSpec::text();
    s.think = Some(ThinkSpec {
        open: Marker::Token(256),
        close: Marker::Token(257),
        opened: true,
        budget: Some(0),
    });
    assert_eq!(constraint(&g, &s).forced().first(), Some(&257));
}

#[test]
fn a_control_token_closes_the_reasoning() {
    // llguidance takes no token as a lazy rule's suffix: the body is any text, then the token.
    let g = grammars();
    let mut s = ConstraintSpec::text();
    s.format = OutputFormat::JsonObject;
    s.think = Some(ThinkSpec {
        open: Marker::Token(256),
        close: Marker::Token(257),
        opened: true,
        budget: None,
    });
    let mut c = constraint(&g, &s);
    for b in "a </x> {b".bytes() {
        c.commit(b as u32).unwrap();
    }
    assert!(c.allows(257).unwrap());
    c.commit(257).unwrap();
    let json = String::from_utf8(walk(c.as_mut(), 4, 6000)).unwrap();
    serde_json::from_str::<Value>(json.trim_start()).expect(&json);
}

#[test]
fn auto_calls_after_reasoning_follow_the_schema() {
    // Not opened, text markers: the reasoning may come first, but text may not open one
    // of its own, so a call after it is still the grammar's.
    let g = grammars();
    let mut s = ConstraintSpec::text();
    s.tools = weather_tools();
    s.choice = ToolChoice::Auto;
    s.think = Some(think(false, None));
    let mut t = constraint(&g, &s);
    for b in "<think>hmm</think>\n".bytes() {
        t.commit(b as u32).unwrap();
    }
    for b in "<tool_call>\n{\"name\": \"".bytes() {
        t.commit(b as u32).unwrap();
    }
    // Only declared names from here.
    assert!(!t.allows(b'x' as u32).unwrap());
    // So after some prose following the reasoning.
    let mut t = constraint(&g, &s);
    for b in "<think>hmm</think>\nSure.\n<tool_call>\n{\"name\": \"".bytes() {
        assert!(t.allows(b as u32).unwrap(), "{:?}", b as char);
        t.commit(b as u32).unwrap();
    }
    assert!(!t.allows(b'x' as u32).unwrap() && t.allows(b'a' as u32).unwrap());
    // Text may hold markers later, but not open with one.
    let mut t = constraint(&g, &s);
    for b in "Hi".bytes() {
        t.commit(b as u32).unwrap();
    }
    assert!(t.allows(b'<' as u32).unwrap());
    let mut t = constraint(&g, &s);
    for b in "<think>x</think><think".bytes() {
        t.commit(b as u32).unwrap();
    }
    assert!(!t.allows(b'>' as u32).unwrap());
}

#[test]
fn inline_reasoning_stays_content_and_calls_after_it_parse() {
    let text =
        "<think>a  b</think>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
    let think = ThinkSplitter::new(ThinkSyntax::TAGS, false).shown(Shown::Inline);
    let (reasoning, content, calls) =
        ReplyParser::new(Some(think), Some(ToolFormat::HERMES)).whole(text);
    assert_eq!(reasoning, None);
    assert_eq!(content.as_deref(), Some("<think>a  b</think>"));
    assert_eq!(calls.len(), 1);
    // In any split, inline text is the text itself; dropped, the reasoning is gone.
    let text = "  <think> x </thi</think>\n ok";
    for (shown, expected) in [(Shown::Inline, text), (Shown::Dropped, "ok")] {
        for cut in 0..=text.len() {
            let think = ThinkSplitter::new(ThinkSyntax::TAGS, false).shown(shown);
            let mut p = ReplyParser::new(Some(think), None);
            let mut pieces = p.push(&text[..cut]);
            pieces.extend(p.push(&text[cut..]));
            pieces.extend(p.finish());
            let content: String = pieces
                .into_iter()
                .map(|p| match p {
                    Piece::Content(t) => t,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(content, expected, "{shown:?} cut at {cut}");
        }
    }
}

#[test]
fn reasoning_tokens_are_counted_a_token_at_a_time() {
    let count = |tokens: &[&str], opened: bool| {
        let mut t = ThinkSplitter::new(ThinkSyntax::TAGS, opened);
        for tok in tokens {
            t.push(tok, &mut Vec::new());
        }
        t.tokens()
    };
    // The markers count, the answer does not.
    assert_eq!(
        count(&["<think>", "a", " b", "</think>", "\n", "ok"], false),
        4
    );
    assert_eq!(count(&["<th", "ink>a</th", "ink>", "ok"], false), 3);
    assert_eq!(count(&["a", "</think>", "ok", "!"], true), 2);
    assert_eq!(count(&["Hello", " <think>"], false), 0);
    // A token that opens and closes is one.
    assert_eq!(count(&["<think>x</think>ok"], false), 1);
}

#[test]
fn a_budget_forces_the_close_marker() {
    let g = grammars();
    let schema = json!({"type": "object"});
    for (format, opened) in [
        (OutputFormat::Text, true),
        (OutputFormat::Text, false),
        (
            OutputFormat::JsonSchema {
                schema,
                strict: false,
            },
            true,
        ),
    ] {
        for budget in [1u64, 5] {
            let mut s = ConstraintSpec::text();
            s.format = format.clone();
            s.think = Some(think(opened, Some(budget)));
            let mut c = constraint(&g, &s);
            let mut text = String::new();
            if !opened {
                // The model opens a reasoning itself: the budget counts from there.
                for b in "<think>".bytes() {
                    c.commit(b as u32).unwrap();
                }
                text.push_str("<think>");
            }
            // A model that would think on: once the budget is spent, only the marker.
            for _ in 0..budget {
                assert!(c.forced().is_empty());
                c.commit(b'x' as u32).unwrap();
                text.push('x');
            }
            let forced: Vec<u8> = c.forced().iter().map(|&t| t as u8).collect();
            assert_eq!(forced, b"</think>", "{format:?} {budget}");
            assert!(!c.allows(b'x' as u32).unwrap());
            let mut logits = vec![0.0; 262];
            c.mask(&mut logits).unwrap();
            assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 1);
            for &t in &forced {
                c.commit(t as u32).unwrap();
            }
            // Then the grammar as usual.
            if matches!(format, OutputFormat::JsonSchema { .. }) {
                let json = String::from_utf8(walk(c.as_mut(), 5, 6000)).unwrap();
                serde_json::from_str::<Value>(json.trim_start()).expect(&json);
            } else {
                assert!(c.allows(b'x' as u32).unwrap());
            }
        }
    }
    // A model that closes within its budget is not cut.
    let mut s = ConstraintSpec::text();
    s.think = Some(think(true, Some(20)));
    let mut c = constraint(&g, &s);
    for b in "ok</think>done and more".bytes() {
        assert!(c.forced().is_empty());
        c.commit(b as u32).unwrap();
    }
    // Free text may end while it thinks, as it may with no budget; JSON may not.
    assert!(c.allows(261).unwrap() || !c.forced().is_empty());
    let mut c = constraint(&g, &s);
    c.commit(b'h' as u32).unwrap();
    assert!(c.allows(261).unwrap());
    let mut json = s.clone();
    json.format = OutputFormat::JsonObject;
    let mut c = constraint(&g, &json);
    c.commit(b'h' as u32).unwrap();
    assert!(!c.allows(261).unwrap());
    let mut logits = vec![0.0; 262];
    c.mask(&mut logits).unwrap();
    assert!(logits[261].is_infinite());
    let mut c = constraint(&g, &s);
    c.commit(b'h' as u32).unwrap();
    let mut logits = vec![0.0; 262];
    c.mask(&mut logits).unwrap();
    assert_eq!(logits[261], 0.0);
    // A reply that opens none has no budget to spend.
    s.think = Some(think(false, Some(2)));
    let mut c = constraint(&g, &s);
    for b in "Hello there".bytes() {
        assert!(c.forced().is_empty());
        c.commit(b as u32).unwrap();
    }
    // A control-token marker is forced by id.
    s.think = Some(ThinkSpec {
        open: Marker::Token(256),
        close: Marker::Token(257),
        opened: true,
        budget: Some(3),
    });
    let mut c = constraint(&g, &s);
    for b in "abc".bytes() {
        c.commit(b as u32).unwrap();
    }
    assert_eq!(c.forced(), vec![257]);
}

#[test]
fn a_budget_closes_at_a_character_boundary_and_finishes_a_begun_marker() {
    let g = grammars();
    let mut s = ConstraintSpec::text();
    s.think = Some(think(false, Some(3)));
    // Whitespace may come before the open marker.
    let mut c = constraint(&g, &s);
    for b in "\n<think>ab".bytes() {
        c.commit(b as u32).unwrap();
    }
    // The budget's last token begins a three-byte character: the marker waits for its end.
    let zhong = "中".as_bytes();
    c.commit(zhong[0] as u32).unwrap();
    assert!(c.forced().is_empty());
    c.commit(zhong[1] as u32).unwrap();
    assert!(c.forced().is_empty());
    c.commit(zhong[2] as u32).unwrap();
    let forced: Vec<u8> = c.forced().iter().map(|&t| t as u8).collect();
    assert_eq!(forced, b"</think>");
    // A marker the model began when the budget ran out is finished, not written again.
    s.think = Some(think(true, Some(4)));
    let mut c = constraint(&g, &s);
    for b in "a</t".bytes() {
        c.commit(b as u32).unwrap();
    }
    let forced: Vec<u8> = c.forced().iter().map(|&t| t as u8).collect();
    assert_eq!(forced, b"hink>");
    for &t in &forced {
        c.commit(t as u32).unwrap();
    }
    // Free text after it: nothing left to enforce, whitespace or a marker included.
    for b in "  <think>".bytes() {
        assert!(c.allows(b as u32).unwrap());
        c.commit(b as u32).unwrap();
    }
}
