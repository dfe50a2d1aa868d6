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
fn a_heavier_key_is_admitted_first_when_slots_free() {
    // One request runs at a time; a blocker holds it while a light key queues three,
    // then a key of weight 3 queues three behind them.
    let s = Server::start(&["--master-key", MASTER, "--max-batch-size", "1"]);
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
        scope.spawn(move || {
            let r = s.post_key("/v1/completions", &body(300), &blocker);
            assert_eq!(r.status, 200, "{}", r.body);
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.metric("edgeinfer_requests_running") < 1.0 {
            assert!(Instant::now() < deadline, "the blocker never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        for (name, k) in [("light", &light), ("heavy", &heavy)] {
            for i in 0..3 {
                let b = body(8);
                scope.spawn(move || {
                    let r = s.post_key("/v1/completions", &b, k);
                    assert_eq!(r.status, 200, "{}", r.body);
                    order.lock().unwrap().push(format!("{name}{i}"));
                });
            }
            let queued = if name == "light" { 3.0 } else { 6.0 };
            waiting_reaches(s, queued);
        }
    });
    // With no one running, arrival order would serve the light key's three first; the
    // heavy key (a third of a slot each running sequence costs it) goes first every time.
    let order = order.into_inner().unwrap();
    let firsts: Vec<&str> = order[..3].iter().map(|o| &o[..5]).collect();
    assert_eq!(firsts, ["heavy"; 3], "{order:?}");
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
