//! The `tokenizer.json` a GGUF file's tokenizer metadata describes: byte-level BPE (`gpt2`)
//! with its pre-tokenizer, or SentencePiece-style BPE (`llama`) with merges from the scores.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use super::super::gguf::GgufFile;
use super::Result;
use crate::error::ModelError;

/// Llama 3's pre-tokenizer split (`llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken pre-tokenizer split (Mistral Nemo, Mistral Small 3 and later), as its
/// `tokenizer.json` writes it: letters split at case changes, each digit alone.
pub(super) const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regex split of a byte-level BPE pre-tokenizer.
pub(super) fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

pub(super) fn string_array(f: &GgufFile, key: &str) -> Result<Vec<String>> {
    let bad = |reason: &str| ModelError::BadMetadata {
        key: key.into(),
        reason: reason.into(),
    };
    let values = f
        .metadata(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.into()))?
        .to_vec()
        .map_err(|_| bad("not an array"))?;
    values
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(bad("not an array of strings")),
        })
        .collect()
}

pub(super) fn i32_array(f: &GgufFile, key: &str) -> Result<Vec<i32>> {
    array_of(f, key, "integers", |v| match v {
        Value::I32(x) => Some(*x),
        Value::U32(x) => Some(*x as i32),
        Value::I8(x) => Some(*x as i32),
        Value::U8(x) => Some(*x as i32),
        _ => None,
    })
}

fn f32_array(f: &GgufFile, key: &str) -> Result<Vec<f32>> {
    array_of(f, key, "floats", |v| v.to_f32().ok())
}

/// The array at `key`, each value through `each` (an error naming `what` it must hold).
fn array_of<T>(
    f: &GgufFile,
    key: &str,
    what: &str,
    each: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>> {
    let bad = || ModelError::BadMetadata {
        key: key.into(),
        reason: format!("not an array of {what}"),
    };
    let values = f
        .metadata(key)
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(bad)?;
    values.iter().map(|v| each(v).ok_or_else(bad)).collect()
}

fn vocab_json(tokens: &[String]) -> Json {
    let map: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    Json::Object(map)
}

/// A byte-level BPE (`tokenizer.ggml.model = gpt2`), pre-tokenized as `pre` says.
pub(super) fn gpt2_json(f: &GgufFile, tokens: &[String], pre: &str) -> Result<Json> {
    let merges: Vec<Json> = string_array(f, "tokenizer.ggml.merges")?
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.merges".into(),
                reason: format!("merge `{m}` is not two tokens separated by a space"),
            }),
        })
        .collect::<Result<_>>()?;
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let (pre_tokenizer, ignore_merges) = match pre {
        "default" | "gpt-2" | "gpt2" => (byte_level(true), false),
        "smollm" | "starcoder" | "refact" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            true,
        ),
        "tekken" => (
            json!({"type": "Sequence", "pretokenizers": [split(TEKKEN_SPLIT), byte_level(false)]}),
            true,
        ),
        other => return Err(ModelError::UnknownPreTokenizer(other.to_string())),
    };
    Ok(json!({
        "version": "1.0",
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": ignore_merges, "vocab": vocab_json(tokens), "merges": merges},
    }))
}

/// A SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model = llama`, Llama 2 and
/// Mistral). Merges are derived from the token scores, as SentencePiece merges the pair whose
/// result scores highest.
pub(super) fn spm_json(f: &GgufFile, tokens: &[String]) -> Result<Json> {
    let scores = f32_array(f, "tokenizer.ggml.scores")?;
    if scores.len() != tokens.len() {
        return Err(ModelError::BadMetadata {
            key: "tokenizer.ggml.scores".into(),
            reason: format!("{} scores for {} tokens", scores.len(), tokens.len()),
        });
    }
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    // Splits cost the square of a piece's length: one past any real vocabulary's (a crafted
    // file's megabyte token) is not split, so it cannot stall loading.
    let splittable = tokens.iter().zip(&scores).filter(|(t, _)| t.len() <= 256);
    for (merged, score) in splittable {
        for (split, _) in merged.char_indices().skip(1) {
            let (a, b) = merged.split_at(split);
            if let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) {
                merges.push((*score, ia, ib, a, b));
            }
        }
    }
    // Highest-scoring result first; ties broken by the parts' ids, like transformers does.
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges: Vec<Json> = merges.iter().map(|m| json!([m.3, m.4])).collect();
    let add_space_prefix = f
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let unk = f
        .opt_u32("tokenizer.ggml.unknown_token_id")?
        .and_then(|i| tokens.get(i as usize).cloned());
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab_json(tokens), "merges": merges},
    }))
}
