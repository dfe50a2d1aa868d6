//! The embedded store: one SQLite file in WAL mode holding the keys, the request ledger
//! (with the totals of the rows past its retention),
//! the stored responses of the Responses API, and the Batch API's files and batches.
//! Knows tables and SQL; never HTTP. Invariant: every connection opens through [`open`], so
//! every one has the same pragmas (WAL, a busy timeout, synchronous=NORMAL: a commit survives
//! the process being killed; only a power loss can take the last commits).

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::GatewayError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,              -- sha256 hex of the key: the key itself is never stored
    alias TEXT,
    models TEXT NOT NULL,             -- JSON array; empty: every model
    tpm_limit INTEGER,
    rpm_limit INTEGER,
    max_budget_micros INTEGER,
    budget_duration_secs INTEGER,
    max_parallel_requests INTEGER,
    weight INTEGER,                   -- fair share under contention (NULL: 1)
    metadata TEXT NOT NULL,           -- JSON object
    expires INTEGER,                  -- unix seconds
    created INTEGER NOT NULL,         -- unix seconds
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS keys_alias ON keys(alias) WHERE alias IS NOT NULL AND revoked = 0;
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,           -- when the request ended, unix milliseconds
    request_id TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    status TEXT NOT NULL,             -- ok, cancelled, error, rate_limited, cached, replayed, rejected
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    ttft_ms INTEGER,
    duration_ms INTEGER NOT NULL,
    session_id TEXT,
    metadata TEXT,                    -- cf-aig-metadata, as sent (never prompt text)
    attempt TEXT,                     -- a batch line's attempts share this (batch_id/line)
    superseded INTEGER NOT NULL DEFAULT 0 -- 1: a later attempt at the same line is billed instead
);
CREATE INDEX IF NOT EXISTS requests_key_ts ON requests(key_id, ts_ms);
CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts_ms);
-- The rows past the ledger's retention, folded (gateway/retention.rs): their totals by day,
-- which the usage reports add to the rows kept, and each key's spend by the hour from its
-- creation, which its budget adds.
CREATE TABLE IF NOT EXISTS usage_days (
    day TEXT NOT NULL,                -- YYYY-MM-DD, UTC
    model TEXT NOT NULL,
    key_id TEXT NOT NULL,             -- '' for the rows without a key
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    PRIMARY KEY (day, model, key_id)
);
CREATE INDEX IF NOT EXISTS usage_days_key ON usage_days(key_id, day);
CREATE TABLE IF NOT EXISTS spend_carried (
    key_id TEXT NOT NULL,
    hour_start INTEGER NOT NULL,      -- unix seconds: the key's creation plus whole hours
    cost_micros INTEGER NOT NULL,
    PRIMARY KEY (key_id, hour_start)
);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,              -- resp_...
    owner TEXT NOT NULL,              -- the key id that made it ('' without a key)
    created INTEGER NOT NULL,         -- unix seconds
    response TEXT NOT NULL,           -- the response object (JSON): holds conversation text
    context TEXT NOT NULL             -- JSON array: the conversation's items through its output
);
CREATE INDEX IF NOT EXISTS responses_created ON responses(created);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,              -- file-...
    owner TEXT NOT NULL,              -- the key id that made it ('' without a key)
    purpose TEXT NOT NULL,            -- batch (uploaded) or batch_output
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created INTEGER NOT NULL,         -- unix seconds
    content BLOB NOT NULL             -- holds prompt or completion text
);
CREATE INDEX IF NOT EXISTS files_owner ON files(owner, created);
-- When a file expires (none: kept until deleted). A table apart, not a column of files:
-- a column after `content` would make SQLite walk the blob's overflow pages to read it, and
-- write a zero blob's whole record out in memory.
CREATE TABLE IF NOT EXISTS file_expiry (
    file_id TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL       -- unix seconds
);
CREATE INDEX IF NOT EXISTS file_expiry_at ON file_expiry(expires_at);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,              -- batch_...
    owner_kind TEXT NOT NULL,         -- key, master or anonymous: whom its requests run as
    owner TEXT NOT NULL,
    created INTEGER NOT NULL,
    status TEXT NOT NULL,
    object TEXT NOT NULL              -- the batch object (JSON)
);
CREATE INDEX IF NOT EXISTS batches_owner ON batches(owner, created);
CREATE INDEX IF NOT EXISTS batches_status ON batches(status);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,            -- 0-based, in the input file's order
    custom_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,               -- the request (JSON): holds prompt text until the batch ends
    ok INTEGER,                       -- NULL until run; 1: answered 2xx
    result TEXT,                      -- the output line (JSON)
    PRIMARY KEY (batch_id, line)
);
-- The requests left to run, and the counts, without reading the bodies.
CREATE INDEX IF NOT EXISTS batch_lines_pending ON batch_lines(batch_id, line) WHERE result IS NULL;
CREATE INDEX IF NOT EXISTS batch_lines_ok ON batch_lines(batch_id, ok);
-- The tokens a running batch's answered requests used (the row goes when the batch ends:
-- its object keeps the totals).
CREATE TABLE IF NOT EXISTS batch_usage (
    batch_id TEXT PRIMARY KEY,
    input INTEGER NOT NULL,
    cached INTEGER NOT NULL,
    output INTEGER NOT NULL,
    reasoning INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (k, v) VALUES ('keys_version', 0);
";

/// Opens (creating if needed) the store at `path` with the shared pragmas and schema.
pub fn open(path: &Path) -> Result<Connection, GatewayError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| GatewayError::Store {
            path: path.to_path_buf(),
            reason: format!("cannot create its directory: {e}"),
        })?;
    }
    let fail = |e: rusqlite::Error| GatewayError::Store {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let conn = Connection::open(path).map_err(fail)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(fail)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(fail)?;
    conn.execute_batch(SCHEMA).map_err(fail)?;
    // Stores made before a column existed get it (another process may add it first).
    for (table, column, decl) in [
        ("keys", "weight", "INTEGER"),
        ("requests", "attempt", "TEXT"),
        ("requests", "superseded", "INTEGER NOT NULL DEFAULT 0"),
        ("batch_usage", "result_bytes", "INTEGER NOT NULL DEFAULT 0"),
        ("batch_lines", "attempts", "INTEGER NOT NULL DEFAULT 0"),
        // A background response's `Idempotency-Key` (hashed with its owner and body).
        ("responses", "idem", "BLOB"),
    ] {
        add_column(&conn, table, column, decl).map_err(fail)?;
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS requests_attempt ON requests(attempt) WHERE attempt IS NOT NULL;
         -- The requests running, and those whose last attempt was cut (`Batches::suspect`).
         CREATE INDEX IF NOT EXISTS batch_lines_attempted ON batch_lines(batch_id, line)
             WHERE result IS NULL AND attempts > 0;
         CREATE UNIQUE INDEX IF NOT EXISTS responses_idem ON responses(owner, idem)
             WHERE idem IS NOT NULL;",
    )
    .map_err(fail)?;
    Ok(conn)
}

