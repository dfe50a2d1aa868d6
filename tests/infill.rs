//! Fill in the middle, end to end: synthetic code models whose vocabularies have
//! fill-in-the-middle tokens (Qwen-style `<|fim_prefix|>` ... `<|file_sep|>`, or Mistral's
//! `[PREFIX]` / `[SUFFIX]`), served over HTTP. A fill must generate exactly what the same
//! layout written as token ids generates (every token and logprob), through the completions
//! API's `suffix` and llama-server's `/infill`.

mod common;

use common::server::Server;
use common::synthetic::{self, Spec};
use serde_json::{json, Value};

const QWEN: &[&str] = &[
    "<|fim_prefix|>", // 258
    "<|fim_suffix|>", // 259
    "<|fim_middle|>", // 260
    "<|fim_pad|>",    // 261
    "<|repo_name|>",  // 262
    "<|file_sep|>",   // 263
];
const PRE: u32 = 258;
const SUF: u32 = 259;
const MID: u32 = 260;
const PAD: u32 = 261;
const REPO: u32 = 262;
const SEP: u32 = 263;

fn server(controls: &'static [&'static str]) -> (tempfile::TempDir, Server) {
    server_with(controls, 256)
}

fn server_with(controls: &'static [&'static str], context: u32) -> (tempfile::TempDir, Server) {
    serve(Spec {
        controls,
        context,
        ..Spec::default()
    })
}

fn serve(spec: Spec) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coder.gguf");
    synthetic::write(&path, &spec);
    let server = Server::spawn(&["--model", path.to_str().unwrap()], &[]);
    server.wait_ready();
    (dir, server)
}

/// The byte-level vocabulary's ids: one token per byte.
fn ids(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Greedy, a fixed length: the end-of-text token and the fill's ends banned.
fn greedy(n: u64) -> Value {
    json!({"temperature": 0, "max_tokens": n, "logprobs": 1,
           "logit_bias": {"257": -100, "261": -100, "262": -100, "263": -100}})
}

fn with(mut base: Value, more: Value) -> Value {
    for (k, v) in more.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// (text, token logprobs) of a completions answer.
fn completion(server: &Server, body: &Value) -> (String, Vec<f64>, Value) {
    let (status, reply) = server.post("/v1/completions", body);
    assert_eq!(status, 200, "{reply}");
    let choice = &reply["choices"][0];
    let lps = choice["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs: {reply}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    (
        choice["text"].as_str().unwrap().to_string(),
        lps,
        reply["usage"].clone(),
    )
}

#[test]
fn suffix_fills_the_middle_as_the_models_layout_says() {
    let (_dir, server) = server(QWEN);
    let (prefix, suffix) = ("def add(a, b):\n    ", "\n    return c\n");
    let filled = with(greedy(8), json!({"prompt": prefix, "suffix": suffix}));
    let (text, lps, usage) = completion(&server, &filled);
    // The layout as token ids: <PRE> prefix <SUF> suffix <MID>.
    let mut layout = vec![PRE];
    layout.extend(ids(prefix));
    layout.push(SUF);
    layout.extend(ids(suffix));
    layout.push(MID);
    let (want, want_lps, want_usage) =
        completion(&server, &with(greedy(8), json!({"prompt": layout})));
    assert_eq!(usage["completion_tokens"], 8, "{usage}");
    assert_eq!((&text, &lps), (&want, &want_lps));
    assert_eq!(usage["prompt_tokens"], want_usage["prompt_tokens"]);
    assert_eq!(usage["prompt_tokens"], layout.len());
    // The suffix matters: the prefix alone is another prompt.
    let (_, alone, _) = completion(&server, &with(greedy(8), json!({"prompt": prefix})));
    assert_ne!(lps, alone);
    // Token ids as the prefix, several prompts, a stream: the same fill.
    let (by_ids, _, _) = completion(
        &server,
        &with(greedy(8), json!({"prompt": ids(prefix), "suffix": suffix})),
    );
    assert_eq!(by_ids, want);
    let (status, two) = server.post(
        "/v1/completions",
        &with(
            greedy(8),
            json!({"prompt": [prefix, "x = "], "suffix": suffix}),
        ),
    );
    assert_eq!(status, 200, "{two}");
    assert_eq!(two["choices"][0]["text"], want.as_str());
    let mut streamed = String::new();
    for data in server.stream(
        "/v1/completions",
        &with(
            greedy(8),
            json!({"prompt": prefix, "suffix": suffix, "stream": true}),
        ),
    ) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        streamed.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert_eq!(streamed, want);
    // Code is text: a control token's spelling in it is not the token.
    let spelled = "x = '<|fim_middle|>'";
    let (status, reply) = server.post(
        "/v1/completions",
        &with(greedy(1), json!({"prompt": spelled, "suffix": spelled})),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["usage"]["prompt_tokens"],
        3 + 2 * spelled.len(),
        "{reply}"
    );
    // `echo` has no place in a fill.
    let (status, err) = server.post(
        "/v1/completions",
        &json!({"prompt": prefix, "suffix": suffix, "echo": true}),
    );
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "echo");
}

#[test]
fn the_fim_tokens_end_a_fill() {
    let (_dir, server) = server(QWEN);
    // Forced, the padding token ends the reply as the end-of-text token does.
    for end in [PAD, REPO, SEP] {
        let body = json!({"prompt": "x", "suffix": "y", "temperature": 0, "max_tokens": 8,
                          "logit_bias": {end.to_string(): 100}});
        let (status, reply) = server.post("/v1/completions", &body);
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["choices"][0]["finish_reason"], "stop", "{reply}");
        assert_eq!(reply["usage"]["completion_tokens"], 0, "{reply}");
    }
}

