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
