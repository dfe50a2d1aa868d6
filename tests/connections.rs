//! Slow and many clients: a header trickled byte by byte is cut off by the header-read
//! timeout (axum's own `serve` would wait forever), connections beyond the cap get a 503,
//! and the server keeps answering everyone else.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::json;

fn chat() -> serde_json::Value {
    json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0})
}

/// Sends `head` then one more header byte every 200 ms; returns how long until the server
/// closed the connection (or `None` if it never did within `limit`).
fn trickle(addr: &str, limit: Duration) -> Option<Duration> {
    let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    until_closed(addr, head, limit, true)
}

/// Sends `first` and then nothing; returns how long until the server closed the connection
/// (or `None` if it never did within `limit`).
fn fall_silent(addr: &str, first: &[u8], limit: Duration) -> Option<Duration> {
    until_closed(addr, first, limit, false)
}

/// Sends `first`, then (`more`) a byte every 200 ms; how long until the server closed it.
fn until_closed(addr: &str, first: &[u8], limit: Duration, more: bool) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let _ = s.write_all(first);
    let mut buf = [0u8; 256];
    while started.elapsed() < limit {
        if more && s.write_all(b"a").is_err() {
            return Some(started.elapsed());
        }
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {} // an error response may come first; the close follows
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[test]
fn trickled_headers_are_cut_off_while_others_are_served() {
    let s = Server::start(&["--header-read-timeout", "1"]);
    let addr = s.addr.clone();
    let closed: Vec<Option<Duration>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..50)
            .map(|_| sc.spawn(|| trickle(&addr, Duration::from_secs(10))))
            .collect();
        // Meanwhile an ordinary client is served.
        let (status, body) = s.post("/v1/chat/completions", &chat());
        assert_eq!(status, 200, "{body}");
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for c in &closed {
        let c = c.expect("every trickling connection is closed");
        assert!(
            c >= Duration::from_millis(900) && c < Duration::from_secs(4),
            "closed after {c:?}"
        );
    }
}

#[test]
fn silent_connections_are_closed_by_the_header_timeout() {
    // A connection that sends no byte, or the start of HTTP/2's preface, would otherwise
    // hold its slot for good: 2 of them would lock everyone else out here.
    let s = Server::start(&["--header-read-timeout", "1", "--max-connections", "3"]);
    let addr = s.addr.clone();
    let firsts: [&[u8]; 2] = [b"", b"PRI * HTTP/2.0\r\n"];
    let closed: Vec<Option<Duration>> = std::thread::scope(|sc| {
        let hs: Vec<_> = firsts
            .iter()
            .map(|f| {
                let addr = &addr;
                sc.spawn(move || fall_silent(addr, f, Duration::from_secs(10)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (c, f) in closed.iter().zip(firsts) {
        let c = c.unwrap_or_else(|| panic!("a connection sending {f:?} is closed"));
        assert!(c < Duration::from_secs(4), "closed after {c:?}");
    }
    let (status, body) = s.post("/v1/chat/completions", &chat());
    assert_eq!(status, 200, "{body}");
}

#[test]
fn connections_beyond_the_cap_get_503_and_the_rest_go_on() {
    let s = Server::start(&["--max-connections", "2"]);
    // Open idle connections one at a time until one is refused: at most the third (the
    // client's own pooled keep-alive connection from the readiness check may hold a slot).
    let mut idle: Vec<TcpStream> = Vec::new();
    let mut refusal = None;
    for _ in 0..4 {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = vec![0u8; 4096];
        match c.read(&mut buf) {
            Ok(n) if n > 0 => {
                // The head and the body may come in two writes: read to the close.
                let rest = common::server::read_some(&mut c, 8192);
                refusal = Some(format!("{}{rest}", String::from_utf8_lossy(&buf[..n])));
                break;
            }
            _ => idle.push(c),
        }
    }
    let refusal = refusal.expect("a connection beyond the cap is refused");
    assert!(idle.len() <= 2, "{} connections were accepted", idle.len());
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    assert!(refusal.contains("\"server_error\""), "{refusal}");
    drop(idle);
    // The server notices the closed connections and frees their slots soon after.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        let (status, _) = s.post("/v1/chat/completions", &chat());
        if status == 200 || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 200);
    // Streams say that proxies must not buffer them.
    let mut body = chat();
    body["stream"] = json!(true);
    let r = ureq::post(&format!("{}/v1/chat/completions", s.base))
        .send_json(body)
        .unwrap();
    assert_eq!(r.header("x-accel-buffering"), Some("no"));
}

#[test]
fn a_queued_stream_gets_keep_alive_comments() {
    use std::io::{BufRead, BufReader};
    // One slot, held by a long request: the second stream waits in the queue. The holder's
    // 2,000-word prompt keeps the slot for seconds even on a fast host (400 tokens of story
    // alone took under the keep-alive second there).
    let s = Server::start(&["--sse-keep-alive", "1", "--max-batch-size", "1"]);
    let long = json!({"messages": [{"role": "user", "content": common::long_prompt("Tell me a very long story.")}],
                      "max_tokens": 400, "temperature": 0, "stream": true});
    let base = s.base.clone();
    let holder = std::thread::spawn(move || {
        let r = ureq::post(&format!("{base}/v1/chat/completions"))
            .send_json(long)
            .unwrap();
        BufReader::new(r.into_reader()).lines().count()
    });
    assert!(
        s.wait_metric("edgeinfer_requests_running", 1.0, Duration::from_secs(10)),
        "the holder started"
    );
    let mut body = chat();
    body["stream"] = json!(true);
    let r = ureq::post(&format!("{}/v1/chat/completions", s.base))
        .send_json(body)
        .unwrap();
    // Lines before the first content delta: the role delta, then comments while queued.
    let mut comments = 0;
    let mut content = false;
    for line in BufReader::new(r.into_reader())
        .lines()
        .map_while(Result::ok)
    {
        if line.starts_with(':') {
            comments += 1;
        }
        if line.contains("\"content\":\"") && !line.contains("\"content\":\"\"") {
            content = true;
        }
        if line == "data: [DONE]" {
            break;
        }
    }
    let held = holder.join().unwrap();
    assert!(held > 10, "the long request ran");
    assert!(content, "the queued stream produced text");
    assert!(comments >= 1, "no keep-alive comment while queued");
}