#[test]
fn fim_tokens_typed_as_words_are_control_tokens_still() {
    // Older conversions type them user-defined; llama.cpp makes them control tokens.
    let (_dir, server) = serve(Spec {
        controls: QWEN,
        controls_user_defined: true,
        ..Spec::default()
    });
    // Code that spells one is text...
    let spelled = "x = '<|fim_middle|>'";
    let (status, reply) = server.post(
        "/v1/completions",
        &with(greedy(1), json!({"prompt": spelled, "suffix": spelled})),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["usage"]["prompt_tokens"],
        3 + 2 * spelled.len(),
        "{reply}"
    );
    // ...and one the model writes is not shown.
    let body = json!({"prompt": "x", "temperature": 0, "max_tokens": 2,
                      "logit_bias": {MID.to_string(): 100}});
    let (status, reply) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["usage"]["completion_tokens"], 2, "{reply}");
    assert_eq!(reply["choices"][0]["text"], "", "{reply}");
}

#[test]
fn mistral_puts_the_suffix_first() {
    let (_dir, server) = server(&["[PREFIX]", "[SUFFIX]"]);
    let (prefix, suffix) = ("fn main() {", "}\n");
    // This vocabulary ends at 259: only the end-of-text token is banned.
    let greedy = |n: u64| with(greedy(n), json!({"logit_bias": {"257": -100}}));
    let (text, lps, _) = completion(
        &server,
        &with(greedy(6), json!({"prompt": prefix, "suffix": suffix})),
    );
    // [SUFFIX] suffix [PREFIX] prefix: the reply continues the prefix.
    let mut layout = vec![259];
    layout.extend(ids(suffix));
    layout.push(258);
    layout.extend(ids(prefix));
    let (want, want_lps, _) = completion(&server, &with(greedy(6), json!({"prompt": layout})));
    assert_eq!((&text, lps), (&want, want_lps));

    // Mistral's own API for it (Codestral's `/v1/fim/completions`): a chat completion.
    let ask = json!({"model": "coder", "prompt": prefix, "suffix": suffix,
                     "temperature": 0, "max_tokens": 6, "random_seed": 7,
                     "logit_bias": {"257": -100}});
    let (status, reply) = server.post("/v1/fim/completions", &ask);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion", "{reply}");
    assert_eq!(reply["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        want.as_str(),
        "{reply}"
    );
    assert_eq!(reply["usage"]["completion_tokens"], 6);
    let mut streamed = String::new();
    for data in server.stream(
        "/v1/fim/completions",
        &with(ask.clone(), json!({"stream": true})),
    ) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk", "{v}");
        streamed.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(streamed, want);
    let (status, err) = server.post("/v1/fim/completions", &with(ask, json!({"min_tokens": 5})));
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "min_tokens");
}

