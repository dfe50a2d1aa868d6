//! Files and batches of OpenAI's Batch API: uploaded JSONL files, the batches made of them,
//! each batch's requests one row apiece (with its result once run), and the output and error
//! files a finished batch leaves. Everything belongs to the key that made it (`owner`: the key
//! id, `(master)` for the master key, `''` without a key); another owner sees nothing. A
//! batch's request rows hold prompt text only until it ends: then they are deleted (and
//! overwritten: this connection deletes securely) and only the files remain (until deleted,
//! or until they expire: a file may carry an expiry time, past which readers no longer see
//! it and [`Batches::delete_expired`] deletes it).
//! Knows rows and JSON; never HTTP or the engine.

use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

use super::GatewayError;

/// The most a stored file may hold (SQLite's blobs stop at 1,000,000,000 bytes).
pub const MAX_STORED_BYTES: usize = 900_000_000;

/// Statuses a batch still has work in (the worker's).
pub const ACTIVE: [&str; 3] = ["in_progress", "finalizing", "cancelling"];

pub struct Batches {
    conn: Mutex<Connection>,
}

/// One file's metadata, as OpenAI's file object.
#[derive(Debug, Clone)]
pub struct FileMeta {
    pub id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub created: i64,
    /// Unix seconds; `None`: kept until deleted.
    pub expires_at: Option<i64>,
}

impl FileMeta {
    pub fn object(&self) -> Value {
        json!({
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created,
            "filename": self.filename, "purpose": self.purpose, "status": "processed",
            "status_details": null, "expires_at": self.expires_at,
        })
    }
}

/// A batch the worker should look at: its id, who made it, and its object.
#[derive(Debug, Clone)]
pub struct ActiveBatch {
    pub id: String,
    pub owner_kind: String,
    pub owner: String,
    pub object: Value,
}

/// One request of a batch, waiting to run.
#[derive(Debug, Clone)]
pub struct Line {
    pub line: i64,
    pub custom_id: String,
    pub url: String,
    /// The request's body: a JSON object's text.
    pub body: String,
}

/// One page of a list, newest first.
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

fn random_hex(n: usize) -> String {
    use rand::Rng;
    let mut r = rand::thread_rng();
    (0..n)
        .map(|_| char::from_digit(r.gen_range(0..16), 16).unwrap_or('0'))
        .collect()
}

/// A new id with this prefix (`file-`, `batch_`, `batch_req_`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", random_hex(32))
}

/// A stored JSON object (anything else is corruption).
fn parse(s: &str, what: &str) -> Result<Value, GatewayError> {
    match serde_json::from_str(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(GatewayError::Db(format!(
            "a stored {what} is not an object"
        ))),
        Err(e) => Err(GatewayError::Db(format!("a stored {what} is corrupt: {e}"))),
    }
}

impl Batches {
    pub fn new(conn: Connection) -> Result<Self, GatewayError> {
        // Deleted files and request rows are overwritten, not left in free pages.
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(GatewayError::db)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a new batch and its requests in one transaction.
    pub fn create(
        &self,
        owner_kind: &str,
        owner: &str,
        object: &Value,
        lines: impl IntoIterator<Item = Line>,
    ) -> Result<(), GatewayError> {
        self.create_held(owner_kind, owner, object, lines, None)
    }

    /// Stores a batch: its requests (and then their answers) are held until it ends, so they
    /// count against the owner's storage quota with its files (see `used_by`). With `quota`,
    /// checked in the writing transaction, as an upload's is.
    pub fn create_held(
        &self,
        owner_kind: &str,
        owner: &str,
        object: &Value,
        lines: impl IntoIterator<Item = Line>,
        quota: Option<Quota<'_>>,
    ) -> Result<(), GatewayError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(GatewayError::db)?;
        // Measured after the insert, in the same transaction (dropped uncommitted if it does
        // not fit): a batch made from a stored file counts only past the file, which `used`
        // already holds.
        let quota = quota.filter(|q| q.bytes > 0);
        let now = super::db::unix_now();
        let before = match quota {
            Some(_) => files::used_by(&tx, owner, now)?,
            None => 0,
        };
        insert_batch(&tx, owner_kind, owner, object, lines)?;
        if let Some(q) = quota {
            let after = files::used_by(&tx, owner, now)?;
            if after > q.limit && after > before {
                return Err(GatewayError::Invalid {
                    field: q.field.into(),
                    reason: format!("({} bytes of requests) does not fit: this key's files and running batches hold {before} of the {} bytes it may store (`--file-storage-per-key`), {after} with it", q.bytes, q.limit),
                });
            }
        }
        tx.commit().map_err(GatewayError::db)
    }
}

