//! OpenAI's Batch API against the real server: files uploaded, batches run in the background
//! through the same path as a client's requests, cancelled, owned by their key, and carried
//! across a restart.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

const BOUNDARY: &str = "edgeinfer-test-boundary";

/// A multipart form of `purpose`, `extra` fields and `content` as the file.
fn form(content: &[u8], purpose: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let boundary = BOUNDARY;
    let mut body = Vec::new();
    for (name, value) in [("purpose", purpose)].iter().chain(extra) {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\ncontent-disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"requests.jsonl\"\r\ncontent-type: application/jsonl\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// A multipart upload of `content` as `purpose`; status and body.
fn upload(s: &Server, content: &[u8], purpose: &str, key: Option<&str>) -> (u16, Value) {
    upload_with(s, content, purpose, &[], key)
}

/// [`upload`] with more form fields.
fn upload_with(
    s: &Server,
    content: &[u8],
    purpose: &str,
    extra: &[(&str, &str)],
    key: Option<&str>,
) -> (u16, Value) {
    let (boundary, body) = (BOUNDARY, form(content, purpose, extra));
    let mut req = ureq::post(&format!("{}/v1/files", s.base)).set(
        "content-type",
        &format!("multipart/form-data; boundary={boundary}"),
    );
    if let Some(k) = key {
        req = req.set("authorization", &format!("Bearer {k}"));
    }
    match req.send_bytes(&body) {
        Ok(r) | Err(ureq::Error::Status(_, r)) => {
            (r.status(), r.into_json().unwrap_or(Value::Null))
        }
        Err(e) => panic!("upload failed: {e}"),
    }
}

fn auth(key: Option<&str>) -> Vec<(&'static str, String)> {
    key.map(|k| ("authorization", format!("Bearer {k}")))
        .into_iter()
        .collect()
}

fn call(
    s: &Server,
    method: &str,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> (u16, Value) {
    let headers = auth(key);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = s.call(method, path, body, &headers);
    (r.status, r.body)
}

/// The raw bytes of a file's content.
fn content(s: &Server, id: &str, key: Option<&str>) -> (u16, String) {
    let mut req = ureq::get(&format!("{}/v1/files/{id}/content", s.base));
    if let Some(k) = key {
        req = req.set("authorization", &format!("Bearer {k}"));
    }
    match req.call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => (r.status(), r.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    }
}

fn jsonl(lines: &[Value]) -> Vec<u8> {
    let mut out = String::new();
    for l in lines {
        out.push_str(&l.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

fn request(custom_id: &str, body: Value) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body})
}

fn chat(ask: &str, max_tokens: u32) -> Value {
    json!({"messages": [{"role": "user", "content": ask}], "max_tokens": max_tokens, "temperature": 0})
}

/// Uploads `lines` and makes a chat batch of them; the batch object.
fn start_batch(s: &Server, lines: &[Value], key: Option<&str>) -> Value {
    let (status, file) = upload(s, &jsonl(lines), "batch", key);
    assert_eq!(status, 200, "{file}");
    let (status, batch) = call(
        s,
        "POST",
        "/v1/batches",
        Some(&json!({"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h"})),
        key,
    );
    assert_eq!(status, 200, "{batch}");
    batch
}

/// Polls the batch until `done` holds of it (or two minutes pass).
fn wait_for(s: &Server, id: &str, key: Option<&str>, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, b) = call(s, "GET", &format!("/v1/batches/{id}"), None, key);
        assert_eq!(status, 200, "{b}");
        if done(&b) {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "the batch did not get there: {b}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ended(b: &Value) -> bool {
    ["completed", "cancelled", "expired", "failed"].contains(&b["status"].as_str().unwrap())
}

/// An output or error file's lines by custom id.
fn lines_of(s: &Server, file: &Value, key: Option<&str>) -> HashMap<String, Value> {
    let Some(id) = file.as_str() else {
        return HashMap::new();
    };
    let (status, text) = content(s, id, key);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["custom_id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

#[test]
fn a_batch_runs_every_request_as_a_direct_call_would_and_leaves_its_files() {
    let s = Server::start(&[]);
    let asks = [
        "Name a color.",
        "Count to five.",
        "What is 2+2?",
        "Say hello.",
    ];
    let mut lines: Vec<Value> = asks
        .iter()
        .enumerate()
        .map(|(i, a)| request(&format!("ask-{i}"), chat(a, 6)))
        .collect();
    lines.push(request(
        "negative",
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
    ));
    lines.push(request(
        "unknown-model",
        json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    ));
    let input = jsonl(&lines);
    let (status, file) = upload(&s, &input, "batch", None);
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["filename"], "requests.jsonl");
    assert_eq!(file["bytes"], input.len());
    let (_, got) = content(&s, file["id"].as_str().unwrap(), None);
    assert_eq!(got.as_bytes(), input);

    let batch = start_batch(&s, &lines, None);
    assert_eq!(batch["status"], "in_progress", "{batch}");
    assert_eq!(batch["request_counts"]["total"], 6);
    assert!(batch["id"].as_str().unwrap().starts_with("batch_"));
    let id = batch["id"].as_str().unwrap();
    let done = wait_for(&s, id, None, ended);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 6, "completed": 4, "failed": 2})
    );
    assert!(done["completed_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());

    let output = lines_of(&s, &done["output_file_id"], None);
    let errors = lines_of(&s, &done["error_file_id"], None);
    assert_eq!(output.len(), 4);
    let (_, text) = content(&s, done["output_file_id"].as_str().unwrap(), None);
    let order: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["custom_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(order, ["ask-0", "ask-1", "ask-2", "ask-3"], "file order");
    for (i, ask) in asks.iter().enumerate() {
        let line = &output[&format!("ask-{i}")];
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(line["error"], Value::Null);
        assert_eq!(line["response"]["status_code"], 200);
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        // The same request sent directly gets the same answer (greedy, batch-invariant).
        let (status, direct) = s.post(CHAT, &chat(ask, 6));
        assert_eq!(status, 200);
        assert_eq!(
            body["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"],
            "{ask}"
        );
        assert_eq!(
            body["usage"]["prompt_tokens"],
            direct["usage"]["prompt_tokens"]
        );
    }
    // The batch's usage is its answers' (the refused requests used nothing).
    let sum = |field: &str| -> i64 {
        (output.values())
            .map(|l| l["response"]["body"]["usage"][field].as_i64().unwrap())
            .sum()
    };
    let (input, generated) = (sum("prompt_tokens"), sum("completion_tokens"));
    assert!(input > 0 && generated > 0);
    assert_eq!(done["usage"]["input_tokens"], input, "{done}");
    assert_eq!(done["usage"]["output_tokens"], generated, "{done}");
    assert_eq!(done["usage"]["total_tokens"], input + generated, "{done}");
    assert_eq!(errors["negative"]["response"]["status_code"], 400);
    assert_eq!(
        errors["negative"]["response"]["body"]["error"]["param"],
        "max_tokens"
    );
    assert_eq!(errors["unknown-model"]["response"]["status_code"], 404);

    // Listed, newest first; a finished batch cannot be cancelled.
    let (_, list) = call(&s, "GET", "/v1/batches?limit=5", None, None);
    assert_eq!(list["data"][0]["id"], id);
    assert_eq!(list["has_more"], false);
    let (status, e) = call(&s, "POST", &format!("/v1/batches/{id}/cancel"), None, None);
    assert_eq!(status, 409, "{e}");
    // Output files are listed under their purpose, and can be deleted.
    let (_, files) = call(&s, "GET", "/v1/files?purpose=batch_output", None, None);
    assert_eq!(files["data"].as_array().unwrap().len(), 2, "{files}");
    let out_id = done["output_file_id"].as_str().unwrap();
    let (status, deleted) = call(&s, "DELETE", &format!("/v1/files/{out_id}"), None, None);
    assert_eq!((status, deleted["deleted"].clone()), (200, json!(true)));
    assert_eq!(content(&s, out_id, None).0, 404);
    // An error file is output, not input for another batch.
    let e = json!({"input_file_id": done["error_file_id"], "endpoint": CHAT, "completion_window": "24h"});
    let (status, e) = call(&s, "POST", "/v1/batches", Some(&e), None);
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("input_file_id")),
        "{e}"
    );
    assert_eq!(
        call(&s, "GET", &format!("/v1/files/{out_id}"), None, None).0,
        404
    );
}

#[test]
fn bad_files_and_bad_requests_are_refused_clearly() {
    let s = Server::start(&[]);
    // An input file with mistakes makes a batch that has failed, naming each line.
    let bad = [
        request("a", chat("x", 2)),
        json!({"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        request("a", chat("x", 2)),
    ];
    let failed = start_batch(&s, &bad, None);
    assert_eq!(failed["status"], "failed", "{failed}");
    let errors = failed["errors"]["data"].as_array().unwrap();
    let got: Vec<(i64, &str)> = errors
        .iter()
        .map(|e| (e["line"].as_i64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [(2, "mismatched_endpoint"), (3, "duplicate_custom_id")]
    );
    assert!(failed["failed_at"].is_i64());
    let (_, file) = upload(&s, &jsonl(&[request("a", chat("x", 2))]), "batch", None);
    let create = |body: Value| call(&s, "POST", "/v1/batches", Some(&body), None);
    let good = json!({"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h"});
    for (field, value, param) in [
        ("input_file_id", json!("file-nope"), "input_file_id"),
        ("endpoint", json!("/v1/moderations"), "endpoint"),
        ("completion_window", json!("1h"), "completion_window"),
        ("metadata", json!({"k": 5}), "metadata"),
        ("input_file_id", Value::Null, "input_file_id"),
    ] {
        let mut body = good.clone();
        if value.is_null() {
            body.as_object_mut().unwrap().remove(field);
        } else {
            body[field] = value;
        }
        let (status, e) = create(body);
        assert_eq!(
            (status, e["error"]["param"].as_str()),
            (400, Some(param)),
            "{e}"
        );
    }
    // Uploads: only for batches, with a file.
    let (status, e) = upload(&s, b"{}", "fine-tune", None);
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("purpose")),
        "{e}"
    );
    let (status, e) = upload(&s, b"", "batch", None);
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("file")),
        "{e}"
    );
    // JSON routes still refuse multipart; unknown ids are 404s; a bad priority is a 400.
    let (status, _) = common::server::raw_request(
        &s.addr,
        "POST",
        CHAT,
        Some("multipart/form-data; boundary=x"),
        b"--x--",
    );
    assert_eq!(status, 415);
    assert_eq!(call(&s, "GET", "/v1/batches/batch_nope", None, None).0, 404);
    assert_eq!(
        call(&s, "POST", "/v1/batches/batch_nope/cancel", None, None).0,
        404
    );
    assert_eq!(call(&s, "GET", "/v1/batches?limit=0", None, None).0, 400);
    let (status, e) = call(&s, "GET", "/v1/files?order=sideways", None, None);
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("order")));
    let (_, asc) = call(&s, "GET", "/v1/files?order=asc&limit=1", None, None);
    let (_, desc) = call(&s, "GET", "/v1/files?order=desc", None, None);
    let desc = desc["data"].as_array().unwrap();
    assert!(desc.len() >= 2, "{desc:?}");
    assert_eq!(asc["data"][0]["id"], desc[desc.len() - 1]["id"]);
    let r = s.call(
        "POST",
        CHAT,
        Some(&chat("x", 1)),
        &[("x-edgeinfer-priority", "urgent")],
    );
    assert_eq!(
        (r.status, r.body["error"]["param"].as_str()),
        (400, Some("x-edgeinfer-priority"))
    );
    let r = s.call(
        "POST",
        CHAT,
        Some(&chat("x", 1)),
        &[("x-edgeinfer-priority", "low")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// `(status, error param)` of a reply.
fn refusal((status, e): (u16, Value)) -> (u16, Option<String>) {
    (status, e["error"]["param"].as_str().map(str::to_string))
}

#[test]
fn files_expire_as_asked_and_a_key_stores_no_more_than_its_quota() {
    const QUOTA: usize = 3 << 20;
    let s = Server::start(&["--file-storage-per-key", &QUOTA.to_string()]);
    // OpenAI's default for batch input: 30 days; or as asked, from an hour to 30 days.
    let line = jsonl(&[request("a", chat("Say hi.", 2))]);
    let (status, plain) = upload(&s, &line, "batch", None);
    assert_eq!(status, 200, "{plain}");
    let created = plain["created_at"].as_i64().unwrap();
    assert_eq!(plain["expires_at"].as_i64(), Some(created + 2_592_000));
    let hour = [
        ("expires_after[anchor]", "created_at"),
        ("expires_after[seconds]", "3600"),
    ];
    let (status, short) = upload_with(&s, &line, "batch", &hour, None);
    assert_eq!(status, 200, "{short}");
    let created = short["created_at"].as_i64().unwrap();
    assert_eq!(short["expires_at"].as_i64(), Some(created + 3600));
    let (_, listed) = call(
        &s,
        "GET",
        &format!("/v1/files/{}", short["id"].as_str().unwrap()),
        None,
        None,
    );
    assert_eq!(listed["expires_at"], short["expires_at"]);
    for (fields, param) in [
        (
            vec![
                ("expires_after[anchor]", "created_at"),
                ("expires_after[seconds]", "60"),
            ],
            "expires_after.seconds",
        ),
        (
            vec![
                ("expires_after[anchor]", "created_at"),
                ("expires_after[seconds]", "2592001"),
            ],
            "expires_after.seconds",
        ),
        (
            vec![
                ("expires_after[anchor]", "last_active_at"),
                ("expires_after[seconds]", "3600"),
            ],
            "expires_after.anchor",
        ),
        (
            vec![("expires_after[seconds]", "3600")],
            "expires_after.anchor",
        ),
        (
            vec![("expires_after[anchor]", "created_at")],
            "expires_after.seconds",
        ),
        (
            vec![
                ("expires_after[anchor]", "created_at"),
                ("expires_after[seconds]", "soon"),
            ],
            "expires_after.seconds",
        ),
    ] {
        let got = refusal(upload_with(&s, &line, "batch", &fields, None));
        assert_eq!(got, (400, Some(param.to_string())), "{fields:?}");
    }

    // A batch's output files expire as `output_expires_after` asks.
    let create = |extra: Value| {
        let mut body =
            json!({"input_file_id": plain["id"], "endpoint": CHAT, "completion_window": "24h"});
        body["output_expires_after"] = extra;
        call(&s, "POST", "/v1/batches", Some(&body), None)
    };
    for (bad, param) in [
        (
            json!({"anchor": "created_at", "seconds": 10}),
            "output_expires_after.seconds",
        ),
        (
            json!({"anchor": "created_at", "seconds": "3600"}),
            "output_expires_after.seconds",
        ),
        (
            json!({"anchor": "created", "seconds": 3600}),
            "output_expires_after.anchor",
        ),
        (json!({}), "output_expires_after"),
        (json!(3600), "output_expires_after"),
    ] {
        assert_eq!(
            refusal(create(bad.clone())),
            (400, Some(param.to_string())),
            "{bad}"
        );
    }
    let (status, batch) = create(json!({"anchor": "created_at", "seconds": 7200}));
    assert_eq!(status, 200, "{batch}");
    let done = wait_for(&s, batch["id"].as_str().unwrap(), None, ended);
    assert_eq!(done["status"], "completed", "{done}");
    let out = done["output_file_id"].as_str().unwrap();
    let (_, out) = call(&s, "GET", &format!("/v1/files/{out}"), None, None);
    assert_eq!(
        out["expires_at"].as_i64(),
        Some(out["created_at"].as_i64().unwrap() + 7200),
        "{out}"
    );

    // A file of several download chunks comes back whole, streamed with its length.
    let big: Vec<u8> = (0..(5usize << 19)).map(|i| b'a' + (i % 23) as u8).collect();
    let (status, file) = upload(&s, &big, "batch", None);
    assert_eq!(status, 200, "{file}");
    let big_id = file["id"].as_str().unwrap().to_string();
    let r = ureq::get(&format!("{}/v1/files/{big_id}/content", s.base))
        .call()
        .unwrap();
    assert_eq!(
        r.header("content-length"),
        Some(big.len().to_string().as_str())
    );
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut got).unwrap();
    assert!(
        got == big,
        "the downloaded file differs ({} bytes of {})",
        got.len(),
        big.len()
    );

    // The key's files now hold 2.5 MiB and a little: another MiB does not fit, until the
    // big file is deleted.
    let mib = vec![b'x'; 1 << 20];
    let (status, e) = upload(&s, &mib, "batch", None);
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("file")),
        "{e}"
    );
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains(&QUOTA.to_string()), "{message}");
    // One announced that large is refused before it is sent, to a client that waits for
    // `100 Continue` (curl does for large bodies)...
    use std::io::{Read, Write};
    let head = |expect: &str| {
        format!(
        "POST /v1/files HTTP/1.1\r\nHost: {}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\nConnection: close\r\n{expect}\r\n",
        s.addr,
        8 << 20
    )
    };
    let mut sock = std::net::TcpStream::connect(&s.addr).unwrap();
    sock.write_all(head("Expect: 100-continue\r\n").as_bytes())
        .unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut got = vec![0u8; 4096];
    let n = sock.read(&mut got).expect("an answer before the body");
    let text = String::from_utf8_lossy(&got[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("--file-storage-per-key"), "{text}");
    // ... and to one that sends it at once, after the whole body, never a broken pipe.
    let mut body = form(&vec![b'y'; 8 << 20], "batch", &[]);
    body.truncate(8 << 20);
    body.resize(8 << 20, b'y');
    let mut sock = std::net::TcpStream::connect(&s.addr).unwrap();
    sock.write_all(head("").as_bytes()).unwrap();
    sock.write_all(&body).expect("the whole body is taken");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut text = String::new();
    let _ = sock.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("--file-storage-per-key"), "{text}");
    assert_eq!(
        call(&s, "DELETE", &format!("/v1/files/{big_id}"), None, None).0,
        200
    );
    let (status, file) = upload(&s, &mib, "batch", None);
    assert_eq!(status, 200, "{file}");
}

