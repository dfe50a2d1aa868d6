//! Sampling settings and logprobs over HTTP with the real default model: `logit_bias`, and
//! `echo` with the prompt's logprobs (how evaluation harnesses score a model).

mod common;

use common::server::Server;
use serde_json::{json, Value};

fn tokens(s: &Server, text: &str) -> Vec<u64> {
    let (status, r) = s.post("/tokenize", &json!({"content": text}));
    assert_eq!(status, 200, "{r}");
    r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

fn detokenize(s: &Server, ids: &[u64]) -> String {
    let (status, r) = s.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(status, 200, "{r}");
    r["content"].as_str().unwrap().to_string()
}

fn complete(s: &Server, route: &str, extra: Value) -> Value {
    let mut body = if route == "/v1/completions" {
        json!({"prompt": "The capital of France is", "temperature": 0})
    } else {
        json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
               "temperature": 0})
    };
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, r) = s.post(route, &body);
    assert_eq!(status, 200, "{r}");
    r
}

fn text(r: &Value) -> String {
    let c = &r["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap()
        .to_string()
}

#[test]
fn logit_bias_bans_and_forces_tokens() {
    let s = Server::start(&[]);
    for route in ["/v1/completions", "/v1/chat/completions"] {
        // The greedy reply's first token, then the same request with it banned.
        let plain = text(&complete(&s, route, json!({"max_tokens": 6})));
        let first = tokens(&s, &plain)[0];
        let banned = complete(
            &s,
            route,
            json!({"max_tokens": 6, "logit_bias": {first.to_string(): -100}}),
        );
        assert_ne!(text(&banned), plain, "{route}: banning the first token");
        let banned_ids = tokens(&s, &text(&banned));
        assert!(
            !banned_ids.contains(&first),
            "{route}: token {first} was banned, got {banned_ids:?} ({plain:?} without the bias)"
        );

        // +100 on one token makes it every token, greedy or sampled.
        let forced = tokens(&s, " banana")[0];
        let want = detokenize(&s, &[forced; 4]);
        for sampling in [
            json!({"temperature": 0}),
            json!({"temperature": 1, "seed": 3}),
        ] {
            let mut extra = json!({"max_tokens": 4, "logit_bias": {forced.to_string(): 100}});
            for (k, v) in sampling.as_object().unwrap() {
                extra[k] = v.clone();
            }
            let r = complete(&s, route, extra);
            assert_eq!(text(&r), want, "{route} {sampling}");
            assert_eq!(r["choices"][0]["finish_reason"], "length");
        }

        // A small bias on a token nobody picks changes nothing.
        let quiet = complete(
            &s,
            route,
            json!({"max_tokens": 6, "logit_bias": {forced.to_string(): 0.01}}),
        );
        assert_eq!(text(&quiet), plain, "{route}");
    }

    // Streaming applies it too.
    let forced = tokens(&s, " banana")[0];
    let events = s.stream(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                "stream": true, "logit_bias": {forced.to_string(): 100}}),
    );
    let streamed: String = events
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, detokenize(&s, &[forced; 3]));
}

/// lm-evaluation-harness's loglikelihood request: token ids, `echo`, `logprobs: 1`,
/// `max_tokens: 1`; it sums `token_logprobs[ctxlen:-1]` and calls the continuation greedy
/// when each token is the largest of its `top_logprobs`.
fn score(s: &Server, context: &[u64], continuation: &[u64]) -> (f64, bool, Value) {
    let ids: Vec<u64> = context.iter().chain(continuation).copied().collect();
    let r = complete(
        s,
        "/v1/completions",
        json!({"prompt": [ids], "echo": true, "logprobs": 1, "max_tokens": 1, "seed": 1234}),
    );
    let lp = r["choices"][0]["logprobs"].clone();
    let n = ids.len() + 1;
    for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[field].as_array().unwrap().len(), n, "{field}: {lp}");
    }
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    let cont = context.len()..ids.len();
    let mut sum = 0.0;
    let mut greedy = true;
    for i in cont {
        let l = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(l <= 0.0, "{l}");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        let max = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        sum += l;
        greedy &= l == max;
    }
    // The text is the prompt's, then the one generated token's.
    let text = text(&r);
    assert!(text.starts_with(&detokenize(s, &ids)), "{text:?}");
    assert_eq!(r["usage"]["prompt_tokens"], ids.len());
    (sum, greedy, r)
}

