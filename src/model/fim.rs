//! Fill-in-the-middle: the tokens a code model was trained with to write the text between a
//! prefix and a suffix, found as llama.cpp finds them (the `tokenizer.ggml.fim_*_token_id`
//! metadata, else the tokens' texts), and the prompt they make.
//!
//! Two layouts: prefix-suffix-middle (`<PRE>prefix<SUF>suffix<MID>`, generation follows the
//! middle token: CodeLlama, DeepSeek-Coder, StarCoder-style and Qwen-style vocabularies), and
//! Mistral's (`[SUFFIX]suffix[PREFIX]prefix`, generation continues the prefix: Codestral).

use super::Tokenizer;
use crate::error::ModelError;

/// Where the suffix goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FimOrder {
    /// Prefix, suffix, then the middle token.
    PrefixSuffixMiddle,
    /// Mistral's: the suffix first, then the prefix, which the reply continues.
    SuffixPrefix,
}

/// A vocabulary's fill-in-the-middle tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fim {
    pub order: FimOrder,
    pub prefix: u32,
    pub suffix: u32,
    /// Only in [`FimOrder::PrefixSuffixMiddle`].
    pub middle: Option<u32>,
    /// A repository-level prompt's repository name and file separator (Qwen2.5-Coder's).
    pub repo: Option<u32>,
    pub file_sep: Option<u32>,
    /// Tokens that end a fill besides EOS: padding, the repository and file separators,
    /// CodeLlama's `<EOT>` (llama.cpp ends generation at them).
    pub ends: Vec<u32>,
}

/// Token texts by role, in llama.cpp's order of preference.
const PREFIX_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const SUFFIX_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const MIDDLE_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const REPO_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FILE_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
const EOT_TEXTS: &[&str] = &["<EOT>", "▁<EOT>"];

/// The project name a repository-level prompt gives (llama.cpp's).
const PROJECT: &str = "myproject";
/// The name of the file being filled in a repository-level prompt (llama.cpp's).
const CURRENT_FILE: &str = "filename";
/// A character that joins no piece: what a text is tokenized after to see it mid-line.
const MARKER: &str = "\u{263A}";
/// What separates extra context chunks in a vocabulary without a file separator.
const SNIPPET: &str = "\n\n--- snippet ---\n\n";

impl Fim {
    /// The vocabulary's fill-in-the-middle tokens, if it has a complete set: `meta` reads a
    /// token id from the metadata, `token` looks a text up in the vocabulary; ids at or past
    /// `vocab` are ignored.
    pub fn detect(
        meta: impl Fn(&str) -> Option<u32>,
        token: impl Fn(&str) -> Option<u32>,
        vocab: usize,
    ) -> Option<Self> {
        let valid = |id: Option<u32>| id.filter(|&t| (t as usize) < vocab);
        let find = |keys: &[&str], texts: &[&str]| {
            keys.iter()
                .find_map(|k| valid(meta(&format!("tokenizer.ggml.{k}_token_id"))))
                .or_else(|| texts.iter().find_map(|t| valid(token(t))))
        };
        let psm = (
            find(&["fim_pre", "prefix"], PREFIX_TEXTS),
            find(&["fim_suf", "suffix"], SUFFIX_TEXTS),
            find(&["fim_mid", "middle"], MIDDLE_TEXTS),
        );
        let (order, prefix, suffix, middle) = match psm {
            (Some(p), Some(s), Some(m)) => (FimOrder::PrefixSuffixMiddle, p, s, Some(m)),
            _ => match (valid(token("[PREFIX]")), valid(token("[SUFFIX]"))) {
                (Some(p), Some(s)) => (FimOrder::SuffixPrefix, p, s, None),
                _ => return None,
            },
        };
        let repo = find(&["fim_rep"], REPO_TEXTS);
        let file_sep = find(&["fim_sep"], FILE_SEP_TEXTS);
        let pad = find(&["fim_pad"], PAD_TEXTS);
        let eot = EOT_TEXTS.iter().find_map(|t| valid(token(t)));
        let mut ends: Vec<u32> = [pad, repo, file_sep, eot].into_iter().flatten().collect();
        ends.sort_unstable();
        ends.dedup();
        Some(Self {
            order,
            prefix,
            suffix,
            middle,
            repo,
            file_sep,
            ends,
        })
    }

