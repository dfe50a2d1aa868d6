//! Stored responses of the Responses API (`store: true`, the default): each row holds the
//! response object and the conversation's items up to and including its output, so a turn
//! that names `previous_response_id` sends only its new items. Rows belong to the key that
//! made them; another key (or none) cannot read or delete them. Rows older than the
//! retention are gone: `get` no longer sees them, and each `put` deletes them.

use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::GatewayError;

pub struct Conversations {
    conn: Mutex<Connection>,
    /// Seconds a row is kept; `None`: until deleted.
    retention: Option<i64>,
}

/// One stored response.
pub struct Stored {
    pub response: Value,
    /// The conversation's items through this response's output.
    pub context: Vec<Value>,
}

impl Conversations {
    /// The store on `conn`; rows past `retention` are deleted now and on every `put`.
    pub fn new(conn: Connection, retention: Option<Duration>) -> Result<Self, GatewayError> {
        let store = Self {
            conn: Mutex::new(conn),
            retention: retention.map(|d| d.as_secs().min(i64::MAX as u64) as i64),
        };
        store.expire(super::db::unix_now())?;
        Ok(store)
    }

    /// The oldest `created` still kept at `now`.
    fn oldest_kept(&self, now: i64) -> i64 {
        self.retention.map_or(i64::MIN, |r| now.saturating_sub(r))
    }

    /// Deletes the rows past the retention at `now`; how many there were.
    fn expire(&self, now: i64) -> Result<usize, GatewayError> {
        if self.retention.is_none() {
            return Ok(0);
        }
        self.conn()
            .execute(
                "DELETE FROM responses WHERE created < ?1",
                params![self.oldest_kept(now)],
            )
            .map_err(GatewayError::db)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put(
        &self,
        id: &str,
        owner: &str,
        response: &Value,
        context: &[Value],
    ) -> Result<(), GatewayError> {
        self.put_at(id, owner, response, context, super::db::unix_now())
    }

    fn put_at(
        &self,
        id: &str,
        owner: &str,
        response: &Value,
        context: &[Value],
        now: i64,
    ) -> Result<(), GatewayError> {
        self.expire(now)?;
        self.conn()
            .execute(
                "INSERT INTO responses (id, owner, created, response, context)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    id,
                    owner,
                    now,
                    response.to_string(),
                    Value::from(context.to_vec()).to_string()
                ],
            )
            .map_err(GatewayError::db)?;
        Ok(())
    }

