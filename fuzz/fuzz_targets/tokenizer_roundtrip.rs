//! The default model's tokenizer (from its GGUF metadata, as the server builds it) and the
//! incremental detokenizer. Text without special-token markup survives encode -> decode
//! exactly; for any token ids, the streamed deltas add up to the whole decoding.
//! The model file: `EDGEINFER_FUZZ_MODEL`, else models/SmolLM2-135M-Instruct.Q4_1.gguf.
#![no_main]

use std::sync::OnceLock;

use edgeinfer::model::detok::IncrementalDecoder;
use edgeinfer::model::gguf::GgufFile;
use edgeinfer::model::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

/// GPT-2's byte-to-character map: the vocabulary's spelling of each byte.
fn byte_char(b: u8) -> char {
    let printable = (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable {
        return char::from(b);
    }
    let shifted = (0..=255u8)
        .filter(|&x| !((b'!'..=b'~').contains(&x) || (0xa1..=0xac).contains(&x) || x >= 0xae))
        .position(|x| x == b)
        .unwrap();
    char::from_u32(256 + shifted as u32).unwrap()
}

/// Whether each byte has a token.
fn encodable(tok: &Tokenizer) -> &'static [bool; 256] {
    static E: OnceLock<[bool; 256]> = OnceLock::new();
    E.get_or_init(|| {
        std::array::from_fn(|b| tok.token_id(&byte_char(b as u8).to_string()).is_some())
    })
}

fn tokenizer() -> &'static (Tokenizer, u32) {
    static T: OnceLock<(Tokenizer, u32)> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::env::var("EDGEINFER_FUZZ_MODEL")
            .unwrap_or_else(|_| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
        let f = GgufFile::open(std::path::Path::new(&path))
            .unwrap_or_else(|e| panic!("the fuzz target needs the default model: {e}"));
        let t = Tokenizer::from_gguf(&f).unwrap();
        let vocab = t.vocab_size() as u32;
        (t, vocab)
    })
}

fuzz_target!(|data: &[u8]| {
    let (tok, vocab) = tokenizer();
    if data.first() == Some(&0) {
        // Token ids, two bytes each.
        let ids: Vec<u32> = data[1..]
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) % vocab)
            .collect();
        let whole = tok.decode(&ids).unwrap();
        let mut d = IncrementalDecoder::new();
        let mut streamed = String::new();
        for &id in &ids {
            if let Some(delta) = d.push(tok, id).unwrap() {
                streamed.push_str(&delta);
            }
        }
        if let Some(rest) = d.flush(tok).unwrap() {
            streamed.push_str(&rest);
        }
        assert_eq!(streamed, whole, "ids {ids:?}");
    } else if let Ok(text) = std::str::from_utf8(data) {
        let ids = tok.encode(text, false).unwrap();
        if !text.contains('<') && text.bytes().all(|b| encodable(tok)[b as usize]) {
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
    }
});