    /// The prompt that asks for the text between `prefix` and `suffix` (token ids, without
    /// BOS), after `context` (from [`Self::context`]): BOS when the model asks for one, the
    /// context, then the layout's tokens.
    pub fn prompt(
        &self,
        tok: &Tokenizer,
        context: &[u32],
        prefix: &[u32],
        suffix: &[u32],
    ) -> Vec<u32> {
        let mut out = Vec::with_capacity(context.len() + prefix.len() + suffix.len() + 4);
        if tok.add_bos {
            out.extend(tok.bos);
        }
        out.extend_from_slice(context);
        match self.order {
            FimOrder::PrefixSuffixMiddle => {
                out.push(self.prefix);
                out.extend_from_slice(prefix);
                out.push(self.suffix);
                out.extend_from_slice(suffix);
                out.extend(self.middle);
            }
            FimOrder::SuffixPrefix => {
                out.push(self.suffix);
                out.extend_from_slice(suffix);
                out.push(self.prefix);
                out.extend_from_slice(prefix);
            }
        }
        out
    }

    /// The suffix's tokens. Mistral's layout writes it right after `[SUFFIX]`, as text goes
    /// on mid-line: without the space SentencePiece puts before a text (`[SUFFIX]return`,
    /// not `[SUFFIX]▁return`, as Mistral's own tokenizer writes it); the other layouts take
    /// it as llama.cpp does. Code is text ([`Tokenizer::encode_plain`]).
    pub fn suffix_tokens(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>, ModelError> {
        if self.order == FimOrder::PrefixSuffixMiddle || text.is_empty() {
            return tok.encode_plain(text);
        }
        // Tokenized after a character no piece merges with, which is then taken off.
        let marker = tok.encode_plain(MARKER)?;
        let with = tok.encode_plain(&format!("{MARKER}{text}"))?;
        Ok(match with.strip_prefix(marker.as_slice()) {
            Some(rest) if !marker.is_empty() => rest.to_vec(),
            _ => tok.encode_plain(text)?,
        })
    }

    /// Other files' text put before the fill, as llama.cpp's `/infill` puts its `input_extra`:
    /// with a repository token, `<repo>myproject\n` first; with a file separator,
    /// `<file_sep>name\ntext` for each chunk and `<file_sep>filename\n` for the file being
    /// filled (a repository-level prompt); without one, each chunk after a `--- snippet ---`
    /// line. Names and texts are text only ([`Tokenizer::encode_plain`]). Each chunk's
    /// tokens come apart, so the oldest can be left out whole.
    pub fn context(
        &self,
        tok: &Tokenizer,
        chunks: &[(String, String)],
    ) -> Result<ContextTokens, ModelError> {
        let mut head = Vec::new();
        if let Some(repo) = self.repo {
            head.push(repo);
            head.extend(tok.encode_plain(&format!("{PROJECT}\n"))?);
        }
        let mut parts = Vec::with_capacity(chunks.len());
        for (name, text) in chunks {
            let mut part = match self.file_sep {
                Some(sep) => {
                    let mut p = vec![sep];
                    p.extend(tok.encode_plain(&format!("{name}\n"))?);
                    p
                }
                None => tok.encode_plain(SNIPPET)?,
            };
            part.extend(tok.encode_plain(text)?);
            parts.push(part);
        }
        let mut tail = Vec::new();
        if let Some(sep) = self.file_sep {
            tail.push(sep);
            tail.extend(tok.encode_plain(&format!("{CURRENT_FILE}\n"))?);
        }
        Ok(ContextTokens { head, parts, tail })
    }
}

/// Cuts a fill's prefix (from its start) and suffix (from its end) to `room` tokens in all,
/// the suffix to a quarter of it when both must give (llama.cpp's 3:1); whether it cut.
pub fn fit_fill(prefix: &mut Vec<u32>, suffix: &mut Vec<u32>, room: usize) -> bool {
    if prefix.len() + suffix.len() <= room {
        return false;
    }
    let keep_suffix = suffix.len().min(room / 4);
    let keep_prefix = prefix.len().min(room - keep_suffix);
    let keep_suffix = suffix.len().min(room - keep_prefix);
    prefix.drain(..prefix.len() - keep_prefix);
    suffix.truncate(keep_suffix);
    true
}

/// A fill's extra context as tokens: a head, one part per chunk (oldest first) and a tail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextTokens {
    pub head: Vec<u32>,
    pub parts: Vec<Vec<u32>>,
    pub tail: Vec<u32>,
}

impl ContextTokens {
    /// The context with the newest chunks that fit in `room` tokens (the head and tail
    /// always), and how many chunks were left out.
    pub fn fit(&self, room: usize) -> (Vec<u32>, usize) {
        let mut left = room.saturating_sub(self.head.len() + self.tail.len());
        let mut kept = 0;
        for part in self.parts.iter().rev() {
            if part.len() > left {
                break;
            }
            left -= part.len();
            kept += 1;
        }
        let first = self.parts.len() - kept;
        let mut out = self.head.clone();
        out.extend(self.parts[first..].iter().flatten());
        out.extend_from_slice(&self.tail);
        (out, first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(table: &'static [(&'static str, u32)]) -> impl Fn(&str) -> Option<u32> {
        move |t| table.iter().find(|(k, _)| *k == t).map(|&(_, id)| id)
    }