#[test]
fn codestrals_sentencepiece_suffix_goes_on_mid_line() {
    // A SentencePiece vocabulary puts a space before a text; Mistral's tokenizer writes the
    // suffix without it (`[SUFFIX]hello▁world[PREFIX]▁hello`).
    let (_dir, server) = serve(Spec {
        spm: true,
        controls: &["[PREFIX]", "[SUFFIX]"],
        ..Spec::default()
    });
    let id = |piece: &str| {
        let at = synthetic::SPM_PIECES
            .iter()
            .position(|(p, _)| *p == piece)
            .unwrap();
        json!(259 + at)
    };
    let (prefix_id, suffix_id) = (
        259 + synthetic::SPM_PIECES.len(),
        260 + synthetic::SPM_PIECES.len(),
    );
    let ask = |prompt: Value, suffix: Option<&str>| {
        let mut body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 4, "logprobs": 1,
                              "logit_bias": {"2": -100}});
        if let Some(s) = suffix {
            body["suffix"] = json!(s);
        }
        completion(&server, &body)
    };
    let filled = ask(json!("hello"), Some("hello world"));
    let layout = json!([
        1,
        suffix_id,
        id("hello"),
        id("▁world"),
        prefix_id,
        id("▁hello")
    ]);
    let want = ask(layout, None);
    assert_eq!((&filled.0, &filled.1), (&want.0, &want.1));
    assert_eq!(filled.2["prompt_tokens"], 6, "{}", filled.2);
}

#[test]
fn a_model_without_fim_tokens_says_so() {
    let (_dir, server) = server(&[]);
    let (status, err) = server.post("/v1/completions", &json!({"prompt": "a", "suffix": "b"}));
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "suffix");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fill in the middle"),
        "{err}"
    );
    let (status, err) = server.post(
        "/infill",
        &json!({"input_prefix": "a", "input_suffix": "b"}),
    );
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "input_suffix");
    // llama-server's `/props` says so too.
    let (status, props) = server.get("/props");
    assert_eq!(status, 200, "{props}");
    let props: Value = serde_json::from_str(&props).unwrap();
    assert_eq!(props["infill"], false, "{props}");
    assert_eq!(
        props["default_generation_settings"]["n_ctx"], 256,
        "{props}"
    );
    assert!(props["chat_template"].is_string(), "{props}");
    let (_coder_dir, coder) = crate::server(QWEN);
    let (_, props) = coder.get("/props");
    let props: Value = serde_json::from_str(&props).unwrap();
    assert_eq!(props["infill"], true, "{props}");
}

/// `/infill`'s greedy settings (llama.cpp's names) with the fill's ends banned.
fn infill_greedy(n: i64) -> Value {
    json!({"temperature": 0, "n_predict": n,
           "logit_bias": {"257": -100, "261": -100, "262": -100, "263": -100}})
}

