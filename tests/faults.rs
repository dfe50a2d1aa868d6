//! Faults: a panic on the engine thread fails its requests, flips /health to 503 and ends
//! the process non-zero (a supervisor restarts it) instead of hanging; SIGTERM under load
//! turns readiness to 503 at once, lets running streams finish, and exits 0; streams still
//! running when the drain time is up end with an error event and are billed.

mod common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::server::{raw_request, Server};
use serde_json::{json, Value};

fn long_stream() -> Value {
    json!({"messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
           "max_tokens": 120, "temperature": 0, "stream": true})
}

/// Streams a request and returns its `data:` payloads; `first` is told when one arrived.
fn stream_lines(base: &str, body: &Value, first: std::sync::mpsc::Sender<()>) -> Vec<String> {
    let r = match ureq::post(&format!("{base}/v1/chat/completions")).send_json(body.clone()) {
        Ok(r) => r,
        Err(e) => return vec![format!("request failed: {e}")],
    };
    let mut out = Vec::new();
    for line in BufReader::new(r.into_reader())
        .lines()
        .map_while(Result::ok)
    {
        if let Some(d) = line.strip_prefix("data: ") {
            if out.is_empty() {
                let _ = first.send(());
            }
            out.push(d.to_string());
        }
    }
    out
}

#[test]
fn an_engine_panic_fails_requests_flips_health_and_exits_nonzero() {
    let mut s = Server::spawn(
        &["--model", common::default_model_path().to_str().unwrap()],
        &[("EDGEINFER_FAULT", "engine-panic-at-step=6")],
    );
    s.wait_ready();
    let (tx, rx) = std::sync::mpsc::channel();
    let base = s.base.clone();
    let h = std::thread::spawn(move || stream_lines(&base, &long_stream(), tx));
    let _ = rx.recv_timeout(Duration::from_secs(60));
    let lines = h.join().unwrap();
    // The stream ends with an error event in OpenAI's shape, not a hang.
    let last_json = lines
        .iter()
        .rev()
        .find(|l| l.as_str() != "[DONE]")
        .expect("some events");
    let v: Value = serde_json::from_str(last_json).unwrap();
    assert!(v["error"]["message"].is_string(), "{lines:?}");
    // Health says so (or the process is already gone), and the process exits non-zero.
    let started = Instant::now();
    // A refused connection is a process already gone (it exits about 2 s after the failure).
    let status = match std::net::TcpStream::connect(&s.addr) {
        Ok(mut c) => {
            use std::io::Write;
            let _ = c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let text = common::server::read_some(&mut c, 4096);
            text.split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0)
        }
        Err(_) => 0,
    };
    assert!(status == 503 || status == 0, "health {status}");
    let exit = s
        .wait_exit(Duration::from_secs(15))
        .expect("the process exits");
    assert!(!exit.success(), "{exit:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn sigterm_under_load_drains_and_exits_zero() {
    let mut s = Server::start(&["--shutdown-timeout", "60"]);
    let (tx, rx) = std::sync::mpsc::channel();
    // A stream's first line comes before its prefill; 2,000-word prompts keep all four
    // running for seconds after it on any host, so the checks below meet a draining server.
    let mut body = long_stream();
    body["messages"][0]["content"] =
        json!(common::long_prompt("Tell me a long story about the sea."));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (base, tx, body) = (s.base.clone(), tx.clone(), body.clone());
            std::thread::spawn(move || stream_lines(&base, &body, tx))
        })
        .collect();
    for _ in 0..4 {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("every stream starts");
    }
    s.signal_term();
    // Readiness turns 503 at once while liveness stays 200 (draining is not a failure); a
    // new request is refused with 503 in OpenAI's shape.
    let deadline = Instant::now() + Duration::from_secs(2);
    let (status, body) = loop {
        let (status, body) = raw_request(&s.addr, "GET", "/ready", None, b"");
        if status == 503 || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "shutting_down");
    let (status, body) = raw_request(&s.addr, "GET", "/health", None, b"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "draining");
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let (status, body) = raw_request(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        Some("application/json"),
        chat.to_string().as_bytes(),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    // The running streams finish whole.
    for h in handles {
        let lines = h.join().unwrap();
        assert_eq!(
            lines.last().map(String::as_str),
            Some("[DONE]"),
            "{lines:?}"
        );
        let finish = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| {
                v["choices"][0]["finish_reason"]
                    .as_str()
                    .map(str::to_string)
            });
        assert!(
            matches!(finish.as_deref(), Some("length" | "stop")),
            "{lines:?}"
        );
    }
    let exit = s
        .wait_exit(Duration::from_secs(30))
        .expect("the process exits");
    assert!(exit.success(), "{exit:?}");
}

