//! The tokenizer, built from GGUF metadata (`tokenizer.ggml.*`) with the `tokenizers` crate,
//! or loaded from an explicit `tokenizer.json`.
//!
//! Knows vocabularies, merges, pre-tokenizers and special tokens; never the model's tensors.
//! Invariant: text that spells a control token (`<|im_start|>`) encodes to that one token, as
//! in llama.cpp, and an unknown `tokenizer.ggml.pre` is refused rather than guessed (a file
//! from before the key existed is split as Llama 3's or GPT-2's, with a warning).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use super::fim::Fim;
use super::gguf::GgufFile;
use crate::error::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

#[path = "tokenizer_json.rs"]
mod json;
use json::{gpt2_json, i32_array, spm_json, string_array};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Texts of tokens that end a turn or a text in common chat formats (llama.cpp's EOG list,
/// for the families served here). A token that spells one is a control token whatever the
/// file types it as (as llama.cpp overrides it): older conversions type `<|im_end|>` as a
/// user-defined word.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<EOT>",
    "_<EOT>",
];

/// An end-of-text spelling that ends a reply only when the file types it control: some
/// vocabularies (Qwen's, Gemma's) have `</s>` as an ordinary word, which HTML and XML use.
const CONTROL_END_TEXTS: &[&str] = &["</s>"];

/// Byte-level pre-tokenizers whose models take a BOS unless the metadata says otherwise
/// (Llama 3's group and Tekken, as llama.cpp).
const BOS_BY_DEFAULT_PRE: &[&str] = &["llama-bpe", "llama3", "llama-v3", "tekken"];

/// A tokenizer plus what the model's metadata says about BOS, EOS and end-of-turn tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether a BOS token is prepended when encoding a prompt.
    pub add_bos: bool,
    /// Whether the model asks for an EOS token after a text (embedding models that pool
    /// the last token): `/v1/embeddings` appends it.
    pub add_eos: bool,
    /// Tokens that end generation: EOS, EOT, the end-of-turn control tokens and a code
    /// model's fill-in-the-middle ends.
    pub stop_ids: Vec<u32>,
    /// The fill-in-the-middle tokens, when the vocabulary has them.
    pub fim: Option<Fim>,
    /// Control tokens (sorted): they encode from their text but decode to nothing.
    control_ids: Vec<u32>,
    /// A plain token one token's text is decoded after, and that token's own text (see
    /// [`Self::token_text_decoded`]).
    probe: Option<(u32, String)>,
    /// The bytes each token id stands for (see [`Self::token_bytes_of`]), built on first use.
    bytes: Arc<OnceLock<Vec<Vec<u8>>>>,
    /// Whether the decoder is GPT-2's byte-level one (see [`Self::byte_level_decoder`]).
    byte_level: bool,
    /// A copy that reads control-token spellings as text (see [`Self::encode_plain`]),
    /// made on first use.
    plain: Arc<OnceLock<tokenizers::Tokenizer>>,
}

/// What the metadata says about special tokens, independent of how text is split.
#[derive(Default)]
struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    stop_ids: Vec<u32>,
    control_ids: Vec<u32>,
}

impl Specials {
    fn from_gguf(f: &GgufFile, tokens: &[String], types: &[i32]) -> Result<Self> {
        let model = f.get_str("tokenizer.ggml.model").unwrap_or("gpt2");
        // A special token's id outside the vocabulary is none (as llama.cpp treats it).
        let id = |key: &str| -> Result<Option<u32>> {
            let id = f.opt_u32(key)?;
            let out = id.filter(|&id| id as usize >= tokens.len());
            if let Some(id) = out {
                tracing::warn!(
                    key,
                    id,
                    "a special token id outside the vocabulary is ignored"
                );
            }
            Ok(id.filter(|_| out.is_none()))
        };
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let mut stop_ids: Vec<u32> = [eos, id("tokenizer.ggml.eot_token_id")?]
            .into_iter()
            .flatten()
            .collect();
        let mut control_ids = Vec::new();
        for (id, (text, &ty)) in tokens.iter().zip(types).enumerate() {
            if ty == TOKEN_TYPE_CONTROL {
                control_ids.push(id as u32);
                let text = text.as_str();
                if END_OF_TURN_TEXTS.contains(&text) || CONTROL_END_TEXTS.contains(&text) {
                    stop_ids.push(id as u32);
                }
            }
        }
        let pre = pre_tokenizer(f, tokens);
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos,
            add_bos: f
                .opt_bool("tokenizer.ggml.add_bos_token")?
                // SentencePiece vocabularies, Llama 3's and Tekken add BOS unless told (as
                // llama.cpp).
                .unwrap_or(model == "llama" || BOS_BY_DEFAULT_PRE.contains(&pre.as_str())),
            add_eos: f.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            stop_ids,
            control_ids,
        })
    }
}

