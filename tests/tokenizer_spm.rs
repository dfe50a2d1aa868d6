//! The SentencePiece-style (`tokenizer.ggml.model = llama`) tokenizer of Llama 2 and Mistral
//! GGUF files, built from a synthetic vocabulary: merges by score, `▁` for spaces, a BOS by
//! default, byte fallback for characters outside the vocabulary. Also: each byte-level
//! pre-tokenizer we know loads and round-trips, and what a byte-level vocabulary's metadata
//! leaves unsaid (BOS, end-of-generation tokens, a missing pre-tokenizer) is read as llama.cpp
//! reads it.

mod common;

use common::synthetic::{self, Spec, SPM_PIECES};
use edgeinfer::model::{GgufFile, Tokenizer};

fn id(piece: &str) -> u32 {
    let i = SPM_PIECES.iter().position(|(p, _)| *p == piece).unwrap();
    (3 + 256 + i) as u32
}

fn tokenizer() -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    synthetic::write(
        &path,
        &Spec {
            spm: true,
            ..Spec::default()
        },
    );
    Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
}

#[test]
fn words_merge_into_their_pieces_with_a_space_prefix() {
    let tok = tokenizer();
    assert!(
        tok.add_bos,
        "llama vocabularies add BOS unless the metadata says otherwise"
    );
    assert_eq!(
        tok.encode("hello world", true).unwrap(),
        vec![1, id("▁hello"), id("▁world")]
    );
    assert_eq!(
        tok.encode("hello world", false).unwrap(),
        vec![id("▁hello"), id("▁world")]
    );
    assert_eq!(
        tok.decode(&[id("▁hello"), id("▁world")]).unwrap(),
        "hello world"
    );
    assert_eq!(tok.stop_ids, vec![2]);
}

#[test]
fn a_tokens_text_keeps_its_space() {
    // As logprobs show each token: `▁world` is " world" mid-text, not "world".
    let tok = tokenizer();
    assert_eq!(tok.token_text_decoded(id("▁world")), " world");
    assert_eq!(tok.token_text_decoded(id("he")), "he");
    assert_eq!(tok.token_text_decoded(id("▁")), " ");
    // The probe's own token too ("a" is two byte-fallback tokens here: ▁ and <0x61>).
    assert_eq!(tok.token_text_decoded(3 + 0x61), "a");
    assert_eq!(tok.token_text_decoded(1), "<s>");
    // A text's first word reads without it (echoed prompts start so).
    assert_eq!(tok.decode_with_control(&[id("▁hello")]).unwrap(), "hello");
}

#[test]
fn unknown_characters_fall_back_to_bytes() {
    let tok = tokenizer();
    // "€" is E2 82 AC in UTF-8; byte token <0xNN> has id 3 + NN.
    let ids = tok.encode("he€", false).unwrap();
    assert_eq!(ids, vec![id("▁"), id("he"), 3 + 0xE2, 3 + 0x82, 3 + 0xAC]);
    assert_eq!(tok.decode(&ids).unwrap(), "he€");
    // Each byte token's bytes are that byte (its text alone reads U+FFFD).
    assert_eq!(tok.token_bytes_of(3 + 0xE2), vec![0xE2]);
    let joined: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes_of(id)).collect();
    assert_eq!(joined, " he€".as_bytes());
    assert_eq!(tok.token_bytes_of(id("▁world")), b" world");
    assert_eq!(tok.token_bytes_of(1), b"<s>");
}

#[test]
fn control_token_text_becomes_the_control_token() {
    let tok = tokenizer();
    let ids = tok.encode("<s>hello", false).unwrap();
    assert_eq!(ids[0], 1);
    assert!(tok.is_control(1));
}

#[test]
fn a_grammar_forces_the_texts_own_tokens_without_the_space_prefix() {
    use edgeinfer::structured::{ConstraintSpec, Grammars, OutputFormat};
    let tok = std::sync::Arc::new(tokenizer());
    let vocab = tok.vocab_size();
    let grammars = Grammars::new(tok.clone(), vocab).unwrap();
    let spec = ConstraintSpec {
        format: OutputFormat::Regex("hello world".into()),
        ..ConstraintSpec::text()
    };
    let mut c = grammars.constraint(&spec).unwrap().unwrap();
    // The reply's first word takes no space (SentencePiece's encoder would put one before
    // it), the second its own `▁world` piece.
    let forced = c.forced();
    assert_eq!(forced, vec![id("hello"), id("▁world")]);
    let bytes: Vec<u8> = forced.iter().flat_map(|&t| tok.token_bytes_of(t)).collect();
    assert_eq!(bytes, b"hello world");
}

