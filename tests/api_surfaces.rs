//! The other API surfaces against the real server, through the official clients: the
//! `anthropic` package (`tests/python/anthropic_client.py`: messages whole and streamed,
//! count_tokens, a tool round trip, errors in Anthropic's envelope), the `cloudflare`
//! package's Workers AI client (`tests/python/cloudflare_client.py`), and the prefix-less
//! OpenAI routes.

mod common;

use std::process::Command;

use common::server::Server;
use serde_json::{json, Value};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
const ALIAS: &str = "@cf/meta/llama-3.1-8b-instruct";

/// Runs `tests/python/SCRIPT BASE MODEL` against `server`; returns the JSON it prints.
fn client(script: &str, server: &Server, model: &str) -> Value {
    let out = Command::new(common::python_with_clients())
        .arg(common::repo_root().join("tests/python").join(script))
        .args([&server.base, model])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the client failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn official_anthropic_client_works() {
    let s = Server::start(&[]);
    let r = client("anthropic_client.py", &s, MODEL);

    // Whole and streamed agree (temperature 0), and the stream's usage is the whole one's
    // with the prompt found in the prefix cache.
    assert!(!r["text"].as_str().unwrap().is_empty(), "{r}");
    assert_eq!(r["text"], r["streamed"], "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("msg_"), "{r}");
    assert_eq!(r["stop_reason"], r["stream_stop_reason"], "{r}");
    assert!(
        ["end_turn", "max_tokens"].contains(&r["stop_reason"].as_str().unwrap()),
        "{r}"
    );
    let (u, su) = (&r["usage"], &r["stream_usage"]);
    let input = |u: &Value| {
        u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap()
    };
    assert_eq!(u["cache_read_input_tokens"], 0, "{r}");
    assert_eq!(input(u), input(su), "{r}");
    assert!(su["cache_read_input_tokens"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(u["output_tokens"], su["output_tokens"], "{r}");
    assert_eq!(r["count"].as_u64().unwrap(), input(u), "{r}");

    // The forced call, whole and streamed (the SDK assembles `input_json_delta`s).
    assert_eq!(r["call_stop_reason"], "tool_use", "{r}");
    assert_eq!(r["call"]["name"], "get_weather", "{r}");
    assert!(r["call"]["input"]["city"].is_string(), "{r}");
    assert_eq!(r["streamed_call"]["name"], "get_weather", "{r}");
    assert_eq!(r["streamed_call"]["input"], r["call"]["input"], "{r}");
    // The result went back and became part of the prompt.
    assert!(
        input(&r["answer_usage"]) > input(u),
        "the tool round trip's prompt holds the call and its result: {r}"
    );
    assert!(!r["answer_blocks"].as_array().unwrap().is_empty(), "{r}");

    // Errors in Anthropic's envelope with the right status.
    let envelope = |e: &Value, status: u64, kind: &str| {
        assert_eq!(e["status"], status, "{r}");
        assert_eq!(e["body"]["type"], "error", "{r}");
        assert_eq!(e["body"]["error"]["type"], kind, "{r}");
        assert!(e["body"]["error"]["message"].as_str().unwrap().len() > 5);
    };
    envelope(&r["not_found"], 404, "not_found_error");
    envelope(&r["bad_request"], 400, "invalid_request_error");
    envelope(&r["bad_json"], 400, "invalid_request_error");
}

#[test]
fn openai_routes_answer_without_the_v1_prefix() {
    let s = Server::start(&[]);
    let (status, models) = s.get("/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    let body = json!({"model": MODEL, "max_tokens": 4, "temperature": 0,
                      "messages": [{"role": "user", "content": "Hi"}]});
    let (status, a) = s.post("/chat/completions", &body);
    assert_eq!(status, 200, "{a}");
    let (_, b) = s.post("/v1/chat/completions", &body);
    assert_eq!(
        a["choices"][0]["message"], b["choices"][0]["message"],
        "same answer on both routes"
    );
    let (status, c) = s.post(
        "/completions",
        &json!({"model": MODEL, "prompt": "The sky is", "max_tokens": 3}),
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    // OpenAI's envelope there, Anthropic's under /v1/messages.
    let (status, e) = s.post("/chat/completions", &json!({"model": MODEL}));
    assert_eq!(status, 400);
    assert!(e["error"]["message"].is_string(), "{e}");
    let (status, e) = s.post("/v1/messages", &json!({"model": MODEL}));
    assert_eq!(status, 400);
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
}

#[test]
fn official_cloudflare_client_runs_workers_ai() {
    let s = Server::start(&["--model-alias", ALIAS]);
    let r = client("cloudflare_client.py", &s, ALIAS);
    let text = r["text"].as_str().unwrap();
    assert!(!text.is_empty(), "{r}");
    assert_eq!(r["text"], r["streamed"], "{r}");
    assert!(r["stream_done"].as_bool().unwrap(), "{r}");
    assert!(r["stream_content_type"]
        .as_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let u = &r["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        r["stream_usage"]["completion_tokens"], u["completion_tokens"],
        "{r}"
    );
    // A prompt goes through the chat template; a raw prompt does not (fewer prompt tokens).
    assert!(!r["prompt_text"].as_str().unwrap().is_empty(), "{r}");
    assert!(!r["raw_text"].as_str().unwrap().is_empty(), "{r}");
    assert!(
        r["raw_usage"]["prompt_tokens"].as_u64().unwrap() < 10,
        "{r}"
    );
    // Tool calls carry their arguments as an object; JSON mode's response is a value.
    let call = &r["tool_calls"][0];
    assert_eq!(call["name"], "get_weather", "{r}");
    assert!(call["arguments"]["city"].is_string(), "{r}");
    assert!(r["json_response"]["city"].is_string(), "{r}");
    assert!(r["json_response"]["country"].is_string(), "{r}");
    // Errors in Cloudflare's envelope.
    let envelope = |e: &Value, status: u64, code: u64| {
        assert_eq!(e["status"], status, "{r}");
        assert_eq!(e["body"]["success"], false, "{r}");
        assert_eq!(e["body"]["errors"][0]["code"], code, "{r}");
        assert!(e["body"]["errors"][0]["message"].as_str().unwrap().len() > 5);
    };
    envelope(&r["unknown_model"], 404, 3042);
    envelope(&r["bad_temperature"], 400, 5006);
    envelope(&r["no_input"], 400, 5006);
}

#[test]
fn workers_ai_shapes_stay_off_v1_and_its_openai_path_speaks_openai() {
    let s = Server::start(&["--model-alias", ALIAS]);
    let base = "/client/v4/accounts/abc/ai";
    let (status, w) = s.post(
        &format!("{base}/run/{ALIAS}"),
        &json!({"prompt": "Hi", "max_tokens": 3}),
    );
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["success"], true);
    assert!(w["result"]["response"].is_string(), "{w}");
    // The alias also works on /v1, in OpenAI's shape there.
    let body =
        json!({"model": ALIAS, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]});
    let (status, o) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{o}");
    assert!(o.get("result").is_none() && o["choices"].is_array(), "{o}");
    let (status, o) = s.post(&format!("{base}/v1/chat/completions"), &body);
    assert_eq!(status, 200, "{o}");
    assert!(o["choices"].is_array(), "{o}");
    let (status, e) = s.post(
        &format!("{base}/v1/chat/completions"),
        &json!({"model": "nope", "messages": []}),
    );
    assert_eq!(status, 404, "{e}");
    assert!(e["error"]["message"].is_string(), "{e}");
    // A bad body on the run route: Cloudflare's envelope.
    let (status, e) = s.post_raw(&format!("{base}/run/{ALIAS}"), b"{nope");
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["success"], false, "{e}");
    assert_eq!(e["errors"][0]["code"], 5006, "{e}");
}
