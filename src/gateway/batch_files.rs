//! The Batch API's stored files: uploads and the output and error files of finished
//! batches, their content written and read through SQLite's incremental blob I/O.

use rusqlite::blob::ZeroBlob;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior, MAIN_DB};

use super::{cursor_named, new_id, Batches, FileMeta, GatewayError, Page};

const FILE_COLUMNS: &str = "id, purpose, filename, bytes, created,
    (SELECT e.expires_at FROM file_expiry e WHERE e.file_id = files.id)";

/// A file that has not expired by `now` (an SQL parameter). An expired file is gone to every
/// reader the moment it expires, before [`Batches::delete_expired`] deletes it.
fn live(now: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM file_expiry e WHERE e.file_id = files.id AND e.expires_at <= {now})"
    )
}

/// The bytes `owner`'s files live at `now` hold, and what its running batches hold until
/// they end: their answers so far, the requests of those made from a request's body, and
/// for those made from files, their copies past the size of the files still stored that
/// they came from (one file may start many batches; a file is its requests and a little).
pub(super) fn used_by(conn: &Connection, owner: &str, now: i64) -> Result<u64, GatewayError> {
    let live = live("?2");
    let used: i64 = conn
        .query_row(
            &format!(
                "SELECT (SELECT COALESCE(SUM(bytes), 0) FROM files WHERE owner = ?1 AND {live})
                  + (SELECT COALESCE(SUM(COALESCE(length(CAST(l.result AS BLOB)), 0)), 0)
                     FROM batch_lines l JOIN batches b ON b.id = l.batch_id WHERE b.owner = ?1)
                  + (SELECT COALESCE(SUM(length(CAST(l.body AS BLOB))), 0)
                     FROM batch_lines l JOIN batches b ON b.id = l.batch_id
                     WHERE b.owner = ?1 AND json_extract(b.object, '$.input_file_id') IS NULL)
                  + MAX(0,
                      (SELECT COALESCE(SUM(length(CAST(l.body AS BLOB))), 0)
                       FROM batch_lines l JOIN batches b ON b.id = l.batch_id
                       WHERE b.owner = ?1
                         AND json_extract(b.object, '$.input_file_id') IS NOT NULL)
                    - (SELECT COALESCE(SUM(bytes), 0) FROM files
                       WHERE owner = ?1 AND {live} AND id IN (
                         SELECT json_extract(b.object, '$.input_file_id') FROM batches b
                         WHERE b.owner = ?1
                           AND EXISTS (SELECT 1 FROM batch_lines l WHERE l.batch_id = b.id))))"
            ),
            params![owner, now],
            |r| r.get(0),
        )
        .map_err(GatewayError::db)?;
    Ok(used.max(0) as u64)
}

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileMeta> {
    Ok(FileMeta {
        id: r.get(0)?,
        purpose: r.get(1)?,
        filename: r.get(2)?,
        bytes: r.get(3)?,
        created: r.get(4)?,
        expires_at: r.get(5)?,
    })
}

/// A file to store: what it is for, its name, and how long after its creation it expires
/// (`None`: kept until deleted).
pub struct NewFile<'a> {
    pub purpose: &'a str,
    pub filename: &'a str,
    pub expires_after: Option<i64>,
}

