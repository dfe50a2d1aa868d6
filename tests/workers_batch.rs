//! Workers AI's asynchronous Batch API on its route (`?queueRequest=true` with `requests`,
//! then polls with `request_id`), against the real server: each queued input is answered as
//! the route answers it directly, in order, with its `external_reference`; bad submissions
//! and polls get Cloudflare's envelope; a batch belongs to its key.

mod common;

use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::{json, Value};

const ALIAS: &str = "@cf/meta/llama-3.1-8b-instruct";
const MASTER: &str = "sk-master-workers-batch";

fn run_path() -> String {
    format!("/client/v4/accounts/abc/ai/run/{ALIAS}")
}

fn post(s: &Server, path: &str, body: &Value, key: &str) -> (u16, Value) {
    let r = s.post_key(path, body, key);
    (r.status, r.body)
}

/// Polls until the batch is answered (200); every earlier poll must be a 202 saying
/// `queued` or `running`. Returns the answer and how many 202s came first.
fn poll_until_done(s: &Server, id: &str, key: &str) -> (Value, usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut waits = 0;
    loop {
        let (status, body) = post(s, &run_path(), &json!({"request_id": id}), key);
        if status == 200 {
            return (body, waits);
        }
        assert_eq!(status, 202, "{body}");
        let word = body["result"]["status"].as_str().unwrap();
        assert!(["queued", "running"].contains(&word), "{body}");
        assert_eq!(body["result"]["request_id"], id, "{body}");
        assert_eq!(body["result"]["model"], ALIAS, "{body}");
        waits += 1;
        assert!(
            Instant::now() < deadline,
            "the batch did not finish: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn workers_error(body: &Value, code: u64) {
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["errors"][0]["code"], code, "{body}");
    assert!(
        body["errors"][0]["message"].as_str().unwrap().len() > 5,
        "{body}"
    );
}

fn key(s: &Server) -> String {
    let r = s.post_key("/key/generate", &json!({}), MASTER);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["key"].as_str().unwrap().to_string()
}

#[test]
fn queued_inputs_are_answered_in_order_as_the_route_answers_them() {
    let s = Server::start(&["--model-alias", ALIAS, "--master-key", MASTER]);
    let alice = key(&s);
    let inputs = [
        json!({"messages": [{"role": "user", "content": "Name a colour."}],
               "max_tokens": 12, "temperature": 0}),
        json!({"prompt": "1, 2, 3,", "raw": true, "max_tokens": 8, "temperature": 0}),
        // Fails when it runs: its answer is that error.
        json!({"messages": "not a list"}),
        json!({"prompt": "Write a long poem about the sea.", "max_tokens": 48,
               "temperature": 0}),
    ];
    let references = [json!("colour"), Value::Null, Value::Null, json!("poem")];
    let requests: Vec<Value> = inputs
        .iter()
        .zip(&references)
        .map(|(input, r)| {
            let mut input = input.clone();
            if !r.is_null() {
                input["external_reference"] = r.clone();
            }
            input
        })
        .collect();
    let queued_path = format!("{}?queueRequest=true", run_path());
    let (status, queued) = post(&s, &queued_path, &json!({"requests": requests}), &alice);
    assert_eq!(status, 200, "{queued}");
    assert_eq!(queued["success"], true, "{queued}");
    assert_eq!(queued["result"]["status"], "queued", "{queued}");
    assert_eq!(queued["result"]["model"], ALIAS, "{queued}");
    let id = queued["result"]["request_id"].as_str().unwrap().to_string();
    let (done, waits) = poll_until_done(&s, &id, &alice);
    assert!(
        waits >= 1,
        "the first poll found the batch already answered: {done}"
    );
    assert_eq!(done["success"], true, "{done}");
    let responses = done["result"]["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 4, "{done}");
    let (mut prompt, mut completion) = (0, 0);
    for (i, r) in responses.iter().enumerate() {
        assert_eq!(r["id"], i, "{done}");
        assert_eq!(r["external_reference"], references[i], "{done}");
        // The same input sent directly: the same answer (greedy), or the same refusal.
        let (status, direct) = post(&s, &run_path(), &inputs[i], &alice);
        if i == 2 {
            assert_eq!(status, 400, "{direct}");
            assert_eq!(r["success"], false, "{done}");
            assert_eq!(r["result"], Value::Null, "{done}");
            assert_eq!(r["errors"], direct["errors"], "{done}");
            continue;
        }
        assert_eq!(status, 200, "{direct}");
        assert_eq!(r["success"], true, "{done}");
        assert_eq!(r["result"], direct["result"], "input {i}: {done}");
        prompt += direct["result"]["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += direct["result"]["usage"]["completion_tokens"]
            .as_u64()
            .unwrap();
    }
    let usage = &done["result"]["usage"];
    assert_eq!(
        usage,
        &json!({"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}),
        "{done}"
    );
    // A poll after the end answers the same again.
    let (status, again) = post(&s, &run_path(), &json!({"request_id": id}), &alice);
    assert_eq!((status, &again), (200, &done));
    // It is a batch of the Batch API too: listed, with the route as its endpoint.
    let r = s.call(
        "GET",
        &format!("/v1/batches/{id}"),
        None,
        &[("authorization", &format!("Bearer {alice}"))],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["endpoint"], run_path(), "{}", r.body);
    assert_eq!(r.body["status"], "completed", "{}", r.body);
}

#[test]
fn bad_submissions_and_polls_get_the_envelope_and_batches_belong_to_their_key() {
    let s = Server::start(&["--model-alias", ALIAS, "--master-key", MASTER]);
    let (alice, bob) = (key(&s), key(&s));
    let queued_path = format!("{}?queueRequest=true", run_path());
    let hi = json!({"prompt": "Hi", "max_tokens": 2});
    for (body, names) in [
        (json!({"requests": []}), "`requests` must be a list"),
        (json!({"requests": "Hi"}), "`requests` must be a list"),
        (
            json!({"requests": [hi, 5]}),
            "`requests[1]` must be a JSON object",
        ),
        (
            json!({"requests": [{"prompt": "Hi", "stream": true}]}),
            "`requests[0].stream`",
        ),
        (
            json!({"requests": [{"prompt": "Hi", "external_reference": 5}]}),
            "`requests[0].external_reference`",
        ),
        // An input is never a poll, nor another batch, and has something to run.
        (
            json!({"requests": [hi, {"request_id": "batch_x"}]}),
            "`requests[1]` must be an input",
        ),
        (
            json!({"requests": [{"requests": [hi]}]}),
            "`requests[0]` must be an input",
        ),
        (
            json!({"requests": [{"max_tokens": 3}]}),
            "`requests[0]` must be an input",
        ),
        // Nothing to queue.
        (json!({"prompt": "Hi"}), "queues `requests`"),
    ] {
        let (status, e) = post(&s, &queued_path, &body, &alice);
        assert_eq!(status, 400, "{body}: {e}");
        workers_error(&e, 5006);
        let message = e["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(names), "{body}: {e}");
    }
    // A list of requests without `queueRequest` is not run as one input.
    let (status, e) = post(&s, &run_path(), &json!({"requests": [hi]}), &alice);
    assert_eq!(status, 400, "{e}");
    workers_error(&e, 5006);
    // An unknown model is refused at once, not request by request.
    let (status, e) = post(
        &s,
        "/client/v4/accounts/abc/ai/run/@cf/x/y?queueRequest=true",
        &json!({"requests": [hi]}),
        &alice,
    );
    assert_eq!(status, 404, "{e}");
    workers_error(&e, 3042);
    // Polls: an id that names nothing, or not a string.
    let (status, e) = post(
        &s,
        &run_path(),
        &json!({"request_id": "batch_nope"}),
        &alice,
    );
    assert_eq!(status, 404, "{e}");
    workers_error(&e, 7000);
    let (status, e) = post(&s, &run_path(), &json!({"request_id": 5}), &alice);
    assert_eq!(status, 400, "{e}");
    workers_error(&e, 5006);
    // Alice's batch: Bob cannot see it.
    let (status, queued) = post(&s, &queued_path, &json!({"requests": [hi]}), &alice);
    assert_eq!(status, 200, "{queued}");
    let id = queued["result"]["request_id"].as_str().unwrap().to_string();
    let (status, e) = post(&s, &run_path(), &json!({"request_id": id}), &bob);
    assert_eq!(status, 404, "{e}");
    workers_error(&e, 7000);
    let (done, _) = poll_until_done(&s, &id, &alice);
    assert_eq!(done["result"]["responses"][0]["success"], true, "{done}");
    // A cancelled batch: the inputs it never ran say so.
    let long = json!({"prompt": "Write a long story.", "max_tokens": 200});
    let many = json!({"requests": vec![long; 6]});
    let (status, queued) = post(&s, &queued_path, &many, &alice);
    assert_eq!(status, 200, "{queued}");
    let id = queued["result"]["request_id"].as_str().unwrap().to_string();
    let r = s.call(
        "POST",
        &format!("/v1/batches/{id}/cancel"),
        None,
        &[("authorization", &format!("Bearer {alice}"))],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let (done, _) = poll_until_done(&s, &id, &alice);
    let responses = done["result"]["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 6, "{done}");
    let cancelled = responses
        .iter()
        .filter(|r| r["success"] == false)
        .inspect(|r| {
            let message = r["errors"][0]["message"].as_str().unwrap();
            assert!(message.contains("cancelled"), "{done}");
        })
        .count();
    assert!(cancelled >= 1, "{done}");
    // Without a key: 401 in the envelope.
    let (status, e) = s.post(&run_path(), &json!({"request_id": id}));
    assert_eq!(status, 401, "{e}");
    workers_error(&e, 10000);
}