#[test]
fn a_cancelled_batch_stops_and_keeps_what_it_finished() {
    let s = Server::start(&[]);
    let lines: Vec<Value> = (0..40)
        .map(|i| request(&format!("r{i}"), json!({"messages": [{"role": "user", "content": format!("Tell a long story about the number {i}.")}], "max_tokens": 48, "temperature": 0.7, "seed": i})))
        .collect();
    let batch = start_batch(&s, &lines, None);
    let id = batch["id"].as_str().unwrap();
    wait_for(&s, id, None, |b| {
        b["request_counts"]["completed"].as_u64().unwrap() >= 2
    });
    let (status, cancelling) = call(&s, "POST", &format!("/v1/batches/{id}/cancel"), None, None);
    assert_eq!(status, 200, "{cancelling}");
    assert!(["cancelling", "cancelled"].contains(&cancelling["status"].as_str().unwrap()));
    assert!(cancelling["cancelling_at"].is_i64());
    let done = wait_for(&s, id, None, ended);
    assert_eq!(done["status"], "cancelled", "{done}");
    let counts = &done["request_counts"];
    let completed = counts["completed"].as_u64().unwrap();
    assert!((2..40).contains(&completed), "{done}");
    assert_eq!(counts["failed"], 0);
    let output = lines_of(&s, &done["output_file_id"], None);
    let errors = lines_of(&s, &done["error_file_id"], None);
    assert_eq!(output.len() as u64, completed);
    // Every request is in exactly one file; the ones never run say so.
    assert_eq!(output.len() + errors.len(), 40);
    for (custom_id, e) in &errors {
        assert!(!output.contains_key(custom_id));
        assert_eq!(e["error"]["code"], "batch_cancelled", "{e}");
    }
    // The engine is idle again: the running requests were dropped.
    assert!(s.wait_idle(Duration::from_secs(10)));
}