#[test]
fn echo_scores_the_prompt_as_evaluation_harnesses_read_it() {
    let s = Server::start(&[]);
    let context = tokens(&s, "The capital of France is");
    // The greedy next token, as generated.
    let gen = complete(
        &s,
        "/v1/completions",
        json!({"prompt": [context], "max_tokens": 1, "logprobs": 1}),
    );
    let next_text = gen["choices"][0]["logprobs"]["tokens"][0]
        .as_str()
        .unwrap()
        .to_string();
    let next_lp = gen["choices"][0]["logprobs"]["token_logprobs"][0]
        .as_f64()
        .unwrap();
    assert_eq!(text(&gen), next_text);
    let next = tokens(&s, &next_text);
    assert_eq!(next.len(), 1, "{next_text:?}");

    // Scored as a continuation, it has the logprob generation gave it, and is greedy.
    let (likely, greedy, r) = score(&s, &context, &next);
    assert!(greedy, "{r}");
    assert!(
        (likely - next_lp).abs() < 1e-3,
        "{likely} vs {next_lp} when generated"
    );
    // An unlikely continuation scores lower and is not greedy.
    let banana = tokens(&s, " banana");
    let (unlikely, greedy, r) = score(&s, &context, &banana);
    assert!(!greedy, "{r}");
    assert!(unlikely < likely - 1.0, "{unlikely} vs {likely}");

    // Every prompt position matches generation from the prefix before it: the logprob of
    // the prompt's token among the alternatives generation reports (top 5).
    let (_, _, r) = score(&s, &context, &next);
    let lp = &r["choices"][0]["logprobs"];
    let mut compared = 0;
    for p in 1..context.len() + 1 {
        let want = lp["tokens"][p].as_str().unwrap();
        let want_lp = lp["token_logprobs"][p].as_f64().unwrap();
        let ids: Vec<u64> = context.iter().chain(&next).take(p).copied().collect();
        let g = complete(
            &s,
            "/v1/completions",
            json!({"prompt": [ids], "max_tokens": 1, "logprobs": 5}),
        );
        if let Some(got) = g["choices"][0]["logprobs"]["top_logprobs"][0][want].as_f64() {
            assert!(
                (got - want_lp).abs() < 1e-3,
                "position {p}: {got} vs {want_lp}"
            );
            compared += 1;
        }
    }
    assert!(
        compared >= 2,
        "only {compared} positions had the prompt's token in the top 5"
    );
    // `max_tokens: 0` scores the prompt alone (as older harnesses ask): the same scores,
    // no token generated.
    let ids: Vec<u64> = context.iter().chain(&next).copied().collect();
    let only = complete(
        &s,
        "/v1/completions",
        json!({"prompt": [ids], "echo": true, "logprobs": 1, "max_tokens": 0}),
    );
    let c = &only["choices"][0];
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(only["usage"]["completion_tokens"], 0);
    assert_eq!(c["text"], detokenize(&s, &ids));
    for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        let mut want = lp[field].as_array().unwrap().clone();
        want.pop();
        assert_eq!(c["logprobs"][field], Value::from(want), "{field}");
    }
    // The one generated token is the end of turn (forced here): it still has its entry, so
    // the harness's `[ctxlen:-1]` slice keeps every continuation token.
    let eot = tokens(&s, "<|im_end|>");
    assert_eq!(eot.len(), 1, "{eot:?}");
    let ended = complete(
        &s,
        "/v1/completions",
        json!({"prompt": [ids], "echo": true, "logprobs": 1, "max_tokens": 1,
               "logit_bias": {eot[0].to_string(): 100}}),
    );
    let c = &ended["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{ended}");
    assert_eq!(c["text"], detokenize(&s, &ids));
    let toks = c["logprobs"]["tokens"].as_array().unwrap();
    assert_eq!(toks.len(), ids.len() + 1, "{ended}");
    assert_eq!(toks[ids.len()], "<|im_end|>");
    let prompt_part = |v: &Value| v.as_array().unwrap()[1..ids.len()].to_vec();
    assert_eq!(
        prompt_part(&c["logprobs"]["token_logprobs"]),
        prompt_part(&lp["token_logprobs"])
    );
    // Without `echo`, 0 is still refused.
    let (status, e) = s.post(
        "/v1/completions",
        &json!({"prompt": [ids], "logprobs": 1, "max_tokens": 0}),
    );
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("max_tokens")),
        "{e}"
    );
    // Scoring reads no cached prefix: the same request again computes every position.
    let (_, _, again) = score(&s, &context, &next);
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(again["choices"][0]["logprobs"], r["choices"][0]["logprobs"]);
}