    #[test]
    fn metadata_comes_before_texts_and_ids_past_the_vocabulary_are_ignored() {
        let tokens = lookup(&[
            ("<fim_prefix>", 1),
            ("<fim_suffix>", 2),
            ("<fim_middle>", 3),
            ("<fim_pad>", 4),
        ]);
        let meta = lookup(&[
            ("tokenizer.ggml.fim_pre_token_id", 10),
            ("tokenizer.ggml.fim_mid_token_id", 999),
        ]);
        let f = Fim::detect(meta, tokens, 100).unwrap();
        assert_eq!(f.order, FimOrder::PrefixSuffixMiddle);
        assert_eq!((f.prefix, f.suffix, f.middle), (10, 2, Some(3)));
        assert_eq!(f.ends, vec![4]);
        assert_eq!((f.repo, f.file_sep), (None, None));
    }

    #[test]
    fn codellama_qwen_and_mistral_vocabularies() {
        let none = |_: &str| None;
        let codellama = lookup(&[
            ("▁<PRE>", 32007),
            ("▁<SUF>", 32008),
            ("▁<MID>", 32009),
            ("▁<EOT>", 32010),
        ]);
        let f = Fim::detect(none, codellama, 32016).unwrap();
        assert_eq!((f.prefix, f.suffix, f.middle), (32007, 32008, Some(32009)));
        assert_eq!(f.ends, vec![32010]);
        let qwen = lookup(&[
            ("<|fim_prefix|>", 5),
            ("<|fim_middle|>", 6),
            ("<|fim_suffix|>", 7),
            ("<|fim_pad|>", 8),
            ("<|repo_name|>", 9),
            ("<|file_sep|>", 10),
        ]);
        let f = Fim::detect(none, qwen, 20).unwrap();
        assert_eq!((f.prefix, f.suffix, f.middle), (5, 7, Some(6)));
        assert_eq!((f.repo, f.file_sep), (Some(9), Some(10)));
        assert_eq!(f.ends, vec![8, 9, 10]);
        let mistral = lookup(&[("[PREFIX]", 11), ("[SUFFIX]", 12), ("[MIDDLE]", 13)]);
        let f = Fim::detect(none, mistral, 20).unwrap();
        assert_eq!(f.order, FimOrder::SuffixPrefix);
        assert_eq!((f.prefix, f.suffix, f.middle), (11, 12, None));
        // An incomplete set is no set; a vocabulary without any has none.
        assert!(
            Fim::detect(none, lookup(&[("<fim_prefix>", 1), ("<fim_suffix>", 2)]), 9).is_none()
        );
        assert!(Fim::detect(none, none, 9).is_none());
    }

    #[test]
    fn a_fill_too_long_keeps_the_prefixs_end_and_the_suffixs_start() {
        let fit = |p: usize, s: usize, room: usize| {
            let (mut prefix, mut suffix): (Vec<u32>, Vec<u32>) =
                ((0..p as u32).collect(), (100..100 + s as u32).collect());
            let cut = fit_fill(&mut prefix, &mut suffix, room);
            (prefix, suffix, cut)
        };
        assert_eq!(fit(3, 2, 5), (vec![0, 1, 2], vec![100, 101], false));
        // 3:1 when both are long; the prefix keeps its end, the suffix its start.
        assert_eq!(
            fit(10, 10, 8),
            (vec![4, 5, 6, 7, 8, 9], vec![100, 101], true)
        );
        // A short side leaves its room to the other.
        assert_eq!(fit(1, 10, 8), (vec![0], (100..107).collect(), true));
        assert_eq!(fit(10, 1, 8), ((3..10).collect(), vec![100], true));
        assert_eq!(fit(5, 5, 0), (vec![], vec![], true));
    }

    #[test]
    fn the_newest_chunks_that_fit_are_kept_whole() {
        let c = ContextTokens {
            head: vec![1],
            parts: vec![vec![2, 2, 2], vec![3, 3], vec![4]],
            tail: vec![5],
        };
        assert_eq!(c.fit(100), (vec![1, 2, 2, 2, 3, 3, 4, 5], 0));
        assert_eq!(c.fit(5), (vec![1, 3, 3, 4, 5], 1));
        // An older chunk that would fit after a newer one that does not is not taken.
        assert_eq!(c.fit(4), (vec![1, 4, 5], 2));
        assert_eq!(c.fit(0), (vec![1, 5], 3));
    }
}
