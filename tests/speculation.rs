//! Speculative decoding by prompt lookup (`--speculate`) with the real model: the replies are
//! the ones plain decoding gives, token for token (greedy, seeded sampling, logprobs, a JSON
//! schema greedy and sampled (drafted from the grammar), tool calls, stop strings, several choices, streamed), while drafts are verified
//! and kept.

mod common;

use std::thread;

use common::server::Server;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

/// A text the model is asked to copy: its replies repeat their context.
fn passage() -> String {
    [
        "The node keeps a shared cache of keys and values in blocks of sixteen positions.",
        "When a request arrives, its prompt is split into blocks and each full block is",
        "looked up by the hash of its tokens and of the blocks before it. A block that is",
        "found is taken as it is, and the request starts computing after it. A block that",
        "is not found is computed and then registered, so the next request with the same",
        "start finds it. Blocks nobody holds stay in the cache until their memory is needed,",
        "and the oldest of them go first. Config: `block_size = 16`, `max_batch_tokens =",
        "256`, `kv_cache_tokens = 16384`, `prefix_cache = true`.",
    ]
    .join("\n")
}

fn bodies() -> Vec<(&'static str, Value)> {
    let copy = format!("Copy this text exactly, word for word:\n\n{}", passage());
    let user = |text: &str| json!([{"role": "user", "content": text}]);
    let schema = json!({"type": "json_schema", "json_schema": {"name": "entry", "strict": true,
        "schema": {"type": "object", "properties": {
            "title": {"type": "string"}, "summary": {"type": "string"},
            "words": {"type": "array", "items": {"type": "string"}}},
        "required": ["title", "summary", "words"], "additionalProperties": false}}});
    let tools = json!([{"type": "function", "function": {"name": "save", "description": "Save a note",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
        "required": ["text"], "additionalProperties": false}}}]);
    vec![
        (
            "greedy copy",
            json!({"messages": user(&copy), "max_tokens": 160, "temperature": 0}),
        ),
        (
            "seeded copy",
            json!({"messages": user(&copy), "max_tokens": 160, "temperature": 0.9, "seed": 11, "top_p": 0.95}),
        ),
        (
            "logprobs",
            json!({"messages": user(&copy), "max_tokens": 60, "temperature": 0, "logprobs": true, "top_logprobs": 3}),
        ),
        (
            "penalties",
            json!({"messages": user(&copy), "max_tokens": 80, "temperature": 0.7, "seed": 3, "frequency_penalty": 0.5, "presence_penalty": 0.3}),
        ),
        (
            "json schema",
            json!({"messages": user(&format!("Describe this text as JSON:\n\n{}", passage())), "max_tokens": 160, "temperature": 0, "response_format": schema}),
        ),
        (
            "sampled json schema",
            json!({"messages": user("Describe a made-up city as JSON."), "max_tokens": 160, "temperature": 0.8, "top_p": 0.9, "seed": 9, "response_format": schema}),
        ),
        (
            "tool call",
            json!({"messages": user(&format!("Save this as a note: {}", &passage()[..300])), "max_tokens": 120, "temperature": 0, "tools": tools, "tool_choice": "required"}),
        ),
        (
            "stop string",
            json!({"messages": user(&copy), "max_tokens": 160, "temperature": 0, "stop": ["size"]}),
        ),
        (
            "two choices",
            json!({"messages": user(&copy), "max_tokens": 60, "temperature": 1.0, "seed": 5, "n": 2}),
        ),
        (
            "free text",
            json!({"messages": user("Write a short story about a lighthouse keeper."), "max_tokens": 120, "temperature": 0}),
        ),
    ]
}

/// What must not change: everything but ids and timestamps.
fn essence(r: &Value) -> Value {
    let mut choices = r["choices"].clone();
    for c in choices.as_array_mut().unwrap() {
        if let Some(calls) = c["message"]["tool_calls"].as_array_mut() {
            for call in calls {
                call["id"] = Value::Null;
            }
        }
    }
    json!({"choices": choices, "usage": r["usage"]})
}

/// Each choice's streamed text (content and tool-call arguments), by index.
fn streamed_text(s: &Server, body: &Value) -> Vec<String> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let mut texts = vec![String::new(); 2];
    for d in s.stream(CHAT, &body).iter().filter(|d| *d != "[DONE]") {
        let v: Value = serde_json::from_str(d).unwrap();
        let Some(c) = v["choices"].as_array().and_then(|c| c.first()) else {
            continue;
        };
        let delta = &c["delta"];
        let text = delta["content"]
            .as_str()
            .or(delta["tool_calls"][0]["function"]["arguments"].as_str());
        texts[c["index"].as_u64().unwrap() as usize].push_str(text.unwrap_or(""));
    }
    texts
}

/// Two servers started side by side: `--speculate 0` and `--speculate 4`.
fn plain_and_drafting() -> (Server, Server) {
    thread::scope(|t| {
        let a = t.spawn(|| Server::start(&["--speculate", "0"]));
        let b = t.spawn(|| Server::start(&["--speculate", "4"]));
        (a.join().unwrap(), b.join().unwrap())
    })
}

