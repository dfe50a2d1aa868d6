//! A real `edgeinfer serve` process on a free loopback port, for HTTP tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    child: Child,
    pub base: String,
    pub addr: String,
    /// Its own key and ledger store (unless `--db` was passed), removed with the server.
    pub data_dir: tempfile::TempDir,
}

/// A response with its headers (names lowercased).
pub struct Reply {
    pub status: u16,
    pub headers: std::collections::HashMap<String, String>,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

impl Server {
    /// Starts the server on the default model with extra flags and waits until it is ready.
    pub fn start(extra: &[&str]) -> Server {
        let model = super::default_model_path();
        let mut args = vec!["--model", model.to_str().unwrap()];
        args.extend_from_slice(extra);
        let server = Self::spawn(&args, &[]);
        server.wait_ready();
        server
    }

    /// Starts `serve` with these flags and environment; returns once it listens.
    pub fn spawn(extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut args = vec!["serve", "--port", "0"];
        args.extend_from_slice(extra);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgeinfer"));
        let data_dir = tempfile::tempdir().expect("a temporary data directory");
        cmd.env("EDGEINFER_DATA_DIR", data_dir.path());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .args(&args)
            .env("EDGEINFER_LOG", "info")
            .env("RAYON_NUM_THREADS", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the server starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("addr=") {
                    let addr = line[i + 5..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send(addr);
                }
                // Keep draining so the server never blocks on a full pipe.
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server logs its address");
        Server {
            child,
            base: format!("http://{addr}"),
            addr,
            data_dir,
        }
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(r) = ureq::get(&format!("{}/ready", self.base)).call() {
                if r.status() == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the server did not become ready");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// POSTs JSON; returns status and parsed body (error statuses included).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string().as_bytes())
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let resp = ureq::post(&format!("{}{path}", self.base))
            .set("content-type", "application/json")
            .send_bytes(body);
        match resp {
            Ok(r) => {
                let status = r.status();
                (status, r.into_json().unwrap_or(Value::Null))
            }
            Err(ureq::Error::Status(status, r)) => (status, r.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("request failed: {e}"),
        }
    }

    /// A request with headers; any status comes back with its headers and JSON body.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = ureq::request(method, &format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let resp = match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        };
        let r = match resp {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("request failed: {e}"),
        };
        let headers = r
            .headers_names()
            .into_iter()
            .filter_map(|n| {
                r.header(&n)
                    .map(|v| (n.to_ascii_lowercase(), v.to_string()))
            })
            .collect();
        let status = r.status();
        Reply {
            status,
            headers,
            body: r.into_json().unwrap_or(Value::Null),
        }
    }

    /// POSTs JSON with a bearer key.
    pub fn post_key(&self, path: &str, body: &Value, key: &str) -> Reply {
        self.call(
            "POST",
            path,
            Some(body),
            &[("authorization", &format!("Bearer {key}"))],
        )
    }

    /// POSTs a body the server may refuse before reading it all (a 413): write errors are
    /// ignored and the answer is read from the raw connection.
    pub fn post_tolerant(&self, path: &str, body: &[u8]) -> (u16, Value) {
        raw_request(&self.addr, "POST", path, Some("application/json"), body)
    }

    /// POSTs a streaming request and returns every `data:` payload, in order.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = ureq::post(&format!("{}{path}", self.base))
            .send_json(body.clone())
            .expect("the stream starts");
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        BufReader::new(r.into_reader())
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&format!("{}{path}", self.base)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
            Err(e) => panic!("request failed: {e}"),
        }
    }

    /// A metric's value from /metrics (first sample whose line starts with `name`).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// The value of the sample of `name` whose labels include every one of `labels` (0 when
    /// there is none yet).
    pub fn labelled(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until the metric `name` reads `value`; false if it did not within `within`.
    pub fn wait_metric(&self, name: &str, value: f64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.metric(name) == value {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits until no request runs or waits and the KV cache is empty.
    pub fn wait_idle(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.metric("edgeinfer_requests_running") == 0.0
                && self.metric("edgeinfer_requests_waiting") == 0.0
                && self.metric("edgeinfer_kv_cache_usage_ratio") == 0.0
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Opens a raw connection and sends a POST without reading the answer.
    pub fn raw_post(&self, path: &str, body: &Value) -> TcpStream {
        let body = body.to_string();
        let mut s = TcpStream::connect(&self.addr).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        s
    }

    /// Sends SIGKILL (no chance to flush anything) and waits for the process to end.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `within` for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on a fresh connection with exactly these bytes as its body and this
/// content type (none if `None`); the status and the JSON body (Null if not JSON).
pub fn raw_request(
    addr: &str,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let ct = content_type.map(|c| ("Content-Type", c));
    raw_request_with(addr, method, path, ct.as_slice(), body)
}

/// [`raw_request`] with any headers: the reply is read even when the server answers before
/// the body is sent.
pub fn raw_request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    let ct: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{ct}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let text = read_some(&mut s, 1 << 20);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = text
        .find("\r\n\r\n")
        .and_then(|i| serde_json::from_str(&text[i + 4..]).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

/// Reads from a raw stream until `n` bytes arrived or it closes.
pub fn read_some(s: &mut TcpStream, n: usize) -> String {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    while got < n {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    String::from_utf8_lossy(&buf[..got]).into_owned()
}
