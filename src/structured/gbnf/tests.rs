//! GBNF read as llama.cpp reads it: each grammar compiled for a one-byte-per-token
//! vocabulary and fed strings byte by byte.

use super::to_lark;
use crate::engine::constraint::TokenConstraint;
use crate::structured::tests::{grammars, walk};
use crate::structured::{ConstraintSpec, OutputFormat};

/// The stop token of the test vocabulary.
const END: u32 = 261;

fn no_tokens(_: &str) -> Option<u32> {
    None
}

fn spec(gbnf: &str) -> ConstraintSpec {
    ConstraintSpec {
        format: OutputFormat::Gbnf(gbnf.into()),
        ..ConstraintSpec::text()
    }
}

fn constraint(gbnf: &str) -> Box<dyn TokenConstraint> {
    grammars()
        .constraint(&spec(gbnf))
        .unwrap_or_else(|e| panic!("{gbnf:?}: {e}"))
        .expect("a constraint")
}

/// Whether the grammar takes exactly `text`.
fn takes(gbnf: &str, text: &str) -> bool {
    let mut c = constraint(gbnf);
    for &b in text.as_bytes() {
        if !c.allows(b as u32).unwrap() {
            return false;
        }
        c.commit(b as u32).unwrap();
    }
    c.allows(END).unwrap()
}

fn error(gbnf: &str) -> String {
    match grammars().constraint(&spec(gbnf)) {
        Err(e) => {
            assert_eq!(e.param, "grammar");
            e.message
        }
        Ok(_) => panic!("{gbnf:?} compiled"),
    }
}

#[test]
fn literals_classes_and_repetitions_mean_what_they_do_in_llama_cpp() {
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            r#"root ::= "yes" | "no""#,
            &["yes", "no"],
            &["", "yesno", "maybe"],
        ),
        (
            "root ::= [0-9]{2,3} # two or three digits",
            &["12", "123"],
            &["1", "1234", "12a"],
        ),
        ("root ::= [a-c]{2}", &["ab", "cc"], &["a", "abc"]),
        ("root ::= \"x\"{2,}", &["xx", "xxxxx"], &["x"]),
        (
            "root ::= \"a\" . \"c\"",
            &["abc", "a\nc", "aéc"],
            &["ac", "abbc"],
        ),
        (r#"root ::= [^"\\]+"#, &["ab c", "é"], &["a\"", "\\"]),
        (
            r#"root ::= "\x41\u00e9\t" [\]\-] [\x30-\x39]"#,
            &["Aé\t]1", "Aé\t-9"],
            &["Aé\ta1", "Aé\t]"],
        ),
        // A rule's alternatives may go on over lines after `|` (not before, as in llama.cpp),
        // and a group over lines.
        (
            "root ::= item (\n  \",\" item\n)*\nitem ::=\n  \"a\" |\n  \"bb\"",
            &["a", "a,bb,a"],
            &["a,", ",a", "b"],
        ),
        // A terminal rule followed by what it could also take: GBNF is a character-level
        // grammar, so the lexer must not swallow the `b`.
        (
            "root ::= word \"b\"\nword ::= [a-z]+",
            &["ab", "zzb", "bb"],
            &["a", "b", "abc"],
        ),
        // Recursion, left and right.
        (
            "root ::= \"(\" root \")\" | \"\"",
            &["", "()", "(())"],
            &["(()", ")("],
        ),
        (
            "root ::= expr\nexpr ::= expr \"+\" num | num\nnum ::= [0-9]+",
            &["1", "12+3+45"],
            &["1+", "+1"],
        ),
        // Names with dashes and digits; a rule used before it is defined.
        (
            "root ::= my-rule2 \"!\"\nmy-rule2 ::= \"hi\"",
            &["hi!"],
            &["hi"],
        ),
        ("root ::= \"a\"?  \"b\"*", &["", "a", "bbb", "abb"], &["ba"]),
    ];
    for (g, yes, no) in cases {
        for t in *yes {
            assert!(takes(g, t), "{g:?} should take {t:?}");
        }
        for t in *no {
            assert!(!takes(g, t), "{g:?} should refuse {t:?}");
        }
    }
}