/// Adds `column` to `table` unless it is there already.
fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> rusqlite::Result<()> {
    let has = |c: &Connection| {
        c.prepare(&format!("SELECT {column} FROM {table} LIMIT 0"))
            .is_ok()
    };
    if has(conn) {
        return Ok(());
    }
    match conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}")) {
        Err(e) if !has(conn) => Err(e),
        _ => Ok(()),
    }
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Unix milliseconds now.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_store_from_before_key_weights_and_batch_attempts_gets_the_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old = rusqlite::Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE keys (id TEXT PRIMARY KEY, alias TEXT, models TEXT NOT NULL,
             tpm_limit INTEGER, rpm_limit INTEGER, max_budget_micros INTEGER,
             budget_duration_secs INTEGER, max_parallel_requests INTEGER,
             metadata TEXT NOT NULL, expires INTEGER, created INTEGER NOT NULL,
             revoked INTEGER NOT NULL DEFAULT 0);
             INSERT INTO keys (id, models, metadata, created) VALUES ('k', '[]', '{}', 1);
             CREATE TABLE requests (id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL,
             request_id TEXT NOT NULL, key_id TEXT, model TEXT NOT NULL, route TEXT NOT NULL,
             status TEXT NOT NULL, finish_reason TEXT, prompt_tokens INTEGER NOT NULL,
             cached_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
             cost_micros INTEGER NOT NULL, ttft_ms INTEGER, duration_ms INTEGER NOT NULL,
             session_id TEXT, metadata TEXT);
             INSERT INTO requests (ts_ms, request_id, model, route, status, prompt_tokens,
             cached_tokens, completion_tokens, cost_micros, duration_ms)
             VALUES (1, 'r', 'm', '/v1/chat/completions', 'ok', 1, 0, 1, 5, 1);",
        )
        .unwrap();
        drop(old);
        let conn = super::open(&path).unwrap();
        let w: Option<i64> = conn
            .query_row("SELECT weight FROM keys WHERE id = 'k'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(w, None);
        // An old row is billed (not superseded) and belongs to no batch line.
        let (attempt, superseded): (Option<String>, i64) = conn
            .query_row(
                "SELECT attempt, superseded FROM requests WHERE request_id = 'r'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((attempt, superseded), (None, 0));
        let index: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'requests_attempt'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 1);
        let f = crate::gateway::usage::UsageFilter::default();
        let lines = crate::gateway::usage::usage(&conn, &f).unwrap();
        assert_eq!((lines.len(), lines[0].cost_micros), (1, 5));
        // Opening again finds the column there.
        drop(conn);
        super::open(&path).unwrap();
    }
}
