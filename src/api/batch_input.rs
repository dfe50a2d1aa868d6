//! A Batch API input file checked line by line: each line `{"custom_id", "method": "POST",
//! "url", "body"}`, or the list of what is wrong with it, as OpenAI lists it; then, once it
//! passed, its requests read one at a time to be stored.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::gateway::batches::Line;

/// The most requests one batch holds (OpenAI's limit).
pub const MAX_REQUESTS: usize = 50_000;
/// Problems listed at most (the rest are counted in the last one's message).
const MAX_ERRORS: usize = 100;

/// The problems found in a batch's input file, as OpenAI lists them: the first
/// [`MAX_ERRORS`], the rest counted.
#[derive(Default)]
struct Problems {
    listed: Vec<Value>,
    more: usize,
}

impl Problems {
    fn add(&mut self, line: Option<usize>, code: &str, message: impl Into<String>) {
        if self.listed.len() < MAX_ERRORS {
            let message = message.into();
            self.listed
                .push(json!({"code": code, "message": message, "param": null, "line": line}));
        } else {
            self.more += 1;
        }
    }

    fn into_list(mut self) -> Vec<Value> {
        if let (Some(last), true) = (self.listed.last_mut(), self.more > 0) {
            let m = last["message"].as_str().unwrap_or_default().to_string();
            last["message"] = format!("{m} (and {} more problems)", self.more).into();
        }
        self.listed
    }
}

/// A batch's requests from its input file, or what is wrong with it (line numbers from 1).
/// Reading stops at the first request past [`MAX_REQUESTS`].
#[cfg(test)]
fn parse_requests(content: &[u8], endpoint: &str) -> Result<Vec<Line>, Vec<Value>> {
    let mut lines = Vec::new();
    scan(content, endpoint, |line, custom_id, body| {
        let (url, body) = (endpoint.to_string(), body.to_string());
        lines.push(Line {
            line,
            custom_id,
            url,
            body,
        });
    })?;
    Ok(lines)
}

/// How many requests a batch's input file holds, or what is wrong with it (line numbers
/// from 1; reading stops at the first request past [`MAX_REQUESTS`]); nothing is kept.
pub(super) fn check_requests(content: &[u8], endpoint: &str) -> Result<usize, Vec<Value>> {
    scan(content, endpoint, |_, _, _| {})
}

/// The requests of an input file [`check_requests`] passed, one at a time (the file is
/// not held twice over). Only for such a file: a line with a problem is left out.
pub(super) fn requests<'a>(
    content: &'a [u8],
    endpoint: &'a str,
) -> impl Iterator<Item = Line> + 'a {
    let text = std::str::from_utf8(strip_bom(content)).unwrap_or_default();
    let raw = text.lines().filter(|l| !l.trim().is_empty());
    raw.take(MAX_REQUESTS)
        .enumerate()
        .filter_map(move |(i, raw)| {
            let (custom_id, body) = read_line(raw, None, None, endpoint, &mut Problems::default())?;
            let (url, body) = (endpoint.to_string(), body.to_string());
            Some(Line {
                line: i as i64,
                custom_id,
                url,
                body,
            })
        })
}

fn strip_bom(content: &[u8]) -> &[u8] {
    content
        .strip_prefix("\u{feff}".as_bytes())
        .unwrap_or(content)
}

/// Checks every line, handing each request (its number from 0, `custom_id` and body) to
/// `keep` while no problem has been found; how many requests, or the problems.
fn scan(
    content: &[u8],
    endpoint: &str,
    mut keep: impl FnMut(i64, String, Value),
) -> Result<usize, Vec<Value>> {
    let mut problems = Problems::default();
    let Ok(text) = std::str::from_utf8(strip_bom(content)) else {
        problems.add(None, "invalid_file", "The input file is not UTF-8 text");
        return Err(problems.into_list());
    };
    let mut seen = HashSet::new();
    let mut requests = 0;
    for (i, raw) in text.lines().enumerate() {
        let n = Some(i + 1);
        if raw.trim().is_empty() {
            continue;
        }
        requests += 1;
        if requests > MAX_REQUESTS {
            // Said whatever else was found.
            let message = format!("A batch holds at most {MAX_REQUESTS} requests");
            problems.more += problems.listed.len().saturating_sub(MAX_ERRORS - 1);
            problems.listed.truncate(MAX_ERRORS - 1);
            problems.add(n, "too_many_requests", message);
            break;
        }
        let read = read_line(raw, n, Some(&mut seen), endpoint, &mut problems);
        // Once a problem is found the requests are not kept, only checked.
        if let (Some((custom_id, body)), true) = (read, problems.listed.is_empty()) {
            keep(requests as i64 - 1, custom_id, body);
        }
    }
    if problems.listed.is_empty() && requests == 0 {
        problems.add(None, "empty_file", "The input file holds no requests");
    }
    if problems.listed.is_empty() {
        Ok(requests)
    } else {
        Err(problems.into_list())
    }
}

