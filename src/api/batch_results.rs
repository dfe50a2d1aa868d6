//! A batch's results read as a stream: its output file, then its error file, a chunk at a
//! time, each whole line mapped to the line the client gets. Memory stays at a chunk and a
//! line, however large the files (a message batch's may hold 100,000 replies).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use serde_json::Value;

use super::batches::{result_files, store};
use super::error::ApiError;
use super::AppState;

/// Bytes read from the store at a time.
const CHUNK: usize = 1 << 20;

/// Where the stream is: the files left (id, size), the offset in the first, and the start
/// of a line the last chunk cut.
struct Reading {
    state: Arc<AppState>,
    owner: String,
    files: Vec<(String, usize)>,
    offset: usize,
    carry: Vec<u8>,
    map: fn(&Value) -> Value,
}

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
    let reading = Reading {
        state,
        owner,
        files,
        offset: 0,
        carry: Vec::new(),
        map,
    };
    Ok(Body::from_stream(futures_util::stream::try_unfold(
        reading, next,
    )))
}

/// The next piece of the body: the lines a chunk completes (empty when it completes none).
async fn next(mut r: Reading) -> Result<Option<(Bytes, Reading)>, std::io::Error> {
    let Some((file, size)) = r.files.first().cloned() else {
        return Ok(None);
    };
    if r.offset >= size {
        // The file's last line may have no newline.
        let last = std::mem::take(&mut r.carry);
        r.files.remove(0);
        r.offset = 0;
        return Ok(Some((Bytes::from(mapped(&last, r.map)), r)));
    }
    let (id, owner, at) = (file.clone(), r.owner.clone(), r.offset);
    let chunk = store(&r.state, move |b| b.file_chunk(&id, &owner, at, CHUNK)).await;
    let chunk = match chunk {
        Ok(Some(chunk)) if !chunk.is_empty() => chunk,
        Ok(_) => {
            tracing::warn!(file = %file, "a batch's results were deleted while read");
            return Err(std::io::Error::other("the results were deleted while read"));
        }
        Err(e) => {
            tracing::warn!(file = %file, error = %e.message, "reading a batch's results failed");
            return Err(std::io::Error::other(e.message));
        }
    };
    r.offset += chunk.len();
    let out = take_lines(&mut r.carry, &chunk, r.map);
    Ok(Some((Bytes::from(out), r)))
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
