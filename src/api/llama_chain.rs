//! llama-server's other sampler settings (`typical_p`, `top_n_sigma`, `xtc_*`,
//! `dynatemp_*`, `repeat_last_n`, `mirostat*`, `min_keep`, `dry_*`) and the order
//! `samplers` gives, read from a `/completion` or `/infill` body (or an OpenAI one that
//! sends them) into the engine's [`ChainParams`]; DRY's sequence breakers made into token
//! sequences as llama.cpp makes them.

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use super::error::ApiError;
use super::llama_sampling::sampler_chain;
use super::response::Surface;
use super::Ready;
use crate::engine::chain::{ChainParams, DryParams, Step};
use crate::engine::sampler::{SamplingError, SamplingParams};
use crate::model::Tokenizer;

/// The most DRY sequence breakers a request may give (each costs a pass over the vocabulary).
const MAX_BREAKERS: usize = 64;
/// llama.cpp's limits: a breaker's first 40 bytes count, and a tail's first 20 tokens.
const BREAKER_BYTES: usize = 40;
const TAIL_TOKENS: usize = 20;

/// Breaker sets made lately (a pass over the vocabulary each), by tokenizer and strings:
/// most requests send llama.cpp's defaults.
type Made = (usize, Vec<String>, Arc<Vec<(u32, Vec<u32>)>>);
static MADE: Mutex<Vec<Made>> = Mutex::new(Vec::new());
const MADE_KEPT: usize = 8;

/// The fields only llama.cpp's chain reads: on OpenAI's routes, a request that sends one is
/// sampled by the chain, as llama-server samples its OpenAI routes.
const CHAIN_ONLY: [&str; 18] = [
    "samplers",
    "typical_p",
    "top_n_sigma",
    "xtc_probability",
    "xtc_threshold",
    "dynatemp_range",
    "dynatemp_exponent",
    "repeat_last_n",
    "penalty_last_n",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "min_keep",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "dry_sequence_breakers",
];

/// Samples `sampling`'s request with llama.cpp's chain where it should be: on llama.cpp's
/// own endpoints always, on OpenAI's when the body sends a field only the chain reads (the
/// OpenAI fields keep their defaults there; top-p and min-p then see the distribution
/// before the temperature, as llama.cpp orders them).
pub(super) async fn apply(
    sampling: &mut SamplingParams,
    surface: &Surface,
    ready: &Ready,
    body: &Value,
) -> Result<(), ApiError> {
    let asked = match surface {
        Surface::LlamaCpp(_) => true,
        Surface::OpenAi => CHAIN_ONLY.iter().any(|k| body.get(*k).is_some()),
        _ => false,
    };
    let post = body.get("post_sampling_probs") == Some(&Value::Bool(true));
    if post && matches!(surface, Surface::OpenAi) {
        return Err(ApiError::invalid(
            "post_sampling_probs",
            "`post_sampling_probs` is read on /completion and /infill; here `logprobs` are the model's own",
        ));
    }
    if asked {
        let mut chain = chain_of(ready, body).await?;
        // `post_sampling_probs` with `n_probs` (llama.cpp's endpoints): each token's
        // probabilities are those after the chain.
        let n_probs = body.get("n_probs").and_then(Value::as_i64).unwrap_or(0);
        chain.final_probs = post && n_probs > 0;
        chain.validate().map_err(|e| match &e {
            SamplingError::OutOfRange { field, .. } => ApiError::invalid(*field, e.to_string()),
        })?;
        sampling.llama_cpp_order = true;
        sampling.llama = Some(chain);
    }
    Ok(())
}

