//! The Batch API's files: `POST /v1/files` (a JSONL upload, with an optional expiry and the
//! key's storage quota), listing, reading (streamed a chunk at a time) and deleting them.

use std::sync::Arc;

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::{ascending, limit_of, list, owner, store, ListQuery, MAX_FILE_BYTES, MAX_UPLOAD_BYTES};
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::gateway::batches::{NewFile, Page};
use crate::gateway::Principal;

/// A multipart error as the API's: 413 past the route's body limit, else a 400 about `what`
/// (naming field `param`, if any).
fn form_error(
    what: &'static str,
    param: Option<&'static str>,
) -> impl Fn(MultipartError) -> ApiError {
    move |e| match (e.status(), param) {
        (StatusCode::PAYLOAD_TOO_LARGE, _) => ApiError::payload_too_large(MAX_UPLOAD_BYTES),
        (_, Some(field)) => ApiError::invalid(field, format!("Cannot read {what}: {e}")),
        (_, None) => ApiError::bad_request(format!("Cannot read {what}: {e}")),
    }
}

/// What an upload's form holds.
#[derive(Debug, Default)]
struct Form {
    purpose: Option<String>,
    /// The file's name and bytes.
    file: Option<(String, Vec<u8>)>,
    /// `expires_after[anchor]` and `expires_after[seconds]`.
    anchor: Option<String>,
    seconds: Option<String>,
}

