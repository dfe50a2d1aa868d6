//! Request timeouts (`cf-aig-request-timeout`, `--request-timeout-ms`) with the real default
//! model: a reply that has not begun in time is cancelled (its queue place and compute
//! freed, its row ledgered) and answered 504; a stream that began in time runs to its end.

mod common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::{json, Value};

fn cancelled_rows(s: &Server) -> f64 {
    s.labelled(
        "edgeinfer_gateway_requests_total",
        &[("status", "cancelled")],
    )
}

fn assert_timed_out(r: &common::server::Reply) {
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "request_timeout", "{}", r.body);
    assert_eq!(r.body["error"]["type"], "timeout_error", "{}", r.body);
}

/// A completions stream read to its end: (text, usage, finish reason); no error events.
fn read_stream(resp: ureq::Response) -> (String, Value, Value) {
    let (mut text, mut usage, mut finish) = (String::new(), Value::Null, Value::Null);
    for line in BufReader::new(resp.into_reader())
        .lines()
        .map_while(Result::ok)
    {
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["text"].as_str().unwrap_or(""));
            if !c["finish_reason"].is_null() {
                finish = c["finish_reason"].clone();
            }
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    (text, usage, finish)
}

/// Completions with the end-of-text tokens banned, so replies run to `max_tokens`.
fn endless(max_tokens: u32, stream: bool) -> Value {
    json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": stream,
           "temperature": 0, "logit_bias": {"0": -100, "2": -100}})
}

#[test]
fn a_reply_not_begun_in_time_is_cancelled_and_answered_504() {
    let s = Server::start(&["--max-batch-size", "1", "--rpm-limit", "1000"]);
    // A long request holds the one slot; the next ones wait in the queue.
    let holder = s.raw_post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": common::long_prompt("Tell me a story.")}],
                "max_tokens": 1000, "stream": true, "logit_bias": {"0": -100, "2": -100}}),
    );
    assert!(s.wait_metric("edgeinfer_requests_running", 1.0, Duration::from_secs(10)));
    let timeout = [("cf-aig-request-timeout", "300")];
    for stream in [false, true] {
        let t = Instant::now();
        let r = s.call(
            "POST",
            "/v1/completions",
            Some(&endless(8, stream)),
            &timeout,
        );
        let waited = t.elapsed();
        // A stream too is refused before anything of it is sent.
        assert_timed_out(&r);
        // With the rate state it was admitted under.
        assert!(
            r.header("x-ratelimit-limit-requests") == Some("1000"),
            "{:?}",
            r.headers
        );
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        // Cancelled in the queue: it leaves it while the holder still runs.
        assert!(s.wait_metric("edgeinfer_requests_waiting", 0.0, Duration::from_secs(5)));
        assert_eq!(
            s.metric("edgeinfer_requests_running"),
            1.0,
            "the holder ended early"
        );
    }
    // Both are ledgered (as cancelled, nothing generated) before the holder ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cancelled_rows(&s) < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cancelled_rows(&s), 2.0);
    assert_eq!(s.metric("edgeinfer_requests_running"), 1.0);
    drop(holder);
    assert!(s.wait_idle(Duration::from_secs(30)));
    // With time to spare, the same requests are answered.
    let timeout = [("cf-aig-request-timeout", "60000")];
    let r = s.call(
        "POST",
        "/v1/completions",
        Some(&endless(8, false)),
        &timeout,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["usage"]["completion_tokens"], 8);
}

#[test]
fn the_server_default_applies_and_a_stream_begun_in_time_runs_to_its_end() {
    let s = Server::start(&["--request-timeout-ms", "1"]);
    // The server's 1 ms: nothing begins that soon.
    let r = s.call("POST", "/v1/completions", Some(&endless(8, false)), &[]);
    assert_timed_out(&r);
    assert!(s.wait_idle(Duration::from_secs(10)));
    // Anthropic's surface in Anthropic's shape.
    let msg = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 8,
                     "messages": [{"role": "user", "content": "Hi"}]});
    let r = s.call("POST", "/v1/messages", Some(&msg), &[]);
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.body["type"], "error", "{}", r.body);
    assert_eq!(r.body["error"]["type"], "timeout_error", "{}", r.body);
    // The header overrides it: 0 is no timeout.
    let none = [("cf-aig-request-timeout", "0")];
    let r = s.call("POST", "/v1/completions", Some(&endless(8, false)), &none);
    assert_eq!(r.status, 200, "{}", r.body);
    // A bad value is the client's error, naming the header.
    let bad = [("cf-aig-request-timeout", "soon")];
    let r = s.call("POST", "/v1/completions", Some(&endless(8, false)), &bad);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["param"], "cf-aig-request-timeout");

    // 1.5 s to the first token; the whole stream takes longer, and is not cut: every token
    // arrives, in order (the same text as the same request whole, without a timeout).
    let mut body = endless(1500, true);
    body["stream_options"] = json!({"include_usage": true});
    let t = Instant::now();
    let resp = ureq::post(&format!("{}/v1/completions", s.base))
        .set("cf-aig-request-timeout", "1500")
        .send_json(body)
        .expect("the stream starts");
    let (text, usage, finish) = read_stream(resp);
    let took = t.elapsed();
    assert_eq!(finish, "length");
    assert_eq!(usage["completion_tokens"], 1500, "{usage}");
    assert!(
        took > Duration::from_millis(1500),
        "the stream ended within its timeout ({took:?}): nothing shown"
    );
    let whole = s.call(
        "POST",
        "/v1/completions",
        Some(&endless(1500, false)),
        &none,
    );
    assert_eq!(whole.status, 200, "{}", whole.body);
    assert_eq!(
        whole.body["choices"][0]["text"].as_str(),
        Some(text.as_str())
    );
}

#[test]
fn with_a_timeout_an_identical_request_under_way_is_not_waited_for() {
    let s = Server::start(&[]);
    // Cached, deterministic and long: a second identical request would otherwise wait for
    // the first one's whole reply (seconds), far past its own 2 s to a first token.
    let headers = [
        ("cf-aig-cache-ttl", "60"),
        ("cf-aig-request-timeout", "2000"),
    ];
    let stream = |s: &Server| {
        let mut req = ureq::post(&format!("{}/v1/completions", s.base));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let r = req
            .send_json(endless(1500, true))
            .expect("the stream starts");
        let status = r.header("cf-aig-cache-status").map(str::to_string);
        let (text, _, _) = read_stream(r);
        (status, text)
    };
    std::thread::scope(|scope| {
        let first = scope.spawn(|| stream(&s));
        assert!(s.wait_metric("edgeinfer_requests_running", 1.0, Duration::from_secs(10)));
        let (status, text) = stream(&s);
        assert_eq!(status.as_deref(), Some("BYPASS"));
        let (first_status, first_text) = first.join().unwrap();
        assert_eq!(first_status.as_deref(), Some("MISS"));
        assert_eq!(text, first_text);
    });
}
