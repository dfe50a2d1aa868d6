//! Listing and deleting batches: a page of an owner's batches (newest first, from either
//! side of a cursor, of one endpoint if asked), and a finished batch deleted with its files.

use rusqlite::params;
use serde_json::Value;

use super::{
    cursor_named, parse, status_and_object, with_counts, Batches, GatewayError, Page, ACTIVE,
};

/// Which of an owner's batches a page holds.
#[derive(Debug, Clone, Copy)]
pub struct BatchQuery<'a> {
    /// Those older than this batch (the page after it, newest first).
    pub after: Option<&'a str>,
    /// Those newer than this batch (the page before it, still listed newest first).
    pub before: Option<&'a str>,
    /// Only the batches of this endpoint.
    pub endpoint: Option<&'a str>,
    pub limit: usize,
    /// The cursors' names, for an error about them: (after, before).
    pub names: (&'a str, &'a str),
}

impl Default for BatchQuery<'_> {
    fn default() -> Self {
        Self {
            after: None,
            before: None,
            endpoint: None,
            limit: 20,
            names: ("after", "before"),
        }
    }
}

/// What deleting a batch came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Deleted {
    Yes,
    /// The owner has no batch by that id.
    NoSuchBatch,
    /// It has not ended yet.
    Running,
}

impl Batches {
    /// A page of `owner`'s batches, newest first; `has_more`: more lie beyond it, in the
    /// direction it was taken (older after `after`, newer before `before`).
    pub fn batches(&self, owner: &str, q: &BatchQuery) -> Result<Page<Value>, GatewayError> {
        let conn = self.conn();
        let (cursor, newer) = match (q.after, q.before) {
            (_, Some(before)) => (
                cursor_named(&conn, "batches", q.names.1, owner, Some(before))?,
                true,
            ),
            (after, None) => (
                cursor_named(&conn, "batches", q.names.0, owner, after)?,
                false,
            ),
        };
        let sql = if newer {
            "SELECT object FROM batches WHERE owner = ?1 AND (created, rowid) > (?2, ?3)
               AND (?5 IS NULL OR json_extract(object, '$.endpoint') = ?5)
             ORDER BY created, rowid LIMIT ?4"
        } else {
            "SELECT object FROM batches WHERE owner = ?1 AND (created, rowid) < (?2, ?3)
               AND (?5 IS NULL OR json_extract(object, '$.endpoint') = ?5)
             ORDER BY created DESC, rowid DESC LIMIT ?4"
        };
        let mut rows: Vec<String> = {
            let mut stmt = conn.prepare(sql).map_err(GatewayError::db)?;
            let args = params![owner, cursor.0, cursor.1, q.limit as i64 + 1, q.endpoint];
            let rows = stmt
                .query_map(args, |r| r.get(0))
                .map_err(GatewayError::db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(GatewayError::db)?;
            rows
        };
        let has_more = rows.len() > q.limit;
        rows.truncate(q.limit);
        if newer {
            rows.reverse();
        }
        let items = rows
            .iter()
            .map(|s| with_counts(&conn, parse(s, "batch")?))
            .collect::<Result<_, _>>()?;
        Ok(Page { items, has_more })
    }

    /// Deletes `owner`'s batch `id` once it has ended, with its output and error files.
    pub fn delete_batch(&self, id: &str, owner: &str) -> Result<Deleted, GatewayError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(GatewayError::db)?;
        let row = status_and_object(&tx, id)?.filter(|(o, _, _)| o == owner);
        let Some((_, status, object)) = row else {
            return Ok(Deleted::NoSuchBatch);
        };
        if ACTIVE.contains(&status.as_str()) {
            return Ok(Deleted::Running);
        }
        let object = parse(&object, "batch")?;
        for field in ["output_file_id", "error_file_id"] {
            if let Some(file) = object[field].as_str() {
                tx.execute(
                    "DELETE FROM files WHERE id = ?1 AND owner = ?2",
                    params![file, owner],
                )
                .map_err(GatewayError::db)?;
                tx.execute("DELETE FROM file_expiry WHERE file_id = ?1", params![file])
                    .map_err(GatewayError::db)?;
            }
        }
        for sql in [
            "DELETE FROM batch_lines WHERE batch_id = ?1",
            "DELETE FROM batch_usage WHERE batch_id = ?1",
            "DELETE FROM batches WHERE id = ?1",
        ] {
            tx.execute(sql, params![id]).map_err(GatewayError::db)?;
        }
        tx.commit().map_err(GatewayError::db)?;
        Ok(Deleted::Yes)
    }
}