#[test]
fn infill_answers_in_llama_cpps_shape() {
    let (_dir, server) = server(QWEN);
    let ask = with(
        infill_greedy(6),
        // As llama.vim sends them: no model name, llama.vim's first indentation (-1).
        json!({"input_prefix": "a = '<|file_sep|>'\n", "input_suffix": "\nb = 2\n",
               "prompt": "c", "model": "", "n_indent": -1, "t_max_predict_ms": null,
               "input_extra": [{"filename": "util.py", "text": "import os\n"}]}),
    );
    let (status, reply) = server.post("/infill", &ask);
    assert_eq!(status, 200, "{reply}");
    // llama.cpp's repository-level layout: the project, each file, then the fill (the line
    // typed so far continues the prefix).
    let mut layout = vec![REPO];
    layout.extend(ids("myproject\n"));
    layout.push(SEP);
    layout.extend(ids("util.py\nimport os\n"));
    layout.push(SEP);
    layout.extend(ids("filename\n"));
    layout.push(PRE);
    layout.extend(ids("a = '<|file_sep|>'\nc"));
    layout.push(SUF);
    layout.extend(ids("\nb = 2\n"));
    layout.push(MID);
    let (want, _, _) = completion(&server, &with(greedy(6), json!({"prompt": layout})));
    assert_eq!(reply["content"], want.as_str(), "{reply}");
    assert_eq!(reply["stop"], true);
    assert_eq!(reply["stop_type"], "limit", "{reply}");
    assert_eq!(reply["tokens_predicted"], 6);
    assert_eq!(reply["tokens_evaluated"], layout.len());
    assert_eq!(reply["truncated"], false);
    assert_eq!(reply["has_new_line"], want.contains('\n'));
    for k in [
        "prompt_n",
        "prompt_ms",
        "predicted_n",
        "predicted_ms",
        "predicted_per_second",
    ] {
        assert!(reply["timings"][k].is_number(), "{k}: {reply}");
    }
    assert_eq!(reply["timings"]["predicted_n"], 6);

    // Streamed: pieces, then the final object with empty content; no [DONE].
    let events = server.stream("/infill", &with(ask.clone(), json!({"stream": true})));
    let objects: Vec<Value> = events
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| panic!("not JSON: {d}")))
        .collect();
    let (last, pieces) = objects.split_last().unwrap();
    let text: String = pieces
        .iter()
        .map(|p| {
            assert_eq!(p["stop"], false, "{p}");
            p["content"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(text, want);
    assert_eq!(
        (&last["stop"], &last["content"]),
        (&json!(true), &json!(""))
    );
    assert_eq!(last["tokens_predicted"], 6);

    // `response_fields`: those paths only, under their names.
    let picked = with(
        ask.clone(),
        json!({"response_fields": ["content", "timings/predicted_n", "nope"]}),
    );
    let (_, reply) = server.post("/infill", &picked);
    assert_eq!(
        reply,
        json!({"content": want, "timings/predicted_n": 6}),
        "{reply}"
    );
}

#[test]
fn infill_warms_the_cache_leaves_old_context_out_and_ends_at_its_limits() {
    let (_dir, server) = server(QWEN);
    let chunk = |i: usize| json!({"filename": format!("f{i}.py"), "text": format!("x{i} = {i}\n").repeat(4)});
    let extra: Vec<Value> = (0..3).map(chunk).collect();
    let base = json!({"input_prefix": "def f():\n", "input_suffix": "\n", "input_extra": extra});
    // `n_predict: 0` computes the prompt only, as editors send to warm the cache.
    let (status, warm) = server.post("/infill", &with(infill_greedy(0), base.clone()));
    assert_eq!(status, 200, "{warm}");
    assert_eq!(
        (&warm["content"], &warm["tokens_predicted"]),
        (&json!(""), &json!(0))
    );
    let (_, hot) = server.post("/infill", &with(infill_greedy(4), base.clone()));
    assert!(
        hot["timings"]["cache_n"].as_u64().unwrap() > 100,
        "the warmed prompt came from the cache: {hot}"
    );

    // More context than the model's 256 positions: the oldest chunks are left out whole
    // and the reply says so; the fill itself is never cut.
    let many: Vec<Value> = (0..12).map(chunk).collect();
    let (status, reply) = server.post(
        "/infill",
        &with(
            infill_greedy(16),
            json!({"input_prefix": "y = ", "input_suffix": "", "input_extra": many}),
        ),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["truncated"], true, "{reply}");
    let evaluated = reply["tokens_evaluated"].as_u64().unwrap();
    // At most half the context goes to it, so a warm-up and its request keep the same.
    // (plus the repository's and the file's names, and the fill).
    assert!(evaluated <= 128 + 30 && evaluated > 100, "{reply}");
    let (status, err) = server.post(
        "/infill",
        &with(
            infill_greedy(16),
            json!({"input_prefix": "z".repeat(300), "input_suffix": "w".repeat(300)}),
        ),
    );
    // A fill longer than the context less the completion keeps the prefix's end and the
    // suffix's start, 3:1 as llama.cpp does, and says so.
    assert_eq!(status, 200, "{err}");
    assert_eq!(err["truncated"], true, "{err}");
    let evaluated = err["tokens_evaluated"].as_u64().unwrap();
    assert!(evaluated + 16 <= 256 && evaluated > 200, "{err}");
    // A completion that leaves the fill nothing beside the chunks takes their room.
    let (status, big) = server.post(
        "/infill",
        &with(
            infill_greedy(180),
            json!({"input_prefix": "z".repeat(300), "input_suffix": "", "input_extra": [chunk(0)]}),
        ),
    );
    assert_eq!(status, 200, "{big}");
    let evaluated = big["tokens_evaluated"].as_u64().unwrap();
    assert!(evaluated + 180 <= 256 && evaluated > 40, "{big}");
    assert_eq!(big["tokens_predicted"], 180, "{big}");
    // One past three quarters of the context leaves the fill a quarter and writes to the
    // context's end, as llama-server's `n_predict` (a most, not a promise).
    let (status, long) = server.post(
        "/infill",
        &with(
            infill_greedy(100000),
            json!({"input_prefix": "z".repeat(300), "input_suffix": ""}),
        ),
    );
    assert_eq!(status, 200, "{long}");
    let evaluated = long["tokens_evaluated"].as_u64().unwrap();
    let predicted = long["tokens_predicted"].as_u64().unwrap();
    assert!((40..=64).contains(&evaluated), "{long}");
    assert_eq!(
        (
            evaluated + predicted,
            &long["stop_type"],
            &long["truncated"]
        ),
        (256, &json!("limit"), &json!(true)),
        "{long}"
    );

    // `n_indent`: a newline forced every token makes an empty second line, which is
    // indented less than 1: the reply ends before it, as llama.cpp's does.
    let newlines = json!({"input_prefix": "if x:\n", "input_suffix": "", "temperature": 0,
                          "n_predict": 8, "logit_bias": {"10": 100}});
    let (_, free) = server.post("/infill", &newlines);
    assert_eq!(free["content"], "\n".repeat(8), "{free}");
    let ok = |s: &Server| {
        s.labelled(
            "edgeinfer_gateway_requests_total",
            &[("key", "none"), ("status", "ok")],
        )
    };
    let before = ok(&server);
    let (_, cut) = server.post("/infill", &with(newlines.clone(), json!({"n_indent": 1})));
    assert_eq!(cut["content"], "\n", "{cut}");
    assert_eq!(cut["stop_type"], "limit", "{cut}");
    // The limit ends the reply in the engine: two tokens, ledgered as a finished request.
    assert_eq!(cut["tokens_predicted"], 2, "{cut}");
    assert_eq!(ok(&server), before + 1.0);
    let streamed: String = server
        .stream(
            "/infill",
            &with(newlines.clone(), json!({"n_indent": 1, "stream": true})),
        )
        .iter()
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, "\n");
    // llama.cpp's sampling names, and OpenAI's limit as llama.cpp takes it; `logprobs` is
    // llama.cpp's `n_probs`, a number.
    let (status, three) = server.post(
        "/infill",
        &json!({"input_prefix": "a", "input_suffix": "b", "max_tokens": 3, "temperature": 0,
                "logit_bias": {"257": -100, "261": -100, "262": -100, "263": -100}}),
    );
    assert_eq!(status, 200, "{three}");
    assert_eq!(three["tokens_predicted"], 3, "{three}");
    let (status, probs) = server.post(
        "/infill",
        &json!({"input_prefix": "a", "input_suffix": "b", "max_tokens": 3, "logprobs": 2,
                "temperature": 0,
                "logit_bias": {"257": -100, "261": -100, "262": -100, "263": -100}}),
    );
    assert_eq!(status, 200, "{probs}");
    let entries = probs["completion_probabilities"].as_array().unwrap();
    assert_eq!(entries.len(), 3, "{probs}");
    assert!(entries
        .iter()
        .all(|e| e["top_logprobs"].as_array().unwrap().len() == 2));
    let (status, err) = server.post(
        "/infill",
        &json!({"input_prefix": "a", "input_suffix": "b", "logprobs": true}),
    );
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "logprobs");
    // Grammars are /completion's, refused here rather than ignored.
    for (field, v) in [
        ("grammar", json!("root ::= \"a\"")),
        ("json_schema", json!({})),
    ] {
        let (status, err) = server.post(
            "/infill",
            &json!({"input_prefix": "a", "input_suffix": "b", field: v}),
        );
        assert_eq!(
            (status, &err["error"]["param"]),
            (400, &json!(field)),
            "{err}"
        );
    }
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/infill"),
        "{err}"
    );
    let (status, err) = server.post("/infill", &json!({"input_prefix": "a"}));
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "input_suffix", "{err}");
}