#[test]
fn files_and_batches_belong_to_their_key_and_a_batch_runs_as_it() {
    let master = "sk-master-batches-test-0123456789";
    let s = Server::start(&["--master-key", master]);
    let make_key = |alias: &str| {
        let r = s.post_key("/key/generate", &json!({"key_alias": alias}), master);
        assert_eq!(r.status, 200, "{}", r.body);
        (
            r.body["key"].as_str().unwrap().to_string(),
            r.body["token"].as_str().unwrap().to_string(),
        )
    };
    let (a, a_token) = make_key("batch-a");
    let (b, _) = make_key("batch-b");
    assert_eq!(upload(&s, b"{}", "batch", None).0, 401);
    // Without a key, an upload gets the ordinary body limit (not a batch file's) before its
    // 401; with one, the same 5 MiB is a file.
    let big = vec![b'\n'; 5 << 20];
    let ctype = format!("multipart/form-data; boundary={BOUNDARY}");
    let (status, _) = common::server::raw_request(
        &s.addr,
        "POST",
        "/v1/files",
        Some(&ctype),
        &form(&big, "batch", &[]),
    );
    assert_eq!(status, 413);
    let (status, f) = upload(&s, &big, "batch", Some(&a));
    assert_eq!((status, f["bytes"].as_u64()), (200, Some(5 << 20)), "{f}");
    // The same 5 MiB as anything but a multipart form is not a file: the ordinary limit.
    let bearer = format!("Bearer {a}");
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    let (status, e) =
        common::server::raw_request_with(&s.addr, "POST", "/v1/files", &headers, &big);
    assert_eq!(status, 413, "{e}");
    let lines: Vec<Value> = (0..3)
        .map(|i| request(&format!("q{i}"), chat("Hi", 3)))
        .collect();
    let batch = start_batch(&s, &lines, Some(&a));
    let id = batch["id"].as_str().unwrap();
    let file = batch["input_file_id"].as_str().unwrap();
    for path in [format!("/v1/batches/{id}"), format!("/v1/files/{file}")] {
        assert_eq!(call(&s, "GET", &path, None, Some(&b)).0, 404, "{path}");
    }
    assert_eq!(content(&s, file, Some(&b)).0, 404);
    assert_eq!(
        call(
            &s,
            "POST",
            &format!("/v1/batches/{id}/cancel"),
            None,
            Some(&b)
        )
        .0,
        404
    );
    assert_eq!(
        call(&s, "DELETE", &format!("/v1/files/{file}"), None, Some(&b)).0,
        404
    );
    for other in [&b, master] {
        let (_, list) = call(&s, "GET", "/v1/batches", None, Some(other));
        assert_eq!(list["data"], json!([]));
    }
    let (_, files) = call(&s, "GET", "/v1/files", None, Some(&b));
    assert_eq!(files["data"], json!([]));
    let done = wait_for(&s, id, Some(&a), ended);
    assert_eq!(done["request_counts"]["completed"], 3, "{done}");
    // Each request was metered to key A, labelled with its batch.
    let (_, usage) = call(&s, "GET", "/v1/usage", None, Some(master));
    let rows: Vec<&Value> = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["key_id"] == a_token.as_str())
        .collect();
    let requests: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert_eq!(requests, 3, "{usage}");
    // A key revoked while its batch runs: the batch fails once, saying why, instead of
    // answering every remaining request with a 401.
    let (c, _) = make_key("batch-c");
    let long: Vec<Value> = (0..40)
        .map(|i| {
            request(
                &format!("l{i}"),
                chat(&format!("Tell a long story about {i}."), 64),
            )
        })
        .collect();
    let batch = start_batch(&s, &long, Some(&c));
    let r = s.post_key("/key/delete", &json!({"keys": [c]}), master);
    assert_eq!(r.status, 200, "{}", r.body);
    let id = batch["id"].as_str().unwrap();
    // The key is gone and the batch is not the master's: read it from the store.
    assert_eq!(
        call(&s, "GET", &format!("/v1/batches/{id}"), None, Some(master)).0,
        404
    );
    let db = rusqlite::Connection::open(s.data_dir.path().join("edgeinfer.db")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let object: Value = loop {
        let (status, object): (String, String) = db
            .query_row(
                "SELECT status, object FROM batches WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        if status != "in_progress" {
            break serde_json::from_str(&object).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the revoked key's batch kept running"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(object["status"], "failed", "{object}");
    assert_eq!(object["errors"]["data"][0]["code"], "batch_failed");
    assert!(object["request_counts"]["completed"].as_u64().unwrap() < 40);
    let rows: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM batch_lines WHERE batch_id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 0, "its prompts are deleted");
}

/// A server's arguments for the default model and a store that outlives its process.
fn restartable() -> (tempfile::TempDir, Vec<String>) {
    let store = tempfile::tempdir().unwrap();
    let db = store.path().join("edgeinfer.db");
    let model = common::default_model_path();
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ];
    (store, args.map(String::from).to_vec())
}

