//! The bad-input matrix: every malformed, mistyped, absurd or oversized request gets a 4xx
//! in OpenAI's error shape (never a 5xx, a hang or a dropped connection), and the server
//! answers normally afterwards.

mod common;

use common::server::{raw_request, Server};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const JSON: Option<&str> = Some("application/json");

fn chat_with(field: &str, value: &str) -> Vec<u8> {
    format!(r#"{{"messages":[{{"role":"user","content":"Hi"}}],"max_tokens":4,"{field}":{value}}}"#)
        .into_bytes()
}

/// (name, route, content type, body)
fn cases() -> Vec<(String, &'static str, Option<&'static str>, Vec<u8>)> {
    let mut c: Vec<(String, &'static str, Option<&'static str>, Vec<u8>)> = vec![
        ("empty body".into(), CHAT, JSON, b"".to_vec()),
        ("whitespace body".into(), CHAT, JSON, b"  \n ".to_vec()),
        (
            "truncated JSON".into(),
            CHAT,
            JSON,
            br#"{"messages": [{"role": "user""#.to_vec(),
        ),
        ("not an object".into(), CHAT, JSON, b"[1, 2, 3]".to_vec()),
        ("a bare string".into(), CHAT, JSON, br#""hello""#.to_vec()),
        ("null".into(), CHAT, JSON, b"null".to_vec()),
        (
            "trailing garbage".into(),
            CHAT,
            JSON,
            br#"{"messages": []} xyz"#.to_vec(),
        ),
        (
            "invalid UTF-8 in a string".into(),
            CHAT,
            JSON,
            b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\xfd\"}]}".to_vec(),
        ),
        (
            "invalid UTF-8 outside strings".into(),
            CHAT,
            JSON,
            b"\xc3\x28{\"messages\":[]}".to_vec(),
        ),
        (
            "a lone surrogate escape".into(),
            CHAT,
            JSON,
            br#"{"messages":[{"role":"user","content":"\ud800"}],"max_tokens":4}"#.to_vec(),
        ),
        (
            "no messages".into(),
            CHAT,
            JSON,
            br#"{"max_tokens": 4}"#.to_vec(),
        ),
        (
            "empty messages".into(),
            CHAT,
            JSON,
            br#"{"messages": []}"#.to_vec(),
        ),
        (
            "messages a string".into(),
            CHAT,
            JSON,
            br#"{"messages": "Hi"}"#.to_vec(),
        ),
        (
            "role a number".into(),
            CHAT,
            JSON,
            br#"{"messages": [{"role": 5, "content": "Hi"}]}"#.to_vec(),
        ),
        (
            "unknown role".into(),
            CHAT,
            JSON,
            br#"{"messages": [{"role": "wizard", "content": "Hi"}]}"#.to_vec(),
        ),
        (
            "content an object".into(),
            CHAT,
            JSON,
            br#"{"messages": [{"role": "user", "content": {"a": 1}}]}"#.to_vec(),
        ),
        (
            "wrong content type: text".into(),
            CHAT,
            Some("text/plain"),
            chat_with("seed", "1"),
        ),
        (
            "wrong content type: form".into(),
            CHAT,
            Some("application/x-www-form-urlencoded"),
            chat_with("seed", "1"),
        ),
        (
            "wrong content type: multipart".into(),
            CHAT,
            Some("multipart/form-data; boundary=x"),
            chat_with("seed", "1"),
        ),
        (
            "completions: prompt an object".into(),
            "/v1/completions",
            JSON,
            br#"{"prompt": {"a": 1}, "max_tokens": 4}"#.to_vec(),
        ),
        (
            "completions: token id beyond the vocabulary".into(),
            "/v1/completions",
            JSON,
            br#"{"prompt": [1, 4294967295], "max_tokens": 4}"#.to_vec(),
        ),
        (
            "completions: negative token id".into(),
            "/v1/completions",
            JSON,
            br#"{"prompt": [1, -7], "max_tokens": 4}"#.to_vec(),
        ),
        ("tokenize: empty".into(), "/tokenize", JSON, b"".to_vec()),
        (
            "tokenize: content a number".into(),
            "/tokenize",
            JSON,
            br#"{"content": 5}"#.to_vec(),
        ),
        (
            "detokenize: token 2^40".into(),
            "/detokenize",
            JSON,
            br#"{"tokens": [1099511627776]}"#.to_vec(),
        ),
        (
            "key generate: malformed".into(),
            "/key/generate",
            JSON,
            br#"{"models": "#.to_vec(),
        ),
    ];
    // Wrong types and absurd values, one field at a time.
    let fields: &[(&str, &[&str])] = &[
        (
            "n",
            &[
                "1e999",
                "9223372036854775808",
                "18446744073709551616",
                "-1",
                "0",
                "17",
                "\"2\"",
                "1.5",
            ],
        ),
        (
            "max_tokens",
            &[
                "1e999",
                "9223372036854775808",
                "-1",
                "0",
                "\"ten\"",
                "[]",
                "1.5",
            ],
        ),
        (
            "max_completion_tokens",
            &["1e999", "9223372036854775807", "-5"],
        ),
        (
            "temperature",
            &["1e999", "-1e999", "1e308", "-1", "3", "\"hot\"", "{}"],
        ),
        ("top_p", &["1e999", "-0.5", "2", "\"x\""]),
        ("top_k", &["-1", "1e999", "\"x\""]),
        ("min_p", &["2", "-1"]),
        ("frequency_penalty", &["1e999", "-3", "9"]),
        ("presence_penalty", &["1e999", "9"]),
        ("repetition_penalty", &["0", "-1", "1e999"]),
        ("seed", &["18446744073709551616", "-1", "1e999", "\"s\""]),
        ("stream", &["\"yes\"", "1"]),
        ("logprobs", &["\"yes\""]),
        ("top_logprobs", &["21", "-1", "1e999"]),
        (
            "stop",
            &["5", "[1, 2]", "[\"a\", \"b\", \"c\", \"d\", \"e\"]"],
        ),
        (
            "response_format",
            &[
                "\"json\"",
                "{\"type\": \"yaml\"}",
                "{\"type\": \"json_schema\"}",
            ],
        ),
        ("tools", &["{}", "[{\"type\": \"function\"}]"]),
        ("tool_choice", &["\"sometimes\"", "5"]),
        (
            "logit_bias",
            &[
                "{\"1\": 101}",
                "{\"-1\": 1}",
                "{\"x\": 1}",
                "{\"1\": \"up\"}",
                "{\"01\": 2}",
                "{\"+5\": 1}",
                "{\"1\": 100.00001}",
                "{\"49152\": 1}",
                "[1]",
            ],
        ),
        ("model", &["5", "\"no-such-model\""]),
    ];
    for (field, values) in fields {
        for v in *values {
            c.push((format!("{field} = {v}"), CHAT, JSON, chat_with(field, v)));
        }
    }
    // 129 levels of nesting, in an ignored field and inside a schema.
    let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
    c.push((
        "129-deep array".into(),
        CHAT,
        JSON,
        chat_with("metadata", &deep),
    ));
    let mut schema = json!({"type": "string"});
    for _ in 0..129 {
        schema = json!({"type": "object", "properties": {"a": schema}});
    }
    let rf = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
    c.push((
        "129-deep schema".into(),
        CHAT,
        JSON,
        chat_with("response_format", &rf.to_string()),
    ));
    // 10^5 stop strings.
    let stops = Value::from(vec!["stop"; 100_000]).to_string();
    c.push((
        "100000 stop strings".into(),
        CHAT,
        JSON,
        chat_with("stop", &stops),
    ));
    // A stop string past the 1 KiB the engine looks for after each token.
    let long = Value::from(vec!["x".repeat(1025)]).to_string();
    c.push((
        "1025-byte stop string".into(),
        CHAT,
        JSON,
        chat_with("stop", &long),
    ));
    // 3 MB: a prompt far beyond the context.
    let big = "word ".repeat(600_000);
    c.push((
        "3 MB prompt".into(),
        CHAT,
        JSON,
        json!({"messages": [{"role": "user", "content": big}], "max_tokens": 4})
            .to_string()
            .into_bytes(),
    ));
    // Over --max-body-bytes (4 MiB by default).
    c.push((
        "5 MB body".into(),
        CHAT,
        JSON,
        json!({"messages": [{"role": "user", "content": "x".repeat(5 << 20)}]})
            .to_string()
            .into_bytes(),
    ));
    c
}

#[test]
fn every_bad_request_gets_a_4xx_in_openai_shape_and_the_server_lives() {
    let s = Server::start(&[]);
    let mut failures = Vec::new();
    let cases = cases();
    for (name, route, ct, body) in &cases {
        let (status, reply) = raw_request(&s.addr, "POST", route, *ct, body);
        let err = &reply["error"];
        let shaped = err["message"].as_str().is_some_and(|m| !m.is_empty())
            && err["type"].as_str().is_some()
            && err.get("param").is_some()
            && err.get("code").is_some();
        if !(400..500).contains(&status) || !shaped {
            failures.push(format!("{name}: {status} {reply}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Alive, and still right.
    let (status, _) = s.get("/health");
    assert_eq!(status, 200);
    let (status, reply) = s.post(
        CHAT,
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(status, 200, "{reply}");
    assert!(reply["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn a_trickled_body_gets_408_within_the_body_timeout() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let s = Server::start(&["--body-read-timeout", "1"]);
    let mut sock = std::net::TcpStream::connect(&s.addr).unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    sock.write_all(head.as_bytes()).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(10) {
        let _ = sock.write_all(b" ");
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                    break;
                }
            }
            Err(_) => {}
        }
    }
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("invalid_request_error"), "{text}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    let (status, _) = s.get("/health");
    assert_eq!(status, 200);
}

/// A POST as a browser sends it: `host` and `origin` as given, a content type or none.
fn browser_post(addr: &str, host: &str, origin: Option<&str>, json: bool) -> (u16, Value) {
    use std::io::{Read, Write};
    let body = br#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#;
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let ct = if json {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: {host}\r\n{origin}{ct}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).unwrap();
    sock.write_all(body).unwrap();
    let mut text = String::new();
    sock.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = text
        .find("\r\n\r\n")
        .and_then(|i| serde_json::from_str(&text[i + 4..]).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

#[test]
fn web_pages_cannot_drive_a_keyless_loopback_server() {
    let s = Server::start(&[]);
    // A page on another site (a cross-site POST with no content type needs no preflight),
    // and a page whose name was re-pointed at 127.0.0.1 (DNS rebinding).
    for (host, origin, json) in [
        (s.addr.as_str(), Some("https://evil.example"), false),
        (s.addr.as_str(), Some("null"), true),
        ("evil.example:8080", None, true),
    ] {
        let (status, e) = browser_post(&s.addr, host, origin, json);
        assert_eq!(status, 403, "{host} {origin:?}: {e}");
        assert_eq!(e["error"]["code"], "cross_site_request", "{e}");
    }
    // Programs on this machine, and the server's own console page, are let in.
    let own = format!("http://{}", s.addr);
    for (host, origin) in [
        (s.addr.as_str(), None),
        ("localhost", None),
        (s.addr.as_str(), Some(own.as_str())),
    ] {
        let (status, r) = browser_post(&s.addr, host, origin, true);
        assert_eq!(status, 200, "{host} {origin:?}: {r}");
    }
}

#[test]
fn pages_of_the_origins_let_in_may_call_from_a_browser() {
    const MASTER: &str = "sk-master-cors-test";
    let app = "https://app.example";
    let s = Server::start(&["--master-key", MASTER, "--cors-allow-origin", app]);
    // The preflight is answered before any key is asked for.
    let ok = preflight(&s, app);
    assert!(ok.status < 300, "{}", ok.status);
    assert_eq!(ok.header("access-control-allow-origin"), Some(app));
    // From a public page to a node on a more private network (Private Network Access), and
    // with an id to find it in the log by.
    assert_eq!(
        ok.header("access-control-allow-private-network"),
        Some("true")
    );
    assert!(ok.header("x-request-id").is_some_and(|id| !id.is_empty()));
    let headers = ok
        .header("access-control-allow-headers")
        .unwrap_or_default();
    assert!(headers.contains("authorization"), "{headers}");
    // Another site's page is not let in.
    let other = preflight(&s, "https://evil.example");
    assert_eq!(other.header("access-control-allow-origin"), None);
    // The answers, a 401 included, are the page's to read, with the headers it needs.
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let bearer = format!("Bearer {MASTER}");
    let r = s.call(
        "POST",
        CHAT,
        Some(&body),
        &[("origin", app), ("authorization", &bearer)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("access-control-allow-origin"), Some(app));
    let exposed = r
        .header("access-control-expose-headers")
        .unwrap_or_default();
    assert!(exposed.contains("x-request-id"), "{exposed}");
    let denied = s.call("POST", CHAT, Some(&body), &[("origin", app)]);
    assert_eq!(denied.status, 401, "{}", denied.body);
    assert_eq!(denied.header("access-control-allow-origin"), Some(app));
    drop(s);

    // Without the flag no page is let in, and a key-less loopback server lets in the listed
    // pages alone.
    let s = Server::start(&[]);
    assert_eq!(
        preflight(&s, app).header("access-control-allow-origin"),
        None
    );
    drop(s);
    let s = Server::start(&["--cors-allow-origin", app]);
    let (status, r) = browser_post(&s.addr, &s.addr, Some(app), true);
    assert_eq!(status, 200, "{r}");
    let (status, e) = browser_post(&s.addr, &s.addr, Some("https://evil.example"), true);
    assert_eq!(
        (status, &e["error"]["code"]),
        (403, &json!("cross_site_request")),
        "{e}"
    );
    drop(s);
    // `*` lets any page read a keyed server's answers, never drive a key-less one.
    let s = Server::start(&["--cors-allow-origin", "*", "--cors-allow-origin", app]);
    let (status, e) = browser_post(&s.addr, &s.addr, Some("https://evil.example"), true);
    assert_eq!(status, 403, "{e}");
    // Nor does it let every public page reach into a private network (a named one may).
    let any = preflight(&s, "https://evil.example");
    assert_eq!(any.header("access-control-allow-origin"), Some("*"));
    assert_eq!(any.header("access-control-allow-private-network"), None);
    let named = preflight(&s, app);
    assert_eq!(
        named.header("access-control-allow-private-network"),
        Some("true")
    );
    // A malformed origin stops the start with a message naming the flag.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args([
            "serve",
            "--cors-allow-origin",
            "app.example/x",
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--cors-allow-origin"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// A browser's preflight of a POST with a key, from a page of `origin`.
fn preflight(s: &Server, origin: &str) -> common::server::Reply {
    s.call(
        "OPTIONS",
        CHAT,
        None,
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type",
            ),
            ("access-control-request-private-network", "true"),
        ],
    )
}
