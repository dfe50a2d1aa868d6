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

    // A matched stop sequence is the stop reason and is named, whole and streamed.
    assert_eq!(r["stop"]["stop_reason"], "stop_sequence", "{r}");
    assert_eq!(r["stop"]["stop_sequence"], "e", "{r}");
    assert!(!r["stop"]["text"].as_str().unwrap().contains('e'), "{r}");
    assert_eq!(r["stop"], r["stream_stop"], "{r}");

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
    envelope(&r["bad_pooling"], 400, 5006);
    // Embeddings in Workers AI's shape: the same vectors as OpenAI's route gives.
    assert_eq!(r["embedding_shape"], json!([2, 576]), "{r}");
    assert_eq!(r["embedding_pooling"], "mean", "{r}");
    let (status, openai) = s.post(
        "/v1/embeddings",
        &json!({"input": ["The cat sat on the mat.", "Markets fell."]}),
    );
    assert_eq!(status, 200, "{openai}");
    for i in 0..2 {
        assert_eq!(r["embeddings"][i], openai["data"][i]["embedding"], "{r}");
    }
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
    // Retrieving the model by its alias names it as asked, as OpenAI's retrieve does.
    let (status, m) = s.get(&format!("/v1/models/{ALIAS}"));
    assert_eq!(status, 200, "{m}");
    let m: serde_json::Value = serde_json::from_str(&m).unwrap();
    assert_eq!(
        (m["id"].as_str(), m.get("parent")),
        (Some(ALIAS), None),
        "{m}"
    );
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