#[test]
fn a_batch_goes_on_after_a_restart() {
    let (_store, args) = restartable();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = Server::spawn(&args, &[]);
    first.wait_ready();
    let lines: Vec<Value> = (0..24)
        .map(|i| request(&format!("r{i}"), json!({"messages": [{"role": "user", "content": format!("Describe the number {i}.")}], "max_tokens": 40, "temperature": 0})))
        .collect();
    let batch = start_batch(&first, &lines, None);
    let id = batch["id"].as_str().unwrap().to_string();
    let partway = wait_for(&first, &id, None, |b| {
        b["request_counts"]["completed"].as_u64().unwrap() >= 1
    });
    assert_eq!(
        partway["status"], "in_progress",
        "the batch finished before the kill: {partway}"
    );
    first.kill9();
    let second = Server::spawn(&args, &[]);
    second.wait_ready();
    let done = wait_for(&second, &id, None, ended);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 24, "completed": 24, "failed": 0})
    );
    let output = lines_of(&second, &done["output_file_id"], None);
    assert_eq!(output.len(), 24);
    assert!((0..24).all(|i| output.contains_key(&format!("r{i}"))));
}

#[test]
fn a_request_that_keeps_failing_the_engine_is_given_up() {
    let (_store, args) = restartable();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Every start, the engine fails a few steps into the batch's request (as a request that
    // meets an engine bug would), and the process exits for its supervisor to restart it.
    let fault = [("EDGEINFER_FAULT", "engine-panic-at-step=6")];
    let line = request("r0", chat("Describe the sea.", 40));
    let mut id = String::new();
    for start in 0..3 {
        let mut s = Server::spawn(&args, &fault);
        s.wait_ready();
        if start == 0 {
            id = start_batch(&s, std::slice::from_ref(&line), None)["id"]
                .as_str()
                .unwrap()
                .to_string();
        }
        let exit = s
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("start {start}: the engine did not fail"));
        assert!(!exit.success());
    }
    // After three attempts that the engine did not outlive, the request is not tried again:
    // its answer is an error, and the batch ends.
    let s = Server::spawn(&args, &fault);
    s.wait_ready();
    let done = wait_for(&s, &id, None, ended);
    assert_eq!(
        (&done["status"], &done["request_counts"]),
        (
            &json!("completed"),
            &json!({"total": 1, "completed": 0, "failed": 1})
        ),
        "{done}"
    );
    let errors = lines_of(&s, &done["error_file_id"], None);
    let message = errors["r0"]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("not tried again"), "{errors:?}");
}

