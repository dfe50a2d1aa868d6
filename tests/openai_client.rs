//! The official `openai` Python package against the real server, streaming and not, with
//! structured output and tools. It runs in the virtual environment `.venv` (see
//! [`common::python_with_clients`]; `.ci/run` prepares it).

mod common;

use std::process::Command;

use common::server::Server;
use serde_json::{json, Value};

/// Runs `tests/python/SCRIPT` against a fresh server; returns the JSON it prints.
fn run_client(script: &str) -> Value {
    run_script(common::python_with_clients(), script, &Server::start(&[]))
}

/// Runs `tests/python/SCRIPT BASE_URL MODEL` against `s`; what it printed, as JSON.
fn run_script(python: std::path::PathBuf, script: &str, s: &Server) -> Value {
    let out = Command::new(python)
        .arg(common::repo_root().join("tests/python").join(script))
        .args([&s.base, "SmolLM2-135M-Instruct.Q4_1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the client failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn official_openai_client_works() {
    let r = run_client("openai_client.py");
    assert!(!r["text"].as_str().unwrap().is_empty());
    assert_eq!(r["text"], r["streamed"], "{r}");
    assert_eq!(r["finish_reason"], r["stream_finish_reason"]);
    // The non-streamed request ran first; the streamed one then found its prompt in the
    // prefix cache (all but the block holding the last token), and the client parsed it.
    let (mut whole, mut streamed) = (r["usage"].clone(), r["stream_usage"].clone());
    let cached = |u: &Value| u["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert_eq!(cached(&whole), Some(0), "{r}");
    assert!(cached(&streamed).unwrap() > 0, "{r}");
    whole["prompt_tokens_details"] = Value::Null;
    streamed["prompt_tokens_details"] = Value::Null;
    assert_eq!(whole, streamed);
    assert_eq!(r["models"], json!(["SmolLM2-135M-Instruct.Q4_1"]));
    assert_eq!(r["retrieved"], "SmolLM2-135M-Instruct.Q4_1");
    // Embeddings through the client's default base64 decode to the floats it asks for.
    let vectors = r["embeddings"].as_array().unwrap();
    assert_eq!(vectors.len(), 2);
    assert_eq!(vectors[0].as_array().unwrap().len(), 576);
    // (JSON floats are f32's shortest form, base64 the f32 itself: equal as f32.)
    let as_f32 = |v: &Value| -> Vec<f32> {
        let rows = v.as_array().unwrap().iter();
        rows.flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect()
    };
    assert_eq!(as_f32(&r["embeddings"]), as_f32(&r["float_embeddings"]));
    assert_ne!(vectors[0], vectors[1]);
    let tokens = r["embedding_usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 10, "{}", r["embedding_usage"]);
    assert_eq!(r["embedding_usage"]["total_tokens"].as_u64(), Some(tokens));
    assert_eq!(r["not_found"], 404);
    assert_eq!(r["bad_request"], 400);
    // Scoring five prompt ids: the client parses six entries (the first unscored).
    let scored = &r["scored"];
    assert_eq!(scored["tokens"], 6, "{r}");
    assert_eq!(scored["top_logprobs"], 6, "{r}");
    let lps = scored["token_logprobs"].as_array().unwrap();
    assert!(lps[0].is_null() && lps[1..].iter().all(|l| l.as_f64().unwrap() <= 0.0));
    assert_eq!(scored["text_offset"].as_array().unwrap().len(), 6);
    // n = 2, greedy: two choices, indexed, the same text.
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{r}");
    assert_eq!((&choices[0][0], &choices[1][0]), (&json!(0), &json!(1)));
    assert_eq!(choices[0][1], choices[1][1]);
}

#[test]
fn official_client_parses_structured_output_and_calls_tools() {
    let r = run_client("structured_client.py");
    // `parse` gave a pydantic object (the script asserts its type), here as JSON.
    assert!(r["film"]["director"]["age"].is_i64(), "{r}");
    // Every one of the 20 strict-schema replies at temperature 1 validated (jsonschema).
    assert_eq!(r["valid"], 20, "{r}");
    assert!(r["objects"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["finish_reason"], "tool_calls");
    assert_eq!(r["call"]["name"], "get_weather");
    assert_eq!(
        r["call"], r["streamed"],
        "streamed deltas differ from the call"
    );
    assert!(r["final_calls"].is_null());
    assert!(!r["final_text"].as_str().unwrap().is_empty());
    assert_eq!(r["refused_param"], "response_format.json_schema");
}

/// lm-evaluation-harness's `local-completions` model, with the server's own tokenizer.
#[test]
fn lm_evaluation_harness_scores_and_generates() {
    let s = Server::start(&[]);
    let r = run_script(common::python_with_lm_eval(), "lm_eval_client.py", &s);
    // It found the server's tokenizer (no download) and it agrees with /tokenize.
    assert_eq!(r["tokenizer_backend"], "remote", "{r}");
    let (_, t) = s.post("/tokenize", &json!({"content": "The capital of France is"}));
    assert_eq!(r["context_ids"], t["tokens"]);
    let (_, info) = s.get("/tokenizer_info");
    let info: Value = serde_json::from_str(&info).unwrap();
    let (_, eos) = s.post("/tokenize", &json!({"content": info["eos_token"]}));
    assert_eq!(eos["tokens"].as_array().unwrap().len(), 1, "{info}");
    assert_eq!(r["eos_token_id"], eos["tokens"][0], "{r}");
    // Its scores are ours: Paris is greedy and likelier than banana.
    let scores = r["scores"].as_array().unwrap();
    let (paris, banana) = (&scores[0], &scores[1]);
    assert_eq!(paris[1], true, "{r}");
    assert_eq!(banana[1], false, "{r}");
    assert!(
        paris[0].as_f64().unwrap() > banana[0].as_f64().unwrap() + 1.0,
        "{r}"
    );
    let (_, direct) = s.post(
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 1, "logprobs": 1,
                "temperature": 0}),
    );
    let want = direct["choices"][0]["logprobs"]["token_logprobs"][0]
        .as_f64()
        .unwrap();
    assert!(
        (paris[0].as_f64().unwrap() - want).abs() < 1e-3,
        "{r} vs {direct}"
    );
    // Its generation is the greedy reply.
    let (_, g) = s.post(
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
                "stop": ["\n"]}),
    );
    assert_eq!(r["generated"][0], g["choices"][0]["text"], "{r}");
}

#[test]
fn official_client_runs_and_cancels_batches() {
    let r = run_client("batch_client.py");
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(
        r["counts"],
        json!({"total": 2, "completed": 2, "failed": 0})
    );
    assert_eq!(r["metadata"], json!({"job": "nightly"}));
    let usage = &r["usage"];
    assert!(usage["input_tokens"].as_i64().unwrap() > 0, "{r}");
    assert_eq!(
        usage["total_tokens"].as_i64(),
        Some(usage["input_tokens"].as_i64().unwrap() + usage["output_tokens"].as_i64().unwrap()),
        "{r}"
    );
    assert_eq!(r["results"], r["direct"], "{r}");
    assert_eq!(r["file"]["purpose"], "batch");
    assert_eq!(r["file"]["filename"], "asks.jsonl");
    // The expiries the client asked for (`expires_after`, `output_expires_after`).
    assert_eq!(r["expiry"], json!([3600, 7200]), "{r}");
    assert!(["cancelling", "cancelled"].contains(&r["cancel_status"].as_str().unwrap()));
    assert_eq!(r["cancelled"], "cancelled", "{r}");
    assert!(r["cancelled_counts"]["completed"].as_u64().unwrap() < 30);
    // Newest first.
    assert_eq!(r["listed"], json!([r["ids"][1], r["ids"][0]]));
}