/// The chain a llama.cpp endpoint's body asks for (its defaults for what it leaves out),
/// its DRY breakers tokenized off the async threads (or as made for an earlier request).
async fn chain_of(ready: &Ready, body: &Value) -> Result<ChainParams, ApiError> {
    let (mut chain, breakers) = read(body)?;
    let Some(dry) = chain.dry.as_mut() else {
        return Ok(chain);
    };
    let tok = ready.tokenizer.clone();
    let key = Arc::as_ptr(&tok) as usize;
    let made = |m: &Vec<Made>| {
        m.iter()
            .find(|(k, b, _)| *k == key && *b == breakers)
            .map(|(_, _, t)| t.clone())
    };
    let known = made(&MADE.lock().unwrap_or_else(|e| e.into_inner()));
    let tokens = match known {
        Some(t) => t,
        None => {
            let strings = breakers.clone();
            let t = tokio::task::spawn_blocking(move || dry_breakers(&tok, &strings))
                .await
                .map_err(|e| {
                    ApiError::internal(format!("reading dry_sequence_breakers failed: {e}"))
                })?;
            let t = Arc::new(t);
            let mut m = MADE.lock().unwrap_or_else(|e| e.into_inner());
            if made(&m).is_none() {
                if m.len() == MADE_KEPT {
                    m.remove(0);
                }
                m.push((key, breakers, t.clone()));
            }
            t
        }
    };
    dry.breakers = tokens.as_ref().clone();
    Ok(chain)
}

/// The settings, and DRY's breakers as text (when DRY is on).
fn read(body: &Value) -> Result<(ChainParams, Vec<String>), ApiError> {
    let empty = Map::new();
    let o = body.as_object().unwrap_or(&empty);
    let mut c = ChainParams::default();
    if let Some(v) = o.get("samplers") {
        let names = sampler_chain(v).ok_or_else(|| {
            ApiError::invalid(
                "samplers",
                "`samplers` must be an array of sampler names or a string of one-letter codes",
            )
        })?;
        c.steps = names.iter().filter_map(|n| step(n)).collect();
    }
    let bounded = |name: &'static str, v: f32, lo: f32, hi: f32| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(ApiError::invalid(
                name,
                format!("`{name}` must be in [{lo}, {hi}], got {v}"),
            ))
        }
    };
    if let Some(v) = number(o, "typical_p")? {
        c.typical_p = v;
    }
    if let Some(v) = number(o, "top_n_sigma")? {
        c.top_n_sigma = v;
    }
    if let Some(v) = number(o, "xtc_probability")? {
        c.xtc_probability = bounded("xtc_probability", v, 0.0, 1.0)?;
    }
    if let Some(v) = number(o, "xtc_threshold")? {
        c.xtc_threshold = bounded("xtc_threshold", v, 0.0, 1.0)?;
    }
    if let Some(v) = number(o, "dynatemp_range")? {
        c.dynatemp_range = v;
    }
    if let Some(v) = number(o, "dynatemp_exponent")? {
        c.dynatemp_exponent = v;
    }
    // llama-server's name, and the name of its flag (-1: the whole context, as older
    // versions read it).
    let last_n = match integer(o, "repeat_last_n", -1)? {
        Some(n) => Some(n),
        None => integer(o, "penalty_last_n", -1)?,
    };
    if let Some(n) = last_n {
        c.penalty_last_n = usize::try_from(n).ok();
    }
    if let Some(n) = integer(o, "mirostat", 0)? {
        if n > 2 {
            return Err(ApiError::invalid(
                "mirostat",
                format!("`mirostat` must be 0 (off), 1 or 2, got {n}"),
            ));
        }
        c.mirostat = n as u8;
    }
    if let Some(v) = number(o, "mirostat_tau")? {
        c.mirostat_tau = v;
    }
    if let Some(v) = number(o, "mirostat_eta")? {
        c.mirostat_eta = v;
    }
    if let Some(n) = integer(o, "min_keep", 0)? {
        c.min_keep = usize::try_from(n).unwrap_or(usize::MAX);
    }
    let (dry, breakers) = dry(o)?;
    c.dry = dry;
    Ok((c, breakers))
}