#[test]
fn echo_streams_and_works_without_logprobs() {
    let s = Server::start(&[]);
    let prompt = "Once upon a time";
    // Without logprobs: the prompt's text, then the completion's.
    let plain = complete(
        &s,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5}),
    );
    let echoed = complete(
        &s,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5, "echo": true}),
    );
    assert_eq!(text(&echoed), format!("{prompt}{}", text(&plain)));
    assert!(echoed["choices"][0]["logprobs"].is_null());

    // Streamed with logprobs: the same text and lists as the whole answer, in pieces.
    let body = json!({"prompt": prompt, "max_tokens": 5, "echo": true, "logprobs": 2,
                      "temperature": 0});
    let (status, whole) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{whole}");
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let events = s.stream("/v1/completions", &sbody);
    let chunks: Vec<Value> = events
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text(&whole));
    assert!(streamed.starts_with(prompt));
    let wl = &whole["choices"][0]["logprobs"];
    for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        let joined: Vec<Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["logprobs"][field].as_array())
            .flatten()
            .cloned()
            .collect();
        assert_eq!(Value::from(joined), wl[field], "{field}");
    }
    // Offsets index the returned text.
    let offsets = wl["text_offset"].as_array().unwrap();
    let toks = wl["tokens"].as_array().unwrap();
    let all: Vec<char> = text(&whole).chars().collect();
    for (o, t) in offsets.iter().zip(toks).skip(1) {
        let o = o.as_u64().unwrap() as usize;
        let t = t.as_str().unwrap();
        let at: String = all[o..(o + t.chars().count()).min(all.len())]
            .iter()
            .collect();
        assert_eq!(at, t, "offset {o}");
    }
}

fn choices(r: &Value) -> Vec<String> {
    let cs = r["choices"].as_array().unwrap();
    for (i, c) in cs.iter().enumerate() {
        assert_eq!(c["index"], i, "{r}");
    }
    cs.iter().map(|c| text(&json!({"choices": [c]}))).collect()
}