/// One line's `custom_id` and body, when the line has no problem (each one found is added
/// to `problems`, numbered `n`; a `custom_id` already in `seen` is one).
fn read_line(
    raw: &str,
    n: Option<usize>,
    seen: Option<&mut HashSet<String>>,
    endpoint: &str,
    problems: &mut Problems,
) -> Option<(String, Value)> {
    let mut v = match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            problems.add(n, "invalid_json_line", "This line is not a JSON object");
            return None;
        }
        Err(e) => {
            let message = format!("This line is not valid JSON: {e}");
            problems.add(n, "invalid_json_line", message);
            return None;
        }
    };
    let custom_id = match v.remove("custom_id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => s,
        _ => {
            let message = "`custom_id` must be a string of 1 to 512 characters";
            problems.add(n, "missing_required_parameter", message);
            return None;
        }
    };
    let mut clean = true;
    if seen.is_some_and(|seen| !seen.insert(custom_id.clone())) {
        let message =
            format!("`custom_id` '{custom_id}' is used twice; each request needs its own");
        problems.add(n, "duplicate_custom_id", message);
        clean = false;
    }
    if v.get("method").and_then(Value::as_str) != Some("POST") {
        problems.add(n, "invalid_method", "`method` must be POST");
        clean = false;
    }
    let url = v.get("url").and_then(Value::as_str).unwrap_or_default();
    if url != endpoint {
        let message = format!("`url` '{url}' is not the batch's endpoint '{endpoint}'");
        problems.add(n, "mismatched_endpoint", message);
        clean = false;
    }
    match v.remove("body") {
        Some(Value::Object(b))
            if !matches!(
                b.get("stream"),
                None | Some(Value::Bool(false) | Value::Null)
            ) =>
        {
            let message = "`body.stream` is not supported in a batch";
            problems.add(n, "invalid_request", message);
            None
        }
        // The completion routes refuse it when they run.
        Some(Value::Object(b))
            if matches!(endpoint, "/v1/chat/completions" | "/v1/completions")
                && b.get("stream_options").is_some_and(|o| !o.is_null()) =>
        {
            let message =
                "`body.stream_options` is only for a streamed request, which a batch does not take";
            problems.add(n, "invalid_request", message);
            None
        }
        Some(body @ Value::Object(_)) => clean.then_some((custom_id, body)),
        _ => {
            let message = "`body` must be a JSON object";
            problems.add(n, "missing_required_parameter", message);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(custom_id: &str, url: &str, body: Value) -> String {
        json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
    }

    #[test]
    fn input_files_are_checked_line_by_line() {
        let chat = "/v1/chat/completions";
        let good = [
            line("a", chat, json!({"messages": []})),
            String::new(),
            line("b", chat, json!({"stream": false})),
        ]
        .join("\n");
        let lines = parse_requests(good.as_bytes(), chat).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[1].line, lines[1].custom_id.as_str()), (1, "b"));
        assert_eq!(lines[1].body, r#"{"stream":false}"#);
        // What a batch stores: the same requests, read one at a time from a checked file
        // (with a byte-order mark, CRLF line ends and a line of spaces).
        let marked = ["\u{feff}", &good.replace('\n', "\r\n"), "\r\n   \r\n"].concat();
        assert_eq!(check_requests(marked.as_bytes(), chat), Ok(2));
        let each = |l: &Line| (l.line, l.custom_id.clone(), l.url.clone(), l.body.clone());
        let stored: Vec<_> = requests(marked.as_bytes(), chat)
            .map(|l| each(&l))
            .collect();
        assert_eq!(stored, lines.iter().map(each).collect::<Vec<_>>());
        let bad = [
            line("a", chat, json!({})),
            "not json".to_string(),
            line("a", chat, json!({})),
            line("c", "/v1/embeddings", json!({})),
            line("d", chat, json!({"stream": true})),
            line("e", chat, json!("text")),
            json!({"custom_id": "f", "method": "GET", "url": chat, "body": {}}).to_string(),
            json!({"method": "POST", "url": chat, "body": {}}).to_string(),
        ]
        .join("\n");
        let errors = parse_requests(bad.as_bytes(), chat).unwrap_err();
        let got: Vec<(u64, &str)> = errors
            .iter()
            .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                (2, "invalid_json_line"),
                (3, "duplicate_custom_id"),
                (4, "mismatched_endpoint"),
                (5, "invalid_request"),
                (6, "missing_required_parameter"),
                (7, "invalid_method"),
                (8, "missing_required_parameter"),
            ]
        );
        let empty = parse_requests(b"\n\n", chat).unwrap_err();
        assert_eq!(empty[0]["code"], "empty_file");
        assert_eq!(
            parse_requests(b"\xff", chat).unwrap_err()[0]["code"],
            "invalid_file"
        );
        let many: String = (0..150).map(|_| "x\n").collect();
        let errors = parse_requests(many.as_bytes(), chat).unwrap_err();
        assert_eq!(errors.len(), MAX_ERRORS);
        let last = errors[MAX_ERRORS - 1]["message"].as_str().unwrap();
        assert!(last.ends_with("(and 50 more problems)"), "{last}");
        // Past the most requests a batch holds, reading stops there.
        let over: String = (0..=MAX_REQUESTS)
            .map(|i| line(&i.to_string(), chat, json!({})) + "\n")
            .collect();
        let errors = parse_requests(over.as_bytes(), chat).unwrap_err();
        assert_eq!(errors.len(), 1);
        let at = (errors[0]["code"].as_str(), errors[0]["line"].as_u64());
        assert_eq!(
            at,
            (Some("too_many_requests"), Some(MAX_REQUESTS as u64 + 1))
        );
        // A byte-order mark is not a line's text.
        let marked = format!("\u{feff}{}", line("m", chat, json!({})));
        assert_eq!(parse_requests(marked.as_bytes(), chat).unwrap().len(), 1);
        // `stream: null` is no stream.
        let null = line("n", chat, json!({"stream": null, "stream_options": null}));
        assert!(parse_requests(null.as_bytes(), chat).is_ok());
        // Stream options without a stream would fail when the line runs: refused here.
        let options = line(
            "o",
            chat,
            json!({"stream_options": {"include_usage": true}}),
        );
        let errors = parse_requests(options.as_bytes(), chat).unwrap_err();
        assert_eq!(errors[0]["code"], "invalid_request", "{errors:?}");
    }
}
