//! Key weights: under contention a key's share of the running batch follows its `weight`
//! (set with `/key/generate` and `/key/update`, shown by `/key/info`), with the real model.

mod common;

use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::json;

const MASTER: &str = "sk-master-weights";

fn key(s: &Server, fields: serde_json::Value) -> String {
    let r = s.post_key("/key/generate", &fields, MASTER);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["key"].as_str().unwrap().to_string()
}

fn waiting_reaches(s: &Server, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.metric("edgeinfer_requests_waiting") < n {
        assert!(Instant::now() < deadline, "{n} never queued");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_heavier_key_running_as_many_gets_the_slot_that_frees() {
    // Three run at a time: a short blocker, and one long request of each of a light key
    // and a key of weight 3. Then each of them queues one more, the light key first.
    let s = Server::start(&["--master-key", MASTER, "--max-batch-size", "3"]);
    let (blocker, light) = (key(&s, json!({})), key(&s, json!({})));
    let heavy = key(&s, json!({"weight": 3}));
    let info = s.call(
        "GET",
        "/key/info",
        None,
        &[("authorization", &format!("Bearer {heavy}"))],
    );
    assert_eq!(info.body["info"]["weight"], 3, "{}", info.body);
    // The stop tokens banned: every request generates all its tokens.
    let body = |n: u64| {
        json!({"prompt": "Once upon a time", "max_tokens": n, "temperature": 0,
               "logit_bias": {"0": -100, "1": -100, "2": -100}})
    };
    let order = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        let (s, order) = (&s, &order);
        let send = |name: &'static str, k: &'static str, n: u64| {
            let key = match k {
                "blocker" => blocker.clone(),
                "light" => light.clone(),
                _ => heavy.clone(),
            };
            scope.spawn(move || {
                let r = s.post_key("/v1/completions", &body(n), &key);
                assert_eq!(r.status, 200, "{}", r.body);
                order.lock().unwrap().push(name);
            });
        };
        send("blocker", "blocker", 150);
        send("light long", "light", 600);
        send("heavy long", "heavy", 600);
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.metric("edgeinfer_requests_running") < 3.0 {
            assert!(Instant::now() < deadline, "the three never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        send("light", "light", 8);
        waiting_reaches(s, 1.0);
        send("heavy", "heavy", 8);
        waiting_reaches(s, 2.0);
        assert_eq!(
            s.metric("edgeinfer_requests_running"),
            3.0,
            "the blocker ended early"
        );
    });
    // When the blocker ends, both keys run one: the light key at its whole share, the
    // heavy one at a third of it, so the heavy key's request goes first (with equal
    // weights, the light key's, queued earlier, would).
    let order = order.into_inner().unwrap();
    let at = |name| order.iter().position(|&o| o == name).unwrap();
    assert_eq!(order[0], "blocker", "{order:?}");
    assert!(at("heavy") < at("light"), "{order:?}");
}

#[test]
fn weights_are_checked_and_updated() {
    let s = Server::start(&["--master-key", MASTER]);
    for bad in [json!(0), json!(101), json!("2"), json!(1.5)] {
        let r = s.post_key("/key/generate", &json!({"weight": bad}), MASTER);
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.body["error"]["param"], "weight", "{}", r.body);
    }
    let k = key(&s, json!({}));
    let info = |s: &Server| {
        s.call(
            "GET",
            &format!("/key/info?key={k}"),
            None,
            &[("authorization", &format!("Bearer {MASTER}"))],
        )
        .body["info"]["weight"]
            .clone()
    };
    assert_eq!(info(&s), 1);
    let r = s.post_key("/key/update", &json!({"key": k, "weight": 5}), MASTER);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(info(&s), 5);
    let r = s.post_key("/key/update", &json!({"key": k, "weight": null}), MASTER);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(info(&s), 1);
}
