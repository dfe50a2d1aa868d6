//! Sampling settings over HTTP with the real default model: `logit_bias`.

mod common;

use common::server::Server;
use serde_json::{json, Value};

fn tokens(s: &Server, text: &str) -> Vec<u64> {
    let (status, r) = s.post("/tokenize", &json!({"content": text}));
    assert_eq!(status, 200, "{r}");
    r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

fn detokenize(s: &Server, ids: &[u64]) -> String {
    let (status, r) = s.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(status, 200, "{r}");
    r["content"].as_str().unwrap().to_string()
}

fn complete(s: &Server, route: &str, extra: Value) -> Value {
    let mut body = if route == "/v1/completions" {
        json!({"prompt": "The capital of France is", "temperature": 0})
    } else {
        json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
               "temperature": 0})
    };
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, r) = s.post(route, &body);
    assert_eq!(status, 200, "{r}");
    r
}

fn text(r: &Value) -> String {
    let c = &r["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap()
        .to_string()
}

#[test]
fn logit_bias_bans_and_forces_tokens() {
    let s = Server::start(&[]);
    for route in ["/v1/completions", "/v1/chat/completions"] {
        // The greedy reply's first token, then the same request with it banned.
        let plain = text(&complete(&s, route, json!({"max_tokens": 6})));
        let first = tokens(&s, &plain)[0];
        let banned = complete(
            &s,
            route,
            json!({"max_tokens": 6, "logit_bias": {first.to_string(): -100}}),
        );
        assert_ne!(text(&banned), plain, "{route}: banning the first token");
        let banned_ids = tokens(&s, &text(&banned));
        assert!(
            !banned_ids.contains(&first),
            "{route}: token {first} was banned, got {banned_ids:?} ({plain:?} without the bias)"
        );

        // +100 on one token makes it every token, greedy or sampled.
        let forced = tokens(&s, " banana")[0];
        let want = detokenize(&s, &[forced; 4]);
        for sampling in [
            json!({"temperature": 0}),
            json!({"temperature": 1, "seed": 3}),
        ] {
            let mut extra = json!({"max_tokens": 4, "logit_bias": {forced.to_string(): 100}});
            for (k, v) in sampling.as_object().unwrap() {
                extra[k] = v.clone();
            }
            let r = complete(&s, route, extra);
            assert_eq!(text(&r), want, "{route} {sampling}");
            assert_eq!(r["choices"][0]["finish_reason"], "length");
        }

        // A small bias on a token nobody picks changes nothing.
        let quiet = complete(
            &s,
            route,
            json!({"max_tokens": 6, "logit_bias": {forced.to_string(): 0.01}}),
        );
        assert_eq!(text(&quiet), plain, "{route}");
    }

    // Streaming applies it too.
    let forced = tokens(&s, " banana")[0];
    let events = s.stream(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                "stream": true, "logit_bias": {forced.to_string(): 100}}),
    );
    let streamed: String = events
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, detokenize(&s, &[forced; 3]));
}
