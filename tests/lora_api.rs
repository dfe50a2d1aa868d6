//! LoRA adapters over HTTP, on the default model with a random adapter: each is a model of
//! its own (listed, named in replies and the ledger, allowed per key), answers with its own
//! weights, keeps its own prefix-cache blocks, and Workers AI's `lora` field selects it.

mod common;

use common::server::{Reply, Server};
use edgeinfer::model::synth::{write_lora, LoraSpec};
use serde_json::{json, Value};

const MASTER: &str = "sk-master-lora";

fn post(s: &Server, path: &str, body: &Value, key: &str) -> Reply {
    s.post_key(path, body, key)
}

fn completion(model: &str, prompt: &str) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1})
}

fn tokens_and_cached(r: &Reply) -> (Vec<f64>, u64) {
    assert_eq!(r.status, 200, "{}", r.body);
    let lp = r.body["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let cached = r.body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    (lp, cached)
}

#[test]
fn an_adapter_is_a_model_of_its_own_with_its_own_weights_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("tuned.gguf");
    let spec = LoraSpec {
        strength: 0.3,
        ..Default::default()
    };
    write_lora(&adapter, &common::default_model_path(), &spec).unwrap();
    let flag = format!("tuned={}", adapter.display());
    let s = Server::start(&["--master-key", MASTER, "--lora", &flag]);

    let models = s.call(
        "GET",
        "/v1/models",
        None,
        &[("authorization", &format!("Bearer {MASTER}"))],
    );
    let data = models.body["data"].as_array().unwrap().clone();
    assert_eq!(data.len(), 2, "{}", models.body);
    let base = data[0]["id"].as_str().unwrap().to_string();
    assert_eq!(data[1]["id"], "tuned");
    assert_eq!(data[1]["parent"], base.as_str());

    // The same long prompt: first the base model, then the adapter. The adapter's keys and
    // values are its own, so it takes nothing from the base model's cached blocks.
    let prompt = common::long_prompt("Now tell me about foxes.");
    let b1 = post(&s, "/v1/completions", &completion(&base, &prompt), MASTER);
    let t1 = post(&s, "/v1/completions", &completion("tuned", &prompt), MASTER);
    let (b1_lp, b1_cached) = tokens_and_cached(&b1);
    let (t1_lp, t1_cached) = tokens_and_cached(&t1);
    assert_eq!(t1.body["model"], "tuned");
    assert_eq!(b1.body["model"], base.as_str());
    assert_eq!(b1_cached, 0);
    assert_eq!(
        t1_cached, 0,
        "the adapter's request took the base model's cached blocks"
    );
    assert_ne!(b1_lp, t1_lp, "the adapter changed nothing");
    // Again: each now finds its own blocks and answers as before.
    let (t2_lp, t2_cached) = tokens_and_cached(&post(
        &s,
        "/v1/completions",
        &completion("tuned", &prompt),
        MASTER,
    ));
    let (b2_lp, b2_cached) = tokens_and_cached(&post(
        &s,
        "/v1/completions",
        &completion(&base, &prompt),
        MASTER,
    ));
    assert!(
        t2_cached > 1000 && b2_cached > 1000,
        "{t2_cached} {b2_cached}"
    );
    let close = |a: &[f64], b: &[f64]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-3)
    };
    assert!(close(&t1_lp, &t2_lp), "{t1_lp:?} vs {t2_lp:?}");
    assert!(close(&b1_lp, &b2_lp), "{b1_lp:?} vs {b2_lp:?}");

    // Workers AI: `lora` names a fine-tune of the model the path names.
    let msgs = json!([{"role": "user", "content": "Name three colours."}]);
    let chat = json!({"model": "tuned", "messages": msgs, "max_tokens": 16, "temperature": 0});
    let openai = post(&s, "/v1/chat/completions", &chat, MASTER);
    assert_eq!(openai.status, 200, "{}", openai.body);
    let mut base_chat = chat.clone();
    base_chat["model"] = json!(base);
    let base_reply = post(&s, "/v1/chat/completions", &base_chat, MASTER);
    assert_ne!(
        base_reply.body["choices"][0]["message"]["content"],
        openai.body["choices"][0]["message"]["content"]
    );
    let run = format!("/client/v4/accounts/a/ai/run/{base}");
    let workers_body =
        json!({"messages": msgs, "max_tokens": 16, "temperature": 0, "lora": "tuned"});
    let w = post(&s, &run, &workers_body, MASTER);
    assert_eq!(w.status, 200, "{}", w.body);
    assert_eq!(
        w.body["result"]["response"], openai.body["choices"][0]["message"]["content"],
        "{}",
        w.body
    );
    let unknown = post(&s, &run, &json!({"prompt": "Hi", "lora": "nope"}), MASTER);
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    let elsewhere = "/client/v4/accounts/a/ai/run/@cf/some/other-model";
    let other = post(&s, elsewhere, &workers_body, MASTER);
    assert_eq!(other.status, 404, "{}", other.body);
    let unknown = post(&s, "/v1/completions", &completion("nope", "Hi"), MASTER);
    assert_eq!(unknown.body["error"]["code"], "model_not_found");

    // llama-server's `lora` list picks an adapter by its place among the `--lora` flags.
    let native = |extra: Value| {
        let mut body = json!({"prompt": "Once upon a time", "n_predict": 8, "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        post(&s, "/completion", &body, MASTER)
    };
    let by_list = native(json!({"lora": [{"id": 0, "scale": 1.0}]}));
    let by_name = native(json!({"model": "tuned"}));
    let plain = native(json!({"lora": [{"id": 0, "scale": 0.0}]}));
    assert_eq!(
        (by_list.status, by_name.status),
        (200, 200),
        "{}",
        by_list.body
    );
    assert_eq!(by_list.body["model"], "tuned");
    assert_eq!(by_list.body["content"], by_name.body["content"]);
    assert_eq!(plain.body["model"], base.as_str());
    assert_ne!(by_list.body["content"], plain.body["content"]);

    // Embeddings run with the adapter too.
    let embed = |model: &str| {
        let r = post(
            &s,
            "/v1/embeddings",
            &json!({"model": model, "input": "a fox"}),
            MASTER,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["model"], model);
        r.body["data"][0]["embedding"].clone()
    };
    assert_ne!(embed("tuned"), embed(&base));
    assert_eq!(embed("tuned"), embed("tuned"));
    for bad in [
        json!({"lora": [{"id": 3, "scale": 1.0}]}),
        json!({"lora": [{"id": 0, "scale": 0.5}]}),
        json!({"lora": {"id": 0}}),
        json!({"model": "tuned", "lora": [{"id": 0, "scale": 1.0}]}),
        json!({"model": "tuned", "lora": [{"id": 0, "scale": 0.0}]}),
    ] {
        let r = native(bad.clone());
        assert_eq!(
            (r.status, &r.body["error"]["param"]),
            (400, &json!("lora")),
            "{bad}: {}",
            r.body
        );
    }

    // A key's `models` name the adapter like any model.
    let key = |models: Value| {
        let r = post(&s, "/key/generate", &json!({"models": models}), MASTER);
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["key"].as_str().unwrap().to_string()
    };
    let base_only = key(json!([base]));
    let tuned_only = key(json!(["tuned"]));
    let r = post(
        &s,
        "/v1/completions",
        &completion("tuned", "Hi"),
        &base_only,
    );
    assert_eq!(
        (r.status, r.body["error"]["code"].clone()),
        (403, json!("model_not_allowed"))
    );
    let r = post(&s, "/v1/completions", &completion(&base, "Hi"), &tuned_only);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post(
        &s,
        "/v1/completions",
        &completion("tuned", "Hi"),
        &tuned_only,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Also when `lora` picks it: the key is checked against what the request runs on.
    let r = post(&s, &run, &workers_body, &tuned_only);
    assert_eq!(r.status, 200, "{}", r.body);
    let listed = json!({"prompt": "Hi", "n_predict": 4, "lora": [{"id": 0, "scale": 1.0}]});
    assert_eq!(post(&s, "/completion", &listed, &tuned_only).status, 200);
    assert_eq!(post(&s, "/completion", &listed, &base_only).status, 403);
    let listed = s.call(
        "GET",
        "/v1/models",
        None,
        &[("authorization", &format!("Bearer {tuned_only}"))],
    );
    let ids: Vec<&Value> = listed.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["id"])
        .collect();
    assert_eq!(ids, [&json!("tuned")]);

    // The ledger counts the adapter's requests under its name.
    let usage = s.call(
        "GET",
        "/v1/usage",
        None,
        &[("authorization", &format!("Bearer {MASTER}"))],
    );
    let tuned_requests: u64 = usage.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["model"] == "tuned")
        .map(|r| r["requests"].as_u64().unwrap())
        .sum();
    assert!(tuned_requests >= 4, "{}", usage.body);
    let m = s.get("/metrics").1;
    assert!(m.contains("running_lora_adapters=\"tuned\""), "{m}");
}

#[test]
fn bad_lora_flags_stop_the_server_with_a_clear_message() {
    let model = common::default_model_path();
    let model = model.to_str().unwrap();
    let run = |lora: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
            .args(["serve", "--port", "0", "--model", model, "--lora", lora])
            .env("EDGEINFER_DATA_DIR", tempfile::tempdir().unwrap().path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_ne!(out.status.code(), Some(0), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    };
    assert!(run("tuned").contains("is not NAME=PATH"));
    let missing = run("tuned=/nonexistent/adapter.gguf");
    assert!(missing.contains("/nonexistent/adapter.gguf"), "{missing}");
    // The model file itself is no adapter.
    let not_adapter = run(&format!("tuned={model}"));
    assert!(not_adapter.contains("not a LoRA adapter"), "{not_adapter}");
    // The served model's own name (the file's stem here).
    let stem = std::path::Path::new(model)
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap();
    let taken = run(&format!("{stem}={model}"));
    assert!(taken.contains("is taken"), "{taken}");
}
