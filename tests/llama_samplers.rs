//! llama-server's other samplers (DRY, XTC, typical-p, Mirostat, `repeat_last_n`,
//! `samplers`) over `/completion` with the real default model: each changes the reply where
//! it should, and leaves it alone where its settings turn it off.

mod common;

use common::server::Server;
use serde_json::{json, Value};

const PROMPT: &str = "I like cats. I like cats. I like cats. I like cats. I like cats.";

/// `/completion`'s text for the prompt, greedy and 24 tokens long, with `extra` fields.
fn completion(s: &Server, extra: Value) -> String {
    let mut body = json!({"prompt": PROMPT, "n_predict": 24, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, r) = s.post("/completion", &body);
    assert_eq!(status, 200, "{body}: {r}");
    r["content"].as_str().unwrap().to_string()
}

#[test]
fn llama_cpps_other_samplers_shape_completion_replies() {
    let s = Server::start(&[]);
    let plain = completion(&s, json!({}));
    // Greedy, the model repeats the prompt's sentence.
    assert!(plain.contains("I like cats. I like cats"), "{plain:?}");

    // DRY penalises the tokens that would go on with the repetition.
    let dry = json!({"dry_multiplier": 2.0, "dry_allowed_length": 2});
    let no_repeat = completion(&s, dry.clone());
    assert_ne!(no_repeat, plain);
    assert!(
        !no_repeat.contains("I like cats. I like cats"),
        "{no_repeat:?}"
    );
    // A period as a sequence breaker: no repetition reaches back past a sentence, and
    // none within one is long enough to change the greedy pick.
    let mut period = dry.clone();
    period["dry_sequence_breakers"] = json!(["."]);
    assert_eq!(completion(&s, period), plain);
    // `cats.` spans two tokens: " cats" is a breaker when "." follows it, and a token that
    // would go on with a repetition otherwise.
    let mut two = dry.clone();
    two["dry_sequence_breakers"] = json!(["cats."]);
    let two = completion(&s, two);
    assert!(two != plain && two != no_repeat, "{two:?}");
    // Off by its window, or left out of `samplers`: the greedy reply.
    let mut off = dry.clone();
    off["dry_penalty_last_n"] = json!(0);
    assert_eq!(completion(&s, off), plain);
    let mut left_out = dry.clone();
    left_out["samplers"] = json!(["top_k", "top_p", "min_p", "temperature"]);
    assert_eq!(completion(&s, left_out), plain);

    // XTC at every step takes the likeliest tokens away, even from a greedy pick.
    let xtc = completion(&s, json!({"xtc_probability": 1.0, "xtc_threshold": 0.1}));
    assert_ne!(xtc, plain);
    // Past 0.5 the threshold turns it off.
    let xtc_off = json!({"xtc_probability": 1.0, "xtc_threshold": 0.6});
    assert_eq!(completion(&s, xtc_off), plain);

    // The repetition penalty over the whole sequence, or over none of it.
    let penalised = completion(&s, json!({"repeat_penalty": 1.5, "repeat_last_n": -1}));
    assert_ne!(penalised, plain);
    let window_off = json!({"repeat_penalty": 1.5, "repeat_last_n": 0});
    assert_eq!(completion(&s, window_off), plain);

    // Mirostat 2 with a target of 0 bits and no learning keeps the top token alone: at
    // temperature 1, the greedy reply.
    let miro = json!({"temperature": 1.0, "seed": 5, "mirostat": 2, "mirostat_tau": 0,
                      "mirostat_eta": 0});
    assert_eq!(completion(&s, miro), plain);

    // Out of range: a 400 naming the field.
    for (field, value) in [
        ("mirostat", json!(3)),
        ("xtc_probability", json!(2)),
        ("dry_sequence_breakers", json!([])),
        ("repeat_last_n", json!(-5)),
    ] {
        let body = json!({"prompt": PROMPT, "n_predict": 2, field: value});
        let (status, r) = s.post("/completion", &body);
        assert_eq!(status, 400, "{body}: {r}");
        assert_eq!(r["error"]["param"], field, "{r}");
    }
}

/// `/v1/completions`' text for the prompt, greedy and 24 tokens long, with `extra` fields.
fn openai(s: &Server, extra: Value) -> String {
    let mut body = json!({"prompt": PROMPT, "max_tokens": 24, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, r) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{body}: {r}");
    r["choices"][0]["text"].as_str().unwrap().to_string()
}

#[test]
fn openai_routes_sample_with_the_chain_when_a_request_names_its_samplers() {
    let s = Server::start(&[]);
    let plain = openai(&s, json!({}));
    assert!(plain.contains("I like cats. I like cats"), "{plain:?}");
    // As llama-server reads its OpenAI routes: DRY, and llama.cpp's name for the
    // repetition penalty with its window.
    let dry = openai(&s, json!({"dry_multiplier": 2.0}));
    assert!(!dry.contains("I like cats. I like cats"), "{dry:?}");
    assert_eq!(dry, completion(&s, json!({"dry_multiplier": 2.0})));
    let penalised = openai(&s, json!({"repeat_penalty": 1.5, "repeat_last_n": -1}));
    assert_ne!(penalised, plain);
    assert_eq!(
        openai(&s, json!({"repeat_penalty": 1.5, "repeat_last_n": 0})),
        plain
    );
    // Mirostat 2 with a target of 0 bits keeps the top token alone.
    let miro = json!({"temperature": 1.0, "seed": 5, "mirostat": 2, "mirostat_tau": 0,
                      "mirostat_eta": 0});
    assert_eq!(openai(&s, miro), plain);
    // Both names of the penalty: the OpenAI extension's wins.
    let both = json!({"repetition_penalty": 1.0, "repeat_penalty": 1.5, "repeat_last_n": -1});
    assert_eq!(openai(&s, both), plain);
    // The chain's own checks, as a 400 naming the field; `post_sampling_probs` is
    // llama.cpp's endpoints' (here `logprobs` are the model's own).
    for (field, value) in [("mirostat", json!(7)), ("post_sampling_probs", json!(true))] {
        let body = json!({"prompt": PROMPT, "max_tokens": 2, field: value});
        let (status, r) = s.post("/v1/completions", &body);
        assert_eq!(status, 400, "{r}");
        assert_eq!(r["error"]["param"], field, "{r}");
    }
}

#[test]
fn post_sampling_probs_are_the_chains_distribution() {
    let s = Server::start(&[]);
    let ask = |extra: Value| {
        let mut body = json!({"prompt": PROMPT, "n_predict": 8, "temperature": 1.0,
                              "seed": 1, "top_k": 2, "top_p": 1.0, "min_p": 0.0,
                              "n_probs": 5});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, r) = s.post("/completion", &body);
        assert_eq!(status, 200, "{r}");
        r["completion_probabilities"].as_array().unwrap().clone()
    };
    // The model's own: five alternatives, as logprobs.
    for e in ask(json!({})) {
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 5, "{e}");
        assert!(e["logprob"].as_f64().unwrap() <= 0.0, "{e}");
    }
    // After top-k 2: at most two, their probabilities summing to 1, the pick's among them.
    let post = ask(json!({"post_sampling_probs": true}));
    assert_eq!(post.len(), 8);
    for e in &post {
        let top = e["top_probs"].as_array().unwrap();
        assert!(!top.is_empty() && top.len() <= 2, "{e}");
        let sum: f64 = top.iter().map(|t| t["prob"].as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "{e}");
        let mine = top
            .iter()
            .find(|t| t["id"] == e["id"])
            .expect("the pick is listed");
        assert!((mine["prob"].as_f64().unwrap() - e["prob"].as_f64().unwrap()).abs() < 1e-6);
        assert!(
            e.get("logprob").is_none() && e.get("top_logprobs").is_none(),
            "{e}"
        );
    }
    // Greedy: the pick alone, certain.
    for e in ask(json!({"post_sampling_probs": true, "temperature": 0})) {
        assert_eq!(e["prob"], 1.0, "{e}");
        assert_eq!(e["top_probs"].as_array().unwrap().len(), 1, "{e}");
    }
}
