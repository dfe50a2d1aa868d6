//! Tokenizer parity on a wider set: 120 strings (unicode, emoji, code, whitespace runs, digits,
//! control tokens) with ids from an independent implementation (Python `transformers` loading
//! the same GGUF; see `scripts/make_tokenizer_fixture.py` and the fixture's `note`).

mod common;

#[test]
fn gguf_tokenizer_matches_the_fixture() {
    let model = common::default_model();
    let path = common::repo_root().join("tests/fixtures/tokenizer_smollm2.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 50,
        "the fixture has only {} cases",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = common::ids(&case["ids"]);
        let got = model.tokenizer.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
            continue;
        }
        // Plain text (no control tokens, which decoding drops) must survive a round trip.
        let has_control = got.iter().any(|&id| model.tokenizer.is_control(id));
        if case["roundtrip"].as_bool() == Some(true) && !has_control {
            let back = model.tokenizer.decode(&got).unwrap();
            if back != text {
                failures.push(format!("{text:?}: decodes to {back:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn incremental_decoding_never_splits_a_character() {
    use edgeinfer::model::detok::IncrementalDecoder;
    let model = common::default_model();
    let tok = &model.tokenizer;
    let text = "Ünïcödé 你好世界 🚀🔥 👨‍👩‍👧 naïve café\n\tdone";
    let ids = tok.encode(text, false).unwrap();
    let mut dec = IncrementalDecoder::new();
    let mut out = String::new();
    let mut pieces = 0;
    for &id in &ids {
        if let Some(piece) = dec.push(tok, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
            out.push_str(&piece);
            pieces += 1;
        }
    }
    if let Some(rest) = dec.flush(tok).unwrap() {
        out.push_str(&rest);
    }
    assert_eq!(out, text);
    // Multi-byte characters span several byte-level tokens: some pushes must have waited.
    assert!(
        pieces < ids.len(),
        "{pieces} pieces for {} tokens",
        ids.len()
    );
}

#[test]
fn a_context_that_ends_inside_a_character_does_not_stop_the_text() {
    // A prompt of token ids may end inside a character: the reply's first token completes
    // it, and the reply's text starts with that whole character.
    use edgeinfer::model::detok::IncrementalDecoder;
    let model = common::default_model();
    let tok = &model.tokenizer;
    let text = "Say 你好 and 🚀 then stop";
    let ids = tok.encode(text, false).unwrap();
    let mut cut = 0;
    for k in 1..ids.len() {
        let before = tok.decode(&ids[..k]).unwrap();
        if !before.ends_with('\u{FFFD}') {
            continue;
        }
        cut += 1;
        let whole = before.trim_end_matches('\u{FFFD}');
        let mut dec = IncrementalDecoder::with_context(&ids[k.saturating_sub(5)..k]);
        let mut out = String::new();
        for &id in &ids[k..] {
            out.extend(dec.push(tok, id).unwrap());
        }
        out.extend(dec.flush(tok).unwrap());
        assert_eq!(out, text[whole.len()..], "cut after token {k}");
    }
    assert!(cut > 0, "no cut of {text:?} ends inside a character");
}

#[test]
fn each_tokens_bytes_join_into_the_texts_bytes() {
    // Logprobs' `bytes` let a client rebuild characters split across tokens.
    let model = common::default_model();
    let tok = &model.tokenizer;
    let text = "Ünïcödé 你好世界 🚀🔥 naïve café <|im_end|>\n\tdone";
    let ids = tok.encode(text, false).unwrap();
    let joined: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes_of(id)).collect();
    assert_eq!(String::from_utf8(joined).unwrap(), text);
    // Some token holds part of a character: its text cannot show it, its bytes do.
    let partial = ids
        .iter()
        .map(|&id| tok.token_bytes_of(id))
        .filter(|b| std::str::from_utf8(b).is_err())
        .count();
    assert!(partial > 0, "no token of {text:?} splits a character");
    for &id in &ids {
        let bytes = tok.token_bytes_of(id);
        if let Ok(s) = std::str::from_utf8(&bytes) {
            assert_eq!(tok.token_text_decoded(id), s, "token {id}");
        }
    }
}

#[test]
fn bytes_that_never_complete_a_character_are_not_held_back() {
    // A reply of lone lead bytes (a `logit_bias` on one byte token): each can never be
    // completed once 3 more tokens follow, so text comes out as it goes, not all at the end
    // (which also decoded the whole held run again at each token).
    use edgeinfer::model::detok::IncrementalDecoder;
    let model = common::default_model();
    let tok = &model.tokenizer;
    let lead = tok.token_id("â").expect("the byte-level token of 0xE2");
    assert_eq!(tok.token_bytes_of(lead), vec![0xE2]);
    let ids: Vec<u32> = [tok.encode("Hi ", false).unwrap(), vec![lead; 200]].concat();
    let mut dec = IncrementalDecoder::new();
    let mut out = String::new();
    let mut before_flush = 0;
    for &id in &ids {
        if let Some(piece) = dec.push(tok, id).unwrap() {
            out.push_str(&piece);
            before_flush = out.chars().count();
        }
    }
    out.extend(dec.flush(tok).unwrap());
    assert_eq!(out, tok.decode(&ids).unwrap());
    assert!(
        before_flush >= 190,
        "only {before_flush} characters before the flush"
    );
    // Control tokens between a character's bytes hold none of them (a fuzzed case): the
    // streamed text is still the whole decoding.
    for ids in [
        vec![314, 0, 374, 4512, 156, 0, 0, 0, 0, 3, 0, 0, 128, 0],
        [vec![lead], vec![0; 5], tok.encode("€", false).unwrap()].concat(),
    ] {
        let mut dec = IncrementalDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            out.extend(dec.push(tok, id).unwrap());
        }
        out.extend(dec.flush(tok).unwrap());
        assert_eq!(out, tok.decode(&ids).unwrap(), "{ids:?}");
    }
    // A character completed after its lead bytes still comes out whole.
    let text = "x🚀y 你好";
    let ids = tok.encode(text, false).unwrap();
    let mut dec = IncrementalDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        let piece = dec.push(tok, id).unwrap().unwrap_or_default();
        assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
        out.push_str(&piece);
    }
    out.extend(dec.flush(tok).unwrap());
    assert_eq!(out, text);
}
