//! The completions API's `logprobs` object in OpenAI's (legacy) shape: parallel lists of the
//! tokens, their logprobs, each position's most likely tokens (a map of text to logprob,
//! with the chosen token always in it: up to `logprobs + 1` entries), and each token's
//! character offset in the returned text. With `echo`, the prompt's tokens come first, the
//! very first with a null logprob: evaluation harnesses score text this way.

use serde_json::{json, Map, Value};

use crate::engine::request::LogprobInfo;

/// One token of the returned text.
pub enum Item<'a> {
    /// The prompt's first token: nothing comes before it to score it. `shown`: whether the
    /// echoed text holds it (a BOS the server added is not: it takes no characters).
    Unscored {
        text: &'a str,
        shown: bool,
    },
    Scored(&'a LogprobInfo),
    /// A scored token that takes `width` characters of the text instead of its text's.
    Narrow(&'a LogprobInfo, usize),
}

/// Builds the object, chunk by chunk when streamed: offsets run on across calls.
#[derive(Default)]
pub struct TextLogprobs {
    /// Characters of the text before the next token.
    offset: usize,
    /// The first bytes of a character the tokens so far have not finished.
    carry: Vec<u8>,
}

impl TextLogprobs {
    pub fn value<'a>(&mut self, items: impl IntoIterator<Item = Item<'a>>) -> Value {
        let (mut tokens, mut logprobs, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for item in items {
            let (text, width) = match item {
                Item::Unscored { text, shown } => {
                    self.carry.clear();
                    logprobs.push(Value::Null);
                    tops.push(Value::Null);
                    (text, if shown { text.chars().count() } else { 0 })
                }
                Item::Scored(info) | Item::Narrow(info, _) => {
                    logprobs.push(json!(info.chosen.logprob));
                    let mut top = Map::new();
                    // Most likely first: of two tokens with the same text, the likelier stays.
                    for t in info.top_logprobs.iter().chain([&info.chosen]) {
                        top.entry(t.token.clone()).or_insert(json!(t.logprob));
                    }
                    tops.push(Value::Object(top));
                    let text = info.chosen.token.as_str();
                    match item {
                        Item::Narrow(_, width) => (text, width),
                        _ => (text, self.added(&info.chosen.bytes)),
                    }
                }
            };
            tokens.push(json!(text));
            offsets.push(json!(self.offset));
            self.offset += width;
        }
        json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
               "text_offset": offsets})
    }

    /// The characters a token's `bytes` add to the text: a character split across tokens
    /// counts at the token that ends it (its text alone reads U+FFFD), and bytes no
    /// character can hold as the one U+FFFD the text shows for them.
    fn added(&mut self, bytes: &[u8]) -> usize {
        self.carry.extend_from_slice(bytes);
        let mut chars = 0;
        loop {
            let (valid, bad) = match std::str::from_utf8(&self.carry) {
                Ok(s) => (s.len(), None),
                Err(e) => (e.valid_up_to(), e.error_len()),
            };
            chars += String::from_utf8_lossy(&self.carry[..valid])
                .chars()
                .count();
            match bad {
                Some(n) => {
                    chars += 1;
                    self.carry.drain(..valid + n);
                }
                None => {
                    self.carry.drain(..valid);
                    return chars;
                }
            }
        }
    }
}

/// The prompt's tokens as items: the first unscored, the rest with their logprobs. `echo`:
/// the prompt's text as returned, which the offsets index: a first token it does not start
/// with (a BOS added to a text prompt) takes no characters, and the word after such a token
/// takes none for the space SentencePiece puts before a text's first word.
pub fn prompt_items<'a>(
    first: &'a str,
    scored: &'a [LogprobInfo],
    echo: &str,
) -> impl Iterator<Item = Item<'a>> {
    let shown = echo.starts_with(first);
    let echo_space = echo.starts_with(' ');
    let lead = move |(i, info): (usize, &'a LogprobInfo)| {
        let text = &info.chosen.token;
        if i == 0 && !shown && text.starts_with(' ') && !echo_space {
            Item::Narrow(info, text.chars().count() - 1)
        } else {
            Item::Scored(info)
        }
    };
    let first = Item::Unscored { text: first, shown };
    std::iter::once(first).chain(scored.iter().enumerate().map(lead))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::TokenLogprob;

    fn info(token: &str, logprob: f32, top: &[(&str, f32)]) -> LogprobInfo {
        let t = |token: &str, logprob| TokenLogprob {
            id: 0,
            token: token.into(),
            logprob,
            bytes: token.as_bytes().to_vec(),
        };
        LogprobInfo {
            chosen: t(token, logprob),
            top_logprobs: top.iter().map(|&(s, l)| t(s, l)).collect(),
        }
    }

    #[test]
    fn lists_run_parallel_and_offsets_continue_across_chunks() {
        let scored = [
            info(" é", -0.5, &[(" a", -0.25)]),
            info("b", -1.0, &[("b", -1.0)]),
        ];
        let mut lp = TextLogprobs::default();
        let v = lp.value(prompt_items("Hi", &scored, "Hi éb"));
        assert_eq!(v["tokens"], json!(["Hi", " é", "b"]));
        assert_eq!(v["token_logprobs"], json!([null, -0.5, -1.0]));
        // The chosen token joins the alternatives (once).
        assert_eq!(
            v["top_logprobs"],
            json!([null, {" a": -0.25, " é": -0.5}, {"b": -1.0}])
        );
        // Characters, not bytes: " é" is two.
        assert_eq!(v["text_offset"], json!([0, 2, 4]));
        let next = lp.value([Item::Scored(&scored[1])]);
        assert_eq!(next["text_offset"], json!([5]));
        // A BOS the echoed text does not hold takes no characters.
        let v = TextLogprobs::default().value(prompt_items("<s>", &scored, " éb"));
        assert_eq!(v["tokens"], json!(["<s>", " é", "b"]));
        assert_eq!(v["text_offset"], json!([0, 0, 2]));
        // Nor the space SentencePiece gives the word after it ("éb" typed, " é" scored).
        let v = TextLogprobs::default().value(prompt_items("<s>", &scored, "éb"));
        assert_eq!(v["text_offset"], json!([0, 0, 1]));
    }

    #[test]
    fn a_character_split_across_tokens_counts_once_at_its_end() {
        // "a😀b" with the emoji's four bytes in two tokens, each alone U+FFFD text.
        let byte_token = |bytes: &[u8]| {
            let mut i = info("", -1.0, &[]);
            i.chosen.token = String::from_utf8_lossy(bytes).into_owned();
            i.chosen.bytes = bytes.to_vec();
            i
        };
        let emoji = "😀".as_bytes();
        let toks = [
            info("a", -1.0, &[]),
            byte_token(&emoji[..2]),
            byte_token(&emoji[2..]),
            info("b", -1.0, &[]),
            // A byte no character has: one U+FFFD in the text.
            byte_token(&[0xff]),
            info("c", -1.0, &[]),
        ];
        let mut lp = TextLogprobs::default();
        let v = lp.value(toks.iter().take(2).map(Item::Scored));
        // Offsets go on across chunks, the character's first bytes carried.
        let w = lp.value(toks.iter().skip(2).map(Item::Scored));
        assert_eq!(v["text_offset"], json!([0, 1]));
        assert_eq!(w["text_offset"], json!([1, 2, 3, 4]));
    }
}