#[test]
fn past_t_max_predict_ms_the_next_newline_ends_the_fill() {
    // Room for 2,000 tokens, which take far longer than the limit's 1 ms to generate.
    let (_dir, server) = server_with(QWEN, 2048);
    let newlines = json!({"input_prefix": "if x:\n", "input_suffix": "", "temperature": 0,
                          "n_predict": 2000, "logit_bias": {"10": 100}});
    let (_, free) = server.post("/infill", &newlines);
    assert_eq!(free["tokens_predicted"], 2000, "{free}");
    let timed = with(newlines, json!({"t_max_predict_ms": 1}));
    let (_, cut) = server.post("/infill", &timed);
    let n = cut["tokens_predicted"].as_u64().unwrap();
    assert!(n > 0 && n < 2000, "{n} tokens");
    assert_eq!(cut["content"], "\n".repeat(n as usize));
    assert_eq!(cut["stop_type"], "limit");
    // The time is the engine's: the tokens it made in the limit, not those read then (the
    // first token's event is sent a few microseconds after the limit's clock starts).
    let ms = cut["timings"]["predicted_ms"].as_f64().unwrap();
    assert!((0.9..1000.0).contains(&ms), "{cut}");
    let streamed = server.stream("/infill", &with(timed, json!({"stream": true})));
    let last: Value = serde_json::from_str(streamed.last().unwrap()).unwrap();
    assert_eq!(
        (&last["stop"], &last["stop_type"]),
        (&json!(true), &json!("limit"))
    );
    assert!(last["tokens_predicted"].as_u64().unwrap() < 2000, "{last}");
}

