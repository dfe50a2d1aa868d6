//! The Batch API's stored files: uploads and the output and error files of finished
//! batches, their content written and read through SQLite's incremental blob I/O.

use rusqlite::blob::ZeroBlob;
use rusqlite::{params, Connection, OptionalExtension, MAIN_DB};

use super::{cursor_of, new_id, Batches, FileMeta, GatewayError, Page};

const FILE_COLUMNS: &str = "id, purpose, filename, bytes, created";

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileMeta> {
    Ok(FileMeta {
        id: r.get(0)?,
        purpose: r.get(1)?,
        filename: r.get(2)?,
        bytes: r.get(3)?,
        created: r.get(4)?,
    })
}

impl Batches {
    /// Stores a file; its metadata.
    pub fn put_file(
        &self,
        owner: &str,
        purpose: &str,
        filename: &str,
        content: &[u8],
    ) -> Result<FileMeta, GatewayError> {
        let meta = FileMeta {
            id: new_id("file-"),
            purpose: purpose.to_string(),
            filename: filename.to_string(),
            bytes: content.len() as i64,
            created: crate::gateway::db::unix_now(),
        };
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(GatewayError::db)?;
        insert_file(&tx, &meta, owner, content)?;
        tx.commit().map_err(GatewayError::db)?;
        Ok(meta)
    }

    pub fn file(&self, id: &str, owner: &str) -> Result<Option<FileMeta>, GatewayError> {
        self.conn()
            .query_row(
                &format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1 AND owner = ?2"),
                params![id, owner],
                file_row,
            )
            .optional()
            .map_err(GatewayError::db)
    }

    pub fn file_content(&self, id: &str, owner: &str) -> Result<Option<Vec<u8>>, GatewayError> {
        let conn = self.conn();
        // One read transaction: the row cannot go (nor its rowid pass to another) between
        // finding it and reading it.
        let tx = conn.unchecked_transaction().map_err(GatewayError::db)?;
        let row: Option<i64> = tx
            .query_row(
                "SELECT rowid FROM files WHERE id = ?1 AND owner = ?2",
                params![id, owner],
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
        let mut content = vec![0; blob.len()];
        blob.read_at_exact(&mut content, 0)
            .map_err(GatewayError::db)?;
        drop(blob);
        tx.finish().map_err(GatewayError::db)?;
        Ok(Some(content))
    }

    /// Deletes a file; false if `owner` has none by that id.
    pub fn delete_file(&self, id: &str, owner: &str) -> Result<bool, GatewayError> {
        let n = self
            .conn()
            .execute(
                "DELETE FROM files WHERE id = ?1 AND owner = ?2",
                params![id, owner],
            )
            .map_err(GatewayError::db)?;
        Ok(n > 0)
    }

    /// `owner`'s files newest first, after the file `after` (a cursor), of `purpose` if given.
    pub fn files(
        &self,
        owner: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<FileMeta>, GatewayError> {
        let conn = self.conn();
        let cursor = cursor_of(&conn, "files", owner, after)?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {FILE_COLUMNS} FROM files WHERE owner = ?1
                 AND (?2 IS NULL OR purpose = ?2) AND (created, rowid) < (?3, ?4)
                 ORDER BY created DESC, rowid DESC LIMIT ?5"
            ))
            .map_err(GatewayError::db)?;
        let mut items = stmt
            .query_map(
                params![owner, purpose, cursor.0, cursor.1, limit as i64 + 1],
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
    Ok(())
}