impl Batches {
    /// Stores a file; its metadata. With `quota`, a file that would bring its owner's live
    /// files past that many bytes is refused (checked in the writing transaction, so two
    /// uploads cannot both squeeze under it).
    pub fn put_file(
        &self,
        owner: &str,
        file: NewFile<'_>,
        content: &[u8],
        quota: Option<u64>,
    ) -> Result<FileMeta, GatewayError> {
        let created = crate::gateway::db::unix_now();
        let meta = FileMeta {
            id: new_id("file-"),
            purpose: file.purpose.to_string(),
            filename: file.filename.to_string(),
            bytes: content.len() as i64,
            created,
            expires_at: file.expires_after.map(|s| created + s),
        };
        let conn = self.conn();
        let tx = Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)
            .map_err(GatewayError::db)?;
        if let Some(quota) = quota {
            let used = used_by(&tx, owner, created)?;
            if used + content.len() as u64 > quota {
                return Err(GatewayError::Invalid {
                    field: "file".into(),
                    reason: format!(
                        "({} bytes) does not fit: this key's files hold {used} of the {quota} bytes it may store (`--file-storage-per-key`); delete files it no longer needs",
                        content.len()
                    ),
                });
            }
        }
        insert_file(&tx, &meta, owner, content)?;
        tx.commit().map_err(GatewayError::db)?;
        Ok(meta)
    }

    /// The bytes `owner`'s live files hold.
    pub fn storage_used(&self, owner: &str) -> Result<u64, GatewayError> {
        used_by(&self.conn(), owner, crate::gateway::db::unix_now())
    }

    pub fn file(&self, id: &str, owner: &str) -> Result<Option<FileMeta>, GatewayError> {
        self.conn()
            .query_row(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM files WHERE id = ?1 AND owner = ?2 AND {}",
                    live("?3")
                ),
                params![id, owner, crate::gateway::db::unix_now()],
                file_row,
            )
            .optional()
            .map_err(GatewayError::db)
    }

    /// A live file's whole content.
    pub fn file_content(&self, id: &str, owner: &str) -> Result<Option<Vec<u8>>, GatewayError> {
        self.file_range(id, owner, 0, usize::MAX, true)
    }

    /// Up to `len` bytes of file `id` from `offset` (fewer at its end), whether or not it
    /// has expired since (a download under way finishes unless the file is deleted); `None`
    /// once the file is gone.
    pub fn file_chunk(
        &self,
        id: &str,
        owner: &str,
        offset: usize,
        len: usize,
    ) -> Result<Option<Vec<u8>>, GatewayError> {
        self.file_range(id, owner, offset, len, false)
    }

    fn file_range(
        &self,
        id: &str,
        owner: &str,
        offset: usize,
        len: usize,
        only_live: bool,
    ) -> Result<Option<Vec<u8>>, GatewayError> {
        let conn = self.conn();
        // One read transaction: the row cannot go (nor its rowid pass to another) between
        // finding it and reading it.
        let tx = conn.unchecked_transaction().map_err(GatewayError::db)?;
        let now = if only_live {
            crate::gateway::db::unix_now()
        } else {
            i64::MIN
        };
        let row: Option<i64> = tx
            .query_row(
                &format!(
                    "SELECT rowid FROM files WHERE id = ?1 AND owner = ?2 AND {}",
                    live("?3")
                ),
                params![id, owner, now],
                |r| r.get(0),
            )
            .optional()
            .map_err(GatewayError::db)?;
        let Some(row) = row else {
            return Ok(None);
        };
        // Read straight into one buffer (a column read would copy it twice).
        let blob =
            (tx.blob_open(MAIN_DB, c"files", c"content", row, true)).map_err(GatewayError::db)?;
        let start = offset.min(blob.len());
        let mut content = vec![0; len.min(blob.len() - start)];
        blob.read_at_exact(&mut content, start)
            .map_err(GatewayError::db)?;
        drop(blob);
        tx.finish().map_err(GatewayError::db)?;
        Ok(Some(content))
    }

    /// Deletes up to `limit` of the files that have expired by `now` (overwritten:
    /// `secure_delete`), soonest expired first; how many. A bounded transaction, so a sweep
    /// of many large files does not hold the store's write lock for long.
    pub fn delete_expired(&self, now: i64, limit: usize) -> Result<usize, GatewayError> {
        let conn = self.conn();
        // Immediate: the write lock first, so no other writer's commit can void the read.
        let tx = Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)
            .map_err(GatewayError::db)?;
        let ids: Vec<String> = {
            let mut stmt = tx
                .prepare(
                    "SELECT file_id FROM file_expiry WHERE expires_at <= ?1
                     ORDER BY expires_at LIMIT ?2",
                )
                .map_err(GatewayError::db)?;
            let ids = stmt
                .query_map(params![now, limit as i64], |r| r.get(0))
                .map_err(GatewayError::db)?
                .collect::<Result<_, _>>()
                .map_err(GatewayError::db)?;
            ids
        };
        for id in &ids {
            tx.execute("DELETE FROM files WHERE id = ?1", params![id])
                .map_err(GatewayError::db)?;
            forget_expiry(&tx, id)?;
        }
        tx.commit().map_err(GatewayError::db)?;
        Ok(ids.len())
    }

    /// Deletes a file; false if `owner` has none by that id.
    pub fn delete_file(&self, id: &str, owner: &str) -> Result<bool, GatewayError> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(GatewayError::db)?;
        let n = tx
            .execute(
                &format!(
                    "DELETE FROM files WHERE id = ?1 AND owner = ?2 AND {}",
                    live("?3")
                ),
                params![id, owner, crate::gateway::db::unix_now()],
            )
            .map_err(GatewayError::db)?;
        if n > 0 {
            forget_expiry(&tx, id)?;
        }
        tx.commit().map_err(GatewayError::db)?;
        Ok(n > 0)
    }

    /// `owner`'s files newest first (oldest first if `ascending`), after the file `after` (a
    /// cursor), of `purpose` if given.
    pub fn files(
        &self,
        owner: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> Result<Page<FileMeta>, GatewayError> {
        let conn = self.conn();
        let mut cursor = cursor_named(&conn, "files", "after", owner, after)?;
        let (past, order) = match ascending {
            true => (">", "ASC"),
            false => ("<", "DESC"),
        };
        if ascending && after.is_none() {
            cursor = (i64::MIN, i64::MIN);
        }
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {FILE_COLUMNS} FROM files WHERE owner = ?1
                 AND (?2 IS NULL OR purpose = ?2) AND (created, rowid) {past} (?3, ?4) AND {}
                 ORDER BY created {order}, rowid {order} LIMIT ?5",
                live("?6")
            ))
            .map_err(GatewayError::db)?;
        let mut items = stmt
            .query_map(
                params![
                    owner,
                    purpose,
                    cursor.0,
                    cursor.1,
                    limit as i64 + 1,
                    crate::gateway::db::unix_now()
                ],
                file_row,
            )
            .map_err(GatewayError::db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(GatewayError::db)?;
        let has_more = items.len() > limit;
        items.truncate(limit);
        Ok(Page { items, has_more })
    }
}

