//! The gateway over real HTTP on the real default model: keys (401/403/404, revocation on the
//! next request, the offline CLI), reservation-exact token limits, budgets that end a stream
//! with `length`, an exact ledger that survives `kill -9`, and the response cache.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::{Reply, Server};
use serde_json::{json, Value};

const MASTER: &str = "sk-master-test-0123456789";

fn counter(s: &Server, name: &str) -> f64 {
    let v = s.metric(name);
    if v.is_nan() {
        0.0
    } else {
        v
    }
}

fn generate_key(s: &Server, fields: Value) -> String {
    let r = s.post_key("/key/generate", &fields, MASTER);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["key"]
        .as_str()
        .expect("the key is returned once")
        .to_string()
}

fn chat(content: &str, max_tokens: u64) -> Value {
    json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

fn assert_openai_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let e = &r.body["error"];
    assert_eq!(e["code"], code, "{}", r.body);
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(e["type"].is_string() && e.get("param").is_some());
}

fn edgeinfer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// A key made with the offline CLI (`edgeinfer keys generate --db DB ARGS...`).
fn offline_key(db: &str, args: &[&str]) -> String {
    let mut all = vec!["keys", "generate", "--db", db];
    all.extend_from_slice(args);
    let out = edgeinfer(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: Value = serde_json::from_slice(&out.stdout).expect("keys generate prints JSON");
    made["key"].as_str().unwrap().to_string()
}

fn db_of(s: &Server) -> String {
    s.data_dir
        .path()
        .join("edgeinfer.db")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn keys_guard_every_route_but_the_probes() {
    let s = Server::start(&["--master-key", MASTER]);
    let body = chat("Hi", 2);
    let route = "/v1/chat/completions";
    assert_openai_error(
        &s.call("POST", route, Some(&body), &[]),
        401,
        "invalid_api_key",
    );
    assert_openai_error(
        &s.post_key(route, &body, "sk-ei-wrong"),
        401,
        "invalid_api_key",
    );
    assert_openai_error(
        &s.call("GET", "/v1/models", None, &[]),
        401,
        "invalid_api_key",
    );
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/metrics").0, 200);

    // Admin routes take only the master key.
    let none = s.call("POST", "/key/generate", Some(&json!({})), &[]);
    assert_openai_error(&none, 401, "invalid_api_key");
    let models = s.call(
        "GET",
        "/v1/models",
        None,
        &[("authorization", &format!("Bearer {MASTER}"))],
    );
    let model = models.body["data"][0]["id"].as_str().unwrap().to_string();
    let alice = generate_key(&s, json!({"key_alias": "alice", "models": [model]}));
    assert_openai_error(
        &s.post_key("/key/generate", &json!({}), &alice),
        403,
        "admin_only",
    );
    assert_eq!(s.post_key(route, &body, &alice).status, 200);
    let via_x_api_key = s.call("POST", route, Some(&body), &[("x-api-key", &alice)]);
    assert_eq!(via_x_api_key.status, 200);

    // A key limited to another model: 403 for this one; an unknown model is 404.
    let other = generate_key(&s, json!({"models": ["some-other-model"]}));
    assert_openai_error(&s.post_key(route, &body, &other), 403, "model_not_allowed");
    // The model list shows each key what it may use.
    let listed = |key: &str| {
        let r = s.call(
            "GET",
            "/v1/models",
            None,
            &[("authorization", &format!("Bearer {key}"))],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["data"].as_array().unwrap().len()
    };
    assert_eq!((listed(&alice), listed(&other), listed(MASTER)), (1, 0, 1));
    // Retrieved by name: a key that may not use it does not see it either.
    let one = |key: &str| {
        let auth = format!("Bearer {key}");
        let path = "/v1/models/SmolLM2-135M-Instruct.Q4_1";
        s.call("GET", path, None, &[("authorization", &auth)])
            .status
    };
    assert_eq!((one(&alice), one(&other), one(MASTER)), (200, 404, 200));
    let mut unknown = body.clone();
    unknown["model"] = json!("no-such-model");
    assert_openai_error(&s.post_key(route, &unknown, &alice), 404, "model_not_found");

    // Settings change on the next request: one request per minute.
    let info = s.call(
        "GET",
        "/key/info?key=alice",
        None,
        &[("authorization", &format!("Bearer {MASTER}"))],
    );
    assert_eq!(info.body["info"]["key_alias"], "alice", "{}", info.body);
    assert!(info.body["info"]["spend"].is_number());
    let upd = s.post_key(
        "/key/update",
        &json!({"key": "alice", "rpm_limit": 1}),
        MASTER,
    );
    assert_eq!(upd.status, 200, "{}", upd.body);
    let first = s.post_key(route, &body, &alice);
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-limit-requests"), Some("1"));
    assert_eq!(first.header("x-ratelimit-remaining-requests"), Some("0"));
    let second = s.post_key(route, &body, &alice);
    assert_openai_error(&second, 429, "rate_limit_exceeded");
    assert!(second.header("retry-after").is_some() && second.header("retry-after-ms").is_some());

    // Revocation holds from the next request, without a restart.
    let del = s.post_key("/key/delete", &json!({"key_aliases": ["alice"]}), MASTER);
    assert_eq!(del.status, 200, "{}", del.body);
    assert_openai_error(&s.post_key(route, &body, &alice), 401, "invalid_api_key");

    // The offline CLI writes the same store; the running server sees it at once.
    let db = db_of(&s);
    let bob = offline_key(&db, &["--alias", "bob", "--tpm-limit", "5000"]);
    let ok = s.post_key(route, &body, &bob);
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.header("x-ratelimit-limit-tokens"), Some("5000"));
    let out = edgeinfer(&["keys", "delete", "--db", &db, "bob"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_openai_error(&s.post_key(route, &body, &bob), 401, "invalid_api_key");
    // No key is stored in the clear.
    let list = edgeinfer(&["keys", "list", "--db", &db]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(!text.contains(&other) && text.contains("token"), "{text}");
}

#[test]
fn a_public_address_without_keys_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::default_model_path();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args([
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--model",
            model.to_str().unwrap(),
        ])
        .env("EDGEINFER_DATA_DIR", dir.path())
        .env_remove("EDGEINFER_MASTER_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve 0.0.0.0 without API keys")
            && err.contains("--master-key")
            && err.contains("--insecure-no-auth"),
        "{err}"
    );
}

/// 40 token ids that differ from every other request's from the first one on (no prefix
/// cache sharing, so computed prompt tokens are exact).
fn ids(i: usize) -> Vec<u32> {
    (0..40).map(|j| (1000 + i * 97 + j * 13) as u32).collect()
}

#[test]
fn token_limits_reserve_exactly_and_refuse_before_prefill() {
    let s = Server::start(&["--master-key", MASTER]);
    let key = generate_key(&s, json!({"tpm_limit": 1000}));
    let computed0 = counter(&s, "edgeinfer_prompt_tokens_computed_total");
    let s = Arc::new(s);
    let started = Instant::now();
    let replies: Vec<(Reply, Instant)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (s, key) = (s.clone(), key.clone());
                sc.spawn(move || {
                    let body = json!({"prompt": ids(i), "max_tokens": 100, "temperature": 0});
                    let r = s.post_key("/v1/completions", &body, &key);
                    (r, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let admitted: Vec<&Reply> = replies
        .iter()
        .map(|(r, _)| r)
        .filter(|r| r.status == 200)
        .collect();
    let refused: Vec<&(Reply, Instant)> = replies.iter().filter(|(r, _)| r.status != 200).collect();
    let total: u64 = admitted
        .iter()
        .map(|r| r.body["usage"]["total_tokens"].as_u64().unwrap())
        .sum();
    // Each reserves 40 + 100 = 140: seven fit in 1,000 (plus what refills during the burst).
    let refill = (started.elapsed().as_secs_f64() * 1000.0 / 60.0) as usize;
    assert!(
        !admitted.is_empty() && admitted.len() * 140 <= 1000 + refill,
        "{} admitted",
        admitted.len()
    );
    assert!(total <= 1000, "admitted requests used {total} tokens");
    eprintln!(
        "tpm 1000: {} admitted using {total} tokens, {} refused",
        admitted.len(),
        50 - admitted.len()
    );
    assert_eq!(admitted.len() + refused.len(), 50);
    for (r, _) in &refused {
        assert_openai_error(r, 429, "rate_limit_exceeded");
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
        assert!(r.header("x-ratelimit-remaining-tokens").is_some());
        assert!(r.header("x-ratelimit-reset-tokens").is_some());
        assert!(r
            .header("retry-after-ms")
            .is_some_and(|v| v.parse::<u64>().is_ok()));
    }
    // Refused requests computed nothing: the prompt tokens computed are exactly the
    // admitted requests' uncached prompt tokens.
    assert!(s.wait_idle(Duration::from_secs(60)));
    let computed = counter(&s, "edgeinfer_prompt_tokens_computed_total") - computed0;
    let expected: u64 = admitted
        .iter()
        .map(|r| {
            r.body["usage"]["prompt_tokens"].as_u64().unwrap()
                - r.body["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap()
        })
        .sum();
    assert_eq!(computed as u64, expected);
    // The last refused client waits what it was told, then gets in.
    let (last, at) = refused
        .iter()
        .max_by_key(|(_, at)| *at)
        .expect("some were refused");
    let wait = Duration::from_millis(last.header("retry-after-ms").unwrap().parse().unwrap());
    assert!(wait <= Duration::from_secs(9), "{wait:?}");
    eprintln!("computed prompt tokens {computed}; last refused client waits {wait:?}");
    std::thread::sleep((*at + wait).saturating_duration_since(Instant::now()));
    let again = s.post_key(
        "/v1/completions",
        &json!({"prompt": ids(99), "max_tokens": 100, "temperature": 0}),
        &key,
    );
    assert_eq!(again.status, 200, "{}", again.body);
}

fn sse_lines(resp: ureq::Response, max_chunks: Option<usize>) -> Vec<Value> {
    let mut out = Vec::new();
    for line in BufReader::new(resp.into_reader())
        .lines()
        .map_while(Result::ok)
    {
        if let Some(d) = line.strip_prefix("data: ") {
            if d == "[DONE]" {
                break;
            }
            out.push(serde_json::from_str(d).unwrap());
            if max_chunks.is_some_and(|m| out.len() >= m) {
                break;
            }
        }
    }
    out
}

fn stream_req(s: &Server, path: &str, body: &Value, headers: &[(&str, &str)]) -> ureq::Response {
    let mut req = ureq::post(&format!("{}{path}", s.base));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    req.send_json(body.clone()).expect("the stream starts")
}

#[test]
fn a_budget_ends_a_stream_with_length_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.json");
    // Prompts are free; every completion token costs 1,000 micro-USD.
    std::fs::write(&prices, r#"{"*": {"input": 0, "output": 1000}}"#).unwrap();
    let s = Server::start(&["--master-key", MASTER, "--prices", prices.to_str().unwrap()]);
    let key = generate_key(&s, json!({"max_budget": 0.05, "budget_duration": "30d"}));
    let auth = format!("Bearer {key}");
    // A short cacheable reply first (a miss that pays for its tokens).
    let cached = |s: &Server| {
        s.call(
            "POST",
            "/v1/completions",
            Some(&json!({"prompt": "7, 8,", "max_tokens": 5, "temperature": 0})),
            &[("authorization", &auth), ("cf-aig-cache-ttl", "600")],
        )
    };
    let first = cached(&s);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header("cf-aig-cache-status"), Some("MISS"));
    let paid = first.body["usage"]["completion_tokens"].as_u64().unwrap();
    // A key with a budget may not price its own requests (or the budget would bind nothing).
    let priced = s.call(
        "POST",
        "/v1/completions",
        Some(&json!({"prompt": "7, 8,", "max_tokens": 5})),
        &[
            ("authorization", &auth),
            (
                "cf-aig-custom-cost",
                r#"{"per_token_in": 0, "per_token_out": 0}"#,
            ),
        ],
    );
    assert_openai_error(&priced, 403, "custom_cost_not_allowed");
    // No max_tokens: the completion is clamped to what the rest of the budget pays for. That
    // reply is the budget's, not the request's: it is not cached.
    // (Chat: the completions API's own default is 16 tokens. No end of text, so the reply
    // runs to the clamp.)
    let body = json!({"messages": [{"role": "user", "content": "Count: 1, 2, 3, 4, 5, 6,"}],
                      "temperature": 0, "logit_bias": {"0": -100, "2": -100}, "stream": true,
                      "stream_options": {"include_usage": true}});
    let headers = [
        ("authorization", auth.as_str()),
        ("cf-aig-cache-ttl", "600"),
    ];
    let resp = stream_req(&s, "/v1/chat/completions", &body, &headers);
    assert_eq!(resp.header("cf-aig-cache-status"), Some("BYPASS"));
    let chunks = sse_lines(resp, None);
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        (finish, usage["completion_tokens"].as_u64()),
        ("length", Some(50 - paid)),
        "{usage}"
    );
    // The budget is spent: the cached reply is refused too (it is not replayed for free).
    let again = cached(&s);
    assert_openai_error(&again, 429, "insufficient_quota");
    assert_eq!(again.header("cf-aig-cache-status"), None);
    let r = s.post_key(
        "/v1/completions",
        &json!({"prompt": "7, 8,", "max_tokens": 1}),
        &key,
    );
    assert_openai_error(&r, 429, "insufficient_quota");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let info = s.call("GET", "/key/info", None, &[("authorization", &auth)]);
    assert_eq!(
        info.body["info"]["spend"].as_f64(),
        Some(0.05),
        "{}",
        info.body
    );
}

#[test]
fn keys_made_offline_turn_auth_on_without_a_restart() {
    // Loopback, no master key, no keys: auth is off and anyone may call.
    let s = Server::spawn(
        &["--model", common::default_model_path().to_str().unwrap()],
        &[],
    );
    s.wait_ready();
    let body = json!({"prompt": "1, 2,", "max_tokens": 1});
    let open = s.call("POST", "/v1/completions", Some(&body), &[]);
    assert_eq!(open.status, 200, "{}", open.body);
    // A key made with the offline CLI turns it on at the next request.
    let db = db_of(&s);
    let key = offline_key(&db, &["--alias", "first"]);
    let none = s.call("POST", "/v1/completions", Some(&body), &[]);
    assert_openai_error(&none, 401, "invalid_api_key");
    let placeholder = [("authorization", "Bearer sk-placeholder")];
    let r = s.call("POST", "/v1/completions", Some(&body), &placeholder);
    assert_openai_error(&r, 401, "invalid_api_key");
    assert_eq!(s.call("GET", "/v1/usage", None, &[]).status, 401);
    assert_eq!(s.post_key("/v1/completions", &body, &key).status, 200);
}

/// Microdollars, as the ledger computes them (prices in picodollars per token).
fn cost(prompt: u64, cached: u64, completion: u64, p: (u64, u64, u64)) -> u64 {
    let picos = (prompt - cached) * p.0 + cached * p.1 + completion * p.2;
    (picos + 500_000) / 1_000_000
}

fn ledger_rows(db: &str) -> Vec<HashMap<String, Value>> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT request_id, status, prompt_tokens, cached_tokens, completion_tokens, cost_micros, session_id, metadata, key_id FROM requests")
        .unwrap();
    let names = [
        "request_id",
        "status",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost_micros",
        "session_id",
        "metadata",
        "key_id",
    ];
    stmt.query_map([], |row| {
        let mut m = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            let v: rusqlite::types::Value = row.get(i)?;
            m.insert(
                n.to_string(),
                match v {
                    rusqlite::types::Value::Integer(x) => json!(x),
                    rusqlite::types::Value::Text(t) => json!(t),
                    _ => Value::Null,
                },
            );
        }
        Ok(m)
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[test]
fn the_ledger_matches_every_response_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db").to_string_lossy().into_owned();
    let prices = dir.path().join("prices.json");
    std::fs::write(
        &prices,
        r#"{"*": {"input": 0.15, "cached_input": 0.075, "output": 0.6, "cached_response": 0.05}}"#,
    )
    .unwrap();
    let p = (150_000u64, 75_000u64, 600_000u64);
    let flags = [
        "--master-key",
        MASTER,
        "--db",
        &db,
        "--prices",
        prices.to_str().unwrap(),
    ];
    let s = Server::start(&flags);
    let key = generate_key(&s, json!({"key_alias": "ledger"}));
    let auth = format!("Bearer {key}");
    let labels = [
        ("authorization", auth.as_str()),
        ("x-session-id", "session-1"),
        ("cf-aig-metadata", r#"{"team": "a", "n": 1}"#),
    ];
    let (mut tokens, mut micros, mut ok, mut cached_rows) = ([0u64; 3], 0u64, 0, 0);
    // `priced`: the cost when the request set its own prices.
    let mut add = |u: &Value, priced: Option<u64>| {
        let hit = priced == Some(u64::MAX);
        let (pr, ca, co) = (
            u["prompt_tokens"].as_u64().unwrap(),
            u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
            u["completion_tokens"].as_u64().unwrap(),
        );
        tokens[0] += pr;
        tokens[1] += ca;
        tokens[2] += co;
        micros += match priced {
            _ if hit => ((pr + co) * 50_000 + 500_000) / 1_000_000,
            Some(c) => c,
            None => cost(pr, ca, co, p),
        };
    };
    // Whole and streamed replies.
    for i in 0..3 {
        let r = s.call(
            "POST",
            "/v1/chat/completions",
            Some(&chat(&format!("Name {i} animals."), 20 + i)),
            &labels,
        );
        assert_eq!(r.status, 200);
        add(&r.body["usage"], None);
        ok += 1;
        let mut body = chat(&format!("Name {i} rivers."), 16);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let chunks = sse_lines(stream_req(&s, "/v1/chat/completions", &body, &labels), None);
        add(&chunks.last().unwrap()["usage"], None);
        ok += 1;
    }
    // Several choices, whole and streamed: one row each request, the choices summed.
    let mut several = chat("Name a fruit.", 10);
    several["n"] = json!(3);
    several["temperature"] = json!(1.0);
    let r = s.call("POST", "/v1/chat/completions", Some(&several), &labels);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["choices"].as_array().unwrap().len(), 3);
    add(&r.body["usage"], None);
    ok += 1;
    let body = json!({"prompt": ["A", "B"], "max_tokens": 6, "stream": true,
                      "stream_options": {"include_usage": true}});
    let chunks = sse_lines(stream_req(&s, "/v1/completions", &body, &labels), None);
    add(&chunks.last().unwrap()["usage"], None);
    ok += 1;
    // A request with its own price (AI Gateway's cf-aig-custom-cost, USD per token).
    let custom = [
        labels[0],
        (
            "cf-aig-custom-cost",
            r#"{"per_token_in": 0.000001, "per_token_out": 0.000003}"#,
        ),
    ];
    let r = s.call(
        "POST",
        "/v1/chat/completions",
        Some(&chat("Name a color.", 8)),
        &custom,
    );
    assert_eq!(r.status, 200);
    let u = &r.body["usage"];
    let (pr, co) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    add(u, Some(pr + 3 * co));
    ok += 1;
    // A miss and a hit of the response cache.
    let cache_headers = [labels[0], ("cf-aig-cache-ttl", "600")];
    for status in ["MISS", "HIT"] {
        let r = s.call(
            "POST",
            "/v1/chat/completions",
            Some(&chat("Say hello.", 12)),
            &cache_headers,
        );
        assert_eq!(r.header("cf-aig-cache-status"), Some(status));
        add(&r.body["usage"], (status == "HIT").then_some(u64::MAX));
        if status == "HIT" {
            cached_rows += 1
        } else {
            ok += 1
        }
    }
    // Two streams cancelled after a few chunks.
    let mut received = Vec::new();
    for i in 0..2 {
        let mut body = chat(&format!("Write a long story about {i} ships."), 400);
        body["stream"] = json!(true);
        let chunks = sse_lines(
            stream_req(&s, "/v1/chat/completions", &body, &labels),
            Some(4),
        );
        received.push(chunks.len() - 1); // the first chunk carries only the role
    }
    assert!(s.wait_idle(Duration::from_secs(30)));
    // The ledger's writer commits in batches of its own: wait until every row is there.
    let expected_rows = ok + cached_rows + 2;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ledger_rows(&db).len() < expected_rows && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }

    let rows = ledger_rows(&db);
    let of = |st: &str| {
        rows.iter()
            .filter(|r| r["status"] == st)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (of("ok").len(), of("cached").len(), of("cancelled").len()),
        (ok, cached_rows, 2),
        "{rows:?}"
    );
    let sum = |rs: &[&HashMap<String, Value>], f: &str| {
        rs.iter().map(|r| r[f].as_u64().unwrap()).sum::<u64>()
    };
    let answered: Vec<_> = rows
        .iter()
        .filter(|r| r["status"] == "ok" || r["status"] == "cached")
        .collect();
    assert_eq!(
        [
            sum(&answered, "prompt_tokens"),
            sum(&answered, "cached_tokens"),
            sum(&answered, "completion_tokens")
        ],
        tokens
    );
    assert_eq!(sum(&answered, "cost_micros"), micros, "{answered:?}");
    assert!(micros > 0);
    for (r, got) in of("cancelled").iter().zip(&received) {
        let done = r["completion_tokens"].as_u64().unwrap();
        assert!(
            done as usize >= *got && done < 400,
            "cancelled after {got} chunks, metered {done}"
        );
        assert!(r["prompt_tokens"].as_u64().unwrap() > 0);
        assert_eq!(
            r["cost_micros"].as_u64().unwrap(),
            cost(
                r["prompt_tokens"].as_u64().unwrap(),
                r["cached_tokens"].as_u64().unwrap(),
                done,
                p
            )
        );
    }
    let labelled = rows
        .iter()
        .filter(|r| r["session_id"] == "session-1")
        .count();
    assert_eq!(
        labelled, 10,
        "3 whole, 3 streamed, 2 of several choices and 2 cancelled carry the session id"
    );
    assert!(rows
        .iter()
        .any(|r| r["metadata"] == r#"{"n":1,"team":"a"}"#));
    // GET /v1/usage reads the same rows (the key's own).
    let usage = s.call("GET", "/v1/usage", None, &[("authorization", &auth)]);
    let all = &usage.body["data"];
    let total_cost: u64 = all
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["cost_micros"].as_u64().unwrap())
        .sum();
    assert_eq!(
        total_cost,
        sum(&rows.iter().collect::<Vec<_>>(), "cost_micros"),
        "{}",
        usage.body
    );

    // kill -9 under load: every request whose reply arrived whole has its row.
    let s = Arc::new(s);
    let completed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..8)
            .map(|c| {
                let (s, auth, completed) = (s.clone(), auth.clone(), completed.clone());
                sc.spawn(move || {
                    let mut done = Vec::new();
                    for r in 0..6 {
                        let id = format!("kill9-{c}-{r}");
                        let resp = ureq::post(&format!("{}/v1/chat/completions", s.base))
                            .set("authorization", &auth)
                            .set("x-request-id", &id)
                            .timeout(Duration::from_secs(30))
                            .send_json(chat(&format!("Count to {} slowly.", c * 10 + r), 24));
                        match resp.map(|r| r.into_json::<Value>()) {
                            Ok(Ok(v)) if v["usage"].is_object() => {
                                done.push(id);
                                completed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            _ => break,
                        }
                    }
                    done
                })
            })
            .collect();
        // Kill while requests run, once a few have finished (however slow the host).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while completed.load(std::sync::atomic::Ordering::SeqCst) < 4
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = s.pid();
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(!done.is_empty(), "some requests completed before the kill");
    eprintln!("kill -9: {} requests had completed", done.len());
    let s = Server::start(&flags);
    let rows = ledger_rows(&db);
    for id in &done {
        assert!(
            rows.iter()
                .any(|r| r["request_id"] == id.as_str() && r["status"] == "ok"),
            "completed request {id} has no row"
        );
    }
    let usage = s.call(
        "GET",
        "/v1/usage?key=ledger",
        None,
        &[("authorization", &format!("Bearer {MASTER}"))],
    );
    let n: u64 = usage.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["requests"].as_u64().unwrap())
        .sum();
    assert!(n as usize >= 11 + done.len(), "{}", usage.body);
}

#[test]
fn the_response_cache_replays_exact_deterministic_replies() {
    let s = Server::start(&[]);
    let ttl = [("cf-aig-cache-ttl", "60")];
    let body = chat("Give me three colors.", 24);
    let miss = s.call("POST", "/v1/chat/completions", Some(&body), &ttl);
    let hit = s.call("POST", "/v1/chat/completions", Some(&body), &ttl);
    assert_eq!(miss.header("cf-aig-cache-status"), Some("MISS"));
    assert_eq!(hit.header("cf-aig-cache-status"), Some("HIT"));
    assert!(hit.header("age").is_some_and(|a| a.parse::<u64>().is_ok()));
    let content = |r: &Reply| {
        r.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(content(&hit), content(&miss));
    assert_eq!(hit.body["usage"], miss.body["usage"]);

    // Key order and layout do not matter.
    let reordered = r#"{ "temperature" : 0, "max_tokens": 24,
        "messages": [{"content": "Give me three colors.", "role": "user"}] }"#;
    let r = ureq::post(&format!("{}/v1/chat/completions", s.base))
        .set("content-type", "application/json")
        .set("cf-aig-cache-ttl", "60")
        .send_string(reordered)
        .unwrap();
    assert_eq!(r.header("cf-aig-cache-status"), Some("HIT"));
    // A stream replays the same text as SSE.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let resp = stream_req(&s, "/v1/chat/completions", &sbody, &ttl);
    assert_eq!(resp.header("cf-aig-cache-status"), Some("HIT"));
    let text: String = sse_lines(resp, None)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, content(&miss));
    // Another sampling parameter misses; a skip or a random request bypasses the cache.
    let mut other = body.clone();
    other["top_k"] = json!(5);
    assert_eq!(
        s.call("POST", "/v1/chat/completions", Some(&other), &ttl)
            .header("cf-aig-cache-status"),
        Some("MISS")
    );
    let skip = s.call(
        "POST",
        "/v1/chat/completions",
        Some(&body),
        &[ttl[0], ("cf-aig-skip-cache", "true")],
    );
    assert_eq!(skip.header("cf-aig-cache-status"), None);
    let mut random = body.clone();
    random["temperature"] = json!(1.0);
    assert_eq!(
        s.call("POST", "/v1/chat/completions", Some(&random), &ttl)
            .header("cf-aig-cache-status"),
        None
    );
    let mut seeded = random.clone();
    seeded["seed"] = json!(7);
    assert_eq!(
        s.call("POST", "/v1/chat/completions", Some(&seeded), &ttl)
            .header("cf-aig-cache-status"),
        Some("MISS")
    );
    assert_eq!(
        s.call("POST", "/v1/chat/completions", Some(&seeded), &ttl)
            .header("cf-aig-cache-status"),
        Some("HIT")
    );

    // Ten identical concurrent requests compute once.
    assert!(s.wait_idle(Duration::from_secs(30)));
    let (gen0, prompt0) = (
        counter(&s, "edgeinfer_generation_tokens_total"),
        counter(&s, "edgeinfer_prompt_tokens_total"),
    );
    let fresh = chat("Name a large city.", 32);
    let replies: Vec<Reply> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..10)
            .map(|_| sc.spawn(|| s.call("POST", "/v1/chat/completions", Some(&fresh), &ttl)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let misses = replies
        .iter()
        .filter(|r| r.header("cf-aig-cache-status") == Some("MISS"))
        .count();
    let hits = replies
        .iter()
        .filter(|r| r.header("cf-aig-cache-status") == Some("HIT"))
        .count();
    assert_eq!((misses, hits), (1, 9));
    assert!(replies.iter().all(|r| content(r) == content(&replies[0])));
    let usage = &replies[0].body["usage"];
    assert_eq!(
        counter(&s, "edgeinfer_generation_tokens_total") - gen0,
        usage["completion_tokens"].as_f64().unwrap()
    );
    assert_eq!(
        counter(&s, "edgeinfer_prompt_tokens_total") - prompt0,
        usage["prompt_tokens"].as_f64().unwrap()
    );

    // A stream does not wait for an identical one under way (it would get nothing until
    // that one ended): it runs by itself, bypassing the cache.
    let long = json!({"messages": [{"role": "user", "content": "Tell a long story."}],
                      "max_tokens": 600, "temperature": 0, "stream": true,
                      "logit_bias": {"0": -100, "2": -100}});
    let post = || {
        ureq::post(&format!("{}/v1/chat/completions", s.base))
            .set(ttl[0].0, ttl[0].1)
            .send_json(long.clone())
            .unwrap()
    };
    let first = post();
    assert_eq!(first.header("cf-aig-cache-status"), Some("MISS"));
    let second = post();
    assert_eq!(second.header("cf-aig-cache-status"), Some("BYPASS"));
    let mut b = [0u8; 4096];
    std::io::Read::read_exact(&mut second.into_reader(), &mut b).unwrap();
    // (Tokens, not only the opening chunk, while the first still runs.)
    assert!(
        counter(&s, "edgeinfer_requests_running") >= 2.0,
        "the second stream's tokens came before the first ended"
    );
    drop(first);
}

/// A long streamed request, running: it holds one engine slot until dropped.
fn hold_a_slot(s: &Server) -> std::net::TcpStream {
    let holder = s.raw_post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": common::long_prompt("Tell me a story.")}],
                "max_tokens": 100, "stream": true}),
    );
    assert!(s.wait_metric("edgeinfer_requests_running", 1.0, Duration::from_secs(10)));
    holder
}

#[test]
fn requests_the_full_queue_refuses_are_ledgered_as_rejected() {
    let s = Server::start(&["--max-queue", "1", "--max-batch-size", "1"]);
    let db = db_of(&s);
    // A long request holds the one slot; then a burst meets a full queue.
    let holder = hold_a_slot(&s);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                let s = &s;
                scope.spawn(move || {
                    let body = json!({"prompt": "Hi", "max_tokens": 2});
                    s.post("/v1/completions", &body).0
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused = statuses.iter().filter(|&&st| st == 429).count();
    assert!(refused >= 1, "{statuses:?}");
    drop(holder);
    assert!(s.wait_idle(Duration::from_secs(30)));
    let deadline = Instant::now() + Duration::from_secs(10);
    let rejected = loop {
        let rows = ledger_rows(&db);
        let rejected: Vec<_> = rows.iter().filter(|r| r["status"] == "rejected").collect();
        if rejected.len() >= refused || Instant::now() > deadline {
            break rejected
                .iter()
                .map(|r| (r["prompt_tokens"].clone(), r["cost_micros"].clone()))
                .collect::<Vec<_>>();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // One row per refusal, with nothing computed or charged.
    assert_eq!(rejected.len(), refused, "{statuses:?}");
    assert!(
        rejected.iter().all(|r| *r == (json!(0), json!(0))),
        "{rejected:?}"
    );
}

#[test]
fn several_choices_are_queued_whole_or_refused_whole() {
    // Room for three requests in flight; a holder takes one.
    let s = Server::start(&["--max-queue", "1", "--max-batch-size", "2"]);
    let db = db_of(&s);
    let holder = hold_a_slot(&s);
    // Three choices do not fit beside it: refused whole, ledgered as rejected, nothing run.
    let (status, r) = s.post(
        "/v1/chat/completions",
        &json!({
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 3}),
    );
    assert_eq!(status, 429, "{r}");
    // More choices than the node ever holds: a 400, not a 429 to retry.
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"prompt": ["a", "b"], "n": 2, "max_tokens": 2}),
    );
    assert_eq!((status, &r["error"]["param"]), (400, &json!("n")), "{r}");
    drop(holder);
    assert!(s.wait_idle(Duration::from_secs(30)));
    let (status, r) = s.post(
        "/v1/chat/completions",
        &json!({
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 3}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"].as_array().unwrap().len(), 3);
    assert!(s.wait_idle(Duration::from_secs(30)));
    let deadline = Instant::now() + Duration::from_secs(10);
    let statuses = loop {
        let mut st: Vec<String> = ledger_rows(&db)
            .iter()
            .map(|r| format!("{} {}", r["status"].as_str().unwrap(), r["prompt_tokens"]))
            .collect();
        st.sort();
        if st.len() >= 3 || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The holder (cancelled), the refused request (rejected, 0 tokens) and the three
    // choices' one row; the 400 is no request.
    assert_eq!(statuses.len(), 3, "{statuses:?}");
    assert!(statuses.contains(&"rejected 0".to_string()), "{statuses:?}");
    assert!(
        statuses.iter().any(|s| s.starts_with("cancelled")),
        "{statuses:?}"
    );
    assert!(statuses.iter().any(|s| s.starts_with("ok")), "{statuses:?}");
}

#[test]
fn one_keys_burst_does_not_queue_another_keys_request_behind_it() {
    // Two requests run at a time; key A queues eight, then key B sends one.
    let s = Server::start(&["--master-key", MASTER, "--max-batch-size", "2"]);
    let (a, b) = (generate_key(&s, json!({})), generate_key(&s, json!({})));
    // The stop tokens banned: every request generates all its tokens.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
                      "logit_bias": {"0": -100, "1": -100, "2": -100}});
    let order = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for i in 0..8 {
            let (s, a, body, order) = (&s, &a, &body, &order);
            scope.spawn(move || {
                let r = s.post_key("/v1/completions", body, a);
                assert_eq!(r.status, 200, "{}", r.body);
                assert_eq!(r.body["usage"]["completion_tokens"], 40);
                order.lock().unwrap().push(format!("a{i}"));
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while counter(&s, "edgeinfer_requests_waiting") < 5.0 {
            assert!(Instant::now() < deadline, "A's burst never queued");
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = s.post_key("/v1/completions", &body, &b);
        assert_eq!(r.status, 200, "{}", r.body);
        order.lock().unwrap().push("b".into());
    });
    // B takes the first slot that frees (A runs two, B none): it ends among the first
    // four, not after A's whole burst as arrival order would have it.
    let order = order.into_inner().unwrap();
    let at = order.iter().position(|o| o == "b").unwrap();
    assert!(at < 4, "{order:?}");
}

#[test]
fn metrics_total_the_ledger_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.json");
    // USD per million tokens: a prompt token costs 1 micro-USD, a completion token 2.
    std::fs::write(&prices, r#"{"*": {"input": 1, "output": 2}}"#).unwrap();
    let s = Server::start(&["--master-key", MASTER, "--prices", prices.to_str().unwrap()]);
    let r = s.post_key("/key/generate", &json!({"rpm_limit": 2}), MASTER);
    let (key, token) = (
        r.body["key"].as_str().unwrap().to_string(),
        r.body["token"].as_str().unwrap()[..12].to_string(),
    );
    let k = token.as_str();
    let mut prompt = 0;
    let mut completion = 0;
    for _ in 0..2 {
        let r = s.post_key("/v1/chat/completions", &chat("Hi", 5), &key);
        assert_eq!(r.status, 200, "{}", r.body);
        prompt += r.body["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += r.body["usage"]["completion_tokens"].as_u64().unwrap();
    }
    // The third request in the minute is refused, and ledgered so.
    let r = s.post_key("/v1/chat/completions", &chat("Hi", 5), &key);
    assert_eq!(r.status, 429, "{}", r.body);
    // Rows are counted as they are ledgered, before the reply's end is sent.
    let m = |name: &str, labels: &[(&str, &str)]| s.labelled(name, labels);
    let requests = "edgeinfer_gateway_requests_total";
    assert_eq!(m(requests, &[("key", k), ("status", "ok")]), 2.0);
    assert_eq!(m(requests, &[("key", k), ("status", "rate_limited")]), 1.0);
    let tokens = "edgeinfer_gateway_tokens_total";
    assert_eq!(m(tokens, &[("key", k), ("kind", "prompt")]), prompt as f64);
    assert_eq!(
        m(tokens, &[("key", k), ("kind", "completion")]),
        completion as f64
    );
    let cost = m("edgeinfer_gateway_cost_micros_total", &[("key", k)]);
    assert_eq!(cost, (prompt + 2 * completion) as f64);
    // The master key's requests are nobody's key.
    let r = s.post_key("/v1/chat/completions", &chat("Hi", 2), MASTER);
    assert_eq!(r.status, 200);
    assert_eq!(m(requests, &[("key", "none"), ("status", "ok")]), 1.0);
}

#[test]
fn each_choice_holds_one_of_a_keys_parallel_slots() {
    let s = Server::start(&["--master-key", MASTER]);
    let key = generate_key(&s, json!({"max_parallel_requests": 2}));
    let auth = format!("Bearer {key}");
    let post = |body: &Value| {
        s.call(
            "POST",
            "/v1/completions",
            Some(body),
            &[("authorization", &auth)],
        )
    };
    // More choices than the key has slots can never run: the client's error, naming `n`.
    let r = post(&json!({"prompt": "Hi", "max_tokens": 2, "n": 3}));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["param"], "n");
    assert_eq!(
        post(&json!({"prompt": "Hi", "max_tokens": 2, "n": 2})).status,
        200
    );
    // Two choices running hold both slots: a third request waits its turn as a 429.
    let long = json!({"prompt": "Once upon a time", "max_tokens": 1000, "n": 2, "stream": true,
                      "logit_bias": {"0": -100, "2": -100}});
    let held = {
        let mut req = ureq::post(&format!("{}/v1/completions", s.base));
        req = req.set("authorization", &auth);
        req.send_json(long).expect("the stream starts")
    };
    assert!(s.wait_metric("edgeinfer_requests_running", 2.0, Duration::from_secs(10)));
    let r = post(&json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(r.status, 429, "{}", r.body);
    drop(held);
    assert!(s.wait_idle(Duration::from_secs(30)));
    assert_eq!(post(&json!({"prompt": "Hi", "max_tokens": 2})).status, 200);
}

#[test]
fn a_custom_cache_key_is_the_callers_own() {
    let s = Server::start(&["--master-key", MASTER]);
    let (a, b) = (generate_key(&s, json!({})), generate_key(&s, json!({})));
    let ask = |key: &str, prompt: &str| {
        let auth = format!("Bearer {key}");
        let body = json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
                          "temperature": 0});
        s.call(
            "POST",
            "/v1/chat/completions",
            Some(&body),
            &[
                ("authorization", &auth),
                ("cf-aig-cache-ttl", "600"),
                ("cf-aig-cache-key", "daily-summary"),
            ],
        )
    };
    let first = ask(&a, "Say hi.");
    assert_eq!(first.header("cf-aig-cache-status"), Some("MISS"));
    // The caller's custom key names its reply, whatever the body.
    let again = ask(&a, "Name a colour.");
    assert_eq!(again.header("cf-aig-cache-status"), Some("HIT"));
    assert_eq!(again.body["choices"], first.body["choices"]);
    // Another key naming it has its own: it neither reads nor replaces the first's.
    let other = ask(&b, "Name a colour.");
    assert_eq!(other.header("cf-aig-cache-status"), Some("MISS"));
    let mine = ask(&a, "Anything.");
    assert_eq!(mine.header("cf-aig-cache-status"), Some("HIT"));
    assert_eq!(mine.body["choices"], first.body["choices"]);
}

#[test]
fn ledger_rows_past_the_retention_fold_into_totals_that_still_bill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db").to_string_lossy().into_owned();
    // A key with a lifetime budget of 1 cent, made 30 days ago, that spent 1.2 cents 20 days
    // ago; and a key-less row beside.
    let key = offline_key(&db, &["--alias", "old", "--max-budget", "0.01"]);
    let day_ms = 86_400_000i64;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE keys SET created = created - 30 * 86400 WHERE alias = 'old'",
        [],
    )
    .unwrap();
    for (i, key_id) in ["(SELECT id FROM keys WHERE alias = 'old')", "NULL"]
        .iter()
        .enumerate()
    {
        for j in 0..3 {
            conn.execute(
                &format!(
                    "INSERT INTO requests (ts_ms, request_id, key_id, model, route, status,
                        prompt_tokens, cached_tokens, completion_tokens, cost_micros, duration_ms)
                     VALUES (?1, ?2, {key_id}, 'm', '/v1/chat/completions', 'ok', 10, 2, 5, 4000, 9)"
                ),
                rusqlite::params![now_ms - 20 * day_ms + j, format!("old-{i}-{j}")],
            )
            .unwrap();
        }
    }
    drop(conn);
    let report = || {
        let out = edgeinfer(&["usage", "--db", &db, "--json"]);
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let before = report();
    assert_eq!(before.lines().count(), 2, "{before}");
    // Every completion token costs 1,000 micro-USD (a free request fits any budget).
    let prices = dir.path().join("prices.json");
    std::fs::write(&prices, r#"{"*": {"input": 0, "output": 1000}}"#).unwrap();
    let s = Server::start(&[
        "--master-key",
        MASTER,
        "--db",
        &db,
        "--prices",
        prices.to_str().unwrap(),
        "--ledger-retention-days",
        "2",
    ]);
    // The rows go at the start (in the background): the reports and the budget stay.
    let rows = || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rows(), 0, "the old rows are still there");
    assert_eq!(report(), before);
    let r = s.post_key(
        "/v1/completions",
        &json!({"prompt": "7, 8,", "max_tokens": 1}),
        &key,
    );
    assert_openai_error(&r, 429, "insufficient_quota");
    let usage = s.call(
        "GET",
        "/v1/usage",
        None,
        &[("authorization", &format!("Bearer {MASTER}"))],
    );
    // (The refusal's own row is today's, at no cost.)
    let costs: Vec<u64> = usage.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["model"] == "m")
        .map(|l| l["cost_micros"].as_u64().unwrap())
        .collect();
    assert_eq!(costs, [12_000, 12_000], "{}", usage.body);
    // A day is too short to keep.
    let out = edgeinfer(&["serve", "--db", &db, "--ledger-retention-days", "1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ledger-retention-days"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