/// DRY's settings (`None` when off: a multiplier of 0 or a window of 0 tokens).
fn dry(o: &Map<String, Value>) -> Result<(Option<DryParams>, Vec<String>), ApiError> {
    let multiplier = number(o, "dry_multiplier")?.unwrap_or(0.0);
    if multiplier < 0.0 {
        return Err(ApiError::invalid(
            "dry_multiplier",
            format!("`dry_multiplier` must be >= 0 (0 is off), got {multiplier}"),
        ));
    }
    // Below 1, llama-server takes its default.
    let base = number(o, "dry_base")?.filter(|b| *b >= 1.0).unwrap_or(1.75);
    let allowed_length = integer(o, "dry_allowed_length", 0)?.unwrap_or(2);
    let last_n = integer(o, "dry_penalty_last_n", -1)?.unwrap_or(64);
    let breakers = match o.get("dry_sequence_breakers") {
        None => ["\n", ":", "\"", "*"].map(String::from).to_vec(),
        Some(v) => {
            let bad = || {
                ApiError::invalid(
                    "dry_sequence_breakers",
                    format!("`dry_sequence_breakers` must be a non-empty array of at most {MAX_BREAKERS} strings"),
                )
            };
            let a = v.as_array().ok_or_else(bad)?;
            if a.is_empty() || a.len() > MAX_BREAKERS {
                return Err(bad());
            }
            // llama.cpp reads a breaker's first 40 bytes.
            let first = |s: &str| {
                let mut end = s.len().min(BREAKER_BYTES);
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s[..end].to_string()
            };
            a.iter()
                .map(|s| s.as_str().map(first).ok_or_else(bad))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    if multiplier == 0.0 || last_n == 0 {
        return Ok((None, Vec::new()));
    }
    let dry = DryParams {
        multiplier,
        base,
        allowed_length: usize::try_from(allowed_length).unwrap_or(usize::MAX),
        last_n: usize::try_from(last_n).ok(),
        breakers: Vec::new(),
    };
    Ok((Some(dry), breakers))
}

/// The chain step a canonical `samplers` name stands for (`None`: one we do not run).
fn step(name: &str) -> Option<Step> {
    Some(match name {
        "penalties" => Step::Penalties,
        "dry" => Step::Dry,
        "top_n_sigma" => Step::TopNSigma,
        "top_k" => Step::TopK,
        "typ_p" => Step::TypicalP,
        "top_p" => Step::TopP,
        "min_p" => Step::MinP,
        "xtc" => Step::Xtc,
        "temperature" => Step::Temperature,
        _ => return None,
    })
}

/// A number field (absent: `None`).
fn number(o: &Map<String, Value>, name: &'static str) -> Result<Option<f32>, ApiError> {
    let Some(v) = o.get(name) else {
        return Ok(None);
    };
    match v.as_f64().map(|f| f as f32).filter(|f| f.is_finite()) {
        Some(f) => Ok(Some(f)),
        None => Err(ApiError::invalid(
            name,
            format!("`{name}` must be a finite number, got {v}"),
        )),
    }
}

/// An integer field no smaller than `min` (absent: `None`).
fn integer(o: &Map<String, Value>, name: &'static str, min: i64) -> Result<Option<i64>, ApiError> {
    let Some(v) = o.get(name) else {
        return Ok(None);
    };
    let n = v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
            .map(|f| f as i64)
    });
    match n.filter(|n| *n >= min) {
        Some(n) => Ok(Some(n)),
        None => Err(ApiError::invalid(
            name,
            format!("`{name}` must be an integer >= {min}, got {v}"),
        )),
    }
}