#[test]
fn the_request_that_fails_the_engine_is_given_up_alone_and_those_beside_it_answered() {
    let (_store, args) = restartable();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Every start, the engine fails at any step that runs the request of 37 tokens (as a
    // request that meets an engine bug would), with the others running beside it.
    let fault = [("EDGEINFER_FAULT", "engine-panic-on-max-tokens=37")];
    let mut lines: Vec<Value> = (0..4)
        .map(|i| {
            request(
                &format!("r{i}"),
                chat(&format!("Describe the number {i}."), 30),
            )
        })
        .collect();
    lines.insert(1, request("bad", chat("Describe the sea.", 37)));
    let (mut id, mut crashes) = (String::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(240);
    let done = loop {
        let mut s = Server::spawn(&args, &fault);
        s.wait_ready();
        if id.is_empty() {
            id = start_batch(&s, &lines, None)["id"]
                .as_str()
                .unwrap()
                .to_string();
        }
        // The batch ends, or the engine fails and the process exits for its supervisor to
        // start it again.
        let ended_here = loop {
            assert!(Instant::now() < deadline, "{crashes} crashes so far");
            if s.wait_exit(Duration::from_millis(200)).is_some() {
                break None;
            }
            let got = ureq::get(&format!("{}/v1/batches/{id}", s.base)).call();
            if let Ok(b) = got.map(|r| r.into_json::<Value>().unwrap()) {
                if ended(&b) {
                    break Some(b);
                }
            }
        };
        match ended_here {
            Some(b) => break b,
            None => crashes += 1,
        }
    };
    // Three attempts of its own, each alone, then it is given up; the four beside it,
    // counted once with it at the first failure, were answered.
    assert_eq!(crashes, 3, "{done}");
    assert_eq!(
        (&done["status"], &done["request_counts"]),
        (
            &json!("completed"),
            &json!({"total": 5, "completed": 4, "failed": 1})
        ),
        "{done}"
    );
}

#[test]
fn requests_cut_off_by_a_restart_run_again_and_are_billed_once() {
    const MASTER: &str = "sk-master-batch-billing";
    let store = tempfile::tempdir().unwrap();
    let db = store.path().join("edgeinfer.db");
    let prices = store.path().join("prices.json");
    std::fs::write(&prices, r#"{"*": {"input": 1, "output": 1000}}"#).unwrap();
    let model = common::default_model_path();
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
        "--master-key",
        MASTER,
        "--prices",
        prices.to_str().unwrap(),
    ];
    let first = Server::spawn(&args, &[]);
    first.wait_ready();
    // A key with a budget: its spend is held in memory, and must agree with the ledger's.
    let made = first.post_key(
        "/key/generate",
        &json!({"max_budget": 1000, "budget_duration": "30d"}),
        MASTER,
    );
    assert_eq!(made.status, 200, "{}", made.body);
    let key = made.body["key"].as_str().unwrap().to_string();
    let key = Some(key.as_str());
    // One short request, to know when the batch is under way; the others run long (no
    // end of text), to be cut off part way.
    let lines: Vec<Value> = (0..12)
        .map(|i| {
            let mut body = chat(&format!("Tell a story about the number {i}."), 300);
            if i == 0 {
                body["max_tokens"] = json!(2);
            } else {
                body["logit_bias"] = json!({"0": -100, "2": -100});
            }
            request(&format!("r{i}"), body)
        })
        .collect();
    let batch = start_batch(&first, &lines, key);
    let id = batch["id"].as_str().unwrap().to_string();
    let partway = wait_for(&first, &id, key, |b| {
        b["request_counts"]["completed"].as_u64().unwrap() >= 1
    });
    assert_eq!(partway["status"], "in_progress", "{partway}");
    // A graceful stop cuts the running requests off; each is ledgered with what it computed.
    assert!(first.terminate().success());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let cut: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM requests WHERE status = 'cancelled' AND completion_tokens > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // Not their doing: their attempts are taken back (they run again, not one at a time).
    let counted: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM batch_lines WHERE result IS NULL AND attempts > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(conn);
    assert!(cut >= 1, "no request was cut off part way: nothing tested");
    assert_eq!(counted, 0, "a graceful stop counted attempts");
    let second = Server::spawn(&args, &[]);
    second.wait_ready();
    let done = wait_for(&second, &id, key, ended);
    assert_eq!(
        done["request_counts"],
        json!({"total": 12, "completed": 12, "failed": 0}),
        "{done}"
    );
    // The usage report bills each request once: what its answer used, as the batch counts it.
    let (status, usage) = call(&second, "GET", "/v1/usage", None, key);
    assert_eq!(status, 200, "{usage}");
    let sum = |field: &str| -> u64 {
        let rows = usage["data"].as_array().unwrap();
        rows.iter().map(|r| r[field].as_u64().unwrap()).sum()
    };
    assert_eq!(sum("requests"), 12, "{usage}");
    assert_eq!(
        sum("prompt_tokens"),
        done["usage"]["input_tokens"].as_u64().unwrap(),
        "{usage} {done}"
    );
    assert_eq!(
        sum("completion_tokens"),
        done["usage"]["output_tokens"].as_u64().unwrap(),
        "{usage} {done}"
    );
    // The key's budget counts the same: the cut-off attempts are taken back from its spend.
    let (status, info) = call(&second, "GET", "/key/info", None, key);
    assert_eq!(status, 200, "{info}");
    let spend = (info["info"]["spend"].as_f64().unwrap() * 1e6).round() as u64;
    assert_eq!(spend, sum("cost_micros"), "{info} {usage}");
    assert!(spend > 0, "{usage}");
}
