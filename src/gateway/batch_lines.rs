//! A running batch's requests: those left to run, the attempts at each, and their answers
//! with the tokens they used (kept within what an output file may hold).

use rusqlite::{params, OptionalExtension};
use serde_json::{json, Value};

use super::{Batches, GatewayError, Line, MAX_STORED_BYTES};

/// The answers a running batch keeps: what its output file may hold (a little in tests).
const HELD_RESULTS_CAP: usize = if cfg!(test) { 4096 } else { MAX_STORED_BYTES };

/// A request read as `line, custom_id, url, body`.
fn line_of(line: i64, r: &rusqlite::Row) -> rusqlite::Result<Line> {
    Ok(Line {
        line,
        custom_id: r.get(1)?,
        url: r.get(2)?,
        body: r.get(3)?,
    })
}

impl Batches {
    /// Up to `limit` of a batch's requests without a result, in file order, skipping `busy`.
    pub fn pending(
        &self,
        batch_id: &str,
        busy: &[i64],
        limit: usize,
    ) -> Result<Vec<Line>, GatewayError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT line, custom_id, url, body FROM batch_lines
                 WHERE batch_id = ?1 AND result IS NULL ORDER BY line",
            )
            .map_err(GatewayError::db)?;
        let mut rows = stmt.query(params![batch_id]).map_err(GatewayError::db)?;
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(r) = rows.next().map_err(GatewayError::db)? else {
                break;
            };
            let line: i64 = r.get(0).map_err(GatewayError::db)?;
            if busy.contains(&line) {
                continue;
            }
            out.push(line_of(line, r).map_err(GatewayError::db)?);
        }
        Ok(out)
    }

    /// The first of a batch's requests without a result, skipping `busy`, whose last attempt
    /// the process or the engine did not outlive (it may be what stops them): it runs alone.
    pub fn suspect(&self, batch_id: &str, busy: &[i64]) -> Result<Option<Line>, GatewayError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT line, custom_id, url, body FROM batch_lines
                 WHERE batch_id = ?1 AND result IS NULL AND attempts > 0 ORDER BY line",
            )
            .map_err(GatewayError::db)?;
        let mut rows = stmt.query(params![batch_id]).map_err(GatewayError::db)?;
        while let Some(r) = rows.next().map_err(GatewayError::db)? {
            let line: i64 = r.get(0).map_err(GatewayError::db)?;
            if !busy.contains(&line) {
                return line_of(line, r).map(Some).map_err(GatewayError::db);
            }
        }
        Ok(None)
    }

    /// A request of a batch starts: how many of its attempts have now started without
    /// ending (more than one: the process stopped while an earlier one ran).
    pub fn begin_attempt(&self, batch_id: &str, line: i64) -> Result<i64, GatewayError> {
        self.conn()
            .query_row(
                "UPDATE batch_lines SET attempts = attempts + 1
                 WHERE batch_id = ?1 AND line = ?2 RETURNING attempts",
                params![batch_id, line],
                |r| r.get(0),
            )
            .optional()
            .map(|n| n.unwrap_or(0))
            .map_err(GatewayError::db)
    }

    /// An attempt at a request ended: answered (`ran`: the count starts over), or refused
    /// before it ran (to be tried later: this attempt is taken back, the earlier ones that
    /// the process or the engine did not outlive still count).
    pub fn end_attempt(&self, batch_id: &str, line: i64, ran: bool) -> Result<(), GatewayError> {
        let sql = if ran {
            "UPDATE batch_lines SET attempts = 0 WHERE batch_id = ?1 AND line = ?2"
        } else {
            "UPDATE batch_lines SET attempts = MAX(attempts - 1, 0) WHERE batch_id = ?1 AND line = ?2"
        };
        self.conn()
            .execute(sql, params![batch_id, line])
            .map(|_| ())
            .map_err(GatewayError::db)
    }

    /// Records one request's output line (`ok`: it answered 2xx) and adds the tokens its
    /// answer used to the batch's usage, once (a line that has a result keeps it).
    pub fn finish_line(
        &self,
        batch_id: &str,
        line: i64,
        ok: bool,
        result: &Value,
    ) -> Result<(), GatewayError> {
        let conn = self.conn();
        // Immediate: it reads before it writes (see `KeyStore::write`).
        let tx =
            rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)
                .map_err(GatewayError::db)?;
        // The results a batch holds are its output file to be: past what a file may hold,
        // a line's answer is not kept (the batch could not end, its results read into
        // memory at once), and the line says so.
        let held: i64 = tx
            .query_row(
                "SELECT result_bytes FROM batch_usage WHERE batch_id = ?1",
                params![batch_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(GatewayError::db)?
            .unwrap_or(0);
        let mut text = result.to_string();
        let mut ok = ok;
        // Each line ends with a newline in the file; what is refused still takes its short
        // line, so room is kept for those.
        if held.max(0) as usize + text.len() + 1 > HELD_RESULTS_CAP - HELD_RESULTS_CAP / 16 {
            ok = false;
            text = json!({"id": result["id"], "custom_id": result["custom_id"], "response": null,
                "error": {"code": "batch_output_too_large", "message": format!(
                    "this request's answer ({} bytes) was not kept: the batch's results reached the {MAX_STORED_BYTES} bytes an output file may hold; split the work into smaller batches",
                    text.len())}})
            .to_string();
        }
        let n = tx
            .execute(
                "UPDATE batch_lines SET ok = ?3, result = ?4
                 WHERE batch_id = ?1 AND line = ?2 AND result IS NULL",
                params![batch_id, line, ok, text],
            )
            .map_err(GatewayError::db)?;
        if n > 0 {
            let [input, cached, output, reasoning] = tokens_of(&result["response"]["body"]);
            tx.execute(
                "INSERT INTO batch_usage (batch_id, input, cached, output, reasoning, result_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (batch_id) DO UPDATE SET input = input + ?2,
                 cached = cached + ?3, output = output + ?4, reasoning = reasoning + ?5,
                 result_bytes = result_bytes + ?6",
                params![
                    batch_id,
                    input,
                    cached,
                    output,
                    reasoning,
                    text.len() as i64 + 1
                ],
            )
            .map_err(GatewayError::db)?;
        }
        tx.commit().map_err(GatewayError::db)
    }
}