#[test]
fn llama_cpps_completion_endpoint_answers_in_its_shape() {
    let (_dir, server) = server(QWEN);
    let ask = json!({"prompt": "Hello", "n_predict": 5, "temperature": 0,
                     "logit_bias": {"257": -100, "261": -100, "262": -100, "263": -100}});
    let (status, reply) = server.post("/completion", &ask);
    assert_eq!(status, 200, "{reply}");
    let (want, lps, usage) = completion(&server, &with(greedy(5), json!({"prompt": "Hello"})));
    assert_eq!(reply["content"], want.as_str(), "{reply}");
    assert_eq!(reply["tokens_predicted"], 5);
    assert_eq!(reply["tokens_evaluated"], usage["prompt_tokens"]);
    assert_eq!(reply["stop_type"], "limit");
    assert!(reply.get("completion_probabilities").is_none(), "{reply}");
    // An `n_predict` past the free context writes to its end, as llama-server does (the
    // OpenAI route's `max_tokens` is refused instead).
    let (status, long) = server.post(
        "/completion",
        &with(ask.clone(), json!({"n_predict": 100000})),
    );
    assert_eq!(status, 200, "{long}");
    let used =
        long["tokens_evaluated"].as_u64().unwrap() + long["tokens_predicted"].as_u64().unwrap();
    assert_eq!((used, &long["stop_type"]), (256, &json!("limit")), "{long}");
    let (status, err) = server.post(
        "/v1/completions",
        &with(greedy(100000), json!({"prompt": "Hello"})),
    );
    assert_eq!(status, 400, "{err}");
    // `n_probs`: each token's logprob (the completions API's, the same numbers) with its
    // most likely alternatives, in llama.cpp's shape; `logprobs` is its other name.
    let (status, probs) = server.post("/completion", &with(ask.clone(), json!({"n_probs": 3})));
    assert_eq!(status, 200, "{probs}");
    let entries = probs["completion_probabilities"].as_array().unwrap();
    assert_eq!(entries.len(), 5, "{probs}");
    let mut bytes = Vec::new();
    for (e, lp) in entries.iter().zip(&lps) {
        assert!(
            (e["logprob"].as_f64().unwrap() - lp).abs() < 1e-4,
            "{e} {lp}"
        );
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        // The alternatives, most likely first, none less likely than the greedy pick.
        let first = top[0]["logprob"].as_f64().unwrap();
        assert!(first + 1e-4 >= *lp, "{e}");
        assert!(top
            .windows(2)
            .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
        bytes.extend(
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    assert_eq!(String::from_utf8_lossy(&bytes), want);
    // This vocabulary's byte tokens have the byte's value as their id.
    let single: Vec<&Value> = entries
        .iter()
        .filter(|e| e["bytes"].as_array().unwrap().len() == 1)
        .collect();
    assert!(!single.is_empty(), "{probs}");
    assert!(single.iter().all(|e| e["id"] == e["bytes"][0]), "{probs}");
    let (_, alias) = server.post("/completion", &with(ask.clone(), json!({"logprobs": 3})));
    assert_eq!(
        alias["completion_probabilities"],
        probs["completion_probabilities"]
    );
    // Streamed, each piece carries its token's entry.
    let pieces: Vec<Value> = server
        .stream(
            "/completion",
            &with(ask.clone(), json!({"n_probs": 3, "stream": true})),
        )
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|p| {
            p["completion_probabilities"]
                .as_array()
                .map(|a| a[0].clone())
        })
        .collect();
    assert_eq!(&pieces, entries);
    // Token ids; a stream of pieces and the final object.
    let (_, by_ids) = server.post(
        "/completion",
        &with(ask.clone(), json!({"prompt": ids("Hello")})),
    );
    assert_eq!(by_ids["content"], want.as_str(), "{by_ids}");
    let events = server.stream("/completion", &with(ask.clone(), json!({"stream": true})));
    let objects: Vec<Value> = events
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, pieces) = objects.split_last().unwrap();
    let text: String = pieces
        .iter()
        .map(|p| p["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, want);
    assert_eq!(
        (&last["stop"], &last["tokens_predicted"]),
        (&json!(true), &json!(5))
    );
    // A stop string: `stop_type: "word"` and the string.
    let forced = json!({"prompt": "Hello", "n_predict": 8, "temperature": 0,
                        "logit_bias": {"120": 100}, "stop": ["xx"]});
    let (_, word) = server.post("/completion", &forced);
    assert_eq!(
        (&word["stop_type"], &word["stopping_word"]),
        (&json!("word"), &json!("xx")),
        "{word}"
    );
    assert_eq!(word["content"], "", "{word}");
    // The tokens that spelled the stop string have no entries, as in llama.cpp.
    let (_, word) = server.post("/completion", &with(forced.clone(), json!({"n_probs": 2})));
    assert_eq!(word["stop_type"], "word", "{word}");
    assert!(word.get("completion_probabilities").is_none(), "{word}");
    // `json_schema` constrains the reply; the end of the grammar is an end of text.
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}},
                        "required": ["ok"], "additionalProperties": false});
    let (status, constrained) = server.post(
        "/completion",
        &json!({"prompt": "Hello", "n_predict": 40, "temperature": 0, "json_schema": schema}),
    );
    assert_eq!(status, 200, "{constrained}");
    let value: Value = serde_json::from_str(constrained["content"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {constrained}"));
    assert!(value["ok"].is_boolean(), "{constrained}");
    assert_eq!(constrained["stop_type"], "eos", "{constrained}");
    // `{}` is any object, as llama.cpp reads it; a bad schema is the field's 400.
    let (status, any) = server.post(
        "/completion",
        &json!({"prompt": "Hello", "n_predict": 60, "temperature": 0, "json_schema": {},
                "grammar": ""}),
    );
    assert_eq!(status, 200, "{any}");
    assert!(any["content"].as_str().unwrap().starts_with('{'), "{any}");
    let (status, err) = server.post(
        "/completion",
        &json!({"prompt": "Hello", "json_schema": {"type": 5}}),
    );
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "json_schema", "{err}");
    // More stop strings than OpenAI's 4, as llama.cpp takes them.
    let stops: Vec<String> = (0..6).map(|i| format!("zz{i}")).collect();
    let (status, reply) = server.post(
        "/completion",
        &json!({"prompt": "Hello", "n_predict": 2, "stop": stops}),
    );
    assert_eq!(status, 200, "{reply}");
    // What it does not take is refused by name.
    // A GBNF grammar shapes the reply as `json_schema` does; not both.
    let (status, err) = server.post(
        "/completion",
        &json!({"prompt": "Hi", "json_schema": {}, "grammar": "root ::= \"a\""}),
    );
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("grammar")),
        "{err}"
    );
    for (field, v) in [
        ("grammar", json!("root ::= \"a")),
        ("grammar", json!(7)),
        ("grammar_lazy", json!(true)),
        ("n_probs", json!(101)),
        ("logprobs", json!(true)),
        ("prompt", json!([1, "mixed"])),
        ("prompt", json!([9999])),
    ] {
        let (status, err) = server.post("/completion", &json!({"prompt": "Hi", field: v}));
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["param"], field, "{err}");
    }
}