/// A new batch's share of its owner's storage: `bytes` of requests against `limit`, the
/// refusal naming `field`. (A batch made from a file counts only past the file itself.)
#[derive(Debug, Clone, Copy)]
pub struct Quota<'a> {
    pub limit: u64,
    pub bytes: u64,
    pub field: &'a str,
}

/// A new batch's row and its requests', in `tx`.
fn insert_batch(
    tx: &Connection,
    owner_kind: &str,
    owner: &str,
    object: &Value,
    lines: impl IntoIterator<Item = Line>,
) -> Result<(), GatewayError> {
    {
        let id = object["id"].as_str().unwrap_or_default();
        tx.execute(
            "INSERT INTO batches (id, owner_kind, owner, created, status, object)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                id,
                owner_kind,
                owner,
                object["created_at"].as_i64().unwrap_or_default(),
                object["status"].as_str().unwrap_or_default(),
                object.to_string()
            ],
        )
        .map_err(GatewayError::db)?;
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO batch_lines (batch_id, line, custom_id, url, body)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(GatewayError::db)?;
            for l in lines {
                insert
                    .execute(params![id, l.line, l.custom_id, l.url, l.body])
                    .map_err(GatewayError::db)?;
            }
        }
    }
    Ok(())
}

impl Batches {
    /// The batch `id` if `owner` made it, its request counts current.
    pub fn batch(&self, id: &str, owner: &str) -> Result<Option<Value>, GatewayError> {
        let conn = self.conn();
        let row: Option<String> = conn
            .query_row(
                "SELECT object FROM batches WHERE id = ?1 AND owner = ?2",
                params![id, owner],
                |r| r.get(0),
            )
            .optional()
            .map_err(GatewayError::db)?;
        row.map(|s| with_counts(&conn, parse(&s, "batch")?))
            .transpose()
    }

    /// Replaces a batch's object (its status with it) if its status is still `expect`;
    /// whether it was.
    pub fn save(&self, object: &Value, expect: &str) -> Result<bool, GatewayError> {
        let n = self
            .conn()
            .execute(
                "UPDATE batches SET status = ?2, object = ?3 WHERE id = ?1 AND status = ?4",
                params![
                    object["id"].as_str().unwrap_or_default(),
                    object["status"].as_str().unwrap_or_default(),
                    object.to_string(),
                    expect
                ],
            )
            .map_err(GatewayError::db)?;
        Ok(n > 0)
    }

