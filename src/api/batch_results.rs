//! A batch's results read as a stream: its output file, then its error file, a part at a
//! time (as a download reads them), each whole line mapped to the line the client gets.
//! Memory stays at a part and a line, however large the files (a message batch's may hold
//! 100,000 replies).

use std::future::ready;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use futures_util::{stream, StreamExt};
use serde_json::Value;

use super::batches::{parts, result_files, store};
use super::error::ApiError;
use super::AppState;

/// The results of an ended batch (`object`, `owner`'s) as a body of JSON lines, each of
/// its files' lines through `map`: 409 for a batch that failed, 404 once its files have
/// expired or been deleted (a file deleted while it is read ends the body early).
pub(super) async fn result_body(
    state: Arc<AppState>,
    object: &Value,
    owner: String,
    map: fn(&Value) -> Value,
) -> Result<Body, ApiError> {
    let mut files = Vec::new();
    for file in result_files(object)? {
        let (key, o) = (file.clone(), owner.clone());
        let Some(meta) = store(&state, move |b| b.file(&key, &o)).await? else {
            let id = object["id"].as_str().unwrap_or_default();
            return Err(ApiError::not_found(format!(
                "The results of '{id}' have expired or were deleted."
            )));
        };
        files.push((file, meta.bytes.max(0) as usize));
    }
    // Each file ends a line (its last may have no newline of its own).
    let chunks = stream::iter(files).flat_map(move |(id, len)| {
        let end = stream::once(ready(Ok(Bytes::from_static(b"\n"))));
        parts(state.clone(), id, owner.clone(), len).chain(end)
    });
    let lines = chunks.scan(Vec::new(), move |carry, chunk| {
        ready(Some(chunk.map(|c| Bytes::from(take_lines(carry, &c, map)))))
    });
    Ok(Body::from_stream(lines))
}

/// Adds `chunk` to `carry` and maps the lines that are now whole; the cut one stays.
fn take_lines(carry: &mut Vec<u8>, chunk: &[u8], map: fn(&Value) -> Value) -> Vec<u8> {
    // Only the chunk is searched: a line of many chunks is not read again for each.
    let before = carry.len();
    carry.extend_from_slice(chunk);
    let Some(end) = chunk.iter().rposition(|&b| b == b'\n') else {
        return Vec::new();
    };
    let whole = before + end + 1;
    let rest = carry.split_off(whole);
    mapped(&std::mem::replace(carry, rest), map)
}

/// Each JSON line of `text` through `map`, newline-ended (lines that are not JSON skipped).
fn mapped(text: &[u8], map: fn(&Value) -> Value) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        if let Ok(v) = serde_json::from_slice::<Value>(line) {
            out.extend_from_slice(map(&v).to_string().as_bytes());
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{mapped, take_lines};
    use serde_json::{json, Value};

    fn tagged(v: &Value) -> Value {
        json!({"id": v["custom_id"], "seen": true})
    }

    #[test]
    fn lines_cut_across_chunks_come_out_whole_and_once() {
        let lines: Vec<String> = (0..40)
            .map(|i| json!({"custom_id": format!("r{i}"), "text": "é".repeat(i)}).to_string())
            .collect();
        // The last line has no newline, as a file may end.
        let file = lines.join("\n");
        let want = mapped(file.as_bytes(), tagged);
        assert_eq!(want.iter().filter(|&&b| b == b'\n').count(), 40);
        for size in [1, 2, 7, 64, 1000, file.len()] {
            let mut carry = Vec::new();
            let mut got = Vec::new();
            for chunk in file.as_bytes().chunks(size) {
                got.extend(take_lines(&mut carry, chunk, tagged));
            }
            got.extend(mapped(&carry, tagged));
            assert_eq!(got, want, "chunks of {size}");
        }
    }
}
