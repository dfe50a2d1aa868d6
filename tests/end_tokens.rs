//! What ends a reply, over HTTP with the real default model: `ignore_eos` (llama.cpp's and
//! vLLM's) runs a reply to its budget, and vLLM's fields this server does not implement are
//! refused by name rather than ignored.

mod common;

use common::server::Server;
use serde_json::{json, Value};

#[test]
fn ignore_eos_runs_a_reply_to_its_budget() {
    let s = Server::start(&[]);
    // `<|im_end|>` forced by a bias ends the reply at once...
    let (status, r) = s.post("/tokenize", &json!({"content": "<|im_end|>"}));
    assert_eq!(status, 200, "{r}");
    let end = r["tokens"][0].as_u64().unwrap();
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12,
            "temperature": 0, "logit_bias": {end.to_string(): 100}});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        s.post("/v1/chat/completions", &body)
    };
    let (status, r) = chat(json!({}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert!(
        r["usage"]["completion_tokens"].as_u64().unwrap() < 12,
        "{r}"
    );
    // ... and with `ignore_eos` is never sampled: the reply runs to `max_tokens`.
    let (status, r) = chat(json!({"ignore_eos": true}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 12, "{r}");
    // llama-server's route too.
    let (status, r) = s.post(
        "/completion",
        &json!({"prompt": "Hi", "n_predict": 12, "temperature": 0, "ignore_eos": true,
                "logit_bias": [[end, 100]]}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["tokens_predicted"], 12, "{r}");
    // A grammar ends with the end-of-text token: the two together are refused.
    let (status, r) = chat(json!({"ignore_eos": true, "response_format": {"type": "json_object"}}));
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "ignore_eos", "{r}");
}

#[test]
fn vllms_fields_that_would_change_the_reply_are_refused_by_name() {
    let s = Server::start(&[]);
    // A token that is no end of a reply (`stop_token_ids` naming the model's own ends,
    // `<|im_end|>` here, as clients often do, changes nothing and passes).
    let (_, r) = s.post("/tokenize", &json!({"content": "Hello"}));
    let word = r["tokens"][0].as_u64().unwrap();
    let (_, r) = s.post("/tokenize", &json!({"content": "<|im_end|>"}));
    let end = r["tokens"][0].as_u64().unwrap();
    for (field, value) in [
        ("min_tokens", json!(5)),
        ("stop_token_ids", json!([word])),
        ("include_stop_str_in_output", json!(true)),
    ] {
        for route in ["/v1/chat/completions", "/v1/completions"] {
            let mut body = json!({"messages": [{"role": "user", "content": "Hi"}],
                "prompt": "Hi", "max_tokens": 2});
            body.as_object_mut()
                .unwrap()
                .remove(if route == "/v1/completions" {
                    "messages"
                } else {
                    "prompt"
                });
            body[field] = value.clone();
            let (status, r) = s.post(route, &body);
            assert_eq!(status, 400, "{route} {field}: {r}");
            assert_eq!(r["error"]["param"], field, "{r}");
            // Their defaults change nothing and pass.
            body[field] = match field {
                "min_tokens" => json!(0),
                "stop_token_ids" => json!([end]),
                _ => json!(false),
            };
            let (status, r) = s.post(route, &body);
            assert_eq!(status, 200, "{route} {field}: {r}");
        }
    }
}