/// Starts a stream far longer than any drain (no end of text, thousands of tokens) and
/// returns once its first event came; joined, it gives the stream's `data:` payloads.
fn endless_stream(s: &Server) -> std::thread::JoinHandle<Vec<String>> {
    let mut body = long_stream();
    body["max_tokens"] = json!(4000);
    body["logit_bias"] = json!({"0": -100, "2": -100});
    body["stream_options"] = json!({"include_usage": true});
    let (tx, rx) = std::sync::mpsc::channel();
    let base = s.base.clone();
    let h = std::thread::spawn(move || stream_lines(&base, &body, tx));
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the stream starts");
    h
}

#[test]
fn a_drain_that_runs_out_ends_the_streams_and_bills_them() {
    let store = tempfile::tempdir().unwrap();
    let db = store.path().join("e.db");
    let mut s = Server::start(&["--shutdown-timeout", "1", "--db", db.to_str().unwrap()]);
    let h = endless_stream(&s);
    std::thread::sleep(Duration::from_millis(500));
    s.signal_term();
    // Cut off at the drain's end, the stream is told so and ends (it was a broken body).
    let lines = h.join().unwrap();
    let tail = &lines[lines.len().saturating_sub(3)..];
    assert_eq!(lines.last().map(String::as_str), Some("[DONE]"), "{tail:?}");
    let error = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("error").is_some())
        .unwrap_or_else(|| panic!("no error event: {tail:?}"));
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{error}"
    );
    let exit = s
        .wait_exit(Duration::from_secs(30))
        .expect("the process exits");
    assert!(exit.success(), "{exit:?}");
    // And metered: what it computed is in the ledger, as a cancelled request's.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (status, completion): (String, i64) = conn
        .query_row(
            "SELECT status, completion_tokens FROM requests WHERE route = '/v1/chat/completions'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(status, "cancelled");
    assert!(completion > 10, "{completion} tokens");
    // The client was told the same, in the usage chunk before the error.
    let usage = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage chunk: {tail:?}"));
    assert_eq!(usage["usage"]["completion_tokens"], completion, "{usage}");
}

#[test]
fn a_second_signal_ends_the_drain_at_once() {
    let mut s = Server::start(&["--shutdown-timeout", "600"]);
    let h = endless_stream(&s);
    s.signal_term();
    // The first signal drains: the stream goes on.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!h.is_finished(), "the first signal let the stream run");
    let second = Instant::now();
    s.signal_term();
    let lines = h.join().unwrap();
    let tail = &lines[lines.len().saturating_sub(3)..];
    assert_eq!(lines.last().map(String::as_str), Some("[DONE]"), "{tail:?}");
    assert!(
        lines.iter().any(|l| l.contains("shutting down")),
        "the stream was not ended by the second signal: {tail:?}"
    );
    let exit = s
        .wait_exit(Duration::from_secs(30))
        .expect("the process exits");
    assert!(exit.success(), "{exit:?}");
    assert!(
        second.elapsed() < Duration::from_secs(20),
        "{:?} from the second signal to the exit",
        second.elapsed()
    );
}
