//! `/v1/embeddings` with the real default model: OpenAI's shape, unit vectors that do not
//! depend on the inputs beside them, token-id and base64 forms, clear errors, and the
//! gateway (windowed by a key's parallel slots, metered at the input price, cached).

mod common;

use base64::Engine as _;
use common::server::{Reply, Server};
use serde_json::{json, Value};

const MASTER: &str = "sk-master-embeddings";

const TEXTS: [&str; 3] = [
    "The cat sat on the mat.",
    "A cat was sitting on a mat.",
    "Stock markets fell sharply today.",
];

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    let data = body["data"].as_array().expect("a data list");
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], i, "in input order");
            let e = d["embedding"].as_array().expect("floats");
            e.iter().map(|x| x.as_f64().unwrap() as f32).collect()
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn assert_error(r: (u16, Value), status: u16, param: &str) {
    assert_eq!(r.0, status, "{}", r.1);
    assert_eq!(r.1["error"]["param"], param, "{}", r.1);
    assert!(r.1["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}

#[test]
fn embeddings_are_unit_vectors_whatever_their_batch() {
    let s = Server::start(&[]);
    // A long input beside short ones: it runs in several chunks, packed with them.
    let long = common::long_prompt("Summarise.");
    let mut inputs: Vec<&str> = TEXTS.to_vec();
    inputs.push(&long);
    let (status, body) = s.post("/v1/embeddings", &json!({"input": inputs}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "SmolLM2-135M-Instruct.Q4_1");
    let all = vectors(&body);
    assert_eq!(all.len(), 4);
    for v in &all {
        assert_eq!(v.len(), 576);
        assert!((dot(v, v).sqrt() - 1.0).abs() < 1e-4);
    }
    // Each input alone (a string, then its token ids) gives its vector.
    let mut tokens = 0;
    for (i, text) in inputs.iter().enumerate() {
        let (_, alone) = s.post("/v1/embeddings", &json!({"input": text}));
        assert!(max_diff(&vectors(&alone)[0], &all[i]) < 1e-5, "input {i}");
        let (_, t) = s.post("/tokenize", &json!({"content": text, "add_special": true}));
        let ids = t["tokens"].clone();
        tokens += ids.as_array().unwrap().len();
        let (_, by_ids) = s.post("/v1/embeddings", &json!({"input": ids}));
        assert_eq!(vectors(&by_ids)[0], vectors(&alone)[0], "input {i} by ids");
    }
    assert_eq!(body["usage"]["prompt_tokens"], tokens);
    assert_eq!(body["usage"]["total_tokens"], tokens);
    // A paraphrase is nearer than another topic.
    let (near, far) = (dot(&all[0], &all[1]), dot(&all[0], &all[2]));
    assert!(near > far + 0.05, "paraphrase {near}, other topic {far}");
    // base64: the same f32s, little-endian.
    let (_, packed) = s.post(
        "/v1/embeddings",
        &json!({"input": TEXTS[0], "encoding_format": "base64", "dimensions": 576}),
    );
    let b64 = packed["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, all[0]);
    // The same route under llama-server's and AI Gateway's paths.
    for path in ["/embeddings", "/v1/acct/gw/openai/embeddings"] {
        let (status, body) = s.post(path, &json!({"input": TEXTS[0]}));
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(vectors(&body)[0], all[0], "{path}");
    }

    // Clear errors, never a truncation.
    let post = |b: Value| s.post("/v1/embeddings", &b);
    assert_error(post(json!({"input": ""})), 400, "input");
    assert_error(post(json!({"input": []})), 400, "input");
    assert_error(post(json!({"input": ["a", ""]})), 400, "input");
    assert_error(post(json!({"input": [[1, 2], []]})), 400, "input");
    assert_error(post(json!({"input": [[1, 99999999]]})), 400, "input");
    assert_error(post(json!({"input": {"text": "a"}})), 400, "input");
    assert_error(post(json!({})), 400, "input");
    let many: Vec<&str> = vec!["a"; 2049];
    assert_error(post(json!({"input": many})), 400, "input");
    let e = post(json!({"input": "a", "encoding_format": "int8"}));
    assert_error(e, 400, "encoding_format");
    assert_error(
        post(json!({"input": "a", "dimensions": 256})),
        400,
        "dimensions",
    );
    let e = post(json!({"input": "a", "model": "text-embedding-3-small"}));
    assert_eq!(e.0, 404, "{}", e.1);
    assert_eq!(e.1["error"]["code"], "model_not_found");
    let too_long = "word ".repeat(9000);
    let e = post(json!({"input": ["short", too_long]}));
    assert_eq!(e.0, 400, "{}", e.1);
    assert_eq!(e.1["error"]["code"], "context_length_exceeded", "{}", e.1);
    assert_eq!(e.1["error"]["param"], "input", "{}", e.1);
    // A request timeout cancels what is left (the timeout's clock starts at the body).
    let many: Vec<String> = (0..64).map(|i| format!("{long} {i}")).collect();
    let before = s.metric("edgeinfer_prompt_tokens_computed_total");
    let r = s.call(
        "POST",
        "/v1/embeddings",
        Some(&json!({"input": many})),
        // Long enough that tokenizing 64 inputs on a slow, shared host leaves time to start
        // computing (200 ms did not in one CI run); far too short for 128k prompt tokens.
        &[("cf-aig-request-timeout", "2000")],
    );
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "request_timeout", "{}", r.body);
    // 64 inputs of 2,000 tokens would take most of a minute; cancelled, they stop now.
    assert!(
        s.wait_idle(std::time::Duration::from_secs(5)),
        "the inputs were not cancelled"
    );
    // Some inputs had started (the timeout cut a run short, not the tokenizing).
    let computed = s.metric("edgeinfer_prompt_tokens_computed_total") - before;
    assert!(computed > 0.0 && computed < 32.0 * 2000.0, "{computed}");
    // The server still answers.
    assert_eq!(post(json!({"input": "ok"})).0, 200);
}

#[test]
fn last_token_pooling_is_a_flag() {
    let mean = Server::start(&[]);
    let last = Server::start(&["--pooling", "last"]);
    let body = json!({"input": TEXTS.to_vec()});
    let (m, l) = (
        vectors(&mean.post("/v1/embeddings", &body).1),
        vectors(&last.post("/v1/embeddings", &body).1),
    );
    for (m, l) in m.iter().zip(&l) {
        assert!((dot(l, l).sqrt() - 1.0).abs() < 1e-4);
        assert!(max_diff(m, l) > 1e-2, "last pooling gave the mean");
    }
    // The last token's state of a text is its state in any longer text it starts.
    let (_, a) = last.post("/v1/embeddings", &json!({"input": [[1, 504, 2349, 28]]}));
    let (_, b) = last.post(
        "/v1/embeddings",
        &json!({"input": [[1, 504, 2349, 28], [1, 504, 2349, 28, 253, 7063]]}),
    );
    assert_eq!(vectors(&a)[0], vectors(&b)[0]);
    assert!(max_diff(&vectors(&b)[0], &vectors(&b)[1]) > 1e-3);
}

/// An embedding model's metadata (a synthetic model declaring last-token pooling and an
/// EOS after each text) is followed: the EOS's state is the embedding.
#[test]
fn an_embedding_models_pooling_and_eos_are_followed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("embedder.gguf");
    let spec = common::synthetic::Spec {
        embedding: true,
        ..Default::default()
    };
    common::synthetic::write(&path, &spec);
    let s = Server::spawn(&["--model", path.to_str().unwrap()], &[]);
    s.wait_ready();
    let (_, t) = s.post(
        "/tokenize",
        &json!({"content": "hello world", "add_special": true}),
    );
    let ids: Vec<u64> = serde_json::from_value(t["tokens"].clone()).unwrap();
    let eos = 257; // the synthetic vocabulary's
    assert_ne!(ids.last(), Some(&eos));
    let mut with_eos = ids.clone();
    with_eos.push(eos);
    let (status, body) = s.post("/v1/embeddings", &json!({"input": "hello world"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], with_eos.len());
    let (_, by_ids) = s.post("/v1/embeddings", &json!({"input": [with_eos, ids]}));
    let (text, v) = (&vectors(&body)[0], vectors(&by_ids));
    assert_eq!(text, &v[0], "the text's embedding is its ids' with the EOS");
    assert!(max_diff(text, &v[1]) > 1e-3, "the EOS was not appended");
    // Workers AI's shape names the model's pooling.
    let (_, w) = s.post(
        "/client/v4/accounts/a/ai/run/embedder",
        &json!({"text": "hello world"}),
    );
    assert_eq!(w["result"]["pooling"], "last", "{w}");
    assert_eq!(w["result"]["data"][0], body["data"][0]["embedding"], "{w}");
}

fn generate_key(s: &Server, fields: Value) -> String {
    let r = s.post_key("/key/generate", &fields, MASTER);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["key"].as_str().unwrap().to_string()
}

fn usage_of(s: &Server, key: &str) -> Value {
    let auth = format!("Bearer {key}");
    let r = s.call("GET", "/v1/usage", None, &[("authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["data"][0].clone()
}

fn embed_with(s: &Server, key: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let auth = format!("Bearer {key}");
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(headers);
    s.call("POST", "/v1/embeddings", Some(body), &h)
}

#[test]
fn the_gateway_meters_limits_and_caches_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.json");
    // Every input token costs 1,000 micro-USD.
    std::fs::write(&prices, r#"{"*": {"input": 1000, "output": 0}}"#).unwrap();
    let s = Server::start(&["--master-key", MASTER, "--prices", prices.to_str().unwrap()]);
    // Two parallel slots: ten inputs run two at a time, not refused.
    let key = generate_key(&s, json!({"max_parallel_requests": 2}));
    let inputs: Vec<String> = (0..10).map(|i| format!("Document number {i}.")).collect();
    let body = json!({"input": inputs});
    let r = embed_with(&s, &key, &body, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(vectors(&r.body).len(), 10);
    let tokens = r.body["usage"]["prompt_tokens"].as_u64().unwrap();
    let u = usage_of(&s, &key);
    assert_eq!(
        (u["requests"].as_u64(), u["prompt_tokens"].as_u64()),
        (Some(1), Some(tokens)),
        "{u}"
    );
    assert_eq!(u["completion_tokens"], 0);
    assert_eq!(u["cost_micros"].as_u64(), Some(tokens * 1000));
    // Cached on request: the second answer is the first, at no new compute.
    let ttl = [("cf-aig-cache-ttl", "60")];
    let miss = embed_with(&s, &key, &body, &ttl);
    assert_eq!(miss.header("cf-aig-cache-status"), Some("MISS"));
    let computed = s.metric("edgeinfer_prompt_tokens_computed_total");
    let hit = embed_with(&s, &key, &body, &ttl);
    assert_eq!(hit.header("cf-aig-cache-status"), Some("HIT"));
    assert_eq!(vectors(&hit.body), vectors(&miss.body));
    assert_eq!(vectors(&hit.body), vectors(&r.body));
    assert_eq!(hit.body["usage"], miss.body["usage"]);
    assert_eq!(s.metric("edgeinfer_prompt_tokens_computed_total"), computed);
    assert_eq!(usage_of(&s, &key)["requests"], 3);
    // A budget pays for what it can: prompt tokens only, no completion to fit.
    let budgeted = generate_key(&s, json!({"max_budget": 1.0, "budget_duration": "30d"}));
    let r = embed_with(&s, &budgeted, &body, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        usage_of(&s, &budgeted)["cost_micros"].as_u64(),
        Some(tokens * 1000)
    );
    let poor = generate_key(&s, json!({"max_budget": 0.001, "budget_duration": "30d"}));
    assert_eq!(embed_with(&s, &poor, &body, &[]).status, 429);
    let computed = s.metric("edgeinfer_prompt_tokens_computed_total");
    // A token limit refuses a request larger than it before computing anything.
    let small = generate_key(&s, json!({"tpm_limit": 20}));
    let r = embed_with(&s, &small, &body, &[]);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(s.metric("edgeinfer_prompt_tokens_computed_total"), computed);
    // A key may not embed with a model it is not allowed.
    let other = generate_key(&s, json!({"models": ["another-model"]}));
    assert_eq!(embed_with(&s, &other, &body, &[]).status, 403);
}