/// The form's fields. The file is read chunk by chunk into one buffer sized from `hint` (the
/// body's announced length), so the upload is held once.
async fn read_form(form: &mut Multipart, hint: usize) -> Result<Form, ApiError> {
    let mut out = Form::default();
    while let Some(mut field) = form
        .next_field()
        .await
        .map_err(form_error("the multipart form", None))?
    {
        let text = match field.name() {
            Some("purpose") => Some((&mut out.purpose, "purpose")),
            Some("expires_after[anchor]") => Some((&mut out.anchor, "expires_after[anchor]")),
            Some("expires_after[seconds]") => Some((&mut out.seconds, "expires_after[seconds]")),
            _ => None,
        };
        if let Some((slot, name)) = text {
            *slot = Some(field.text().await.map_err(form_error(name, Some(name)))?);
            continue;
        }
        if field.name() != Some("file") {
            continue;
        }
        let name = field.file_name().unwrap_or("upload.jsonl").to_string();
        let mut bytes = Vec::with_capacity(hint.min(MAX_FILE_BYTES + 1));
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(form_error("`file`", Some("file")))?
        {
            if bytes.len() + chunk.len() > MAX_FILE_BYTES {
                // A 413 as the body limit's, naming the field.
                return Err(ApiError {
                    message: format!("`file` is larger than {MAX_FILE_BYTES} bytes"),
                    param: Some("file".into()),
                    ..ApiError::payload_too_large(MAX_FILE_BYTES)
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        out.file = Some((name, bytes));
    }
    Ok(out)
}

/// `POST /v1/files` (multipart: `purpose` and `file`). The body arrives as it is read (the
/// body guard lets it through unbuffered), within the upload's time.
pub async fn upload(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut form = form.map_err(|e| {
        ApiError::bad_request(format!(
            "Send the file as multipart/form-data with fields `purpose` and `file`: {e}"
        ))
    })?;
    let hint = (headers.get(header::CONTENT_LENGTH))
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(0);
    let owner = owner(&who);
    let quota = state.batch.file_storage_per_key;
    let limit = state
        .body_limits
        .read_timeout
        .max(crate::api::body::UPLOAD_READ_TIMEOUT);
    // A file announced larger than the key may still store is refused before it is held:
    // a client that waits for `100 Continue` sends nothing more, one already sending has
    // its body read and dropped, so it reads the refusal (not a broken pipe).
    if let Some(quota) = quota.filter(|_| hint > 0) {
        let o = owner.clone();
        let used = store(&state, move |b| b.storage_used(&o)).await?;
        if used.saturating_add(hint as u64) > quota.saturating_add(FORM_OVERHEAD) {
            let expects = headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if !expects {
                let _ = tokio::time::timeout(limit, discard(&mut form)).await;
            }
            return Err(ApiError::invalid(
                "file",
                format!("the upload ({hint} bytes) does not fit: this key's files and running batches hold {used} of the {quota} bytes it may store (`--file-storage-per-key`)"),
            ));
        }
    }
    // Uploads are held whole before they are stored: a few at once, the rest wait (the wait
    // is not the upload's time).
    let _slot = UPLOADS.acquire().await;
    let form = tokio::time::timeout(limit, read_form(&mut form, hint))
        .await
        .map_err(|_| ApiError::body_timeout(limit))??;
    match form.purpose.as_deref() {
        Some("batch") => {}
        Some(p) => {
            return Err(ApiError::invalid(
                "purpose",
                format!(
                    "`purpose` '{p}' is not supported: this server takes files for `batch` only"
                ),
            ))
        }
        None => return Err(ApiError::invalid("purpose", "`purpose` is required")),
    }
    let seconds = match form.seconds.as_deref().map(str::trim) {
        None => None,
        Some(s) => Some(s.parse::<i64>().map_err(|_| {
            ApiError::invalid(
                "expires_after.seconds",
                format!("`expires_after.seconds` must be a whole number, not '{s}'"),
            )
        })?),
    };
    let expires_after = expiry(form.anchor.as_deref(), seconds, "expires_after")?;
    let Some((name, bytes)) = form.file else {
        return Err(ApiError::invalid("file", "`file` is required"));
    };
    if bytes.is_empty() {
        return Err(ApiError::invalid("file", "`file` is empty"));
    }
    let meta = store(&state, move |b| {
        let file = NewFile {
            purpose: "batch",
            filename: &name,
            // OpenAI's default for batch input.
            expires_after: Some(expires_after.unwrap_or(MAX_EXPIRY_SECS)),
        };
        b.put_file(&owner, file, &bytes, quota)
    })
    .await?;
    Ok(Json(meta.object()))
}

/// Uploads read at once (each up to `MAX_FILE_BYTES` in memory until it is stored).
static UPLOADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// What a multipart body holds besides the file (boundaries, headers, the other fields).
const FORM_OVERHEAD: u64 = 64 << 10;

/// Reads the rest of a refused upload, keeping none of it.
async fn discard(form: &mut Multipart) {
    while let Ok(Some(mut field)) = form.next_field().await {
        while let Ok(Some(_)) = field.chunk().await {}
    }
}

/// The shortest and longest expiry a file may be given (OpenAI's: an hour, 30 days).
const MIN_EXPIRY_SECS: i64 = 3_600;
pub(super) const MAX_EXPIRY_SECS: i64 = 2_592_000;

/// An expiry policy's seconds after the file's creation (`param`: `expires_after` or
/// `output_expires_after`); `None` when neither part is given.
pub(super) fn expiry(
    anchor: Option<&str>,
    seconds: Option<i64>,
    param: &str,
) -> Result<Option<i64>, ApiError> {
    match (anchor, seconds) {
        (None, None) => Ok(None),
        (Some("created_at"), Some(s)) if (MIN_EXPIRY_SECS..=MAX_EXPIRY_SECS).contains(&s) => {
            Ok(Some(s))
        }
        (Some("created_at"), Some(s)) => Err(ApiError::invalid(
            format!("{param}.seconds"),
            format!("`{param}.seconds` must be from {MIN_EXPIRY_SECS} (an hour) to {MAX_EXPIRY_SECS} (30 days), not {s}"),
        )),
        (Some("created_at"), None) => Err(ApiError::invalid(
            format!("{param}.seconds"),
            format!("`{param}.seconds` is required"),
        )),
        (Some(a), _) => Err(ApiError::invalid(
            format!("{param}.anchor"),
            format!("`{param}.anchor` must be 'created_at', not '{a}'"),
        )),
        (None, Some(_)) => Err(ApiError::invalid(
            format!("{param}.anchor"),
            format!("`{param}.anchor` is required (`created_at`)"),
        )),
    }
}

/// `GET /v1/files` (`purpose`, `after`, `limit` up to 10,000, `order`: `desc`, newest first,
/// or `asc`).
pub async fn files(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = limit_of(&q, 10_000, 10_000)?;
    let owner = owner(&who);
    let ascending = ascending(&q)?;
    let page = store(&state, move |b| {
        let (purpose, after) = (q.purpose.as_deref(), q.after.as_deref());
        b.files(&owner, purpose, after, limit, ascending)
    })
    .await?;
    Ok(list(Page {
        items: page.items.iter().map(|f| f.object()).collect(),
        has_more: page.has_more,
    }))
}

fn no_file(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}"))
}

/// `GET /v1/files/{id}`.
pub async fn file(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (owner, key) = (owner(&who), id.clone());
    store(&state, move |b| b.file(&key, &owner))
        .await?
        .map(|f| Json(f.object()))
        .ok_or_else(|| no_file(&id))
}

/// A download reads its file from the store in this many parts at most, of at least
/// [`MIN_DOWNLOAD_PART`] bytes. Each read of a part walks the blob's overflow pages from its
/// start (SQLite keeps no position between reads), so the walking grows with the parts times
/// the file: 16 parts of a 190 MiB file take about 0.5 s more than one read, 1 MiB parts 5 s.
const DOWNLOAD_PARTS: usize = 16;
const MIN_DOWNLOAD_PART: usize = 1 << 20;

/// `GET /v1/files/{id}/content`: the file's bytes, read from the store a part at a time as
/// the client takes them (so a large file is never held whole, only a sixteenth of it). A
/// file deleted during its download ends the body short of its `Content-Length`, which
/// clients see as an error.
pub async fn file_content(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (owner, key) = (owner(&who), id.clone());
    let meta = store(&state, move |b| b.file(&key, &owner))
        .await?
        .ok_or_else(|| no_file(&id))?;
    let len = meta.bytes.max(0) as usize;
    let chunks = parts(state, id, self::owner(&who), len);
    Ok((
        [
            (header::CONTENT_TYPE, "application/jsonl".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

/// File `id`'s `len` bytes as a stream of parts read from the store one at a time (the
/// store is free between them); a file deleted meanwhile ends it with an error.
pub(in crate::api) fn parts(
    state: Arc<AppState>,
    id: String,
    owner: String,
    len: usize,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    let part = len.div_ceil(DOWNLOAD_PARTS).max(MIN_DOWNLOAD_PART);
    futures_util::stream::try_unfold(0usize, move |offset| {
        let (state, owner, id) = (state.clone(), owner.clone(), id.clone());
        async move {
            if offset >= len {
                return Ok(None);
            }
            let file = id.clone();
            let read = store(&state, move |b| b.file_chunk(&file, &owner, offset, part)).await;
            match read {
                Ok(Some(chunk)) if !chunk.is_empty() => {
                    let next = offset + chunk.len();
                    Ok(Some((axum::body::Bytes::from(chunk), next)))
                }
                Ok(_) => {
                    tracing::warn!(file = %id, offset, "a file was deleted during its download");
                    Err(std::io::Error::other(
                        "the file was deleted during its download",
                    ))
                }
                Err(e) => {
                    tracing::warn!(file = %id, offset, error = %e.message, "a file's download failed");
                    Err(std::io::Error::other(e.message))
                }
            }
        }
    })
}

/// `DELETE /v1/files/{id}`.
pub async fn delete_file(
    State(state): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (owner, key) = (owner(&who), id.clone());
    if !store(&state, move |b| b.delete_file(&key, &owner)).await? {
        return Err(no_file(&id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::extract::{FromRequest, Multipart, Request};
    use axum::http::StatusCode;

    use super::read_form;

    fn form(fields: &[(&str, &[u8])]) -> Multipart {
        let mut body = Vec::new();
        for (name, content) in fields {
            let head = format!(
                "--XB\r\ncontent-disposition: form-data; name=\"{name}\"; filename=\"f\"\r\n\r\n"
            );
            body.extend_from_slice(head.as_bytes());
            body.extend_from_slice(content);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--XB--\r\n");
        let req = Request::post("/v1/files")
            .header("content-type", "multipart/form-data; boundary=XB")
            .body(Body::from_stream(in_pieces(body)))
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(Multipart::from_request(req, &())).unwrap()
    }

    /// The body in 64 KiB pieces, as a network would bring it.
    fn in_pieces(
        body: Vec<u8>,
    ) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
        let pieces: Vec<_> = body.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
        futures_util::stream::iter(pieces)
    }

    #[test]
    fn a_form_arriving_in_pieces_is_read_whole_and_an_oversized_one_is_a_413() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let file: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut f = form(&[("purpose", b"batch"), ("file", &file)]);
        let got = rt.block_on(read_form(&mut f, 0)).unwrap();
        assert_eq!(got.purpose.as_deref(), Some("batch"));
        assert_eq!(got.file.map(|(_, b)| b), Some(file));
        // Past the body limit (axum's default of 2 MiB here; the route sets a batch file's).
        let mut f = form(&[("junk", &vec![b'x'; 3 << 20]), ("purpose", b"batch")]);
        let e = rt.block_on(read_form(&mut f, 0)).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