#[test]
fn speculation_changes_no_reply_and_keeps_drafts() {
    let (plain, fast) = plain_and_drafting();
    for (name, body) in bodies() {
        let (sa, a) = plain.post(CHAT, &body);
        let (sb, b) = fast.post(CHAT, &body);
        assert_eq!((sa, sb), (200, 200), "{name}: {a} {b}");
        assert_eq!(essence(&a), essence(&b), "{name}");
    }
    // Streamed, and several at once (drafted and plain sequences in one batch).
    let all = bodies();
    let want: Vec<Vec<String>> = all.iter().map(|(_, b)| streamed_text(&plain, b)).collect();
    let got: Vec<Vec<String>> = thread::scope(|t| {
        let handles: Vec<_> = all
            .iter()
            .map(|(_, b)| t.spawn(|| streamed_text(&fast, b)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((name, _), (w, g)) in all.iter().zip(want.iter().zip(&got)) {
        assert!(!w[0].is_empty(), "{name}: nothing streamed");
        assert_eq!(w, g, "{name}, streamed concurrently");
    }
    // Drafts were verified and most of them kept (the copies repeat their context).
    let offered = fast.metric("edgeinfer_draft_tokens_total");
    let kept = fast.metric("edgeinfer_draft_tokens_accepted_total");
    assert!(
        offered > 100.0 && kept > 0.4 * offered,
        "{kept} of {offered}"
    );
    assert_eq!(plain.metric("edgeinfer_draft_tokens_total"), 0.0);
}

#[test]
fn a_prediction_drafts_the_reply_and_changes_nothing() {
    let (plain, fast) = plain_and_drafting();
    // A reply with nothing to copy from its prompt: only the prediction can draft it.
    let story = json!({"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
                       "max_tokens": 120, "temperature": 0});
    let (_, r) = plain.post(CHAT, &story);
    let reply = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let tokens = r["usage"]["completion_tokens"].as_u64().unwrap() as f64;
    let (head, tail) = reply.split_at(reply.len() / 2);
    let edited = format!("{head} Then a storm came from nowhere at all.{tail}");
    let parts = json!([{"type": "text", "text": head}, {"type": "text", "text": tail}]);
    let accepted = |r: &Value| {
        let d = &r["usage"]["completion_tokens_details"];
        let a = d["accepted_prediction_tokens"].as_f64().unwrap();
        (a, d["rejected_prediction_tokens"].as_f64().unwrap())
    };
    for (name, content, least) in [
        ("exact", json!(reply), 0.7),
        ("in parts", parts, 0.7),
        ("edited", json!(edited), 0.4),
        (
            "unrelated",
            json!("Spreadsheets sort rows by the values in a column."),
            0.0,
        ),
    ] {
        let mut body = story.clone();
        body["prediction"] = json!({"type": "content", "content": content});
        let (sa, a) = plain.post(CHAT, &body);
        let (sb, b) = fast.post(CHAT, &body);
        assert_eq!((sa, sb), (200, 200), "{name}: {a} {b}");
        // The reply is the one without a prediction, token for token.
        assert_eq!(a["choices"], r["choices"], "{name}");
        assert_eq!(b["choices"], r["choices"], "{name}");
        assert_eq!(
            b["usage"]["completion_tokens"],
            r["usage"]["completion_tokens"]
        );
        let (kept, refused) = accepted(&b);
        assert!(kept >= least * tokens, "{name}: {kept} of {tokens} kept");
        assert!(refused < tokens, "{name}: {refused} refused");
        // Without speculation a prediction is only accepted, never used.
        assert_eq!(accepted(&a), (0.0, 0.0), "{name}");
        assert_eq!(streamed_text(&fast, &body)[0], reply, "{name}, streamed");
    }
    for bad in [
        json!({"type": "text", "content": "x"}),
        json!({"type": "content"}),
        json!({"type": "content", "content": 7}),
        json!({"type": "content", "content": [{"type": "image_url"}]}),
        json!("x"),
    ] {
        let mut body = story.clone();
        body["prediction"] = bad.clone();
        let (status, e) = fast.post(CHAT, &body);
        assert_eq!(
            (status, &e["error"]["param"]),
            (400, &json!("prediction")),
            "{bad}: {e}"
        );
    }
}

#[test]
fn a_prediction_with_tokens_the_model_lacks_drafts_only_what_it_has() {
    // A `--tokenizer` larger than the model's vocabulary: its extra token may be in a
    // prediction, and must never reach the model (it would fail the step for every request
    // in it).
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("small.gguf");
    common::synthetic::write(&model, &common::synthetic::Spec::default());
    let mut tok: Value = serde_json::from_str(&common::synthetic::tokenizer_json()).unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap().len();
    let extra = json!({"id": vocab, "content": "ZZZ", "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": false});
    tok["added_tokens"].as_array_mut().unwrap().push(extra);
    tok["model"]["vocab"]["ZZZ"] = json!(vocab);
    let tok_path = dir.path().join("tokenizer.json");
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let s = Server::spawn(
        &[
            "--model",
            model.to_str().unwrap(),
            "--tokenizer",
            tok_path.to_str().unwrap(),
            "--speculate",
            "4",
        ],
        &[],
    );
    s.wait_ready();
    let (status, t) = s.post("/tokenize", &json!({"content": "ZZZ"}));
    assert_eq!((status, &t["tokens"]), (200, &json!([vocab])), "{t}");
    // The reply is forced to `aaaaaaaa` (one token per byte, `a` is 97): the prediction
    // drafts from its start, and its fourth token is the extra one.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                      "temperature": 0, "logit_bias": {"97": 100}});
    let (status, plain) = s.post(CHAT, &body);
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["choices"][0]["message"]["content"], "aaaaaaaa");
    let mut predicted = body.clone();
    predicted["prediction"] = json!({"type": "content", "content": "aaaZZZaaaa"});
    let (status, r) = s.post(CHAT, &predicted);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"], plain["choices"]);
    let details = &r["usage"]["completion_tokens_details"];
    assert!(
        details["accepted_prediction_tokens"].as_u64() > Some(0),
        "{r}"
    );
}