/// The vocabulary and its token types, with an end-of-turn text typed control whatever the
/// file says.
fn tokens_and_types(f: &GgufFile) -> Result<(Vec<String>, Vec<i32>)> {
    let tokens = string_array(f, "tokenizer.ggml.tokens")?;
    let mut types = match f.metadata("tokenizer.ggml.token_type") {
        Some(_) => i32_array(f, "tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    for (id, (text, ty)) in tokens.iter().zip(types.iter_mut()).enumerate() {
        if *ty != TOKEN_TYPE_CONTROL && END_OF_TURN_TEXTS.contains(&text.as_str()) {
            tracing::warn!(
                id,
                token = text.as_str(),
                "an end-of-turn token not typed control is made one (as llama.cpp does)"
            );
            *ty = TOKEN_TYPE_CONTROL;
        }
    }
    Ok((tokens, types))
}

/// A byte-level vocabulary's pre-tokenizer (`tokenizer.ggml.pre`). Files converted before
/// the key existed have none: a Llama 3 vocabulary (it has `<|begin_of_text|>`) is split as
/// Llama 3's, any other as GPT-2's (the tokenizer warns).
fn pre_tokenizer(f: &GgufFile, tokens: &[String]) -> String {
    if let Ok(pre) = f.get_str("tokenizer.ggml.pre") {
        return pre.to_string();
    }
    let llama3 = tokens.iter().any(|t| t == "<|begin_of_text|>");
    let guess = if llama3 { "llama-bpe" } else { "default" };
    guess.to_string()
}

impl Tokenizer {
    /// Builds the tokenizer described by the GGUF metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model = f.get_str("tokenizer.ggml.model")?;
        let (tokens, types) = tokens_and_types(f)?;
        let json = match model {
            "gpt2" => {
                let pre = pre_tokenizer(f, &tokens);
                if f.metadata("tokenizer.ggml.pre").is_none() {
                    tracing::warn!(
                        pre_tokenizer = pre.as_str(),
                        "the model has no `tokenizer.ggml.pre`; its text is split as this \
                         pre-tokenizer's, which may differ from how it was trained (pass \
                         --tokenizer with its tokenizer.json to be sure)"
                    );
                }
                gpt2_json(f, &tokens, &pre)?
            }
            "llama" => spm_json(f, &tokens)?,
            other => return Err(ModelError::UnsupportedTokenizer(other.to_string())),
        };
        let mut inner = tokenizers::Tokenizer::from_str(&json.to_string())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let added: Vec<tokenizers::AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(text, &ty)| {
                tokenizers::AddedToken::from(text.clone(), ty == TOKEN_TYPE_CONTROL)
                    .normalized(false)
            })
            .collect();
        inner.add_special_tokens(&added);
        let specials = Specials::from_gguf(f, &tokens, &types)?;
        Ok(Self::with_specials(inner, specials).with_fim(f))
    }

    /// Loads a `tokenizer.json`; BOS, EOS and end-of-turn tokens still come from the GGUF
    /// metadata when it has them, else from the file's special tokens.
    pub fn from_file(path: &Path, f: &GgufFile) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut specials = match tokens_and_types(f) {
            Ok((tokens, types)) => Specials::from_gguf(f, &tokens, &types)?,
            Err(_) => Specials::default(),
        };
        if specials.stop_ids.is_empty() {
            specials.stop_ids = END_OF_TURN_TEXTS
                .iter()
                .chain(CONTROL_END_TEXTS)
                .filter_map(|t| inner.token_to_id(t))
                .collect();
            specials.stop_ids.sort_unstable();
            specials.stop_ids.dedup();
        }
        Ok(Self::with_specials(inner, specials).with_fim(f))
    }

    /// Finds the fill-in-the-middle tokens; their ends end every generation, and all of
    /// them are control tokens whatever the file's types say (as llama.cpp makes them):
    /// never read from code's text, never shown.
    fn with_fim(mut self, f: &GgufFile) -> Self {
        let meta = |k: &str| f.opt_u32(k).ok().flatten();
        self.fim = Fim::detect(meta, |t| self.inner.token_to_id(t), self.vocab_size());
        let Some(fim) = &self.fim else { return self };
        self.stop_ids.extend(&fim.ends);
        self.stop_ids.sort_unstable();
        self.stop_ids.dedup();
        let ids = [
            Some(fim.prefix),
            Some(fim.suffix),
            fim.middle,
            fim.repo,
            fim.file_sep,
        ];
        let promoted: Vec<(u32, String)> = ids
            .into_iter()
            .flatten()
            .chain(fim.ends.iter().copied())
            .filter(|&id| !self.is_control(id))
            .filter_map(|id| Some((id, self.inner.id_to_token(id)?)))
            .collect();
        let added: Vec<tokenizers::AddedToken> = promoted
            .iter()
            .map(|(_, text)| tokenizers::AddedToken::from(text.clone(), true).normalized(false))
            .collect();
        self.inner.add_special_tokens(&added);
        self.control_ids.extend(promoted.iter().map(|&(id, _)| id));
        self.control_ids.sort_unstable();
        self.control_ids.dedup();
        self
    }

    fn with_specials(inner: tokenizers::Tokenizer, s: Specials) -> Self {
        // "a" as a word: its last token decodes the same on its own and first in a text.
        let probe = inner
            .encode_fast("a", false)
            .ok()
            .and_then(|e| e.get_ids().last().copied())
            .and_then(|p| Some((p, inner.decode(&[p], false).ok()?)));
        let byte_level = inner
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|d| d.contains("ByteLevel"));
        Self {
            byte_level,
            inner,
            bos: s.bos,
            eos: s.eos,
            add_bos: s.add_bos,
            add_eos: s.add_eos,
            stop_ids: s.stop_ids,
            fim: None,
            control_ids: s.control_ids,
            probe,
            bytes: Arc::default(),
            plain: Arc::default(),
        }
    }

    /// Encodes `text`; control-token text becomes the control token. With `add_bos`, a BOS
    /// token is prepended when the model's metadata asks for one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Encodes `text` as text only, without BOS: a control token's spelling in it is text
    /// (llama.cpp's `parse_special = false`), as code may hold `<|endoftext|>`.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let plain = self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let enc = plain
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids` to text; control tokens are dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Decodes `ids` to text, control tokens as their text (`<|im_start|>`): what a
    /// prompt of these ids reads as.
    pub fn decode_with_control(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The text of one token as stored in the vocabulary (e.g. `<|im_end|>`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The text one token stands for mid-text (control tokens: their vocabulary text). It is
    /// decoded after a plain token and that token's text taken off: SentencePiece decoders
    /// drop the space a text starts with, which would turn `▁world` into `world`.
    pub fn token_text_decoded(&self, id: u32) -> String {
        if self.is_control(id) {
            return self.token_text(id).unwrap_or_default();
        }
        let alone = || self.inner.decode(&[id], false).unwrap_or_default();
        let Some((probe, first)) = &self.probe else {
            return alone();
        };
        match self.inner.decode(&[*probe, id], false) {
            Ok(both) => match both.strip_prefix(first.as_str()) {
                Some(rest) => rest.to_string(),
                None => alone(),
            },
            Err(_) => alone(),
        }
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_control(&self, id: u32) -> bool {
        self.control_ids.binary_search(&id).is_ok()
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.binary_search(&id).is_ok()
    }

    /// The bytes token `id` stands for mid-text: a byte-level piece mapped back through
    /// GPT-2's byte alphabet, a SentencePiece piece with `▁` as a space and `<0xHH>` as its
    /// byte, an added or control token's own text. A token that holds part of a character
    /// has those bytes (its decoded text would read U+FFFD); a text's tokens' bytes joined
    /// are the text's bytes (with SentencePiece, after the space it puts first).
    pub fn token_bytes_of(&self, id: u32) -> Vec<u8> {
        self.byte_table()
            .get(id as usize)
            .cloned()
            .unwrap_or_default()
    }

    /// Every token's bytes, indexed by id, for grammar engines: as
    /// [`Self::token_bytes_of`], with control tokens marked by a leading `0xFF` byte (no
    /// valid UTF-8 text starts with it), so no text can spell them.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let added = self.inner.get_added_tokens_decoder();
        let mut table = self.byte_table().to_vec();
        for (id, b) in table.iter_mut().enumerate() {
            let id = id as u32;
            let special = self.is_control(id) || added.get(&id).is_some_and(|t| t.special);
            if special && !b.is_empty() {
                b.insert(0, 0xFF);
            }
        }
        table
    }

    /// Whether the decoder is GPT-2's byte-level one (each invalid byte its own U+FFFD);
    /// SentencePiece's byte fallback replaces a whole run of bytes with one that is invalid.
    pub fn byte_level_decoder(&self) -> bool {
        self.byte_level
    }

    pub fn byte_table(&self) -> &[Vec<u8>] {
        self.bytes.get_or_init(|| {
            let byte_level = self.byte_level_decoder();
            let unbyte = byte_level.then(gpt2_byte_decoder);
            let added = self.inner.get_added_tokens_decoder();
            (0..self.vocab_size() as u32)
                .map(|id| {
                    let Some(piece) = self.inner.id_to_token(id) else {
                        return Vec::new();
                    };
                    if self.is_control(id) || added.contains_key(&id) {
                        return piece.into_bytes();
                    }
                    match &unbyte {
                        Some(map) => piece
                            .chars()
                            .map(|c| map.get(&c).copied())
                            .collect::<Option<Vec<u8>>>()
                            .unwrap_or_else(|| piece.clone().into_bytes()),
                        None => spm_piece_bytes(&piece),
                    }
                })
                .collect()
        })
    }
}

/// GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the other
/// 68 bytes for the code points from U+0100 on, in byte order.
fn gpt2_byte_decoder() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are chars. This is a bug.")
        };
        map.insert(c, b);
    }
    map
}

/// A SentencePiece piece as bytes: `<0xHH>` is that byte, `▁` a space.
fn spm_piece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece
        .strip_prefix("<0x")
        .and_then(|p| p.strip_suffix('>'))
        .filter(|h| h.len() == 2)
    {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
#[path = "tokenizer_tests.rs"]
mod tests;
