//! Anthropic's Message Batches API against the real server: through the official `anthropic`
//! package (`tests/python/anthropic_batches.py`: create, retrieve until ended, results,
//! list, delete), and over raw HTTP: bad batches refused in Anthropic's envelope, cancel,
//! paging, and batches that belong to their key.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::{json, Value};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
const MASTER: &str = "sk-master-anthropic-batches";
const BATCHES: &str = "/v1/messages/batches";

#[test]
fn official_client_runs_a_message_batch_as_direct_calls() {
    let s = Server::start(&[]);
    let out = Command::new(common::python_with_clients())
        .arg(common::repo_root().join("tests/python/anthropic_batches.py"))
        .args([&s.base, MODEL])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the client failed:\n{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();

    let created = &r["created"];
    assert!(
        created["id"].as_str().unwrap().starts_with("msgbatch_"),
        "{r}"
    );
    assert_eq!(created["type"], "message_batch", "{r}");
    assert_eq!(created["processing_status"], "in_progress", "{r}");
    assert_eq!(created["request_counts"]["processing"], 3, "{r}");
    assert!(created["results_url"].is_null(), "{r}");
    let ended = &r["ended"];
    assert_eq!(
        ended["request_counts"],
        json!({"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0, "expired": 0}),
        "{r}"
    );
    assert!(ended["ended_at"].is_string(), "{r}");
    let url = format!(
        "/v1/messages/batches/{}/results",
        created["id"].as_str().unwrap()
    );
    assert_eq!(ended["results_url"], url.as_str(), "{r}");

    // Each request's result is what the same request gets directly (greedy).
    for id in ["colour", "count"] {
        let (batched, direct) = (&r["results"][id], &r["direct"][id]);
        assert_eq!(batched["type"], "succeeded", "{r}");
        assert!(!direct["text"].as_str().unwrap().is_empty(), "{r}");
        assert_eq!(batched["text"], direct["text"], "{id}: {r}");
        assert_eq!(batched["stop_reason"], direct["stop_reason"], "{id}: {r}");
        let input = |u: &Value| {
            u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap()
        };
        assert_eq!(input(&batched["usage"]), input(&direct["usage"]), "{r}");
        assert_eq!(
            batched["usage"]["output_tokens"], direct["usage"]["output_tokens"],
            "{r}"
        );
    }
    // The unknown model's request errored with the error it gets alone.
    assert_eq!(r["results"]["nope"]["type"], "errored", "{r}");
    assert_eq!(r["results"]["nope"]["error_type"], "not_found_error", "{r}");
    // Listed, then deleted.
    assert!(
        r["listed"].as_array().unwrap().contains(&created["id"]),
        "{r}"
    );
    assert_eq!(r["deleted"]["type"], "message_batch_deleted", "{r}");
    assert_eq!(r["deleted"]["id"], created["id"], "{r}");
    assert_eq!(r["after_delete"], 404, "{r}");
}

fn call(s: &Server, method: &str, path: &str, body: Option<&Value>, key: &str) -> (u16, Value) {
    let auth = format!("Bearer {key}");
    let r = s.call(method, path, body, &[("authorization", &auth)]);
    (r.status, r.body)
}

fn anthropic_error(e: &Value, kind: &str) {
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"]["type"], kind, "{e}");
}

fn request(id: &str, max_tokens: u32) -> Value {
    json!({"custom_id": id, "params": {"model": MODEL, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}})
}

fn key(s: &Server) -> String {
    let r = s.post_key("/key/generate", &json!({}), MASTER);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["key"].as_str().unwrap().to_string()
}

#[test]
fn bad_batches_cancel_paging_and_owners() {
    let s = Server::start(&["--master-key", MASTER]);
    let (alice, bob) = (key(&s), key(&s));
    let params = request("a", 4)["params"].clone();
    for (body, says) in [
        (json!({}), "requests: must be a list"),
        (json!({"requests": []}), "requests: must be a list"),
        (
            json!({"requests": [request("a", 4), request("a", 4)]}),
            "requests.1.custom_id: 'a' is used twice",
        ),
        (
            json!({"requests": [{"custom_id": "a b", "params": params}]}),
            "requests.0.custom_id",
        ),
        (
            json!({"requests": [{"custom_id": "a", "params": "Hi"}]}),
            "requests.0.params: must be an object",
        ),
        (
            json!({"requests": [{"custom_id": "a", "params": {"stream": true}}]}),
            "requests.0.params.stream",
        ),
    ] {
        let (status, e) = call(&s, "POST", BATCHES, Some(&body), &alice);
        assert_eq!(status, 400, "{body}: {e}");
        anthropic_error(&e, "invalid_request_error");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{e}"
        );
    }

    // A long batch: no results yet, no deleting it; cancelled, its unrun requests say so.
    let long: Vec<Value> = (0..6).map(|i| request(&format!("r{i}"), 300)).collect();
    let (status, batch) = call(
        &s,
        "POST",
        BATCHES,
        Some(&json!({"requests": long})),
        &alice,
    );
    assert_eq!(status, 200, "{batch}");
    let id = batch["id"].as_str().unwrap().to_string();
    let at = |tail: &str| format!("{BATCHES}/{id}{tail}");
    let (status, e) = call(&s, "GET", &at("/results"), None, &alice);
    assert_eq!(status, 400, "{e}");
    anthropic_error(&e, "invalid_request_error");
    let (status, e) = call(&s, "DELETE", &at(""), None, &alice);
    assert_eq!(status, 400, "{e}");
    // Another key sees nothing of it.
    for (method, tail) in [
        ("GET", ""),
        ("GET", "/results"),
        ("POST", "/cancel"),
        ("DELETE", ""),
    ] {
        let (status, e) = call(&s, method, &at(tail), None, &bob);
        assert_eq!(status, 404, "{method} {tail}: {e}");
        anthropic_error(&e, "not_found_error");
    }
    let (status, cancelling) = call(&s, "POST", &at("/cancel"), None, &alice);
    assert_eq!(status, 200, "{cancelling}");
    assert!(
        cancelling["cancel_initiated_at"].is_string(),
        "{cancelling}"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let ended = loop {
        let (_, b) = call(&s, "GET", &at(""), None, &alice);
        if b["processing_status"] == "ended" {
            break b;
        }
        assert!(Instant::now() < deadline, "{b}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let counts = &ended["request_counts"];
    let n = |f: &str| counts[f].as_u64().unwrap();
    assert_eq!(n("succeeded") + n("errored") + n("canceled"), 6, "{ended}");
    assert!(n("canceled") >= 1, "{ended}");
    let text = ureq::get(&format!("{}{}", s.base, at("/results")))
        .set("authorization", &format!("Bearer {alice}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "{text}");
    let canceled = lines
        .iter()
        .filter(|l| l["result"]["type"] == "canceled")
        .count();
    assert_eq!(canceled as u64, n("canceled"), "{text}");
    let succeeded = lines.iter().filter(|l| l["result"]["type"] == "succeeded");
    for l in succeeded {
        assert_eq!(l["result"]["message"]["type"], "message", "{text}");
    }

    // Paging, newest first, either side of a cursor; Bob's list holds none of Alice's.
    let mut ids = vec![id.clone()];
    for _ in 0..2 {
        let (status, b) = call(
            &s,
            "POST",
            BATCHES,
            Some(&json!({"requests": [request("a", 1)]})),
            &alice,
        );
        assert_eq!(status, 200, "{b}");
        ids.push(b["id"].as_str().unwrap().to_string());
    }
    let page = |q: &str| {
        let (status, p) = call(&s, "GET", &format!("{BATCHES}?{q}"), None, &alice);
        assert_eq!(status, 200, "{p}");
        let got: Vec<String> = p["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect();
        (got, p["has_more"].as_bool().unwrap())
    };
    assert_eq!(
        page("limit=2"),
        (vec![ids[2].clone(), ids[1].clone()], true)
    );
    assert_eq!(
        page(&format!("limit=2&after_id={}", ids[1])),
        (vec![ids[0].clone()], false)
    );
    assert_eq!(
        page(&format!("limit=1&before_id={}", ids[0])),
        (vec![ids[1].clone()], true)
    );
    // A batch past the default body limit (4 MiB) is taken, up to 32 MiB, from a key; one
    // request past it could never run, and is refused at once.
    let padded = |id: &str, bytes: usize| {
        let mut r = request(id, 1);
        r["params"]["metadata"] = json!({"user_id": "x".repeat(bytes)});
        r
    };
    let body = json!({"requests": [padded("big1", 5 << 19), padded("big2", 5 << 19)]});
    let (status, b) = call(&s, "POST", BATCHES, Some(&body), &alice);
    assert_eq!(status, 200, "{b}");
    let body = json!({"requests": [request("a", 1), padded("huge", 5 << 20)]});
    let (status, e) = call(&s, "POST", BATCHES, Some(&body), &alice);
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests.1.params"),
        "{e}"
    );
    // Without a key, the usual limit (and then the 401).
    let (status, e) = s.post_tolerant(BATCHES, body.to_string().as_bytes());
    assert_eq!(status, 413, "{e}");
    // A cursor that names nothing, by its name; an ended batch has nothing to cancel.
    let (status, e) = call(
        &s,
        "GET",
        &format!("{BATCHES}?after_id=msgbatch_nope"),
        None,
        &alice,
    );
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("after_id"),
        "{e}"
    );
    let (status, e) = call(&s, "POST", &format!("{BATCHES}/{id}/cancel"), None, &alice);
    assert_eq!(status, 409, "{e}");
    anthropic_error(&e, "invalid_request_error");
    let (_, theirs) = call(&s, "GET", BATCHES, None, &bob);
    assert_eq!(theirs["data"], json!([]), "{theirs}");
    let (status, e) = call(&s, "GET", &format!("{BATCHES}?limit=0"), None, &alice);
    assert_eq!(status, 400, "{e}");
    anthropic_error(&e, "invalid_request_error");
}

#[test]
fn a_spent_budget_that_resets_waits_for_its_reset() {
    // A milli-dollar a token and four a two-second period: one request of four tokens
    // spends a period's budget, and the others wait for the next (they were all `errored`,
    // 429, when only an OpenAI-shaped refusal was read as a budget's).
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.json");
    std::fs::write(&prices, r#"{"*": {"input": 0, "output": 1000}}"#).unwrap();
    let s = Server::start(&["--master-key", MASTER, "--prices", prices.to_str().unwrap()]);
    let made = s.post_key(
        "/key/generate",
        &json!({"max_budget": 0.004, "budget_duration": "2s"}),
        MASTER,
    );
    assert_eq!(made.status, 200, "{}", made.body);
    let key = made.body["key"].as_str().unwrap().to_string();
    let requests: Vec<Value> = (0..3).map(|i| request(&format!("r{i}"), 4)).collect();
    let (status, b) = call(
        &s,
        "POST",
        BATCHES,
        Some(&json!({"requests": requests})),
        &key,
    );
    assert_eq!(status, 200, "{b}");
    let at = format!("{BATCHES}/{}", b["id"].as_str().unwrap());
    let start = Instant::now();
    let ended = loop {
        let (_, b) = call(&s, "GET", &at, None, &key);
        if b["processing_status"] == "ended" {
            break b;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "{b}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        ended["request_counts"],
        json!({"processing": 0, "succeeded": 3, "errored": 0, "canceled": 0, "expired": 0}),
        "{ended}"
    );
    // Three periods at least: the budget held.
    assert!(start.elapsed() >= Duration::from_secs(3), "{ended}");
}

#[test]
fn held_requests_count_against_the_key_storage_quota() {
    let s = Server::start(&["--file-storage-per-key", "4000"]);
    let mut big = request("big", 1);
    big["params"]["messages"][0]["content"] = json!("word ".repeat(1000));
    let (status, e) = s.post(BATCHES, &json!({"requests": [big]}));
    assert_eq!(status, 400, "{e}");
    anthropic_error(&e, "invalid_request_error");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("--file-storage-per-key"), "{e}");
    // Two batches that each fit, but not together while the first runs.
    let size = |r: &[Value]| {
        r.iter()
            .map(|r| r["params"].to_string().len())
            .sum::<usize>()
    };
    let first: Vec<Value> = (0..20).map(|i| request(&format!("a{i}"), 300)).collect();
    let second: Vec<Value> = (0..12).map(|i| request(&format!("b{i}"), 300)).collect();
    assert!(
        size(&first) < 4000 && size(&second) < 4000,
        "the test's sizes"
    );
    assert!(size(&first) + size(&second) > 4000, "the test's sizes");
    let (status, b) = s.post(BATCHES, &json!({"requests": first}));
    assert_eq!(status, 200, "{b}");
    let (status, e) = s.post(BATCHES, &json!({"requests": second}));
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--file-storage-per-key"),
        "{e}"
    );
    // Workers AI's queued inputs too.
    let run = "/client/v4/accounts/abc/ai/run/SmolLM2-135M-Instruct.Q4_1?queueRequest=true";
    let (status, e) = s.post(
        run,
        &json!({"requests": [{"prompt": "word ".repeat(1000)}]}),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["errors"][0]["code"], 5006, "{e}");
}