/// The tokens (input, cached input, output, reasoning) a reply's body says it used: a chat
/// or text completion's or embeddings' `usage`, a response's, or, in Cloudflare's envelope,
/// a Workers AI answer's (`result.usage`).
fn tokens_of(body: &Value) -> [i64; 4] {
    let u = match &body["usage"] {
        Value::Null => &body["result"]["usage"],
        u => u,
    };
    let n = |a: &Value, b: &Value| a.as_i64().or_else(|| b.as_i64()).unwrap_or(0).max(0);
    // Anthropic's `input_tokens` are those past the cache: what it read from the cache (and
    // wrote to it) are counted apart.
    let read = n(&u["cache_read_input_tokens"], &Value::Null);
    let written = n(&u["cache_creation_input_tokens"], &Value::Null);
    [
        n(&u["prompt_tokens"], &u["input_tokens"]) + read + written,
        n(
            &u["prompt_tokens_details"]["cached_tokens"],
            &u["input_tokens_details"]["cached_tokens"],
        ) + read,
        n(&u["completion_tokens"], &u["output_tokens"]),
        n(
            &u["completion_tokens_details"]["reasoning_tokens"],
            &u["output_tokens_details"]["reasoning_tokens"],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_surfaces_usage_counts_its_whole_prompt() {
        let chat = json!({"usage": {"prompt_tokens": 30, "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 16}}});
        assert_eq!(tokens_of(&chat), [30, 16, 5, 0]);
        let responses = json!({"usage": {"input_tokens": 30, "output_tokens": 5,
            "input_tokens_details": {"cached_tokens": 16},
            "output_tokens_details": {"reasoning_tokens": 2}}});
        assert_eq!(tokens_of(&responses), [30, 16, 5, 2]);
        // Anthropic's input_tokens leave out what the cache served.
        let message = json!({"type": "message", "usage": {"input_tokens": 14,
            "output_tokens": 5, "cache_read_input_tokens": 16, "cache_creation_input_tokens": 0}});
        assert_eq!(tokens_of(&message), [30, 16, 5, 0]);
    }
}