    /// Batches with work left, oldest first.
    pub fn active(&self) -> Result<Vec<ActiveBatch>, GatewayError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, owner_kind, owner, object FROM batches
                 WHERE status IN (?1, ?2, ?3) ORDER BY created, rowid",
            )
            .map_err(GatewayError::db)?;
        let rows = stmt
            .query_map(params![ACTIVE[0], ACTIVE[1], ACTIVE[2]], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, String>(3)?))
            })
            .map_err(GatewayError::db)?
            .collect::<Result<Vec<(String, String, String, String)>, _>>()
            .map_err(GatewayError::db)?;
        rows.into_iter()
            .map(|(id, owner_kind, owner, object)| {
                Ok(ActiveBatch {
                    id,
                    owner_kind,
                    owner,
                    object: parse(&object, "batch")?,
                })
            })
            .collect()
    }

    /// Ends a batch whose status is still `expect`, in one transaction: `build` turns its
    /// requests' results into the output and error files (and sets the object's status and
    /// counts), the files are stored, the object saved, its request rows (prompt text)
    /// deleted. Whether it was still `expect`.
    pub fn conclude(
        &self,
        owner: &str,
        object: &mut Value,
        expect: &str,
        build: impl FnOnce(&Results, &mut Value) -> Result<(Vec<u8>, Vec<u8>), GatewayError>,
    ) -> Result<bool, GatewayError> {
        let now = super::db::unix_now();
        let mut conn = self.conn();
        // Immediate: the write lock first, so no other writer's commit (the ledger's) can
        // invalidate this transaction's reads before it writes.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(GatewayError::db)?;
        let id = object["id"].as_str().unwrap_or_default().to_string();
        let status: Option<String> = tx
            .query_row(
                "SELECT status FROM batches WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(GatewayError::db)?;
        if status.as_deref() != Some(expect) {
            return Ok(false);
        }
        let (output, errors) = build(&results_of(&tx, &id)?, object)?;
        object["usage"] = usage_of(&tx, &id)?;
        for (content, field, name) in [
            (&output, "output_file_id", "output"),
            (&errors, "error_file_id", "errors"),
        ] {
            if content.len() > MAX_STORED_BYTES {
                return Err(GatewayError::Invalid {
                    field: "batch".into(),
                    reason: format!(
                        "its {name} file would be {} bytes, over the {MAX_STORED_BYTES} a file may hold; split the work into smaller batches",
                        content.len()
                    ),
                });
            }
            if content.is_empty() {
                continue;
            }
            let file = FileMeta {
                id: new_id("file-"),
                purpose: "batch_output".into(),
                filename: format!("{id}_{name}.jsonl"),
                bytes: content.len() as i64,
                created: now,
                expires_at: object["output_expires_after"]["seconds"]
                    .as_i64()
                    .map(|s| now + s),
            };
            insert_file(&tx, &file, owner, content)?;
            object[field] = Value::from(file.id);
        }
        tx.execute(
            "UPDATE batches SET status = ?2, object = ?3 WHERE id = ?1",
            params![
                id,
                object["status"].as_str().unwrap_or_default(),
                object.to_string()
            ],
        )
        .map_err(GatewayError::db)?;
        forget_lines(&tx, &id)?;
        tx.commit().map_err(GatewayError::db)?;
        Ok(true)
    }
}

impl Batches {
    /// Ends a batch with work left as `failed`, saying why, and deletes its request rows;
    /// false if it had already ended.
    pub fn fail(&self, id: &str, message: &str) -> Result<bool, GatewayError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(GatewayError::db)?;
        let row = status_and_object(&tx, id)?;
        let Some((_, status, object)) = row.filter(|(_, s, _)| ACTIVE.contains(&s.as_str())) else {
            return Ok(false);
        };
        let mut object = with_counts(&tx, parse(&object, "batch")?)?;
        object["status"] = "failed".into();
        object["failed_at"] = super::db::unix_now().into();
        object["errors"] = json!({"object": "list", "data": [
            {"code": "batch_failed", "message": message, "param": null, "line": null}]});
        tx.execute(
            "UPDATE batches SET status = 'failed', object = ?2 WHERE id = ?1 AND status = ?3",
            params![id, object.to_string(), status],
        )
        .map_err(GatewayError::db)?;
        forget_lines(&tx, id)?;
        tx.commit().map_err(GatewayError::db)?;
        Ok(true)
    }
}

