//! `Idempotency-Key` with the real default model: a retry with the same key and body gets
//! the first attempt's reply (sampled ones too) without a second generation or a second
//! charge, even when the first client left mid-stream or its budget is now spent; another
//! API key's retry is its own request; a reply no longer held is 409, never made again; a
//! request of several choices is refused the header.

mod common;

use std::io::Read;
use std::time::Duration;

use common::server::Server;
use serde_json::{json, Value};

/// Sampled (no seed), with the end-of-text tokens banned so it runs to `max_tokens`.
fn sampled(max_tokens: u32, stream: bool) -> Value {
    json!({"messages": [{"role": "user", "content": "Write a poem about the sea."}],
           "max_tokens": max_tokens, "temperature": 1.0, "stream": stream,
           "logit_bias": {"0": -100, "2": -100}})
}

fn text(r: &common::server::Reply) -> String {
    r.body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", r.body))
        .to_string()
}

#[test]
fn a_retry_gets_the_first_reply_without_a_second_generation() {
    let s = Server::start(&[]);
    let post = |body: &Value, key: Option<&str>| {
        let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
        s.call("POST", "/v1/chat/completions", Some(body), &headers)
    };
    // Sampled replies differ without the header...
    let (a, b) = (
        post(&sampled(48, false), None),
        post(&sampled(48, false), None),
    );
    assert_ne!(text(&a), text(&b), "two samples came out the same");
    // ...and repeat with it: the retry is a replay, ledgered as such.
    let first = post(&sampled(48, false), Some("order-17"));
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None);
    let generated = s.metric("edgeinfer_generation_tokens_total");
    let again = post(&sampled(48, false), Some("order-17"));
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(text(&again), text(&first));
    assert_eq!(again.body["usage"], first.body["usage"]);
    assert_eq!(s.metric("edgeinfer_generation_tokens_total"), generated);
    // Another key, or another body, is another request.
    let other = post(&sampled(48, false), Some("order-18"));
    assert_ne!(text(&other), text(&first));
    assert_eq!(other.header("idempotent-replayed"), None);
    let longer = post(&sampled(49, false), Some("order-17"));
    assert_eq!(longer.body["usage"]["completion_tokens"], 49);

    // Several choices cannot be replayed as one: refused, naming the header.
    let mut two = sampled(4, false);
    two["n"] = json!(2);
    let r = post(&two, Some("order-19"));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["param"], "idempotency-key");
    let bad = post(&sampled(4, false), Some(&"x".repeat(300)));
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[test]
fn a_client_that_leaves_mid_stream_can_retry_and_get_the_whole_reply() {
    let s = Server::start(&[]);
    let before = s.metric("edgeinfer_generation_tokens_total");
    // A stream of 400 tokens whose client reads its first bytes and goes.
    let mut gone = ureq::post(&format!("{}/v1/chat/completions", s.base))
        .set("idempotency-key", "agent-step-3")
        .send_json(sampled(400, true))
        .expect("the stream starts")
        .into_reader();
    let mut buf = [0u8; 64];
    gone.read_exact(&mut buf).unwrap();
    drop(gone);
    // The retry (not streamed this time: delivery is not part of the key) waits for the
    // generation the first attempt started, which went on without its client.
    let r = s.call(
        "POST",
        "/v1/chat/completions",
        Some(&sampled(400, false)),
        &[("idempotency-key", "agent-step-3")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["usage"]["completion_tokens"], 400, "{}", r.body);
    assert!(s.wait_idle(Duration::from_secs(30)));
    // One generation of 400 tokens in all; the ledger has it once, and one replay.
    assert_eq!(
        s.metric("edgeinfer_generation_tokens_total") - before,
        400.0
    );
    let rows = |status| s.labelled("edgeinfer_gateway_requests_total", &[("status", status)]);
    assert_eq!(rows("ok"), 1.0);
    assert_eq!(rows("replayed"), 1.0);
    assert_eq!(rows("cancelled"), 0.0);
}

#[test]
fn a_streamed_retry_is_answered_at_once_and_kept_alive_until_the_replay() {
    let s = Server::start(&["--sse-keep-alive", "1"]);
    let key = [("idempotency-key", "agent-step-9")];
    std::thread::scope(|sc| {
        // The first attempt: a long whole request.
        let first = sc.spawn(|| {
            s.call(
                "POST",
                "/v1/chat/completions",
                Some(&sampled(1500, false)),
                &key,
            )
        });
        assert!(s.wait_metric("edgeinfer_requests_running", 1.0, Duration::from_secs(20)));
        // Its streamed retry gets its headers while the first still runs, then comments
        // that keep the connection alive, then the replay.
        let r = ureq::post(&format!("{}/v1/chat/completions", s.base))
            .set(key[0].0, key[0].1)
            .send_json(sampled(1500, true))
            .expect("the retry is answered");
        assert_eq!(s.metric("edgeinfer_requests_running"), 1.0, "not at once");
        assert_eq!(r.header("idempotent-replayed"), Some("true"));
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let mut body = String::new();
        r.into_reader().read_to_string(&mut body).unwrap();
        let first = first.join().unwrap();
        assert_eq!(first.status, 200, "{}", first.body);
        let lines: Vec<&str> = body.lines().filter(|l| !l.is_empty()).collect();
        assert!(
            lines[0].starts_with(':'),
            "no keep-alive first: {:?}",
            &lines[..3]
        );
        let streamed: String = lines
            .iter()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(streamed, text(&first));
        assert_eq!(lines.last(), Some(&"data: [DONE]"));
    });
    // One generation in all.
    assert!(s.wait_idle(Duration::from_secs(30)));
    let rows = |status| s.labelled("edgeinfer_gateway_requests_total", &[("status", status)]);
    assert_eq!((rows("ok"), rows("replayed")), (1.0, 1.0));
}

const MASTER: &str = "sk-master-test-0123456789";

#[test]
fn replays_are_per_api_key_free_of_limits_and_never_made_twice() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.json");
    // Every completion token costs 1,000 micro-USD.
    std::fs::write(
        &prices,
        r#"{"*": {"input": 0, "output": 1000, "cached_response": 500}}"#,
    )
    .unwrap();
    // Room for short replies only: a long one is too large to keep.
    let s = Server::start(&[
        "--master-key",
        MASTER,
        "--prices",
        prices.to_str().unwrap(),
        "--idempotency-max-bytes",
        "4000",
    ]);
    let key = |fields: Value| {
        let r = s.post_key("/key/generate", &fields, MASTER);
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["key"].as_str().unwrap().to_string()
    };
    // A budget of exactly ten tokens.
    let (a, b) = (key(json!({"max_budget": 0.01})), key(json!({})));
    let post = |k: &str, body: &Value, idem: &str| {
        let auth = format!("Bearer {k}");
        s.call(
            "POST",
            "/v1/chat/completions",
            Some(body),
            &[("authorization", &auth), ("idempotency-key", idem)],
        )
    };
    let first = post(&a, &sampled(10, false), "step-1");
    assert_eq!(first.status, 200, "{}", first.body);
    // The budget is spent: a new request is refused, the retry is handed its reply.
    let refused = post(&a, &sampled(10, false), "step-2");
    assert_eq!(refused.status, 429, "{}", refused.body);
    let again = post(&a, &sampled(10, false), "step-1");
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(text(&again), text(&first));
    // Another API key with the same idempotency key and body: its own request.
    let other = post(&b, &sampled(10, false), "step-1");
    assert_eq!(other.status, 200, "{}", other.body);
    assert_eq!(other.header("idempotent-replayed"), None);
    // A reply too large to keep: its retry is told so, and nothing runs again.
    let long = post(&b, &sampled(120, false), "step-3");
    assert_eq!(long.status, 200, "{}", long.body);
    let generated = s.metric("edgeinfer_generation_tokens_total");
    let gone = post(&b, &sampled(120, false), "step-3");
    assert_eq!(gone.status, 409, "{}", gone.body);
    assert_eq!(gone.body["error"]["code"], "idempotency_reply_gone");
    assert_eq!(s.metric("edgeinfer_generation_tokens_total"), generated);
    // The replay is ledgered as one, at no cost: the spend is the first attempt's.
    let replayed = s.labelled(
        "edgeinfer_gateway_requests_total",
        &[("status", "replayed")],
    );
    assert_eq!(replayed, 1.0);
    // Key a spent the first attempt's tokens, not a cached reply's price on top.
    let paid = first.body["usage"]["completion_tokens"].as_f64().unwrap() * 1000.0 / 1e6;
    let info = s.call(
        "GET",
        "/key/info",
        None,
        &[("authorization", &format!("Bearer {a}"))],
    );
    assert_eq!(info.status, 200, "{}", info.body);
    assert_eq!(
        info.body["info"]["spend"].as_f64(),
        Some(paid),
        "{}",
        info.body
    );
}