#[test]
fn every_known_byte_level_pre_tokenizer_loads_and_round_trips() {
    // The byte-level vocabularies by `tokenizer.ggml.pre` (Tekken: Mistral Nemo, Small 3).
    for pre in ["gpt-2", "smollm", "llama-bpe", "tekken"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bpe.gguf");
        synthetic::write(
            &path,
            &Spec {
                pre,
                ..Spec::default()
            },
        );
        let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap())
            .unwrap_or_else(|e| panic!("{pre}: {e}"));
        let text = "getHTTPResponse(42) naïve\n\n  ok";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "{pre}");
    }
}

fn bpe(spec: Spec) -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bpe.gguf");
    synthetic::write(&path, &spec);
    Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
}

#[test]
fn end_of_generation_tokens_stop_a_reply_whatever_their_type() {
    // Llama 3's `<|end_of_text|>` (id 258 here) ends a raw completion, as in llama.cpp.
    let tok = bpe(Spec {
        controls: &["<|end_of_text|>"],
        ..Spec::default()
    });
    assert!(tok.stop_ids.contains(&258), "{:?}", tok.stop_ids);
    // An older conversion types `<|im_end|>`-like tokens as user-defined words: they still
    // end the turn, and are never shown.
    let tok = bpe(Spec {
        controls: &["<|eot_id|>"],
        controls_user_defined: true,
        ..Spec::default()
    });
    assert!(tok.stop_ids.contains(&258), "{:?}", tok.stop_ids);
    assert!(tok.is_control(258));
    assert_eq!(tok.decode(&[b'h' as u32, 258]).unwrap(), "h");
    assert_eq!(tok.encode("<|eot_id|>", false).unwrap(), vec![258]);
    // `</s>` typed as a word stays a word (Qwen's and Gemma's vocabularies have one).
    let tok = bpe(Spec {
        controls: &["</s>"],
        controls_user_defined: true,
        ..Spec::default()
    });
    assert!(!tok.stop_ids.contains(&258) && !tok.is_control(258));
    // Other user-defined words stay words.
    let tok = bpe(Spec {
        controls: &["<tool>"],
        controls_user_defined: true,
        ..Spec::default()
    });
    assert!(!tok.stop_ids.contains(&258) && !tok.is_control(258));
    assert_eq!(tok.decode(&[258]).unwrap(), "<tool>");
}

#[test]
fn a_llama_3_vocabulary_takes_a_bos_unless_its_metadata_says_not() {
    use candle_core::quantized::gguf_file::Value;
    let tok = bpe(Spec {
        pre: "llama-bpe",
        ..Spec::default()
    });
    assert!(tok.add_bos);
    assert_eq!(tok.encode("hi", true).unwrap()[0], 256);
    let tok = bpe(Spec {
        pre: "llama-bpe",
        meta: vec![("tokenizer.ggml.add_bos_token", Value::Bool(false))],
        ..Spec::default()
    });
    assert!(!tok.add_bos);
    // GPT-2's split takes none unless told.
    assert!(!bpe(Spec::default()).add_bos);
}

#[test]
fn a_vocabulary_without_a_pre_tokenizer_is_read_as_its_family() {
    // A Llama 3 vocabulary from before `tokenizer.ggml.pre` existed is Llama 3's: it takes a
    // BOS (and Llama 3's split, which these merge-less vocabularies cannot show).
    let tok = bpe(Spec {
        pre: "",
        controls: &["<|begin_of_text|>"],
        ..Spec::default()
    });
    assert!(tok.add_bos);
    // Any other loads as GPT-2's.
    let tok = bpe(Spec {
        pre: "",
        ..Spec::default()
    });
    assert!(!tok.add_bos);
    let text = "getHTTPResponse(42) naïve";
    assert_eq!(tok.decode(&tok.encode(text, false).unwrap()).unwrap(), text);
}

#[test]
fn streamed_byte_fallback_text_is_the_whole_decoding() {
    // SentencePiece's byte fallback replaces a whole run of bytes with U+FFFD when any is
    // invalid: a lone E2 before a rocket's four bytes, then a word.
    use edgeinfer::model::detok::IncrementalDecoder;
    let tok = tokenizer();
    let bytes = [0xE2u32, 0xF0, 0x9F, 0x9A, 0x80];
    let mut ids: Vec<u32> = bytes.iter().map(|b| 3 + b).collect();
    ids.push(id("▁hello"));
    let mut dec = IncrementalDecoder::new();
    let mut out = String::new();
    for &t in &ids {
        out.extend(dec.push(&tok, t).unwrap());
    }
    out.extend(dec.flush(&tok).unwrap());
    assert_eq!(out, tok.decode(&ids).unwrap());
}
