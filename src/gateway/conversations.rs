//! Stored responses of the Responses API (`store: true`, the default): each row holds the
//! response object and the conversation's items up to and including its output, so a turn
//! that names `previous_response_id` sends only its new items. Rows belong to the key that
//! made them; another key (or none) cannot read or delete them.

use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::GatewayError;

pub struct Conversations {
    conn: Mutex<Connection>,
}

/// One stored response.
pub struct Stored {
    pub response: Value,
    /// The conversation's items through this response's output.
    pub context: Vec<Value>,
}

impl Conversations {
    pub fn new(conn: Connection) -> Self {
        Self {
            conn: Mutex::new(conn),
        }
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
        self.conn()
            .execute(
                "INSERT INTO responses (id, owner, created, response, context)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    id,
                    owner,
                    super::db::unix_now(),
                    response.to_string(),
                    Value::from(context.to_vec()).to_string()
                ],
            )
            .map_err(GatewayError::db)?;
        Ok(())
    }

    /// The response `id` if `owner` made it.
    pub fn get(&self, id: &str, owner: &str) -> Result<Option<Stored>, GatewayError> {
        let row: Option<(String, String)> = self
            .conn()
            .query_row(
                "SELECT response, context FROM responses WHERE id = ?1 AND owner = ?2",
                params![id, owner],
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

    /// Deletes the response `id` if `owner` made it; false if there was none.
    pub fn delete(&self, id: &str, owner: &str) -> Result<bool, GatewayError> {
        let n = self
            .conn()
            .execute(
                "DELETE FROM responses WHERE id = ?1 AND owner = ?2",
                params![id, owner],
            )
            .map_err(GatewayError::db)?;
        Ok(n > 0)
    }
}