/// Deletes a deleted file's expiry.
fn forget_expiry(conn: &Connection, id: &str) -> Result<(), GatewayError> {
    conn.execute("DELETE FROM file_expiry WHERE file_id = ?1", params![id])
        .map_err(GatewayError::db)?;
    Ok(())
}

/// Inserts file `meta`'s row with its content, written through SQLite's incremental blob I/O
/// (a bound blob is copied twice on its way in: by the binding and into the record).
pub(super) fn insert_file(
    conn: &Connection,
    meta: &FileMeta,
    owner: &str,
    content: &[u8],
) -> Result<(), GatewayError> {
    let len = i32::try_from(content.len()).map_err(|_| GatewayError::Invalid {
        field: "file".into(),
        reason: format!("holds {} bytes, more than a stored file may", content.len()),
    })?;
    conn.execute(
        "INSERT INTO files (id, owner, purpose, filename, bytes, created, content)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            meta.id,
            owner,
            meta.purpose,
            meta.filename,
            meta.bytes,
            meta.created,
            ZeroBlob(len)
        ],
    )
    .map_err(GatewayError::db)?;
    if !content.is_empty() {
        let mut blob = (conn.blob_open(
            MAIN_DB,
            c"files",
            c"content",
            conn.last_insert_rowid(),
            false,
        ))
        .map_err(GatewayError::db)?;
        blob.write_all_at(content, 0).map_err(GatewayError::db)?;
    }
    if let Some(at) = meta.expires_at {
        conn.execute(
            "INSERT INTO file_expiry (file_id, expires_at) VALUES (?1, ?2)",
            params![meta.id, at],
        )
        .map_err(GatewayError::db)?;
    }
    Ok(())
}