/// DRY's sequence breakers (their first 40 bytes) as llama.cpp finds them in the
/// vocabulary: every token whose
/// text holds a breaker is one on its own; a token whose text ends with the start of a
/// breaker is one followed by the rest of it (tokenized as text, at most 20 tokens). Sorted
/// and without repeats.
pub(super) fn dry_breakers(tok: &Tokenizer, breakers: &[String]) -> Vec<(u32, Vec<u32>)> {
    let mut out = Vec::new();
    let words = tok.byte_table();
    for b in breakers {
        let s = b.as_bytes();
        if s.is_empty() {
            continue;
        }
        // The rest of the breaker after its first `run` bytes, tokenized once per `run`.
        let mut tails: Vec<Option<Option<Vec<u32>>>> = vec![None; s.len()];
        for (id, word) in words.iter().enumerate() {
            let id = id as u32;
            if word.windows(s.len()).any(|w| w == s) {
                out.push((id, Vec::new()));
                continue;
            }
            // Each place the word's end starts the breaker: the rest follows as a tail.
            for pos in (0..word.len()).filter(|&p| word[p] == s[0]) {
                let run = word.len() - pos;
                if run < s.len() && word[pos..] == s[..run] {
                    let tail = tails[run].get_or_insert_with(|| {
                        let rest = std::str::from_utf8(&s[run..]).ok()?;
                        let mut t = tok.encode_plain(rest).ok()?;
                        t.truncate(TAIL_TOKENS);
                        Some(t)
                    });
                    if let Some(t) = tail {
                        out.push((id, t.clone()));
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn llama_cpp_sampler_settings_read_into_the_chain() {
        let (c, breakers) = read(&json!({})).unwrap();
        assert_eq!(c, ChainParams::default());
        assert!(breakers.is_empty());
        let (c, breakers) = read(&json!({
            "samplers": ["dry", "Typical-P", "xtc", "temp"], "typical_p": 0.5,
            "top_n_sigma": 1.5, "xtc_probability": 0.25, "xtc_threshold": 0.2,
            "dynatemp_range": 0.3, "dynatemp_exponent": 2, "repeat_last_n": -1,
            "mirostat": 2, "mirostat_tau": 4, "mirostat_eta": 0.2, "min_keep": 3,
            "dry_multiplier": 0.8, "dry_base": 0.5, "dry_allowed_length": 3,
            "dry_penalty_last_n": 128, "dry_sequence_breakers": ["\n\n", "###"]
        }))
        .unwrap();
        assert_eq!(
            c.steps,
            [Step::Dry, Step::TypicalP, Step::Xtc, Step::Temperature]
        );
        assert_eq!(
            (
                c.typical_p,
                c.top_n_sigma,
                c.xtc_probability,
                c.xtc_threshold
            ),
            (0.5, 1.5, 0.25, 0.2)
        );
        assert_eq!((c.dynatemp_range, c.dynatemp_exponent), (0.3, 2.0));
        assert_eq!(c.penalty_last_n, None);
        assert_eq!((c.mirostat, c.mirostat_tau, c.mirostat_eta), (2, 4.0, 0.2));
        assert_eq!(c.min_keep, 3);
        let d = c.dry.unwrap();
        // A base below 1 is llama-server's default.
        assert_eq!((d.multiplier, d.base, d.allowed_length), (0.8, 1.75, 3));
        assert_eq!(d.last_n, Some(128));
        assert_eq!(breakers, ["\n\n", "###"]);
        // One-letter codes; the flag's name for the window.
        let (c, _) = read(&json!({"samplers": "edskypmxt", "penalty_last_n": 16})).unwrap();
        assert_eq!(c.steps, Step::DEFAULT);
        assert_eq!(c.penalty_last_n, Some(16));
        // Out of range or the wrong type: a 400 naming the field.
        for (body, field) in [
            (json!({"mirostat": 3}), "mirostat"),
            (json!({"xtc_probability": 1.5}), "xtc_probability"),
            (json!({"xtc_threshold": -0.1}), "xtc_threshold"),
            (json!({"repeat_last_n": -2}), "repeat_last_n"),
            (json!({"min_keep": 1.5}), "min_keep"),
            (json!({"typical_p": "high"}), "typical_p"),
            (json!({"dry_multiplier": -1}), "dry_multiplier"),
            (
                json!({"dry_sequence_breakers": []}),
                "dry_sequence_breakers",
            ),
            (
                json!({"dry_sequence_breakers": "\n"}),
                "dry_sequence_breakers",
            ),
            (json!({"dry_allowed_length": -1}), "dry_allowed_length"),
        ] {
            let e = read(&body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{body}");
        }
        // A breaker's first 40 bytes count.
        let long = "ab".repeat(30);
        let (_, b) = read(&json!({"dry_multiplier": 1, "dry_sequence_breakers": [long]})).unwrap();
        assert_eq!(b, ["ab".repeat(20)]);
        // DRY's window is llama.cpp's 64 unless given.
        let (c, _) = read(&json!({"dry_multiplier": 0.8})).unwrap();
        assert_eq!(c.dry.unwrap().last_n, Some(64));
        let e = read(&json!({"samplers": ["top_k", 3]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("samplers"));
        // DRY off: no breakers to tokenize.
        let (c, b) = read(&json!({"dry_multiplier": 0.8, "dry_penalty_last_n": 0})).unwrap();
        assert!(c.dry.is_none() && b.is_empty());
    }
}