#[test]
fn a_retry_is_replayed_past_a_full_queue() {
    let s = Server::start(&["--max-batch-size", "1", "--max-queue", "1"]);
    let post = |idem: &str| {
        s.call(
            "POST",
            "/v1/chat/completions",
            Some(&sampled(8, false)),
            &[("idempotency-key", idem)],
        )
    };
    let first = post("r-1");
    assert_eq!(first.status, 200, "{}", first.body);
    // One long request runs, one waits: the queue is full.
    let long = json!({"messages": [{"role": "user", "content": "Tell me a story."}],
                      "max_tokens": 1000, "stream": true, "logit_bias": {"0": -100, "2": -100}});
    let mut running = s.raw_post("/v1/chat/completions", &long);
    // It runs: its stream has begun. (The running gauge alone could still count the first
    // request, and then the second long one could still be on its way in when the new
    // request below is sent, and be admitted: a 200 where a 429 is due.)
    let begun = common::server::read_some(&mut running, 400);
    assert!(begun.contains("data:"), "{begun}");
    let waiting = s.raw_post("/v1/chat/completions", &long);
    assert!(s.wait_metric("edgeinfer_requests_waiting", 1.0, Duration::from_secs(10)));
    // The retry is handed its reply; a new request is refused as usual.
    let again = post("r-1");
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(text(&again), text(&first));
    assert_eq!(post("r-2").status, 429);
    drop((running, waiting));
    assert!(s.wait_idle(Duration::from_secs(30)));
}