/// Batch `id`'s (owner, status, object text), if there is one.
fn status_and_object(
    conn: &Connection,
    id: &str,
) -> Result<Option<(String, String, String)>, GatewayError> {
    conn.query_row(
        "SELECT owner, status, object FROM batches WHERE id = ?1",
        params![id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .map_err(GatewayError::db)
}

/// Every request's (custom id, its result if it has one) in file order.
/// Each result is its output line as stored (JSON text).
pub type Results = Vec<(String, Option<(bool, String)>)>;

fn results_of(conn: &Connection, batch_id: &str) -> Result<Results, GatewayError> {
    let mut stmt = conn
        .prepare("SELECT custom_id, ok, result FROM batch_lines WHERE batch_id = ?1 ORDER BY line")
        .map_err(GatewayError::db)?;
    let rows = stmt
        .query_map(params![batch_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<bool>>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })
        .map_err(GatewayError::db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(GatewayError::db)?;
    let results = rows
        .into_iter()
        .map(|(custom_id, ok, result)| match (ok, result) {
            (Some(ok), Some(r)) => (custom_id, Some((ok, r))),
            _ => (custom_id, None),
        });
    Ok(results.collect())
}

/// The (created, rowid) a list continues below: the `after` row's, or past everything.
/// The (created, rowid) position of `owner`'s row `id` in `table`, for a cursor given as
/// `field`; past every row when there is none.
fn cursor_named(
    conn: &Connection,
    table: &str,
    field: &str,
    owner: &str,
    id: Option<&str>,
) -> Result<(i64, i64), GatewayError> {
    let Some(after) = id else {
        return Ok((i64::MAX, i64::MAX));
    };
    conn.query_row(
        &format!("SELECT created, rowid FROM {table} WHERE id = ?1 AND owner = ?2"),
        params![after, owner],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .map_err(GatewayError::db)?
    .ok_or_else(|| GatewayError::Invalid {
        field: field.into(),
        reason: format!(
            "names no {} of yours: '{after}'",
            if table == "batches" { "batch" } else { "file" }
        ),
    })
}

/// Batch `id`'s usage so far, as OpenAI's batch object gives it.
fn usage_of(conn: &Connection, id: &str) -> Result<Value, GatewayError> {
    let [input, cached, output, reasoning] = conn
        .query_row(
            "SELECT input, cached, output, reasoning FROM batch_usage WHERE batch_id = ?1",
            params![id],
            |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?]),
        )
        .optional()
        .map_err(GatewayError::db)?
        .unwrap_or([0i64; 4]);
    Ok(json!({
        "input_tokens": input, "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input + output,
    }))
}

/// Deletes an ended batch's request rows (its prompts) and running usage.
fn forget_lines(conn: &Connection, id: &str) -> Result<(), GatewayError> {
    conn.execute("DELETE FROM batch_lines WHERE batch_id = ?1", params![id])
        .map_err(GatewayError::db)?;
    conn.execute("DELETE FROM batch_usage WHERE batch_id = ?1", params![id])
        .map_err(GatewayError::db)?;
    Ok(())
}

/// A batch still running gets its request counts and usage from its rows.
fn with_counts(conn: &Connection, mut object: Value) -> Result<Value, GatewayError> {
    let status = object["status"].as_str().unwrap_or_default();
    if !ACTIVE.contains(&status) {
        return Ok(object);
    }
    let (total, completed, failed): (i64, i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(ok = 1), 0), COALESCE(SUM(ok = 0), 0)
             FROM batch_lines WHERE batch_id = ?1",
            params![object["id"].as_str().unwrap_or_default()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(GatewayError::db)?;
    object["request_counts"] = json!({"total": total, "completed": completed, "failed": failed});
    object["usage"] = usage_of(conn, object["id"].as_str().unwrap_or_default())?;
    Ok(object)
}

#[path = "batch_files.rs"]
mod files;
#[path = "batch_lines.rs"]
mod lines;
#[path = "batch_list.rs"]
mod list;
use files::insert_file;
pub use files::NewFile;
pub use list::{BatchQuery, Deleted};

#[cfg(test)]
#[path = "batches_tests.rs"]
mod tests;
