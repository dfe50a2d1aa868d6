//! The tokenizer's unit tests.

use super::json::{split, TEKKEN_SPLIT};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

fn pieces(pattern: &str, text: &str) -> Vec<String> {
    let pre: PreTokenizerWrapper = serde_json::from_value(split(pattern)).unwrap();
    let mut s = PreTokenizedString::from(text);
    pre.pre_tokenize(&mut s).unwrap();
    s.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(p, _, _)| p.to_string())
        .collect()
}

#[test]
fn the_tekken_split_is_mistrals() {
    // Expected: Python's `regex.findall` with the pattern of Mistral's tokenizer.json.
    let cases: [(&str, &[&str]); 5] = [
        (
            "Hello World123 ABCdef",
            &["Hello", " World", "1", "2", "3", " ABCdef"],
        ),
        (
            "HTTPServer's JSONParser  \n\n  x",
            &["HTTPServer", "'s", " JSONParser", "  \n\n", " ", " x"],
        ),
        (
            "naïve café: 3.14159!\r\n// done",
            &[
                "naïve", " café", ":", " ", "3", ".", "1", "4", "1", "5", "9", "!\r\n//", " done",
            ],
        ),
        (
            "getHTTPResponseCode(42)",
            &["get", "HTTPResponse", "Code", "(", "4", "2", ")"],
        ),
        (
            "ÉCOLE über straße 你好",
            &["ÉCOLE", " über", " straße", " 你好"],
        ),
    ];
    for (text, want) in cases {
        assert_eq!(pieces(TEKKEN_SPLIT, text), want, "{text:?}");
    }
}
