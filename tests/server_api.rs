//! The real server on loopback with the real default model, over real HTTP.

mod common;

use std::time::Duration;

use common::server::{read_some, Server};
use serde_json::{json, Value};

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": content}], "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// `usage` without `prompt_tokens_details`: how much of a prompt came from the prefix cache
/// depends on what ran before.
fn usage_counts(v: &Value) -> Value {
    let mut u = v["usage"].clone();
    u.as_object_mut().unwrap().remove("prompt_tokens_details");
    u
}

fn content_of(stream: &[String]) -> (String, Vec<Value>) {
    let chunks: Vec<Value> = stream
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    (text, chunks)
}

#[test]
fn chat_completions_behave_like_openai() {
    let s = Server::start(&[]);
    // Non-stream and stream agree; usage is right.
    let body = chat("Name three colors.", json!({"max_tokens": 24}));
    let (status, whole) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty());
    let usage = &whole["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 24);
    // llama-server's /apply-template: the same prompt as text, which tokenizes to as many.
    let (status, applied) = s.post("/apply-template", &body);
    assert_eq!(status, 200, "{applied}");
    let prompt = applied["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("<|im_start|>user\nName three colors.<|im_end|>")
            && prompt.ends_with("<|im_start|>assistant\n"),
        "{prompt}"
    );
    // A follow-up after calls, sent without `tools`: the calls and their results are in the
    // prompt as they would be with tools (the template has no tool support).
    let (status, followup) = s.post(
        "/apply-template",
        &json!({"messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]}),
    );
    assert_eq!(status, 200, "{followup}");
    let rendered = followup["prompt"].as_str().unwrap();
    assert!(
        rendered.contains("<tool_call>")
            && rendered.contains("get_weather")
            && rendered.contains("<tool_response>\n18 C"),
        "{rendered}"
    );
    let (_, tokens) = s.post("/tokenize", &json!({"content": prompt}));
    assert_eq!(
        tokens["tokens"].as_array().unwrap().len() as u64,
        usage["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/chat/completions", &sbody);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let (streamed, chunks) = content_of(&events);
    assert_eq!(
        streamed, text,
        "stream deltas concatenate to the non-stream text"
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(usage_counts(last), usage_counts(&whole));
    // OpenAI: with `include_usage` every other chunk carries `"usage": null`.
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c.get("usage"), Some(&Value::Null), "{c}");
    }
    // The same prompt a second time: all but the block holding its last token was cached.
    assert_eq!(whole["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    // The reference request renders to llama.cpp's prompt size.
    let reference = common::llamacpp_reference();
    let tpl = &reference["chat_template"];
    let (_, r) = s.post(
        "/v1/chat/completions",
        &json!({"messages": tpl["messages"], "max_tokens": 1}),
    );
    let want = tpl["rendered_prompt_tokens"].as_array().unwrap().len() as u64;
    assert_eq!(r["usage"]["prompt_tokens"].as_u64(), Some(want));

    // Stop strings cut the text before the stop, which is not included.
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() >= 3 {
        let stop = words[2];
        let cut = text.find(stop).unwrap();
        let (_, r) = s.post(
            "/v1/chat/completions",
            &chat(
                "Name three colors.",
                json!({"max_tokens": 24, "stop": [stop]}),
            ),
        );
        assert_eq!(
            r["choices"][0]["message"]["content"].as_str().unwrap(),
            &text[..cut]
        );
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }

    // Seeds: same seed, same text.
    let sampled = |seed: u64| {
        let (_, r) = s.post(
            "/v1/chat/completions",
            &chat(
                "Write a word.",
                json!({"max_tokens": 12, "temperature": 1.0, "seed": seed}),
            ),
        );
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(sampled(7), sampled(7));
    let variants: std::collections::HashSet<String> = (1..=4).map(sampled).collect();
    assert!(variants.len() > 1, "different seeds never differed");

    // Completions endpoint with a raw prompt.
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200);
    assert_eq!(r["object"], "text_completion");
    assert!(r["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with(" Paris"));
    assert_eq!(r["usage"]["prompt_tokens"], 5);
    // Without `max_tokens`, 16 tokens, as OpenAI's completions API writes (not the rest of
    // the context, as chat does).
    let (_, r) = s.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "logit_bias": {"0": -100, "2": -100}}),
    );
    assert_eq!(r["usage"]["completion_tokens"], 16, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");

    // Logprobs.
    let (_, r) = s.post(
        "/v1/chat/completions",
        &chat(
            "Hi",
            json!({"max_tokens": 3, "logprobs": true, "top_logprobs": 2}),
        ),
    );
    let lp = &r["choices"][0]["logprobs"]["content"];
    assert_eq!(
        lp.as_array().unwrap().len(),
        r["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(lp[0]["logprob"].as_f64().unwrap() <= 0.0);

    // Models, health, tokenize, detokenize, request ids, metrics names.
    let (status, models) = s.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    // One model by name, as the list shows it; another name is 404.
    for path in [
        "/v1/models/SmolLM2-135M-Instruct.Q4_1",
        "/models/SmolLM2-135M-Instruct.Q4_1",
    ] {
        let (status, one) = s.get(path);
        assert_eq!(status, 200, "{one}");
        assert_eq!(
            serde_json::from_str::<Value>(&one).unwrap(),
            models["data"][0]
        );
    }
    let (status, none) = s.get("/v1/models/org/other-model");
    assert_eq!(status, 404, "{none}");
    let none: Value = serde_json::from_str(&none).unwrap();
    assert_eq!(none["error"]["code"], "model_not_found");
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/ready").0, 200);
    let (_, t) = s.post("/tokenize", &json!({"content": "Hello, world!"}));
    assert_eq!(t["tokens"], json!([19556, 28, 905, 17]));
    let (_, d) = s.post("/detokenize", &json!({"tokens": [19556, 28, 905, 17]}));
    assert_eq!(d["content"], "Hello, world!");
    // Control tokens round-trip too.
    let chatml = "<|im_start|>user\nHi<|im_end|>";
    let (_, t) = s.post("/tokenize", &json!({"content": chatml}));
    let (_, d) = s.post("/detokenize", &json!({"tokens": t["tokens"]}));
    assert_eq!(d["content"], chatml, "{t}");
    // llama-server's `with_pieces` (a piece not UTF-8 on its own comes as its bytes) and
    // `parse_special: false` (control-token spellings are text).
    let text = "Hi<|im_end|> \u{1F980}\u{1F9A0}";
    let (_, t) = s.post("/tokenize", &json!({"content": text, "with_pieces": true}));
    let entries = t["tokens"].as_array().unwrap();
    let mut bytes = Vec::new();
    for e in entries {
        match &e["piece"] {
            Value::String(p) => bytes.extend(p.as_bytes()),
            Value::Array(b) => bytes.extend(b.iter().map(|b| b.as_u64().unwrap() as u8)),
            other => panic!("{other}"),
        }
    }
    assert_eq!(bytes, text.as_bytes(), "{t}");
    assert!(entries.iter().any(|e| e["piece"].is_array()), "{t}");
    assert!(entries.iter().any(|e| e["piece"] == "<|im_end|>"), "{t}");
    let (_, plain) = s.post(
        "/tokenize",
        &json!({"content": text, "parse_special": false}),
    );
    let plain = plain["tokens"].as_array().unwrap();
    assert!(plain.len() > entries.len(), "{plain:?}");
    let end = entries.iter().find(|e| e["piece"] == "<|im_end|>").unwrap();
    assert!(!plain.contains(&end["id"]), "{plain:?}");
    let r = ureq::get(&format!("{}/health", s.base))
        .set("x-request-id", "my-id-42")
        .call()
        .unwrap();
    assert_eq!(r.header("x-request-id"), Some("my-id-42"));
    let (_, metrics) = s.get("/metrics");
    for name in [
        "edgeinfer_requests_running",
        "edgeinfer_requests_waiting",
        "edgeinfer_prompt_tokens_total",
        "edgeinfer_generation_tokens_total",
        "edgeinfer_request_success_total{finish_reason=\"stop\"}",
        "edgeinfer_time_to_first_token_seconds_bucket",
        "edgeinfer_inter_token_latency_seconds_bucket",
        "edgeinfer_e2e_request_latency_seconds_bucket",
        "edgeinfer_request_queue_time_seconds_bucket",
        "edgeinfer_kv_cache_usage_ratio",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    assert!(s.metric("edgeinfer_generation_tokens_total") > 50.0);
    // The same counts under vLLM's names, labelled with the model, for schedulers.
    let model = "{model_name=\"SmolLM2-135M-Instruct.Q4_1\"}";
    for name in ["vllm:generation_tokens_total", "vllm:prompt_tokens_total"] {
        let ours = name.replace("vllm:", "edgeinfer_");
        assert_eq!(
            s.metric(&format!("{name}{model}")),
            s.metric(&format!("{ours} ")),
            "{name}"
        );
    }
    assert!(metrics.contains(
        "vllm:request_success_total{model_name=\"SmolLM2-135M-Instruct.Q4_1\",finished_reason=\"stop\"}"
    ));
}

#[test]
fn errors_have_the_openai_shape_and_status() {
    let s = Server::start(&["--max-body-bytes", "100000"]);
    let user = json!([{"role": "user", "content": "x"}]);
    // (body, status, param, code)
    type Case = (Vec<u8>, u16, Option<&'static str>, Option<&'static str>);
    let cases: Vec<Case> = vec![
        (b"{not json".to_vec(), 400, None, None),
        (vec![0xff, 0xfe, 0x00], 400, None, None),
        (
            json!({"messages": user, "temperature": "hot"})
                .to_string()
                .into_bytes(),
            400,
            Some("temperature"),
            None,
        ),
        (
            json!({"messages": user, "top_p": 1.5})
                .to_string()
                .into_bytes(),
            400,
            Some("top_p"),
            None,
        ),
        (
            json!({"messages": user, "max_tokens": 0})
                .to_string()
                .into_bytes(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            json!({"messages": user, "n": 17}).to_string().into_bytes(),
            400,
            Some("n"),
            None,
        ),
        (
            json!({"messages": user, "tools": [{"type": "function"}]})
                .to_string()
                .into_bytes(),
            400,
            Some("tools[0]"),
            None,
        ),
        (
            json!({"messages": user, "response_format": {"type": "xml"}})
                .to_string()
                .into_bytes(),
            400,
            Some("response_format.type"),
            None,
        ),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]})
                .to_string()
                .into_bytes(),
            400,
            Some("messages[0].role"),
            None,
        ),
        (
            json!({"messages": 5}).to_string().into_bytes(),
            400,
            Some("messages"),
            None,
        ),
        (
            json!({"model": "gpt-4o", "messages": user})
                .to_string()
                .into_bytes(),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            json!({"messages": user, "max_tokens": 100000})
                .to_string()
                .into_bytes(),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (vec![b' '; 200_000], 413, None, None),
        (
            json!({"messages": user, "stream_options": {"include_usage": true}})
                .to_string()
                .into_bytes(),
            400,
            Some("stream_options"),
            None,
        ),
    ];
    for (body, status, param, code) in cases {
        let (got, r) = if status == 413 {
            s.post_tolerant("/v1/chat/completions", &body)
        } else {
            s.post_raw("/v1/chat/completions", &body)
        };
        let what = String::from_utf8_lossy(&body[..body.len().min(80)]).to_string();
        assert_eq!(got, status, "{what}: {r}");
        let err = &r["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {r}"
        );
        assert!(err["type"].is_string(), "{r}");
        assert!(
            err.get("param").is_some() && err.get("code").is_some(),
            "{r}"
        );
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{what}: {r}");
        }
        if let Some(c) = code {
            assert_eq!(err["code"], c, "{what}: {r}");
        }
    }
    // The context error states the numbers.
    let (_, r) = s.post(
        "/v1/chat/completions",
        &json!({"messages": user, "max_tokens": 100000}),
    );
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("8192") && msg.contains("100000"), "{msg}");
    let (status, r) = s.post("/v1/nothing", &json!({}));
    assert_eq!(
        (status, r["error"]["type"].as_str()),
        (404, Some("invalid_request_error"))
    );
    // What axum answers itself comes in OpenAI's shape too: a method the route does not
    // take, a path that is not UTF-8.
    for (method, path, status) in [
        ("GET", "/v1/chat/completions", 405),
        ("GET", "/v1/models/%FF", 400),
    ] {
        let r = s.call(method, path, None, &[]);
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            r.body
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    // `null` is an optional field not given (OpenAI's fields are nullable), and `top_p: 0`
    // keeps the most likely token alone: the greedy reply.
    let greedy = chat("Say hi.", json!({"max_tokens": 6, "temperature": 0}));
    let (st, want) = s.post("/v1/chat/completions", &greedy);
    assert_eq!(st, 200, "{want}");
    let nulls = chat(
        "Say hi.",
        json!({"max_tokens": 6, "temperature": 1, "top_p": 0, "stream": null, "logprobs": null,
               "stream_options": null, "seed": null, "stop": null, "n": null}),
    );
    let (st, got) = s.post("/v1/chat/completions", &nulls);
    assert_eq!(st, 200, "{got}");
    assert_eq!(
        got["choices"][0]["message"]["content"],
        want["choices"][0]["message"]["content"]
    );
    let streamed = chat(
        "Say hi.",
        json!({"max_tokens": 2, "stream": true, "stream_options": {"include_usage": null}}),
    );
    let events = s.stream("/v1/chat/completions", &streamed);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

#[test]
fn concurrent_greedy_requests_equal_their_solo_runs() {
    let s = Server::start(&["--max-batch-size", "8", "--max-batch-tokens", "64"]);
    let prompts = [
        ("Hi", 5),
        ("What is the capital of France?", 20),
        ("Write a haiku about the sea.", 33),
        ("Count from one to ten.", 12),
        ("Explain gravity to a child in two sentences.", 40),
        ("List three fruits.", 8),
        (
            "Tell me a joke about computers and their users, please.",
            27,
        ),
        ("Why is the sky blue?", 16),
        ("Say the alphabet.", 24),
    ];
    let body = |p: &str, n: u64| chat(p, json!({"max_tokens": n}));
    let solo: Vec<String> = prompts
        .iter()
        .map(|(p, n)| {
            let (_, r) = s.post("/v1/chat/completions", &body(p, *n));
            r["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|(p, n)| {
                let s = &s;
                let b = body(p, *n);
                scope.spawn(move || {
                    let (status, r) = s.post("/v1/chat/completions", &b);
                    assert_eq!(status, 200, "{r}");
                    r["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, solo, "batching changed an output");
    assert!(s.wait_idle(Duration::from_secs(10)));
}

#[test]
fn flood_with_a_small_queue_gets_429_with_retry_after() {
    let s = Server::start(&["--max-queue", "1", "--max-batch-size", "1"]);
    // A long request holds the one slot first, so the flood meets a full queue on any host
    // (ten 16-token requests alone can pass one at a time on a fast one).
    let holder = s.raw_post(
        "/v1/chat/completions",
        &chat(
            &common::long_prompt("Tell me a long story."),
            json!({"max_tokens": 200, "stream": true}),
        ),
    );
    assert!(s.wait_metric("edgeinfer_requests_running", 1.0, Duration::from_secs(10)));
    let results: Vec<(u16, Option<String>)> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..10)
            .map(|_| {
                let s = &s;
                scope.spawn(move || {
                    let r = ureq::post(&format!("{}/v1/chat/completions", s.base))
                        .send_json(chat("Tell me a story.", json!({"max_tokens": 16})));
                    match r {
                        Ok(r) => (r.status(), None),
                        Err(ureq::Error::Status(st, r)) => {
                            (st, r.header("retry-after").map(str::to_string))
                        }
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let rejected: Vec<_> = results.iter().filter(|(st, _)| *st == 429).collect();
    assert!(!rejected.is_empty(), "{results:?}");
    assert!(rejected.iter().all(|(_, ra)| ra.as_deref() == Some("1")));
    assert!(
        results.iter().all(|(st, _)| *st == 200 || *st == 429),
        "{results:?}"
    );
    assert!(results.iter().any(|(st, _)| *st == 200));
    drop(holder);
    assert!(s.wait_idle(Duration::from_secs(20)));
}

#[test]
fn disconnects_free_the_sequence_in_every_phase() {
    // One sequence at a time and small steps, so phases last long enough to leave in.
    let s = Server::start(&["--max-batch-size", "1", "--max-batch-tokens", "16"]);
    let long_prompt = "word ".repeat(1500);
    // Decoding: read the first chunks of a stream, then hang up.
    let mut conn = s.raw_post(
        "/v1/chat/completions",
        &chat(
            "Tell me a long story.",
            json!({"max_tokens": 2000, "stream": true}),
        ),
    );
    let head = read_some(&mut conn, 600);
    assert!(head.contains("200 OK") && head.contains("data: "), "{head}");
    drop(conn);
    assert!(
        s.wait_idle(Duration::from_secs(10)),
        "decode disconnect not freed"
    );
    // Prefilling: a long prompt takes ~100 steps of 16 tokens; leave during it.
    let conn = s.raw_post(
        "/v1/chat/completions",
        &chat(&long_prompt, json!({"max_tokens": 5})),
    );
    assert!(
        s.wait_metric("edgeinfer_requests_running", 1.0, Duration::from_secs(10)),
        "the prompt is being prefilled"
    );
    drop(conn);
    assert!(
        s.wait_idle(Duration::from_secs(10)),
        "prefill disconnect not freed"
    );
    // Queued: occupy the only slot, queue a second request, leave while it waits.
    let busy = s.raw_post(
        "/v1/chat/completions",
        &chat(&long_prompt, json!({"max_tokens": 50})),
    );
    assert!(s.wait_metric("edgeinfer_requests_running", 1.0, Duration::from_secs(10)));
    let queued = s.raw_post(
        "/v1/chat/completions",
        &chat("Hi", json!({"max_tokens": 5})),
    );
    assert!(
        s.wait_metric("edgeinfer_requests_waiting", 1.0, Duration::from_secs(10)),
        "the second request waits"
    );
    drop(queued);
    drop(busy);
    assert!(
        s.wait_idle(Duration::from_secs(10)),
        "queued disconnect not freed"
    );
    // And the server still answers.
    let (status, _) = s.post(
        "/v1/chat/completions",
        &chat("Hi", json!({"max_tokens": 3})),
    );
    assert_eq!(status, 200);
}

#[test]
fn shutdown_drains_running_requests_then_exits_zero() {
    let s = Server::start(&[]);
    // A streaming request that is surely mid-flight when the signal arrives.
    let mut conn = s.raw_post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "stream": true}),
    );
    let first = read_some(&mut conn, 400);
    assert!(first.contains("data: "), "{first}");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut conn, &mut rest);
        rest
    });
    let status = s.terminate();
    let rest = reader.join().unwrap();
    assert!(
        rest.contains("\"finish_reason\":\""),
        "the stream was cut: {rest}"
    );
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn a_small_kv_pool_preempts_and_recomputes_without_changing_outputs() {
    // 256 positions for requests that need ~95 each: six at once cannot all fit.
    let s = Server::start(&[
        "--kv-cache-tokens",
        "256",
        "--max-batch-tokens",
        "128",
        "--block-size",
        "16",
    ]);
    let prompts = [
        "Tell me a story.",
        "Describe the sea.",
        "Explain rain.",
        "Why do cats purr?",
        "Write a poem.",
        "What is a star?",
    ];
    let body = |p: &str| chat(p, json!({"max_tokens": 60}));
    let solo: Vec<Value> = prompts
        .iter()
        .map(|p| s.post("/v1/chat/completions", &body(p)).1)
        .collect();
    // All six are sent at once (a barrier), so they overlap in the engine on any host.
    let start = std::sync::Barrier::new(prompts.len());
    let together: Vec<Value> = std::thread::scope(|scope| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (s, b, start) = (&s, body(p), &start);
                scope.spawn(move || {
                    start.wait();
                    s.post("/v1/chat/completions", &b).1
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, b) in solo.iter().zip(&together) {
        assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
        assert_eq!(usage_counts(a), usage_counts(b));
    }
    assert!(
        s.metric("edgeinfer_preemptions_total") > 0.0,
        "the pool never ran out"
    );
    assert!(s.wait_idle(Duration::from_secs(10)), "blocks leaked");
}

#[test]
fn ready_is_503_and_health_200_while_the_model_loads() {
    // A hub that accepts connections and never answers keeps the model loading.
    let hub = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", hub.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let s = Server::spawn(
        &[
            "--model",
            "someone/slow-GGUF:model.gguf",
            "--models-dir",
            dir.path().to_str().unwrap(),
        ],
        &[
            ("HF_ENDPOINT", &endpoint),
            ("HF_HOME", dir.path().to_str().unwrap()),
        ],
    );
    // Liveness holds (loading is not a failure); readiness does not.
    let (status, body) = s.get("/health");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("loading"), "{body}");
    let (status, body) = s.get("/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("loading"), "{body}");
    // The scheduler metrics are there before the model is.
    let (_, metrics) = s.get("/metrics");
    assert!(metrics.contains("vllm:num_requests_waiting{"), "{metrics}");
    let (status, r) = s.post("/v1/chat/completions", &chat("Hi", json!({})));
    assert_eq!(status, 503, "{r}");
    assert_eq!(r["error"]["type"], "server_error");
    drop(hub);
}