#[test]
fn n_and_several_prompts_give_one_choice_each() {
    let s = Server::start(&[]);
    let chat = "/v1/chat/completions";
    // Greedy: every choice is the one greedy reply.
    let one = complete(&s, chat, json!({"max_tokens": 8}));
    let three = complete(&s, chat, json!({"max_tokens": 8, "n": 3}));
    assert_eq!(choices(&three), vec![text(&one); 3]);
    let single = one["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(three["usage"]["completion_tokens"], 3 * single);
    // The prompt counts once, as OpenAI counts `n`.
    assert_eq!(
        three["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    let total = |r: &Value| r["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(
        total(&three),
        3 * single + one["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    // Choices that each compute the prompt each count it.
    let apart = complete(
        &s,
        chat,
        json!({"max_tokens": 8, "n": 2, "cache_prompt": false}),
    );
    assert_eq!(
        apart["usage"]["prompt_tokens"],
        2 * one["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    // Seeded sampling: choices differ, repeat, and the first is the n = 1 reply.
    let sampled = json!({"max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 4});
    let a = choices(&complete(&s, chat, sampled.clone()));
    let b = choices(&complete(&s, chat, sampled));
    assert_eq!(a, b);
    assert!(a.iter().any(|t| *t != a[0]), "{a:?}");
    let first = complete(
        &s,
        chat,
        json!({"max_tokens": 12, "temperature": 1.0, "seed": 5}),
    );
    assert_eq!(a[0], text(&first));

    // The choices share one prefill: the first computes the prompt, the others wait for its
    // blocks and take them from the prefix cache (all but the last, partial block).
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let computed = || s.metric("edgeinfer_prompt_tokens_computed_total") as u64;
    let before = computed();
    let r = complete(
        &s,
        chat,
        json!({"messages": [{"role": "user", "content": long}], "max_tokens": 2, "n": 3}),
    );
    let u = &r["usage"];
    let prompt = u["prompt_tokens"].as_u64().unwrap();
    // Only the chat template's start was cached before; the first choice computes the rest.
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let ran = computed() - before;
    assert!(
        prompt > 400 && ran + cached >= prompt && ran <= prompt - cached + 2 * 16,
        "{ran} prompt tokens computed for three choices of {prompt}"
    );

    // Several prompts, `n` each: prompt by prompt, as OpenAI orders them.
    let route = "/v1/completions";
    let prompts = ["The capital of France is", "Once upon a time"];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| text(&complete(&s, route, json!({"prompt": p, "max_tokens": 5}))))
        .collect();
    let both = complete(
        &s,
        route,
        json!({"prompt": prompts, "max_tokens": 5, "n": 2, "echo": true}),
    );
    let want: Vec<String> = (0..4)
        .map(|c| format!("{}{}", prompts[c / 2], alone[c / 2]))
        .collect();
    assert_eq!(choices(&both), want);

    // Streamed: each choice's chunks carry its index; one finish each, one usage, one [DONE].
    let body = json!({"prompt": prompts, "max_tokens": 5, "stream": true,
                      "stream_options": {"include_usage": true}, "temperature": 0});
    let events = s.stream(route, &body);
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut texts = vec![String::new(); 2];
    let mut finishes = [0; 2];
    for c in &chunks {
        if let Some(choice) = c["choices"].as_array().unwrap().first() {
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["text"].as_str().unwrap());
            finishes[i] += usize::from(!choice["finish_reason"].is_null());
        }
    }
    assert_eq!(texts, alone);
    assert_eq!(finishes, [1, 1]);
    let usage = &chunks.last().unwrap()["usage"];
    let (_, whole) = s.post(
        route,
        &json!({"prompt": prompts, "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(
        usage["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );
    // Two prompts, each counted once, streamed or whole.
    assert_eq!(usage["prompt_tokens"], whole["usage"]["prompt_tokens"]);
    let two_prompts: usize = prompts.iter().map(|p| tokens(&s, p).len()).sum();
    assert_eq!(whole["usage"]["prompt_tokens"], two_prompts);
    let events = s.stream(
        route,
        &json!({"prompt": prompts, "max_tokens": 5, "temperature": 0, "n": 2, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["usage"]["prompt_tokens"], two_prompts, "{last}");
    assert_eq!(
        last["usage"]["completion_tokens"],
        2 * whole["usage"]["completion_tokens"].as_u64().unwrap()
    );

    // At most 16 choices a request.
    let many = vec!["Hi"; 9];
    let (status, e) = s.post(route, &json!({"prompt": many, "n": 2, "max_tokens": 1}));
    assert_eq!((status, &e["error"]["param"]), (400, &json!("n")), "{e}");
}

#[test]
fn best_of_answers_the_choices_with_the_best_mean_logprob() {
    let s = Server::start(&[]);
    let route = "/v1/completions";
    // Stop tokens banned: every candidate runs its 10 tokens, so its mean logprob is the
    // mean of the token_logprobs shown.
    let body = |extra: Value| {
        let mut b = json!({"prompt": "Once upon a time", "max_tokens": 10,
                           "temperature": 1.0, "seed": 11,
                           "logit_bias": {"0": -100, "1": -100, "2": -100}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // `best_of` samples its candidate j with seed + j, as `n` does: `n: 4` shows them all.
    let ranked = |prompt: &str| {
        let all = complete(
            &s,
            route,
            body(json!({"prompt": prompt, "n": 4, "logprobs": 0})),
        );
        let mean = |c: &Value| {
            let lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
            lps.iter().map(|l| l.as_f64().unwrap()).sum::<f64>() / lps.len() as f64
        };
        let run: Vec<(f64, String)> = all["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (mean(c), c["text"].as_str().unwrap().to_string()))
            .collect();
        let mut best = run.clone();
        best.sort_by(|a, b| b.0.total_cmp(&a.0));
        assert!(best[0].0 > best[3].0 + 1e-3, "{best:?}");
        let texts = |v: &[(f64, String)]| v.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>();
        (texts(&best), texts(&run), all)
    };
    let (best, run, all) = ranked("Once upon a time");
    // The ranking reorders these candidates (else this test could not see it).
    assert_ne!(best[..2], run[..2]);

    let two = complete(
        &s,
        route,
        body(json!({"best_of": 4, "n": 2, "logprobs": 0})),
    );
    assert_eq!(choices(&two), best[..2], "{two}");
    // Every candidate is billed, kept or not; the prompt once.
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(two["usage"][field], all["usage"][field], "{field}");
    }
    // Ranked by logprobs the client did not ask to see.
    let one = complete(&s, route, body(json!({"best_of": 4})));
    assert_eq!(choices(&one), best[..1]);
    assert!(one["choices"][0]["logprobs"].is_null(), "{one}");
    // Several prompts: each gets the best of its own candidates.
    let other = "The capital of France is";
    let (best_other, _, _) = ranked(other);
    let both = complete(
        &s,
        route,
        body(json!({"prompt": ["Once upon a time", other], "best_of": 4})),
    );
    assert_eq!(choices(&both), vec![best[0].clone(), best_other[0].clone()]);
    // `best_of` equal to `n`, whole: every candidate, best first.
    let four = complete(&s, route, body(json!({"best_of": 4, "n": 4})));
    assert_eq!(choices(&four), best);

    // `best_of` equal to `n` streams; greater must be whole; fewer than `n` or too many is
    // refused.
    let events = s.stream(route, &body(json!({"best_of": 2, "n": 2, "stream": true})));
    assert_eq!(events.last().unwrap(), "[DONE]");
    for bad in [
        json!({"best_of": 3, "stream": true}),
        json!({"best_of": 1, "n": 2}),
        json!({"best_of": 0}),
        json!({"best_of": 17}),
        json!({"best_of": 9, "prompt": ["a", "b"]}),
    ] {
        let (status, e) = s.post(route, &body(bad.clone()));
        assert_eq!(
            (status, &e["error"]["param"]),
            (400, &json!("best_of")),
            "{bad} {e}"
        );
    }
}

#[test]
fn logprob_bytes_hold_a_split_characters_own_bytes() {
    let s = Server::start(&[]);
    let rocket = "🚀".as_bytes();
    let ids = tokens(&s, "🚀");
    assert!(ids.len() > 1, "🚀 is one token here: {ids:?}");
    // Force the first of its tokens: its text alone is no character, its bytes are the
    // character's first bytes.
    let r = complete(
        &s,
        "/v1/chat/completions",
        json!({"max_tokens": 1, "logprobs": true, "top_logprobs": 2,
               "logit_bias": {ids[0].to_string(): 100}}),
    );
    let entry = &r["choices"][0]["logprobs"]["content"][0];
    let bytes: Vec<u8> = entry["bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    assert!(
        !bytes.is_empty() && bytes.len() < rocket.len() && rocket.starts_with(&bytes),
        "{entry}"
    );
}
