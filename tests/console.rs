//! The built-in web console, end to end in headless Chromium (Debian's, driven by Playwright
//! from `.venv`; see `tests/python/console_browser.py`): with keys on, the page asks for a
//! key; a prompt streams its reply; JSON mode; the live charts and the usage table update.

mod common;

use std::process::Command;

use common::server::Server;
use serde_json::Value;

const MASTER: &str = "sk-console-test-master-0123456789";

#[test]
fn the_console_streams_a_reply_and_its_charts_update_in_a_real_browser() {
    let s = Server::start(&["--master-key", MASTER]);
    // The page and its assets need no key and hold no data; the API behind them does.
    let (status, page) = s.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("/console/app.js"), "{page}");
    assert_eq!(s.get("/console/app.js").0, 200);
    assert_eq!(s.get("/v1/usage").0, 401);

    let shot = common::repo_root().join("target/console.png");
    let out = Command::new(common::python_with_clients())
        .arg(common::repo_root().join("tests/python/console_browser.py"))
        .args([&s.base, MASTER])
        .arg(common::chromium())
        .arg(&shot)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser test failed:\n{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{r:#}");
    // What the script saw, checked again here: streamed pieces, moving charts, the ledger.
    let reply = r["reply"].as_str().unwrap();
    let lengths = r["lengths_seen"].as_array().unwrap();
    assert!(lengths.len() >= 4, "{r}");
    // Python counts characters.
    assert_eq!(
        lengths.last().unwrap().as_u64(),
        Some(reply.chars().count() as u64)
    );
    assert!(r["peak_tok_s"].as_f64().unwrap() > 0.0, "{r}");
    let points = r["chart_points"].as_array().unwrap();
    assert!(points[1].as_u64() > points[0].as_u64(), "{r}");
    let requests: u64 = r["usage_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[1].as_str().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(requests >= 2, "{r}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
}
