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
}

impl TextLogprobs {
    pub fn value<'a>(&mut self, items: impl IntoIterator<Item = Item<'a>>) -> Value {
        let (mut tokens, mut logprobs, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for item in items {
            let (text, width) = match item {
                Item::Unscored { text, shown } => {
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
                        _ => (text, text.chars().count()),
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
}