#[test]
fn a_json_grammar_makes_json() {
    let g = r#"
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F\x80-\U0010FFFF] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) ){0,6} "\"" ws
number ::= "-"? ("0" | [1-9] [0-9]{0,8}) ("." [0-9]{1,4})? ws
ws ::= | " " | "\n" [ \t]{0,4}
"#;
    let gs = grammars();
    for seed in 0..8 {
        let mut c = gs.constraint(&spec(g)).unwrap().unwrap();
        let out = walk(c.as_mut(), seed, 2000);
        let text = String::from_utf8(out).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v.is_object(), "{text}");
    }
    assert!(takes(g, r#"{"a": [1, -2.5, "x\n"], "b": {}}"#));
    assert!(!takes(g, r#"{"a": 01}"#));
}

#[test]
fn token_references_are_resolved_for_the_vocabulary() {
    // The test vocabulary: bytes 0..256, then specials; 261 is `<|end|>`.
    let lark = to_lark("root ::= <[256]> \"a\" !<[257]>", &no_tokens, 262).unwrap();
    assert!(
        lark.contains("<[256]>") && lark.contains("<[^257]>"),
        "{lark}"
    );
    let named = |t: &str| (t == "<think>").then_some(258);
    let lark = to_lark("root ::= <think> [a-z]*", &named, 262).unwrap();
    assert!(lark.starts_with("start: <[258]> "), "{lark}");
    let e = to_lark("root ::= <thinking>", &named, 262).unwrap_err();
    assert!(e.contains("`<thinking>` is not one token"), "{e}");
    let e = to_lark("root ::= <[262]>", &named, 262).unwrap_err();
    assert!(e.contains("not a token id of this model"), "{e}");
    let mut c = constraint("root ::= <[256]> \"a\"");
    assert!(!c.allows(b'a' as u32).unwrap());
    assert!(c.allows(256).unwrap());
}

#[test]
fn llguidance_lark_passes_through() {
    assert!(takes(
        "%llguidance {}\nstart: \"a\" NUM\nNUM: /[0-9]+/",
        "a42"
    ));
    assert!(error("%llguidance {}\nstart: %json {\"x-guidance\": {}}").contains("x-guidance"));
}

#[test]
fn mistakes_are_named_with_their_line_and_column() {
    let cases = [
        ("root = \"a\"", "line 1, column 6: expected `::=`"),
        (
            "root ::= \"a\"\nroot ::= \"b\"",
            "line 2, column 1: rule `root` is defined twice",
        ),
        ("root ::= item", "rule `item` is used but never defined"),
        ("start ::= \"a\"", "no `root` rule"),
        (
            "root ::= \"\\q\"",
            "line 1, column 11: unknown escape `\\q`",
        ),
        ("root ::= \"\\x4\"", "`\\x` needs 2 hexadecimal digits"),
        ("root ::= \"\\uD800\"", "not a Unicode character"),
        (
            "root ::= (\"a\" | \"b\"",
            "line 1, column 10: a `(` without its `)`",
        ),
        ("root ::= * \"a\"", "`*` follows nothing"),
        (
            "root ::= \"a\"*****",
            "more than 4 repetition marks in a row",
        ),
        ("root ::= \"a\"{3,1}", "runs backwards"),
        ("root ::= \"a\"{2001}", "at most 2000"),
        ("root ::= \"a\"{2,x}", "expected `}`"),
        ("root ::= []", "an empty character class"),
        ("root ::= [z-a]", "the range `z-a` runs backwards"),
        ("root ::= \"abc", "unexpected end of the grammar"),
        (
            "root ::= \"a\" )",
            "line 1, column 14: expected the end of the rule",
        ),
        ("::= \"a\"", "line 1, column 1: expected a rule name"),
    ];
    for (g, want) in cases {
        let e = to_lark(g, &no_tokens, 262).unwrap_err();
        assert!(e.contains(want), "{g:?}: {e}");
    }
    let deep = format!("root ::= {}\"a\"{}", "(".repeat(200), ")".repeat(200));
    assert!(to_lark(&deep, &no_tokens, 262)
        .unwrap_err()
        .contains("nest deeper"));
    // Through the compiler, the message says it is GBNF's.
    assert!(error("root ::= \"a\" )").starts_with("GBNF: line 1"));
}

#[test]
fn bounds_past_llama_cpps_cap_are_no_bound() {
    let lark = to_lark("root ::= \"a\"{1,5000}", &no_tokens, 262).unwrap();
    assert_eq!(lark.trim(), "start: \"a\"+");
    assert!(takes("root ::= \"a\"{1,5000}", "aaaa"));
}

#[test]
fn each_character_is_its_own_lexeme() {
    let lark = to_lark("root ::= \"A: \"+ .* <[256]>", &no_tokens, 262).unwrap();
    assert_eq!(lark.trim(), "start: (\"A\" \":\" \" \")+ /(?s:.)/* <[256]>");
    // A literal beside its own pieces: both readings stay open.
    let g = "root ::= \"a\" \"b\" | \"ab\" \"c\"";
    assert!(takes(g, "ab") && takes(g, "abc") && !takes(g, "abb"));
    assert!(takes("root ::= \"A: \" .*", "A: any\ntext"));
    // Rules unused from `root` are left out.
    let lark = to_lark("root ::= \"a\"\nunused ::= \"b\"", &no_tokens, 262).unwrap();
    assert_eq!(lark.trim(), "start: \"a\"");
}

#[test]
fn long_chains_of_rules_and_refs_compile_without_overflowing_the_stack() {
    // A few hundred overflowed a 2 MiB stack in llguidance's compiler (the test thread's,
    // and the server's blocking threads'), which aborts the process. Chains as long as
    // they are taken, each link nested as deep as it is written:
    // GBNF (nested groups too; deeper, llguidance runs out of symbols first),
    let n = super::MAX_RULES - 2;
    let mut g = String::from("root ::= r0\n");
    for i in 0..n {
        let nested = (0..2).fold(format!("r{}", i + 1), |x, _| format!("(\"a\" {x} | \"q\")"));
        g.push_str(&format!("r{i} ::= {nested}\n"));
    }
    g.push_str(&format!("r{n} ::= \"b\"\n"));
    let mut c = grammars().constraint(&spec(&g)).unwrap().unwrap();
    for _ in 0..100 {
        c.commit(b'a' as u32).unwrap();
    }
    assert!(c.allows(b'q' as u32).unwrap() && !c.allows(END).unwrap());
    let more = format!("{g}x ::= \"c\"\nroot2 ::= x\n");
    assert!(to_lark(
        &more.replace("root ::= r0", "root ::= r0 root2"),
        &no_tokens,
        262
    )
    .unwrap_err()
    .contains("more than 10000 rules"));
    // Lark (llguidance's parser takes 30 levels of nesting),
    let lines = 5000 - 2;
    let (open, close) = ("(".repeat(28), ")".repeat(28));
    let mut lark = String::from("start: r0\n");
    for i in 0..lines {
        lark.push_str(&format!("r{i}: {open}\"a\" r{}{close}\n", i + 1));
    }
    lark.push_str(&format!("r{lines}: \"b\"\n"));
    let spec_of = |format| ConstraintSpec {
        format,
        ..ConstraintSpec::text()
    };
    assert!(grammars()
        .constraint(&spec_of(OutputFormat::Lark(lark.clone())))
        .unwrap()
        .is_some());
    lark.push_str("extra: \"c\"\n");
    let e = grammars()
        .constraint(&spec_of(OutputFormat::Lark(lark)))
        .unwrap_err();
    assert!(e.message.contains("more than 5000 lines"), "{e}");
    // and `$ref`s, until llguidance finds the schema too large.
    for (n, ok) in [(3000, true), (15000, false)] {
        let mut defs = serde_json::Map::new();
        for i in 0..n {
            let next = format!("#/$defs/d{}", i + 1);
            defs.insert(
                format!("d{i}"),
                serde_json::json!({"type": "object", "properties": {"x": {"$ref": next}}}),
            );
        }
        defs.insert(format!("d{n}"), serde_json::json!({"type": "integer"}));
        let schema = serde_json::json!({"$ref": "#/$defs/d0", "$defs": defs});
        let r = grammars().constraint(&spec_of(OutputFormat::JsonSchema {
            schema,
            strict: false,
        }));
        assert_eq!(r.is_ok(), ok, "{n}");
    }
}

#[test]
fn what_llguidance_would_read_otherwise_is_written_so_it_reads_it_right() {
    // `{0}` is nothing (Lark has no `{0}`); DEL in a literal; groups nested past the Lark
    // parser's limit.
    assert!(takes("root ::= \"a\" \"b\"{0} \"c\"{0,0}", "a"));
    assert!(takes("root ::= \"x\\x7Fy\"", "x\u{7f}y"));
    let mut deep = "\"z\"".to_string();
    for _ in 0..40 {
        deep = format!("(\"a\" {deep} | \"q\")");
    }
    let deep = format!("root ::= {deep}");
    assert!(to_lark(&deep, &no_tokens, 262).unwrap().contains("\ng0: "));
    let text = format!("{}z", "a".repeat(40));
    assert!(takes(&deep, &text) && takes(&deep, "aaq") && !takes(&deep, "aa"));
    // Chained repetition marks, as llama.cpp reads them.
    assert!(takes("root ::= \"ab\"{2}?", "") && takes("root ::= \"ab\"{2}?", "abab"));
    assert!(!takes("root ::= \"ab\"{2}?", "ab"));
}

#[test]
fn a_stop_token_never_ends_a_grammar_early() {
    // `!<[97]>` is any token but `a`, the stop token included: it may end the reply only
    // where the grammar may end.
    let mut c = constraint("root ::= \"x\" !<[97]> \"y\"");
    c.commit(b'x' as u32).unwrap();
    let mut logits = vec![0f32; 262];
    c.mask(&mut logits).unwrap();
    assert_eq!(logits[END as usize], f32::NEG_INFINITY);
    assert_eq!(logits[b'a' as usize], f32::NEG_INFINITY);
    assert!(logits[b'b' as usize].is_finite() && logits[258].is_finite());
    assert!(!c.allows(END).unwrap());
    c.commit(258).unwrap();
    c.commit(b'y' as u32).unwrap();
    let mut logits = vec![0f32; 262];
    c.mask(&mut logits).unwrap();
    assert!(logits[END as usize].is_finite());
}

#[test]
fn special_tokens_are_found_by_name() {
    // The test vocabulary's specials: `<|tool|>` (256) to `<|end|>` (261).
    let mut c = constraint("root ::= \"a\" <|user|> \"b\"");
    c.commit(b'a' as u32).unwrap();
    assert!(c.allows(258).unwrap() && !c.allows(b'<' as u32).unwrap());
    assert!(error("root ::= <|nobody|>").contains("`<|nobody|>` is not one token"));
    assert!(error("root ::= <[+5]>").contains("not a token id"));
}