    /// Stores a response made under `key` (a background create's `Idempotency-Key`, with its
    /// owner and body) unless one was stored under it already: then that response, and
    /// nothing is stored.
    pub fn put_once(
        &self,
        id: &str,
        owner: &str,
        response: &Value,
        context: &[Value],
        key: &[u8],
    ) -> Result<Option<Value>, GatewayError> {
        let now = super::db::unix_now();
        self.expire(now)?;
        let conn = self.conn();
        let earlier = || self.stored_under(&conn, owner, key, now);
        let mut found = earlier()?;
        if found.is_none() {
            // Another process may store one under the key first: its row is the answer.
            let stored = conn
                .execute(
                    "INSERT OR IGNORE INTO responses (id, owner, created, response, context, idem)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        id,
                        owner,
                        now,
                        response.to_string(),
                        Value::from(context.to_vec()).to_string(),
                        key
                    ],
                )
                .map_err(GatewayError::db)?;
            if stored == 0 {
                found = earlier()?;
                if found.is_none() {
                    // Another's row under the key went as this one was refused.
                    return Err(GatewayError::Db(
                        "a response under this Idempotency-Key changed while stored; retry".into(),
                    ));
                }
            }
        }
        parsed(found)
    }

    /// The response stored under `key` by `owner` (see [`Self::put_once`]), if any.
    pub fn get_once(&self, owner: &str, key: &[u8]) -> Result<Option<Value>, GatewayError> {
        let now = super::db::unix_now();
        parsed(self.stored_under(&self.conn(), owner, key, now)?)
    }

    fn stored_under(
        &self,
        conn: &Connection,
        owner: &str,
        key: &[u8],
        now: i64,
    ) -> Result<Option<String>, GatewayError> {
        conn.query_row(
            "SELECT response FROM responses WHERE owner = ?1 AND idem = ?2 AND created >= ?3",
            params![owner, key, self.oldest_kept(now)],
            |r| r.get::<_, String>(0),
        )
        .optional()
        .map_err(GatewayError::db)
    }

    /// The response `id` if `owner` made it.
    pub fn get(&self, id: &str, owner: &str) -> Result<Option<Stored>, GatewayError> {
        self.get_at(id, owner, super::db::unix_now())
    }

    fn get_at(&self, id: &str, owner: &str, now: i64) -> Result<Option<Stored>, GatewayError> {
        let row: Option<(String, String)> = self
            .conn()
            .query_row(
                "SELECT response, context FROM responses
                 WHERE id = ?1 AND owner = ?2 AND created >= ?3",
                params![id, owner, self.oldest_kept(now)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(GatewayError::db)?;
        let Some((response, context)) = row else {
            return Ok(None);
        };
        let parse = |s: &str| {
            serde_json::from_str::<Value>(s)
                .map_err(|e| GatewayError::Db(format!("a stored response is corrupt: {e}")))
        };
        let context = match parse(&context)? {
            Value::Array(items) => items,
            _ => return Err(GatewayError::Db("a stored context is not a list".into())),
        };
        Ok(Some(Stored {
            response: parse(&response)?,
            context,
        }))
    }

    /// Replaces the response `id` of `owner` (and its conversation, when given) while it is
    /// still unfinished (a background response `queued` or `in_progress`): never one that
    /// ended (a cancel or an end stored first wins) or was deleted; whether it was.
    pub fn update_unfinished(
        &self,
        id: &str,
        owner: &str,
        response: &Value,
        context: Option<&[Value]>,
    ) -> Result<bool, GatewayError> {
        let context = context.map(|c| Value::from(c.to_vec()).to_string());
        let n = self
            .conn()
            .execute(
                "UPDATE responses SET response = ?3, context = COALESCE(?4, context)
                 WHERE id = ?1 AND owner = ?2
                 AND json_extract(response, '$.status') IN ('queued', 'in_progress')",
                params![id, owner, response.to_string(), context],
            )
            .map_err(GatewayError::db)?;
        Ok(n > 0)
    }

    /// Deletes the response `id` if `owner` made it; false if there was none.
    pub fn delete(&self, id: &str, owner: &str) -> Result<bool, GatewayError> {
        let n = self
            .conn()
            .execute(
                "DELETE FROM responses WHERE id = ?1 AND owner = ?2 AND created >= ?3",
                params![id, owner, self.oldest_kept(super::db::unix_now())],
            )
            .map_err(GatewayError::db)?;
        Ok(n > 0)
    }
}

/// A stored response's JSON.
fn parsed(row: Option<String>) -> Result<Option<Value>, GatewayError> {
    row.map(|r| {
        serde_json::from_str(&r)
            .map_err(|e| GatewayError::Db(format!("a stored response is corrupt: {e}")))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(c: &Conversations) -> i64 {
        c.conn()
            .query_row("SELECT COUNT(*) FROM responses", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn responses_past_the_retention_are_unseen_then_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let day = 86_400;
        let c = Conversations::new(
            super::super::db::open(&path).unwrap(),
            Some(Duration::from_secs(30 * day as u64)),
        )
        .unwrap();
        let now = 1_700_000_000; // 2023: before any start-up of this test
        let item = [json!({"role": "user", "content": "hi"})];
        c.put_at("old", "k", &json!({"id": "old"}), &item, now - 31 * day)
            .unwrap();
        c.put_at("kept", "k", &json!({"id": "kept"}), &item, now - 29 * day)
            .unwrap();
        assert_eq!(rows(&c), 2);
        // At `now` the 31-day-old one is past 30 days: not found, though still a row.
        assert!(c.get_at("old", "k", now).unwrap().is_none());
        assert!(c.get_at("old", "k", now - 2 * day).unwrap().is_some());
        let kept = c.get_at("kept", "k", now).unwrap().unwrap();
        assert_eq!(kept.response["id"], "kept");
        assert_eq!(kept.context.len(), 1);
        // The next put deletes it.
        c.put_at("new", "k", &json!({"id": "new"}), &item, now)
            .unwrap();
        assert_eq!(rows(&c), 2);
        assert!(c.get_at("old", "k", now - 2 * day).unwrap().is_none());
        // Reopened with no retention, nothing expires; with one, start-up deletes what is old.
        drop(c);
        let forever = Conversations::new(super::super::db::open(&path).unwrap(), None).unwrap();
        assert!(forever
            .get_at("kept", "k", now + 1000 * day)
            .unwrap()
            .is_some());
        drop(forever);
        let short =
            Conversations::new(super::super::db::open(&path).unwrap(), Some(Duration::ZERO))
                .unwrap();
        assert_eq!(rows(&short), 0);
    }
}
