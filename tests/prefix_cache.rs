//! Automatic prefix caching over real HTTP with the real default model: follow-up turns
//! compute only their new tokens and answer exactly as with the cache off; a small KV budget
//! evicts without leaking; concurrent requests share a prefix; a prompt diverging mid-block
//! reuses exactly the tokens before the divergence (rows of a partly matching block are copied).

mod common;

use std::time::Duration;

use common::server::Server;
use serde_json::{json, Value};

const BLOCK: u64 = 16;

/// A counter's value, 0 before its first increment.
fn counter(s: &Server, name: &str) -> f64 {
    let v = s.metric(name);
    if v.is_nan() {
        0.0
    } else {
        v
    }
}

struct Counters {
    queries: f64,
    hits: f64,
    computed: f64,
}

fn counters(s: &Server) -> Counters {
    Counters {
        queries: counter(s, "edgeinfer_prefix_cache_queries_total"),
        hits: counter(s, "edgeinfer_prefix_cache_hits_total"),
        computed: counter(s, "edgeinfer_prompt_tokens_computed_total"),
    }
}

/// Deterministic filler prose: `n` sentences that differ from each other.
fn prose(seed: usize, n: usize) -> String {
    let subjects = [
        "The river",
        "A small robot",
        "Our team",
        "The old library",
        "Every map",
    ];
    let verbs = ["remembers", "describes", "measures", "collects", "explains"];
    let objects = [
        "the winter storms",
        "seven blue doors",
        "a quiet harbor",
        "the tax forms",
    ];
    (0..n)
        .map(|i| {
            let k = seed * 31 + i * 7;
            format!(
                "{} {} {} on day {}.",
                subjects[k % subjects.len()],
                verbs[(k / 3) % verbs.len()],
                objects[(k / 5) % objects.len()],
                seed * 100 + i
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A multi-turn conversation of roughly 1,000 tokens.
fn history() -> Vec<Value> {
    let mut m =
        vec![json!({"role": "system", "content": "You are a careful assistant. Answer briefly."})];
    for turn in 0..4 {
        m.push(json!({"role": "user", "content": format!("Note {turn}: {}", prose(turn, 13))}));
        m.push(json!({"role": "assistant", "content": format!("Noted. {}", prose(turn + 10, 3))}));
    }
    m.push(json!({"role": "user", "content": "Summarise the notes in one sentence."}));
    m
}

fn chat(s: &Server, messages: &[Value], extra: Value) -> (String, Value) {
    let mut body = json!({"messages": messages, "temperature": 0, "max_tokens": 24});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    (text, v["usage"].clone())
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn a_follow_up_turn_computes_only_its_new_tokens_and_answers_as_without_cache() {
    let s = Server::start(&[]);
    let mut messages = history();
    let before = counters(&s);
    let (reply, first) = chat(&s, &messages, json!({}));
    let p1 = num(&first["prompt_tokens"]);
    assert!(p1 > 800, "the history is about 1,000 tokens (got {p1})");
    assert_eq!(num(&first["prompt_tokens_details"]["cached_tokens"]), 0);
    let after_first = counters(&s);
    assert_eq!(after_first.computed - before.computed, p1 as f64);

    messages.push(json!({"role": "assistant", "content": reply}));
    messages.push(json!({"role": "user", "content": "And in three words?"}));
    let (text, usage) = chat(&s, &messages, json!({}));
    let (p2, cached) = (
        num(&usage["prompt_tokens"]),
        num(&usage["prompt_tokens_details"]["cached_tokens"]),
    );
    let after = counters(&s);
    eprintln!("first turn {p1} prompt tokens; follow-up {p2}, of which {cached} cached");
    // Everything of the first turn in registered (full) blocks is reused; only the new tokens
    // (and the reply's last, unregistered partial block) are computed.
    assert!(
        cached >= p1 / BLOCK * BLOCK - BLOCK && cached < p2,
        "cached {cached} of {p2} (first turn {p1})"
    );
    assert_eq!(after.hits - after_first.hits, cached as f64);
    assert_eq!(after.queries - after_first.queries, p2 as f64);
    assert_eq!(after.computed - after_first.computed, (p2 - cached) as f64);
    assert!(
        p2 - cached <= p2 - p1 + BLOCK,
        "computed more than the new tokens"
    );

    // The same follow-up with the cache bypassed: same answer, all tokens computed.
    let (uncached, usage) = chat(&s, &messages, json!({"cache_prompt": false}));
    assert_eq!(num(&usage["prompt_tokens_details"]["cached_tokens"]), 0);
    assert_eq!(
        counters(&s).computed - after.computed,
        p2 as f64,
        "cache_prompt: false recomputes the whole prompt"
    );
    assert_eq!(text, uncached, "the prefix cache changed the output");

    // Streaming reports cached tokens too (in the usage chunk).
    let body = json!({"messages": messages, "temperature": 0, "max_tokens": 24, "stream": true,
                      "stream_options": {"include_usage": true}});
    let events = s.stream("/v1/chat/completions", &body);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(num(&usage["usage"]["prompt_tokens_details"]["cached_tokens"]) >= cached);

    // With --no-prefix-cache the server never reuses anything, and answers the same.
    let off = Server::start(&["--no-prefix-cache"]);
    for _ in 0..2 {
        let (t, usage) = chat(&off, &messages, json!({}));
        assert_eq!(t, text);
        assert_eq!(num(&usage["prompt_tokens_details"]["cached_tokens"]), 0);
    }
    assert_eq!(counter(&off, "edgeinfer_prefix_cache_hits_total"), 0.0);
    assert_eq!(counter(&off, "edgeinfer_prefix_cache_blocks"), 0.0);
}

#[test]
fn a_small_budget_evicts_old_prefixes_without_leaking() {
    // 512 positions = 32 blocks; each request below needs about 20.
    let s = Server::start(&["--kv-cache-tokens", "512"]);
    let prompts: Vec<Vec<Value>> = (0..4)
        .map(|i| {
            vec![
                json!({"role": "system", "content": format!("Persona {i}.")}),
                json!({"role": "user", "content": prose(40 + i, 20)}),
            ]
        })
        .collect();
    let mut answers = Vec::new();
    for p in &prompts {
        let (t, usage) = chat(&s, p, json!({}));
        assert!(num(&usage["prompt_tokens"]) > 250, "{usage}");
        // At most the template's head ("<|im_start|>system\nPersona ") is shared.
        assert!(num(&usage["prompt_tokens_details"]["cached_tokens"]) < BLOCK);
        answers.push(t);
        assert!(s.wait_idle(Duration::from_secs(10)), "blocks leaked");
        assert!(counter(&s, "edgeinfer_prefix_cache_blocks") <= 32.0);
    }
    assert!(counter(&s, "edgeinfer_prefix_cache_evictions_total") > 0.0);
    // The newest prefix is still cached; the oldest was evicted. Both answer as before.
    let (t, usage) = chat(&s, &prompts[3], json!({}));
    assert!(num(&usage["prompt_tokens_details"]["cached_tokens"]) > 200);
    assert_eq!(t, answers[3]);
    let (t, usage) = chat(&s, &prompts[0], json!({}));
    assert!(num(&usage["prompt_tokens_details"]["cached_tokens"]) < BLOCK);
    assert_eq!(t, answers[0]);
    assert!(s.wait_idle(Duration::from_secs(10)), "blocks leaked");
}

#[test]
fn concurrent_requests_share_a_cached_prefix() {
    let s = Server::start(&[]);
    let system = json!({"role": "system", "content": prose(7, 25)});
    let ask = |q: &str| vec![system.clone(), json!({"role": "user", "content": q})];
    // Warm the shared prefix, then two requests on it at once.
    let (_, warm) = chat(&s, &ask("Say hello."), json!({}));
    let shared = num(&warm["prompt_tokens"]);
    let questions = ["What is on day 700?", "Name a door colour."];
    let results: Vec<(String, Value)> = std::thread::scope(|sc| {
        let handles: Vec<_> = questions
            .iter()
            .map(|q| {
                let m = ask(q);
                let s = &s;
                sc.spawn(move || chat(s, &m, json!({})))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((text, usage), q) in results.iter().zip(questions) {
        let cached = num(&usage["prompt_tokens_details"]["cached_tokens"]);
        assert!(
            cached >= shared / BLOCK * BLOCK - 2 * BLOCK,
            "cached {cached} of a {shared}-token shared prefix"
        );
        let (alone, _) = chat(&s, &ask(q), json!({"cache_prompt": false}));
        assert_eq!(text, &alone, "sharing a prefix changed the output");
    }
    assert!(s.wait_idle(Duration::from_secs(10)), "blocks leaked");
}

#[test]
fn a_prompt_diverging_mid_block_reuses_exactly_the_tokens_before_it() {
    let s = Server::start(&[]);
    let ids = |text: &str| -> Vec<u64> {
        let (status, v) = s.post("/tokenize", &json!({"content": text, "add_special": true}));
        assert_eq!(status, 200, "{v}");
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect()
    };
    let complete = |prompt: &str, cache: bool| -> (String, u64) {
        let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 12,
                          "cache_prompt": cache});
        let (status, v) = s.post("/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        let cached = num(&v["usage"]["prompt_tokens_details"]["cached_tokens"]);
        (
            v["choices"][0]["text"].as_str().unwrap().to_string(),
            cached,
        )
    };
    let base = prose(3, 12);
    let words: Vec<&str> = base.split(' ').collect();
    let a_ids = ids(&base);
    // Replace one word, choosing a place where the shared token prefix ends mid-block.
    let (variant, common) = (40..words.len())
        .find_map(|k| {
            let mut w = words.clone();
            w[k] = "zebra";
            let v = w.join(" ");
            let common = a_ids
                .iter()
                .zip(ids(&v))
                .take_while(|(x, y)| **x == *y)
                .count() as u64;
            (!common.is_multiple_of(BLOCK)).then_some((v, common))
        })
        .expect("some split ends mid-block");
    assert!(common > 2 * BLOCK);
    let (_, first) = complete(&base, true);
    assert_eq!(first, 0);
    let (text, cached) = complete(&variant, true);
    // The full blocks before the divergence are shared; the rows of the block it falls in
    // that still match are copied, so exactly the common tokens are reused.
    assert_eq!(cached, common, "{common} tokens in common");
    let (uncached, _) = complete(&variant, false);
    assert_eq!(text, uncached);
    assert!(s.wait_idle(Duration::from_secs(10)), "blocks leaked");
}