#[test]
fn official_openai_client_chains_responses() {
    let s = Server::start(&[]);
    let r = client("responses_client.py", &s, MODEL);
    let turns = r["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 3);
    for (i, t) in turns.iter().enumerate() {
        assert!(t["id"].as_str().unwrap().starts_with("resp_"), "{r}");
        assert!(!t["text"].as_str().unwrap().is_empty(), "{r}");
        if i > 0 {
            assert_eq!(t["previous"], turns[i - 1]["id"], "{r}");
        }
    }
    let input = |i: usize| turns[i]["usage"]["input_tokens"].as_u64().unwrap();
    let output = |i: usize| turns[i]["usage"]["output_tokens"].as_u64().unwrap();
    let cached = |i: usize| {
        turns[i]["usage"]["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    // Each turn's prompt holds the whole conversation before it...
    assert!(input(1) >= input(0) + output(0), "{r}");
    assert!(input(2) >= input(1) + output(1), "{r}");
    // ...and the prefix cache covers that history: all but the last partial block (16).
    assert!(cached(2) + 16 > input(1) + output(1), "{r}");
    assert!(cached(1) + 16 > input(0) + output(0), "{r}");

    let events: Vec<&str> = r["stream_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(events[0], "response.created");
    assert!(events.contains(&"response.output_text.delta"), "{r}");
    assert!(events.contains(&"response.output_item.done"), "{r}");
    assert!(
        ["response.completed", "response.incomplete"].contains(events.last().unwrap()),
        "{r}"
    );
    assert_eq!(r["stream_text"], r["whole_text"], "{r}");

    assert_eq!(r["call"]["name"], "get_weather", "{r}");
    assert!(r["call"]["arguments"]["city"].is_string(), "{r}");
    assert_eq!(r["streamed_call"]["name"], "get_weather", "{r}");
    // A reply that is one call lists the call alone, streamed or not.
    assert_eq!(r["one_call_items"], json!(["function_call"]), "{r}");
    assert_eq!(r["streamed_one_call_items"], r["one_call_items"], "{r}");
    // The output went back through previous_response_id: the call and its result are in
    // the prompt.
    let u = |k: &str| r[k]["input_tokens"].as_u64().unwrap();
    assert!(u("answer_usage") > u("call_usage"), "{r}");
    assert!(
        r["json"]["city"].is_string() && r["json"]["country"].is_string(),
        "{r}"
    );

    // The third turn's input items: the conversation it was given, oldest first when asked.
    let items = r["input_items"].as_array().unwrap();
    let roles: Vec<&str> = items.iter().map(|i| i["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user", "assistant", "user"],
        "{r}"
    );
    assert_eq!(items[0]["text"], "My name is Ada and I like tea.", "{r}");
    assert_eq!(items[1]["text"], turns[0]["text"], "{r}");
    assert_eq!(items[3]["text"], turns[1]["text"], "{r}");
    assert_eq!(items[4]["text"], "And what is my name?", "{r}");
    // Newest first by default.
    assert_eq!(r["newest_input_item"], items[4]["id"], "{r}");
    assert_eq!(r["newest_has_more"], true, "{r}");
    // The answer's: the result, the calls (one or more) and the question, newest first.
    let types: Vec<&str> = r["answer_input_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let (first, rest) = types.split_first().unwrap();
    let (last, calls) = rest.split_last().unwrap();
    assert_eq!((*first, *last), ("function_call_output", "message"), "{r}");
    assert!(
        !calls.is_empty() && calls.iter().all(|t| *t == "function_call"),
        "{r}"
    );
    assert_eq!(r["cancel"], 400, "{r}");
    // Run in the background: queued at once, then polled to its end (which cannot be
    // cancelled any more).
    assert_eq!(r["background_first"], "queued", "{r}");
    assert!(
        ["completed", "incomplete"].contains(&r["background_end"].as_str().unwrap()),
        "{r}"
    );
    assert!(!r["background_text"].as_str().unwrap().is_empty(), "{r}");
    // Streamed in the background and joined again after the third event: the rest of them.
    let bs = &r["background_stream"];
    assert_eq!(bs["first"][0], "response.created", "{r}");
    let rest = bs["rest"].as_array().unwrap();
    assert!(
        rest.iter().enumerate().all(|(i, n)| n == &json!(i + 3)),
        "{r}"
    );
    assert!(
        bs["end"] == "response.completed" || bs["end"] == "response.incomplete",
        "{r}"
    );
    // Logprobs read as the SDK's types: one per token, greedy ones the likeliest.
    let lps = r["logprobs"].as_array().unwrap();
    assert!((1..=4).contains(&lps.len()), "{r}");
    assert!(
        lps.iter()
            .all(|lp| lp["top"][0] == lp["token"] && lp["top"].as_array().unwrap().len() == 2),
        "{r}"
    );
    assert_eq!(r["background_cancel"], 400, "{r}");
    assert_eq!(r["retrieved_text"], turns[0]["text"], "{r}");
    assert_eq!(r["deleted"], true, "{r}");
    assert_eq!(r["after_delete"], 404, "{r}");
    // As OpenAI answers: a 400 whose code says to send the history again.
    assert_eq!(
        r["unknown_previous"],
        json!([400, "previous_response_not_found", "previous_response_id"]),
        "{r}"
    );
    // A tool result that answers no call in the conversation.
    assert_eq!(r["orphan_output"], 400, "{r}");
    assert_eq!(r["unstored"], 404, "{r}");
}

#[test]
fn stored_responses_survive_a_restart_and_belong_to_their_key() {
    const MASTER: &str = "sk-master-responses-test";
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("node.db");
    let flags = ["--db", db.to_str().unwrap(), "--master-key", MASTER];
    let s = Server::start(&flags);
    let key = |s: &Server| {
        let r = s.post_key("/key/generate", &json!({}), MASTER);
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["key"].as_str().unwrap().to_string()
    };
    let (alice, bob) = (key(&s), key(&s));
    let turn = |s: &Server, k: &str, input: &str, prev: Option<&str>| {
        s.post_key(
            "/v1/responses",
            &json!({"model": MODEL, "input": input, "previous_response_id": prev,
                    "max_output_tokens": 8, "temperature": 0}),
            k,
        )
    };
    let first = turn(&s, &alice, "My name is Ada.", None);
    assert_eq!(first.status, 200, "{}", first.body);
    let id = first.body["id"].as_str().unwrap().to_string();
    drop(s);

    let s = Server::start(&flags);
    let get = |k: &str| {
        s.call(
            "GET",
            &format!("/v1/responses/{id}"),
            None,
            &[("authorization", &format!("Bearer {k}"))],
        )
    };
    let mine = get(&alice);
    assert_eq!(mine.status, 200, "{}", mine.body);
    assert_eq!(mine.body["output"], first.body["output"]);
    let theirs = get(&bob);
    assert_eq!(theirs.status, 404, "{}", theirs.body);
    assert!(theirs.body["error"]["message"].is_string());
    // Its input items too: the owner's alone.
    let items = |k: &str, query: &str| {
        s.call(
            "GET",
            &format!("/v1/responses/{id}/input_items{query}"),
            None,
            &[("authorization", &format!("Bearer {k}"))],
        )
    };
    let mine = items(&alice, "");
    assert_eq!(mine.status, 200, "{}", mine.body);
    assert_eq!(
        mine.body["data"][0]["content"][0]["text"],
        "My name is Ada."
    );
    assert_eq!(items(&bob, "").status, 404);
    let bad = items(&alice, "?after=msg_nope");
    assert_eq!(
        (bad.status, &bad.body["error"]["param"]),
        (400, &json!("after")),
        "{}",
        bad.body
    );
    // Continuing works for the owner after the restart, and not for another key.
    let next = turn(&s, &alice, "What is my name?", Some(&id));
    assert_eq!(next.status, 200, "{}", next.body);
    assert!(
        next.body["usage"]["input_tokens"].as_u64().unwrap()
            > first.body["usage"]["input_tokens"].as_u64().unwrap()
    );
    let stolen = turn(&s, &bob, "What is my name?", Some(&id));
    assert_eq!(stolen.status, 400, "{}", stolen.body);
    assert_eq!(stolen.body["error"]["code"], "previous_response_not_found");
    assert_eq!(stolen.body["error"]["param"], "previous_response_id");
    let del = s.call(
        "DELETE",
        &format!("/v1/responses/{id}"),
        None,
        &[("authorization", &format!("Bearer {bob}"))],
    );
    assert_eq!(del.status, 404, "another key cannot delete it");
}

#[test]
fn errors_come_in_each_surfaces_envelope() {
    let s = Server::start(&["--model-alias", ALIAS, "--rpm-limit", "4"]);
    let run = format!("/client/v4/accounts/abc/ai/run/{ALIAS}");
    let anthropic = |e: &Value, kind: &str| {
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["error"]["type"], kind, "{e}");
    };
    let workers = |e: &Value, code: u64| {
        assert_eq!(e["success"], false, "{e}");
        assert_eq!(e["errors"][0]["code"], code, "{e}");
    };
    let openai = |e: &Value| assert!(e["error"]["message"].is_string(), "{e}");
    // Bad JSON.
    let (st, e) = s.post_raw("/v1/messages", b"{");
    assert_eq!(st, 400);
    anthropic(&e, "invalid_request_error");
    let (st, e) = s.post_raw(&run, b"{");
    assert_eq!(st, 400);
    workers(&e, 5006);
    let (st, e) = s.post_raw("/v1/responses", b"{");
    assert_eq!(st, 400);
    openai(&e);
    // A field of the wrong type.
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let (st, e) = s.post(
        "/v1/messages",
        &json!({"model": MODEL, "max_tokens": "x", "messages": msgs}),
    );
    assert_eq!(st, 400);
    anthropic(&e, "invalid_request_error");
    let (st, e) = s.post(&run, &json!({"messages": msgs, "max_tokens": "x"}));
    assert_eq!(st, 400);
    workers(&e, 5006);
    let (st, e) = s.post("/v1/responses", &json!({"model": MODEL, "input": 5}));
    assert_eq!(st, 400);
    assert_eq!(e["error"]["param"], "input", "{e}");
    // Unknown model.
    let (st, e) = s.post(
        "/v1/messages",
        &json!({"model": "claude-x", "max_tokens": 4, "messages": msgs}),
    );
    assert_eq!(st, 404);
    anthropic(&e, "not_found_error");
    let (st, e) = s.post(
        "/client/v4/accounts/abc/ai/run/@cf/x/y",
        &json!({"prompt": "Hi"}),
    );
    assert_eq!(st, 404);
    workers(&e, 3042);
    let (st, e) = s.post("/v1/responses", &json!({"model": "gpt-x", "input": "Hi"}));
    assert_eq!(st, 404);
    openai(&e);
    // Over the limit (4 requests a minute, node-wide).
    let ok = |st: u16, e: &Value| assert_eq!(st, 200, "{e}");
    let (st, e) = s.post(
        "/v1/messages",
        &json!({"model": MODEL, "max_tokens": 2, "messages": msgs}),
    );
    ok(st, &e);
    let (st, e) = s.post(&run, &json!({"prompt": "Hi", "max_tokens": 2}));
    ok(st, &e);
    let (st, e) = s.post(
        "/v1/responses",
        &json!({"model": MODEL, "input": "Hi", "max_output_tokens": 2}),
    );
    ok(st, &e);
    let (st, e) = s.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "max_tokens": 2, "messages": msgs}),
    );
    ok(st, &e);
    let (st, e) = s.post(
        "/v1/messages",
        &json!({"model": MODEL, "max_tokens": 2, "messages": msgs}),
    );
    assert_eq!(st, 429);
    anthropic(&e, "rate_limit_error");
    let (st, e) = s.post(&run, &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(st, 429);
    workers(&e, 3040);
    let (st, e) = s.post(
        "/v1/responses",
        &json!({"model": MODEL, "input": "Hi", "max_output_tokens": 2}),
    );
    assert_eq!(st, 429);
    assert_eq!(e["error"]["type"], "rate_limit_error", "{e}");
}

#[test]
fn ai_gateway_urls_reach_the_same_surfaces() {
    let s = Server::start(&["--model-alias", ALIAS]);
    let gw = "/v1/acct-1/my-gateway";
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    // Workers AI's REST shape, in Cloudflare's envelope; errors too.
    let (status, w) = s.post(
        &format!("{gw}/workers-ai/{ALIAS}"),
        &json!({"messages": msgs, "max_tokens": 3}),
    );
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["success"], true, "{w}");
    assert!(w["result"]["response"].is_string(), "{w}");
    let (status, e) = s.post_raw(&format!("{gw}/workers-ai/{ALIAS}"), b"{nope");
    assert_eq!(
        (status, &e["errors"][0]["code"]),
        (400, &json!(5006)),
        "{e}"
    );
    let (status, e) = s.post(
        &format!("{gw}/workers-ai/@cf/x/y"),
        &json!({"prompt": "Hi"}),
    );
    assert_eq!(
        (status, &e["errors"][0]["code"]),
        (404, &json!(3042)),
        "{e}"
    );
    // OpenAI's shapes on the provider paths, with the model named as that provider names it.
    for (path, model) in [
        ("workers-ai/v1/chat/completions", ALIAS.to_string()),
        ("openai/chat/completions", MODEL.to_string()),
        ("compat/chat/completions", format!("workers-ai/{ALIAS}")),
    ] {
        let body = json!({"model": model, "messages": msgs, "max_tokens": 3, "temperature": 0});
        let (status, o) = s.post(&format!("{gw}/{path}"), &body);
        assert_eq!(status, 200, "{path}: {o}");
        assert_eq!(o["object"], "chat.completion", "{path}: {o}");
        let (_, direct) = s.post(
            "/v1/chat/completions",
            &json!({"messages": msgs, "max_tokens": 3, "temperature": 0}),
        );
        assert_eq!(o["choices"], direct["choices"], "{path}");
        // An unknown model is OpenAI's 404 there.
        let (status, e) = s.post(
            &format!("{gw}/{path}"),
            &json!({"model": "openai/nope", "messages": msgs}),
        );
        assert_eq!(
            (status, &e["error"]["code"]),
            (404, &json!("model_not_found")),
            "{path}: {e}"
        );
    }
    let (status, m) = s.get(&format!("{gw}/openai/models"));
    assert_eq!(status, 200, "{m}");
    assert!(m.contains(MODEL), "{m}");
}

#[test]
fn an_assistant_prefill_is_continued_not_answered_anew() {
    let s = Server::start(&[]);
    let lead = "The three primary colors are";
    let turns = json!([{"role": "user", "content": "Name the three primary colors."},
                       {"role": "assistant", "content": lead}]);
    // The prompt ends inside the assistant's turn, right after its text (no end of turn, no
    // new turn opened).
    let (st, t) = s.post(
        "/apply-template",
        &json!({"messages": turns, "continue_final_message": true}),
    );
    assert_eq!(st, 200, "{t}");
    let prompt = t["prompt"].as_str().unwrap().to_string();
    assert!(prompt.ends_with(lead), "{prompt:?}");
    let (_, closed) = s.post("/apply-template", &json!({"messages": turns}));
    let closed = closed["prompt"].as_str().unwrap();
    assert!(
        closed.len() > prompt.len() && closed.starts_with(&prompt),
        "{closed:?}"
    );
    // That prompt continued as raw text is what each chat surface answers.
    let (st, raw) = s.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(st, 200, "{raw}");
    let want = raw["choices"][0]["text"].as_str().unwrap().to_string();
    let (st, m) = s.post(
        "/v1/messages",
        &json!({"model": MODEL, "max_tokens": 12, "temperature": 0, "messages": turns}),
    );
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["content"][0]["text"], want.as_str(), "{m}");
    let (st, c) = s.post(
        "/v1/chat/completions",
        &json!({"messages": turns, "max_tokens": 12, "temperature": 0,
                "continue_final_message": true, "add_generation_prompt": false}),
    );
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["choices"][0]["message"]["content"], want.as_str(), "{c}");
    // The cut is where the template wrote the message, whatever else holds the same text: a
    // prefill found in the turn's end (`<` of `<|im_end|>`), or in an earlier message, with
    // its trailing space kept.
    for (user, prefill) in [("Hi", "<"), ("Start with \"Answer: \" please.", "Answer: ")] {
        let turns = json!([{"role": "user", "content": user},
                           {"role": "assistant", "content": prefill}]);
        let (st, t) = s.post(
            "/apply-template",
            &json!({"messages": turns, "continue_final_message": true}),
        );
        assert_eq!(st, 200, "{t}");
        let prompt = t["prompt"].as_str().unwrap();
        let want = format!("{user}<|im_end|>\n<|im_start|>assistant\n{prefill}");
        assert!(prompt.ends_with(&want), "{prompt:?}");
    }
    // Nothing may start the reply afresh: an output format, or Anthropic's thinking.
    let (st, e) = s.post(
        "/v1/chat/completions",
        &json!({"messages": turns, "continue_final_message": true,
                "response_format": {"type": "json_object"}}),
    );
    assert_eq!(
        (st, &e["error"]["param"]),
        (400, &json!("continue_final_message")),
        "{e}"
    );
    let (st, e) = s.post(
        "/v1/messages",
        &json!({"model": MODEL, "max_tokens": 12, "messages": turns,
                "thinking": {"type": "enabled", "budget_tokens": 1024}}),
    );
    assert_eq!((st, &e["type"]), (400, &json!("error")), "{e}");
    // Nothing to continue: a 400 naming the field.
    let (st, e) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}],
                "continue_final_message": true}),
    );
    assert_eq!(
        (st, &e["error"]["param"]),
        (400, &json!("continue_final_message"))
    );
    // Anthropic takes more than OpenAI's 4 stop sequences.
    let stops: Vec<String> = (0..6).map(|i| format!("zq{i}")).collect();
    let (st, m) = s.post(
        "/v1/messages",
        &json!({"model": MODEL, "max_tokens": 4, "stop_sequences": stops,
                "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(st, 200, "{m}");
}

#[test]
fn a_call_cut_short_leaves_the_conversation_usable() {
    let s = Server::start(&[]);
    let tools = json!([{"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}]);
    // The smallest budget that cuts a call inside its arguments.
    let cut = (8..40)
        .map(|n| {
            let (st, r) = s.post(
                "/v1/responses",
                &json!({"model": MODEL, "input": "What is the weather in Paris?", "tools": tools,
                        "tool_choice": "required", "max_output_tokens": n, "temperature": 0}),
            );
            assert_eq!(st, 200, "{r}");
            r
        })
        .find(|r| {
            r["output"].as_array().unwrap().iter().any(|it| {
                it["type"] == "function_call"
                    && serde_json::from_str::<Value>(it["arguments"].as_str().unwrap()).is_err()
            })
        })
        .expect("a budget cuts the call inside its arguments");
    assert_eq!(cut["status"], "incomplete", "{cut}");
    // The next turn builds on it: the cut call is not in the stored conversation.
    let (st, next) = s.post(
        "/v1/responses",
        &json!({"model": MODEL, "input": "Never mind.", "previous_response_id": cut["id"],
                "max_output_tokens": 4}),
    );
    assert_eq!(st, 200, "{next}");
}

#[test]
fn truncation_auto_drops_the_oldest_turns_that_do_not_fit() {
    // A template that, as Mistral's and Llama 2's do, refuses a conversation that does not
    // start with a user's turn: only cuts before a user turn are taken with it.
    let dir = tempfile::tempdir().unwrap();
    let alternating = dir.path().join("alternating.jinja");
    std::fs::write(
        &alternating,
        "{% for m in messages %}{% if m['role'] != 'system' and loop.index0 == (1 if messages[0]['role'] == 'system' else 0) and m['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    // 512 tokens of KV cache: the most a sequence holds.
    let limit = 512;
    // Long user turns (about 100 tokens), short assistant ones: dropping the first user turn
    // is what makes it fit, so the earliest cut is an assistant's.
    let turn = |i: usize| {
        let (role, kind, n) = if i.is_multiple_of(2) {
            ("user", "input_text", 12)
        } else {
            ("assistant", "output_text", 1)
        };
        let text = format!("Note {i}: ") + &"the river runs past the old mill. ".repeat(n);
        json!({"type": "message", "role": role, "content": [{"type": kind, "text": text}]})
    };
    // Eleven turns, the last a user's question.
    let mut items: Vec<Value> = (0..10).map(turn).collect();
    items.push(json!({"role": "user", "content": "What runs past the mill?"}));
    let max_out = 16;
    let mut kept = vec![];
    for template in [None, Some(alternating.to_str().unwrap())] {
        let mut flags = vec!["--kv-cache-tokens", "512"];
        flags.extend(
            template
                .map(|t| ["--chat-template-file", t])
                .into_iter()
                .flatten(),
        );
        let s = Server::start(&flags);
        let ask = |items: &[Value], truncation: &str| {
            s.post(
                "/v1/responses",
                &json!({"model": MODEL, "instructions": "Answer briefly.", "input": items,
                        "truncation": truncation, "max_output_tokens": max_out,
                        "temperature": 0, "store": false}),
            )
        };
        let (st, e) = ask(&items, "disabled");
        assert_eq!(
            (st, &e["error"]["code"]),
            (400, &json!("context_length_exceeded")),
            "{e}"
        );
        let (st, r) = ask(&items, "auto");
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["truncation"], "auto");
        assert!(r["output"][0]["content"][0]["text"].is_string(), "{r}");
        // The newest turns are kept: the same prompt as a suffix that fits untruncated (and
        // that the template takes), the longest or one at most a quarter of the context
        // shorter (the cut moves in steps).
        let inputs: Vec<Option<usize>> = (0..items.len())
            .map(|from| {
                let (st, r) = ask(&items[from..], "disabled");
                let input = r["usage"]["input_tokens"].as_u64()? as usize;
                (st == 200).then_some(input)
            })
            .collect();
        let least = (0..items.len())
            .find(|&from| inputs[from].is_some_and(|n| n + max_out <= limit))
            .expect("the last turn fits");
        let got = r["usage"]["input_tokens"].as_u64().unwrap() as usize;
        let from = (least..items.len())
            .find(|&from| inputs[from] == Some(got))
            .unwrap_or_else(|| panic!("{got} tokens: no suffix's prompt in {inputs:?}"));
        let longest = inputs[least].unwrap();
        assert!(longest - got <= limit / 4 + 16, "{got} of {longest} kept");
        assert!(got > 100, "{got}: more than the question was kept");
        kept.push(from);
        // Any other value is refused.
        let (st, e) = ask(&items, "sometimes");
        assert_eq!(
            (st, &e["error"]["param"]),
            (400, &json!("truncation")),
            "{e}"
        );
    }
    // The alternating template's cut at a user's turn.
    assert!(kept[1] % 2 == 0, "{kept:?}");
}

#[test]
fn truncation_auto_cuts_in_steps_so_the_prefix_cache_serves_the_history() {
    // An agent at the limit: each request is the last one and a new turn. A cut that dropped
    // only as much as it must would move with each (a new turn is longer than an old one),
    // and the prompt, starting elsewhere each time, would share nothing with the last.
    let limit = 512;
    let s = Server::start(&["--kv-cache-tokens", "512"]);
    let say = |role: &str, text: String| json!({"role": role, "content": text});
    let mut items: Vec<Value> = (0..24)
        .flat_map(|i| {
            [
                say("user", format!("Note {i}: the mill is old.")),
                say("assistant", "Noted.".into()),
            ]
        })
        .collect();
    let mut hits = vec![];
    for turn in 0..7 {
        items.push(say(
            "user",
            format!("Question {turn}: what runs past the old mill by the river?"),
        ));
        let (st, r) = s.post(
            "/v1/responses",
            &json!({"model": MODEL, "instructions": "Answer briefly.", "input": items,
                    "truncation": "auto", "max_output_tokens": 4, "temperature": 0,
                    "store": false}),
        );
        assert_eq!(st, 200, "{r}");
        let input = r["usage"]["input_tokens"].as_u64().unwrap();
        let cached = r["usage"]["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(input + 4 <= limit && input > 200, "{r}");
        if turn > 0 {
            hits.push((input, cached));
        }
        items.push(say("assistant", "The river runs past it.".into()));
    }
    eprintln!("(input, cached) by turn: {hits:?}");
    // Most turns find the history in the cache: the cut moved at most twice in six turns.
    let served = hits.iter().filter(|(input, cached)| cached * 2 >= *input);
    assert!(served.count() >= 4, "(input, cached) by turn: {hits:?}");
}

#[test]
fn responses_carry_the_message_tokens_logprobs_when_included() {
    let s = Server::start(&[]);
    let ask = json!({"model": MODEL, "input": "Name three colors.", "max_output_tokens": 8,
                     "temperature": 0, "store": false,
                     "include": ["message.output_text.logprobs"], "top_logprobs": 3});
    let (st, r) = s.post("/v1/responses", &ask);
    assert_eq!(st, 200, "{r}");
    let part = &r["output"][0]["content"][0];
    let lps = part["logprobs"].as_array().expect("logprobs").clone();
    // One per token of the message, whose bytes make its text; greedy: each the likeliest.
    assert_eq!(
        lps.len() as u64,
        r["usage"]["output_tokens"].as_u64().unwrap(),
        "{r}"
    );
    let bytes: Vec<u8> = lps
        .iter()
        .flat_map(|lp| {
            lp["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
        })
        .collect();
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        part["text"].as_str().unwrap()
    );
    for lp in &lps {
        let top = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{lp}");
        assert_eq!(top[0]["token"], lp["token"], "{lp}");
        assert!(lp["logprob"].as_f64().unwrap() <= 0.0, "{lp}");
    }
    // The same as the chat API gives for the same conversation.
    let (st, chat) = s.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Name three colors."}],
                "max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    );
    assert_eq!(st, 200, "{chat}");
    assert_eq!(json!(lps), chat["choices"][0]["logprobs"]["content"]);
    // Streamed: the deltas' add up to them, as do the part's at its end.
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let events: Vec<Value> = s
        .stream("/v1/responses", &streamed)
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let of = |kind: &'static str| events.iter().filter(move |e| e["type"] == kind);
    let deltas: Vec<Value> = of("response.output_text.delta")
        .flat_map(|e| e["logprobs"].as_array().unwrap().clone())
        .collect();
    assert_eq!(deltas, lps);
    let done = of("response.output_text.done").next().unwrap();
    assert_eq!(done["logprobs"], json!(lps));
    let end = of("response.incomplete").next().unwrap();
    assert_eq!(
        end["response"]["output"][0]["content"][0]["logprobs"],
        json!(lps)
    );
    // Not asked for: none.
    let mut plain = ask.clone();
    plain.as_object_mut().unwrap().remove("include");
    plain["top_logprobs"] = json!(0);
    let (_, r) = s.post("/v1/responses", &plain);
    assert!(
        r["output"][0]["content"][0].get("logprobs").is_none(),
        "{r}"
    );
    // Bad values are named.
    for (field, value, param) in [
        (
            "include",
            json!(["message.output_text.everything"]),
            "include[0]",
        ),
        ("include", json!("message.output_text.logprobs"), "include"),
        ("top_logprobs", json!(21), "top_logprobs"),
    ] {
        let mut bad = ask.clone();
        bad[field] = value;
        let (st, e) = s.post("/v1/responses", &bad);
        assert_eq!((st, &e["error"]["param"]), (400, &json!(param)), "{e}");
    }
}

/// A stream's events (`data:` lines as JSON), at most `most` of them: the connection then
/// drops.
fn read_events(
    s: &Server,
    (method, path): (&str, &str),
    body: Option<&Value>,
    most: usize,
) -> Vec<Value> {
    use std::io::BufRead;
    let req = ureq::request(method, &format!("{}{path}", s.base));
    let r = match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    }
    .expect("the stream starts");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    std::io::BufReader::new(r.into_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            l.strip_prefix("data: ")
                .map(|d| serde_json::from_str(d).unwrap())
        })
        .take(most)
        .collect()
}

#[test]
fn background_streams_go_on_without_their_client_and_are_joined_again() {
    let s = Server::start(&[]);
    let ask = json!({"model": MODEL, "input": "Write a short poem about the sea.",
                     "max_output_tokens": 64, "temperature": 0, "background": true,
                     "stream": true});
    // The client that created it reads a few events, then its connection drops.
    let first = read_events(&s, ("POST", "/v1/responses"), Some(&ask), 4);
    // As OpenAI's: the response `queued` first.
    let types: Vec<&str> = first.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types[..3],
        [
            "response.created",
            "response.queued",
            "response.in_progress"
        ]
    );
    assert_eq!(first[0]["response"]["status"], "queued", "{first:?}");
    let id = first[0]["response"]["id"].as_str().unwrap().to_string();
    // The run goes on to its end, stored.
    let done = poll_response(&s, &id, None);
    let status = done["status"].as_str().unwrap();
    assert!(["completed", "incomplete"].contains(&status), "{done}");
    // Joined again from the start: the events read first, then the rest, to the end.
    let path = format!("/v1/responses/{id}?stream=true");
    let all = read_events(&s, ("GET", &path), None, usize::MAX);
    assert_eq!(all[..4], first[..]);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["sequence_number"], i, "{e}");
    }
    let end = all.last().unwrap();
    assert_eq!(end["type"], format!("response.{status}"), "{end}");
    assert_eq!(end["response"]["output"], done["output"]);
    let text: String = all
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(
        text,
        done["output"][0]["content"][0]["text"].as_str().unwrap()
    );
    // From after an event: the ones after it.
    let path = format!("/v1/responses/{id}?stream=true&starting_after=5");
    assert_eq!(read_events(&s, ("GET", &path), None, usize::MAX), all[6..]);
    // A response not streamed in the background has no events kept.
    let mut whole = ask.clone();
    whole["stream"] = json!(false);
    let (st, r) = s.post("/v1/responses", &whole);
    assert_eq!(st, 200, "{r}");
    let path = format!("/v1/responses/{}?stream=true", r["id"].as_str().unwrap());
    let r = s.call("GET", &path, None, &[]);
    assert_eq!(
        (r.status, &r.body["error"]["param"]),
        (400, &json!("stream")),
        "{}",
        r.body
    );
}

/// Cancels a background response, which must answer `cancelled`.
fn cancel_response(s: &Server, id: &str) {
    let r = s.call("POST", &format!("/v1/responses/{id}/cancel"), None, &[]);
    assert_eq!(
        (r.status, &r.body["status"]),
        (200, &json!("cancelled")),
        "{}",
        r.body
    );
}

/// Polls a background response until it leaves `queued` / `in_progress` (or shows `want`).
fn poll_response(s: &Server, id: &str, want: Option<&str>) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = s.call("GET", &format!("/v1/responses/{id}"), None, &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        let status = r.body["status"].as_str().unwrap_or_default().to_string();
        let done = match want {
            Some(w) => status == w,
            None => status != "queued" && status != "in_progress",
        };
        if done || std::time::Instant::now() > deadline {
            return r.body;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn background_responses_run_on_and_can_be_cancelled() {
    let s = Server::start(&[]);
    let ask = json!({"model": MODEL, "input": "List three colors.", "max_output_tokens": 12,
                     "temperature": 0});
    let (st, fg) = s.post("/v1/responses", &ask);
    assert_eq!(st, 200, "{fg}");
    let mut bg_ask = ask.clone();
    bg_ask["background"] = json!(true);
    let (st, queued) = s.post("/v1/responses", &bg_ask);
    assert_eq!(st, 200, "{queued}");
    assert_eq!(
        (&queued["status"], &queued["background"], &queued["output"]),
        (&json!("queued"), &json!(true), &json!([])),
        "{queued}"
    );
    let id = queued["id"].as_str().unwrap();
    let done = poll_response(&s, id, None);
    // The same answer as in the request, stored and chained as any response.
    assert_eq!(done["status"], fg["status"], "{done}");
    assert_eq!(done["output"][0]["content"], fg["output"][0]["content"]);
    assert_eq!(done["usage"]["output_tokens"], fg["usage"]["output_tokens"]);
    let (st, next) = s.post(
        "/v1/responses",
        &json!({"model": MODEL, "input": "One more.", "previous_response_id": id,
                "max_output_tokens": 4}),
    );
    assert_eq!(st, 200, "{next}");
    // An ended one is not cancelled; a request answered in its request has no run to stop.
    let r = s.call("POST", &format!("/v1/responses/{id}/cancel"), None, &[]);
    assert_eq!(r.status, 400, "{}", r.body);
    // Its end is read from the store.
    let mut bad = bg_ask.clone();
    bad["store"] = json!(false);
    let (st, e) = s.post("/v1/responses", &bad);
    assert_eq!(
        (st, &e["error"]["param"]),
        (400, &json!("background")),
        "{e}"
    );
    // What the request itself would be refused is refused at once, as in the foreground,
    // not stored `queued` to fail later.
    let schema = json!({"type": "json_schema", "name": "x", "schema": {"type": "nope"}});
    for (field, value) in [
        ("temperature", json!(7)),
        ("max_output_tokens", json!(100_000)),
        ("text", json!({"format": schema})),
        ("top_logprobs", json!(50)),
    ] {
        let mut fg_bad = ask.clone();
        fg_bad[field] = value;
        let (fg_st, fg_e) = s.post("/v1/responses", &fg_bad);
        let mut bg_bad = fg_bad.clone();
        bg_bad["background"] = json!(true);
        let (st, e) = s.post("/v1/responses", &bg_bad);
        assert_eq!(fg_st, 400, "{field}: {fg_e}");
        assert_eq!((st, &e), (fg_st, &fg_e), "{field}");
    }
    // A retry of a create with its `Idempotency-Key` (the reply to the first was lost) is
    // answered the first's response as it stands, and runs nothing again; another body
    // under the key is another request.
    let create = |body: &Value| {
        let r = s.call(
            "POST",
            "/v1/responses",
            Some(body),
            &[("idempotency-key", "bg-1")],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r
    };
    let first = create(&bg_ask);
    let first_id = first.body["id"].as_str().unwrap();
    let retry = create(&bg_ask);
    assert_eq!(
        (&retry.body["id"], retry.header("idempotent-replayed")),
        (&first.body["id"], Some("true")),
        "{}",
        retry.body
    );
    let done = poll_response(&s, first_id, None);
    assert!(
        matches!(done["status"].as_str(), Some("completed" | "incomplete")),
        "{done}"
    );
    let retry = create(&bg_ask);
    assert_eq!(
        retry.body, done,
        "a retry after the end is answered the end"
    );
    // Cancelled, its generation stops at once, also when its create carried an
    // Idempotency-Key (the run's reply is not recorded for replays, which outlive a cancel).
    let running = |s: &Server| s.metric("edgeinfer_requests_running");
    let long = json!({"model": MODEL, "input": "Count from 1 to 2000, one number per line.",
                      "max_output_tokens": 4000, "temperature": 0, "background": true});
    let r = s.call(
        "POST",
        "/v1/responses",
        Some(&long),
        &[("idempotency-key", "bg-long")],
    );
    let long_id = r.body["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while running(&s) < 1.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(running(&s), 1.0, "the run did not start");
    cancel_response(&s, &long_id);
    // No token is made a moment after the cancel.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let made = || s.metric("edgeinfer_generation_tokens_total");
    let after = made();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_eq!(made(), after, "still generating after the cancel");
    let mut other = bg_ask.clone();
    other["max_output_tokens"] = json!(5);
    let another = create(&other);
    assert_ne!(another.body["id"], first.body["id"], "{}", another.body);
    assert_eq!(another.header("idempotent-replayed"), None);
    drop(s);

    // A run that cannot end (the engine hangs at its first step): in progress until
    // cancelled; a chain cannot build on it yet.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db").to_string_lossy().into_owned();
    let model = common::default_model_path();
    let flags = ["--model", model.to_str().unwrap(), "--db", &db];
    let s = Server::spawn(&flags, &[("EDGEINFER_FAULT", "engine-stall-at-step=1")]);
    s.wait_ready();
    let start = |s: &Server| {
        let (st, r) = s.post("/v1/responses", &bg_ask);
        assert_eq!(st, 200, "{r}");
        r["id"].as_str().unwrap().to_string()
    };
    let (cancelled, lost) = (start(&s), start(&s));
    let running = poll_response(&s, &cancelled, Some("in_progress"));
    assert_eq!(running["status"], "in_progress", "{running}");
    let (st, e) = s.post(
        "/v1/responses",
        &json!({"model": MODEL, "input": "And?", "previous_response_id": cancelled}),
    );
    assert_eq!(
        (st, &e["error"]["param"]),
        (400, &json!("previous_response_id")),
        "{e}"
    );
    // Cancelled (and cancelling again answers the same).
    for _ in 0..2 {
        cancel_response(&s, &cancelled);
        assert_eq!(poll_response(&s, &cancelled, None)["status"], "cancelled");
    }
    // Deleting one stops it, and it stays deleted.
    let deleted = start(&s);
    let r = s.call("DELETE", &format!("/v1/responses/{deleted}"), None, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = s.call("GET", &format!("/v1/responses/{deleted}"), None, &[]);
    assert_eq!(r.status, 404, "{}", r.body);
    // A run the node does not live to finish reads failed after the restart.
    assert_eq!(
        poll_response(&s, &lost, Some("in_progress"))["status"],
        "in_progress"
    );
    s.kill9();
    let s = Server::start(&["--db", &db]);
    let after = poll_response(&s, &lost, None);
    assert_eq!(after["status"], "failed", "{after}");
    assert!(after["error"]["message"].is_string(), "{after}");
    drop(s);

    // A full node's refusal (one place, no queue, a long reply in it) is waited out.
    let s = Server::start(&["--max-batch-size", "1", "--max-queue", "0"]);
    let base = s.base.clone();
    let long = std::thread::spawn(move || {
        ureq::post(&format!("{base}/v1/completions"))
            .send_json(json!({"prompt": "Once upon a time", "max_tokens": 120,
                              "logit_bias": {"0": -100, "2": -100}}))
            .map_or(0, |r| r.status())
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (st, refused) = s.post("/v1/responses", &ask);
    assert_eq!(st, 429, "the node was not full: nothing tested ({refused})");
    let (st, queued) = s.post("/v1/responses", &bg_ask);
    assert_eq!(st, 200, "{queued}");
    let done = poll_response(&s, queued["id"].as_str().unwrap(), None);
    assert!(
        ["completed", "incomplete"].contains(&done["status"].as_str().unwrap()),
        "{done}"
    );
    assert_eq!(long.join().unwrap(), 200);
}

/// A node with keys, one place and `queue` waiting at most.
fn one_place(master: &str, queue: usize) -> Server {
    let queue = queue.to_string();
    let flags = [
        "--master-key",
        master,
        "--max-batch-size",
        "1",
        "--max-queue",
        &queue,
    ];
    Server::start(&flags)
}

/// A new key made with `body`.
fn new_key(s: &Server, master: &str, body: Value) -> String {
    let r = s.post_key("/key/generate", &body, master);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["key"].as_str().unwrap().to_string()
}

#[test]
fn background_runs_are_bounded_by_the_node_and_by_a_keys_parallel_requests() {
    // Two requests in flight at most (one running, one queued); a key of one.
    let master = "sk-master-background-test-0123456789";
    let s = one_place(master, 1);
    let one = new_key(
        &s,
        master,
        json!({"key_alias": "one", "max_parallel_requests": 1}),
    );
    let long = json!({"model": MODEL, "input": "Count from 1 to 2000, one number per line.",
                      "max_output_tokens": 4000, "temperature": 0, "background": true});
    let create = |key: &str| {
        let auth = format!("Bearer {key}");
        s.call(
            "POST",
            "/v1/responses",
            Some(&long),
            &[("authorization", &auth)],
        )
    };
    let cancel = |key: &str, id: &Value| {
        let auth = format!("Bearer {key}");
        let path = format!("/v1/responses/{}/cancel", id.as_str().unwrap());
        let r = s.call("POST", &path, None, &[("authorization", &auth)]);
        assert_eq!(r.status, 200, "{}", r.body);
    };
    let refused = |r: &common::server::Reply, whose: &str| {
        assert_eq!(r.status, 429, "{}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(whose), "{}", r.body);
        assert!(r.header("retry-after").is_some());
    };
    let auth = format!("Bearer {one}");
    let once = [
        ("authorization", auth.as_str()),
        ("idempotency-key", "bg-cap"),
    ];
    let a = s.call("POST", "/v1/responses", Some(&long), &once);
    assert_eq!(a.status, 200, "{}", a.body);
    refused(&create(&one), "this key's 1");
    // A retry of that create (its reply was lost) is still answered it.
    let retry = s.call("POST", "/v1/responses", Some(&long), &once);
    assert_eq!(
        (
            retry.status,
            &retry.body["id"],
            retry.header("idempotent-replayed")
        ),
        (200, &a.body["id"], Some("true")),
        "{}",
        retry.body
    );
    let b = create(master);
    assert_eq!(b.status, 200, "{}", b.body);
    refused(&create(master), "this node's 2");
    // A run that ends makes room.
    cancel(&one, &a.body["id"]);
    let c = create(master);
    assert_eq!(c.status, 200, "{}", c.body);
    refused(&create(&one), "this node's 2");
    cancel(master, &b.body["id"]);
    cancel(master, &c.body["id"]);
    let d = create(&one);
    assert_eq!(d.status, 200, "{}", d.body);
    cancel(&one, &d.body["id"]);
}

#[test]
fn a_background_run_waiting_for_room_runs_as_its_key_stands_then() {
    // One place and no queue, held by a long request: the run waits; meanwhile its key may
    // no longer use the model, and its next attempt is refused so.
    let master = "sk-master-background-key-0123456789";
    let s = one_place(master, 0);
    let key = new_key(&s, master, json!({"key_alias": "later"}));
    let base = s.base.clone();
    let long = std::thread::spawn(move || {
        ureq::post(&format!("{base}/v1/completions"))
            .set("authorization", &format!("Bearer {master}"))
            .send_json(json!({"prompt": "Once upon a time", "max_tokens": 400,
                              "logit_bias": {"0": -100, "2": -100}}))
            .map_or(0, |r| r.status())
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let auth = format!("Bearer {key}");
    let ask = json!({"model": MODEL, "input": "List three colors.", "max_output_tokens": 8,
                     "background": true});
    let r = s.call(
        "POST",
        "/v1/responses",
        Some(&ask),
        &[("authorization", &auth)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let u = s.post_key(
        "/key/update",
        &json!({"key": key, "models": ["another-model"]}),
        master,
    );
    assert_eq!(u.status, 200, "{}", u.body);
    assert_eq!(long.join().unwrap(), 200, "the node was not held");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let done = loop {
        let r = s.call(
            "GET",
            &format!("/v1/responses/{id}"),
            None,
            &[("authorization", &auth)],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let status = r.body["status"].as_str().unwrap_or_default().to_string();
        if !["queued", "in_progress"].contains(&status.as_str())
            || std::time::Instant::now() > deadline
        {
            break r.body;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(
        (&done["status"], &done["error"]["code"]),
        (&json!("failed"), &json!("model_not_allowed")),
        "{done}"
    );
}

#[test]
fn a_keys_models_may_name_the_served_model_by_its_alias() {
    let master = "sk-master-alias-test-0123456789";
    let s = Server::start(&["--model-alias", ALIAS, "--master-key", master]);
    let key = |models: Value| format!("Bearer {}", new_key(&s, master, json!({"models": models})));
    let (aliased, other) = (key(json!([ALIAS])), key(json!(["another-model"])));
    let chat = |auth: &str, model: &str| {
        let body = json!({"model": model, "max_tokens": 2,
                          "messages": [{"role": "user", "content": "Hi"}]});
        let r = s.call(
            "POST",
            "/v1/chat/completions",
            Some(&body),
            &[("authorization", auth)],
        );
        r.status
    };
    // The alias's key may use the model by either name, and sees it.
    assert_eq!(chat(&aliased, ALIAS), 200);
    assert_eq!(chat(&aliased, MODEL), 200);
    let list = s.call("GET", "/v1/models", None, &[("authorization", &aliased)]);
    assert_eq!(list.body["data"][0]["id"], MODEL, "{}", list.body);
    let one = s.call(
        "GET",
        &format!("/v1/models/{ALIAS}"),
        None,
        &[("authorization", &aliased)],
    );
    assert_eq!(one.status, 200, "{}", one.body);
    // Another model's key may not.
    assert_eq!(chat(&other, ALIAS), 403);
    let list = s.call("GET", "/v1/models", None, &[("authorization", &other)]);
    assert_eq!(list.body["data"], json!([]), "{}", list.body);
}
