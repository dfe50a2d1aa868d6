//! llama-server's sampling fields read into the OpenAI ones every generation reads, with
//! llama.cpp's defaults for what a request leaves out and its `samplers` chain.

use serde_json::{json, Value};

use super::error::ApiError;

/// llama.cpp's sampling defaults (its `common_params_sampling`) for its own endpoints: a
/// request that names none samples as llama-server would.
const DEFAULTS: [(&str, f64); 4] = [
    ("temperature", 0.8),
    ("top_k", 40.0),
    ("top_p", 0.95),
    ("min_p", 0.05),
];

/// llama.cpp's sampling names as the OpenAI fields every generation reads (`route` names
/// the endpoint in errors): `n_predict` is `max_tokens` (negative: no limit but the context;
/// 0: only the prompt is computed, to warm the prefix cache; without it, `max_tokens` or
/// `max_completion_tokens` as llama.cpp takes them), `repeat_penalty` is
/// `repetition_penalty`, a `seed` of -1 is none, and `temperature` defaults to llama.cpp's
/// 0.8 (and the other filters to llama.cpp's defaults).
pub(super) fn to_sampling(mut v: Value, route: &str) -> Result<Value, ApiError> {
    let o = v.as_object_mut().expect("parse_body returns objects");
    // `logprobs` is llama.cpp's other name for `n_probs` (a number of alternatives); null
    // is not given.
    if let Some(n) = o.remove("logprobs").filter(|n| !n.is_null()) {
        if !n.is_i64() {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` on {route} is llama.cpp's `n_probs`: a number"),
            ));
        }
        if o.get("n_probs").is_none_or(Value::is_null) {
            o.insert("n_probs".into(), n);
        }
    }
    if o.contains_key("best_of") {
        return Err(ApiError::invalid(
            "best_of",
            format!("`best_of` is not a field of {route}"),
        ));
    }
    let n_predict = o.remove("n_predict");
    if n_predict.as_ref().is_some_and(|n| !n.is_null()) {
        o.remove("max_tokens");
        o.remove("max_completion_tokens");
    }
    match n_predict {
        None | Some(Value::Null) => {}
        Some(n) if n.as_f64().is_some_and(|n| n < 0.0) => {}
        Some(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0 && f < 1e18) => {
            let n = n.as_f64().unwrap_or_default() as u64;
            o.insert("max_tokens".into(), n.into());
        }
        Some(n) => {
            return Err(ApiError::invalid(
                "n_predict",
                format!("`n_predict` must be an integer, got {n}"),
            ))
        }
    }
    if let Some(p) = o.remove("repeat_penalty") {
        o.insert("repetition_penalty".into(), p);
    }
    // llama-server's `logit_bias` may be pairs: `[[token, bias], ...]`, `false` banning it.
    if let Some(Value::Array(pairs)) = o.get("logit_bias") {
        let map = logit_bias_pairs(pairs)?;
        o.insert("logit_bias".into(), Value::Object(map));
    }
    if o.get("seed").and_then(Value::as_i64) == Some(-1) {
        o.remove("seed");
    }
    // `samplers` (names, or llama.cpp's one-letter codes as a string) picks the steps that
    // run: one it leaves out does not, whatever its fields say (without `temperature` the
    // draw is at 1, without `penalties` there are none).
    if let Some(chain) = o.get("samplers").and_then(sampler_chain) {
        let steps: [(&str, &[(&str, Value)]); 5] = [
            ("top_k", &[("top_k", json!(0))]),
            ("top_p", &[("top_p", json!(1.0))]),
            ("min_p", &[("min_p", json!(0.0))]),
            ("temperature", &[("temperature", json!(1.0))]),
            (
                "penalties",
                &[
                    ("repetition_penalty", json!(1.0)),
                    ("frequency_penalty", json!(0.0)),
                    ("presence_penalty", json!(0.0)),
                ],
            ),
        ];
        for (step, off) in steps {
            if !chain.iter().any(|s| s == step) {
                for (name, value) in off {
                    o.insert((*name).into(), value.clone());
                }
            }
        }
    }
    for (name, default) in DEFAULTS {
        if o.get(name).is_none_or(Value::is_null) {
            let v = match name {
                "top_k" => json!(default as u64),
                _ => json!(default),
            };
            o.insert(name.into(), v);
        }
    }
    Ok(v)
}

/// llama-server's `logit_bias` pairs as OpenAI's map: a token id and a bias, or `false`
/// (never this token: OpenAI's -100). A token given as text is refused: name its ids.
fn logit_bias_pairs(pairs: &[Value]) -> Result<serde_json::Map<String, Value>, ApiError> {
    let mut map = serde_json::Map::new();
    for (i, pair) in pairs.iter().enumerate() {
        let bad = || {
            ApiError::invalid(
                format!("logit_bias[{i}]"),
                "each pair is `[token id, bias]`, the bias a number or `false` to ban the token",
            )
        };
        let (Some(id), Some(bias)) = (pair.get(0).and_then(Value::as_u64), pair.get(1)) else {
            return Err(bad());
        };
        let bias = match bias {
            Value::Bool(false) => json!(-100),
            Value::Number(n) => Value::Number(n.clone()),
            _ => return Err(bad()),
        };
        if pair.as_array().map(Vec::len) != Some(2) {
            return Err(bad());
        }
        map.insert(id.to_string(), bias);
    }
    Ok(map)
}

/// llama.cpp's `samplers`, as the canonical names of the steps it lists (`top_k`, `top_p`,
/// `min_p`, `temperature`, `typ_p`, `top_n_sigma`, `xtc`, `dry`, `penalties`): an array of
/// names (any case, `-` for `_`, its aliases) or
/// a string of one-letter codes. `None`: not a chain.
pub(super) fn sampler_chain(v: &Value) -> Option<Vec<String>> {
    let from_code = |c: char| match c {
        'k' => "top_k",
        'p' => "top_p",
        'm' => "min_p",
        't' => "temperature",
        'e' => "penalties",
        'd' => "dry",
        'y' => "typ_p",
        's' => "top_n_sigma",
        'x' => "xtc",
        _ => "other",
    };
    let from_name = |n: &str| {
        let n = n.to_ascii_lowercase().replace('-', "_");
        match n.as_str() {
            "topk" => "top_k".to_string(),
            "topp" | "nucleus" => "top_p".to_string(),
            "minp" => "min_p".to_string(),
            "temp" => "temperature".to_string(),
            "typ" | "typp" | "typical_p" | "typical" => "typ_p".to_string(),
            "topnsigma" => "top_n_sigma".to_string(),
            _ => n,
        }
    };
    match v {
        Value::String(s) => Some(s.chars().map(|c| from_code(c).to_string()).collect()),
        Value::Array(a) => a.iter().map(|n| n.as_str().map(from_name)).collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logit_bias_pairs_become_openais_map() {
        let v = to_sampling(
            json!({"logit_bias": [[15, 2.5], [7, false]]}),
            "/completion",
        )
        .unwrap();
        assert_eq!(v["logit_bias"], json!({"15": 2.5, "7": -100}));
        // The map passes as it is.
        let v = to_sampling(json!({"logit_bias": {"15": 1}}), "/completion").unwrap();
        assert_eq!(v["logit_bias"], json!({"15": 1}));
        for bad in [
            json!([["hello", 1]]),
            json!([[1]]),
            json!([[1, true]]),
            json!([[1, 2, 3]]),
        ] {
            let e = to_sampling(json!({"logit_bias": bad}), "/completion").unwrap_err();
            assert_eq!(e.param.as_deref(), Some("logit_bias[0]"), "{bad}");
        }
    }

    #[test]
    fn llama_cpp_sampling_names_translate() {
        let to_sampling = |v| to_sampling(v, "/infill");
        let v = to_sampling(json!({"n_predict": 16, "repeat_penalty": 1.1, "seed": -1})).unwrap();
        assert_eq!(v["max_tokens"], 16);
        assert_eq!(v["repetition_penalty"], 1.1);
        assert!(v.get("seed").is_none() && v.get("n_predict").is_none());
        assert_eq!(
            [&v["temperature"], &v["top_k"], &v["top_p"], &v["min_p"]],
            [&json!(0.8), &json!(40), &json!(0.95), &json!(0.05)]
        );
        let v = to_sampling(json!({"n_predict": -1, "temperature": 0, "top_k": 0, "top_p": 1}))
            .unwrap();
        assert!(v.get("max_tokens").is_none());
        assert_eq!(
            (&v["temperature"], &v["top_k"], &v["top_p"]),
            (&json!(0), &json!(0), &json!(1))
        );
        let v = to_sampling(json!({"n_predict": 128.0, "seed": 3})).unwrap();
        assert_eq!(
            (v["max_tokens"].as_u64(), v["seed"].as_u64()),
            (Some(128), Some(3))
        );
        assert!(to_sampling(json!({"n_predict": 1.5})).is_err());
        assert!(to_sampling(json!({"n_predict": "x"})).is_err());
        // OpenAI's limit as llama.cpp takes it: when `n_predict` is absent.
        assert_eq!(
            to_sampling(json!({"max_tokens": 3})).unwrap()["max_tokens"],
            3
        );
        let v = to_sampling(json!({"max_tokens": 3, "n_predict": 5})).unwrap();
        assert_eq!(v["max_tokens"], 5);
        assert_eq!(
            to_sampling(json!({"temperature": null})).unwrap()["temperature"],
            0.8
        );
        // `logprobs` is `n_probs` (when that is not given), a number.
        assert_eq!(to_sampling(json!({"logprobs": 2})).unwrap()["n_probs"], 2);
        let v = to_sampling(json!({"logprobs": 2, "n_probs": 4})).unwrap();
        assert!(v["n_probs"] == 4 && v.get("logprobs").is_none());
        assert!(to_sampling(json!({"logprobs": true})).is_err());
        assert!(to_sampling(json!({"best_of": 2})).is_err());
        // `samplers` leaves out the filters it does not list, given or default.
        let v = to_sampling(json!({"samplers": ["Top-K", "temperature"], "top_p": 0.5})).unwrap();
        assert_eq!(
            [&v["top_k"], &v["top_p"], &v["min_p"]],
            [&json!(40), &json!(1.0), &json!(0.0)]
        );
        let v = to_sampling(json!({"samplers": "mt", "top_k": 5})).unwrap();
        assert_eq!(
            [&v["top_k"], &v["top_p"], &v["min_p"]],
            [&json!(0), &json!(1.0), &json!(0.05)]
        );
        // Without `temperature` the draw is at 1; without `penalties` there are none.
        let v = to_sampling(json!({"samplers": ["top_k"], "temperature": 0,
                                   "repeat_penalty": 1.3, "presence_penalty": 0.5}))
        .unwrap();
        assert_eq!(
            [
                &v["temperature"],
                &v["repetition_penalty"],
                &v["presence_penalty"]
            ],
            [&json!(1.0), &json!(1.0), &json!(0.0)]
        );
    }
}
