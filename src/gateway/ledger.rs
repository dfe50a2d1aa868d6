//! The request ledger: one row per request (tokens, cost, status, timings, session and
//! metadata; never text), written by one thread in batched transactions.
//!
//! Knows rows and SQL; never HTTP. Invariant: a caller that awaits [`Ledger::record`]'s
//! acknowledgement holds a committed row, so a response sent after it survives `kill -9`.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};

use rusqlite::{params, Connection};
use tokio::sync::oneshot;

use super::usage::{self, UsageFilter, UsageLine};
use super::GatewayError;

/// One request's outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub ts_ms: i64,
    pub request_id: String,
    pub key_id: Option<String>,
    pub model: String,
    pub route: String,
    /// `ok`, `cancelled`, `error`, `rate_limited`, `cached`, `replayed` (an `Idempotency-Key`
    /// retry: the reply's tokens, at no cost) or `rejected`.
    pub status: &'static str,
    pub finish_reason: Option<&'static str>,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros: u64,
    pub ttft_ms: Option<i64>,
    pub duration_ms: i64,
    pub session_id: Option<String>,
    pub metadata: Option<String>,
    /// The batch line this is an attempt at (`batch_id/line`): a row with one supersedes the
    /// earlier attempts' rows (unless it is a refusal: see [`supersedes`]), so a line run
    /// again after a restart is billed once, as its last attempt.
    pub attempt: Option<String>,
}

/// Whether a row of this status supersedes its line's earlier attempts: every ending of a
/// request that ran (or was answered from the cache), not a refusal, which computed nothing
/// and leaves the earlier attempt's work billed.
pub fn supersedes(status: &str) -> bool {
    !matches!(status, "rate_limited" | "rejected")
}

/// A row to write (`None`: nothing, only the acknowledgement of what was queued before).
type Msg = (Option<Row>, Option<oneshot::Sender<bool>>);

pub struct Ledger {
    tx: Mutex<mpsc::Sender<Msg>>,
    /// For admissions' reads (a key's spend, a batch line's cost).
    reader: Mutex<Connection>,
    /// For usage reports (the console polls one every few seconds): a report over many
    /// rows never holds an admission's read.
    reports: Mutex<Connection>,
    path: PathBuf,
}

impl Ledger {
    /// Opens the store and starts the writer thread.
    pub fn start(path: &Path) -> Result<Self, GatewayError> {
        let writer = super::db::open(path)?;
        let reader = super::db::open(path)?;
        let reports = super::db::open(path)?;
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("edgeinfer-ledger".into())
            .spawn(move || write_loop(writer, rx))
            .map_err(|e| GatewayError::Store {
                path: path.to_path_buf(),
                reason: format!("cannot start the ledger thread: {e}"),
            })?;
        Ok(Self {
            tx: Mutex::new(tx),
            reader: Mutex::new(reader),
            reports: Mutex::new(reports),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a row; the receiver says `true` once it is committed (`false`: the write
    /// failed, which is logged).
    pub fn record(&self, row: Row) -> oneshot::Receiver<bool> {
        let (ack, done) = oneshot::channel();
        self.record_then(row, Some(ack));
        done
    }

    /// Queues a row without waiting (any thread, no async runtime needed); `ack`, if given,
    /// hears when it is committed.
    pub fn record_then(&self, row: Row, ack: Option<oneshot::Sender<bool>>) {
        let tokens = [row.prompt_tokens, row.cached_tokens, row.completion_tokens];
        crate::telemetry::ledgered(row.key_id.as_deref(), row.status, tokens, row.cost_micros);
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(mpsc::SendError((_, Some(ack)))) = tx.send((Some(row), ack)) {
            let _ = ack.send(false);
        }
    }

    /// Hears `true` once every row queued before it is committed (at shutdown, so that what
    /// the last requests computed is not lost with the process).
    pub fn flush(&self) -> oneshot::Receiver<bool> {
        let (ack, done) = oneshot::channel();
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(mpsc::SendError((_, Some(ack)))) = tx.send((None, Some(ack))) {
            let _ = ack.send(false);
        }
        done
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A key's spend (microdollars) in rows that ended at or after `since_unix`.
    pub fn spent(&self, key_id: &str, since_unix: i64) -> Result<u64, GatewayError> {
        spent(&self.reader(), key_id, since_unix)
    }

    pub fn usage(&self, f: &UsageFilter) -> Result<Vec<UsageLine>, GatewayError> {
        usage::usage(&self.reports.lock().unwrap_or_else(|p| p.into_inner()), f)
    }

    /// What a batch line's attempts so far cost since `since_unix`, as billed now (what the
    /// next attempt's row will supersede).
    pub fn attempt_cost(&self, attempt: &str, since_unix: i64) -> Result<u64, GatewayError> {
        self.reader()
            .query_row(
                "SELECT COALESCE(SUM(cost_micros), 0) FROM requests
                 WHERE attempt = ?1 AND superseded = 0 AND ts_ms >= ?2",
                params![attempt, since_unix.saturating_mul(1000)],
                |r| r.get::<_, i64>(0),
            )
            .map(|x| x.max(0) as u64)
            .map_err(GatewayError::db)
    }
}

/// A key's spend (microdollars) since `since_unix`, a start of its budget period: its rows
/// since then, and what the rows past the retention carried into the hours since then.
pub fn spent(conn: &Connection, key_id: &str, since_unix: i64) -> Result<u64, GatewayError> {
    conn.query_row(
        "SELECT (SELECT COALESCE(SUM(cost_micros), 0) FROM requests
                 WHERE key_id = ?1 AND ts_ms >= ?2 AND superseded = 0)
              + (SELECT COALESCE(SUM(cost_micros), 0) FROM spend_carried
                 WHERE key_id = ?1 AND hour_start >= ?3)",
        params![key_id, since_unix.saturating_mul(1000), since_unix],
        |r| r.get::<_, i64>(0),
    )
    .map(|x| x.max(0) as u64)
    .map_err(GatewayError::db)
}

fn write_loop(mut conn: Connection, rx: mpsc::Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let ok = write_with_retries(&mut conn, &batch);
        for (_, ack) in batch {
            if let Some(ack) = ack {
                let _ = ack.send(ok);
            }
        }
    }
}

/// More tries of a write that found the store busy (past its own 5 s timeout: a large batch
/// result or upload holding the write lock, say), after these waits. Other errors are not
/// tried again: they would fail the same way.
const RETRY_WAITS_MS: [u64; 2] = [250, 250];

/// Writes a batch of rows in one transaction; whether it landed.
fn write_with_retries(conn: &mut Connection, batch: &[Msg]) -> bool {
    for (attempt, wait) in std::iter::once(0).chain(RETRY_WAITS_MS).enumerate() {
        std::thread::sleep(std::time::Duration::from_millis(wait));
        match insert(conn, batch) {
            Ok(()) => return true,
            Err(e) => {
                tracing::error!(error = %e, rows = batch.len(), attempt, "ledger write failed");
                let busy = matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                );
                if !busy {
                    return false;
                }
            }
        }
    }
    false
}

fn insert(conn: &mut Connection, batch: &[Msg]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO requests (ts_ms, request_id, key_id, model, route, status, finish_reason,
                prompt_tokens, cached_tokens, completion_tokens, cost_micros, ttft_ms, duration_ms,
                session_id, metadata, attempt)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        let mut supersede = tx.prepare_cached(
            "UPDATE requests SET superseded = 1 WHERE attempt = ?1 AND superseded = 0",
        )?;
        for r in batch.iter().filter_map(|(r, _)| r.as_ref()) {
            if let Some(attempt) = r.attempt.as_ref().filter(|_| supersedes(r.status)) {
                supersede.execute([attempt])?;
            }
            stmt.execute(params![
                r.ts_ms,
                r.request_id,
                r.key_id,
                r.model,
                r.route,
                r.status,
                r.finish_reason,
                r.prompt_tokens as i64,
                r.cached_tokens as i64,
                r.completion_tokens as i64,
                r.cost_micros as i64,
                r.ttft_ms,
                r.duration_ms,
                r.session_id,
                r.metadata,
                r.attempt,
            ])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rows_are_committed_before_the_ack_and_summed_by_day_and_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::start(&path).unwrap();
        let day_ms = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        for (i, (model, cost)) in [("a", 5), ("a", 7), ("b", 1)].into_iter().enumerate() {
            let row = Row {
                ts_ms: day_ms + i as i64,
                request_id: format!("r{i}"),
                key_id: Some("k".into()),
                model: model.into(),
                route: "/v1/chat/completions".into(),
                status: "ok",
                prompt_tokens: 10,
                cached_tokens: 2,
                completion_tokens: 3,
                cost_micros: cost,
                ..Row::default()
            };
            assert!(ledger.record(row).await.unwrap());
        }
        // A fresh connection (another process, after a crash) sees every acknowledged row.
        let other = super::super::db::open(&path).unwrap();
        let lines = usage::usage(&other, &UsageFilter::default()).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].model.as_str(), lines[0].requests), ("a", 2));
        assert_eq!(lines[0].cost_micros, 12);
        assert_eq!(lines[0].total_tokens, 26);
        assert_eq!(lines[0].day, "2026-01-01");
        assert_eq!(spent(&other, "k", day_ms / 1000).unwrap(), 13);
        assert_eq!(spent(&other, "k", day_ms / 1000 + 1).unwrap(), 0);
        let f = UsageFilter {
            key_id: Some("other".into()),
            ..UsageFilter::default()
        };
        assert!(usage::usage(&other, &f).unwrap().is_empty());
        let f = UsageFilter {
            key_id: Some("k".into()),
            ..UsageFilter::default()
        };
        assert_eq!(usage::usage(&other, &f).unwrap(), lines);
    }

    #[tokio::test]
    async fn a_batch_lines_last_attempt_that_ran_is_billed_and_the_earlier_ones_kept_unbilled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::start(&path).unwrap();
        // Line 0 cut off by a shutdown, refused once, then run again; line 1 twice (a crash
        // between its row and its result); a direct request and another batch's line once
        // each; a line cut off and then refused for good (its batch's key out of budget).
        let rows = [
            (Some("batch_a/0"), "cancelled", 4, 100),
            (Some("batch_a/1"), "ok", 9, 1000),
            (None, "ok", 9, 10_000),
            (Some("batch_a/0"), "rate_limited", 0, 0),
            (Some("batch_a/0"), "ok", 9, 100_000),
            (Some("batch_a/1"), "ok", 9, 1_000_000),
            (Some("batch_b/0"), "ok", 9, 10_000_000),
            (Some("batch_c/0"), "cancelled", 5, 7),
            (Some("batch_c/0"), "rate_limited", 0, 0),
        ];
        let mut acks = Vec::new();
        for (i, (attempt, status, completion, cost)) in rows.into_iter().enumerate() {
            let row = Row {
                ts_ms: 1_767_225_600_000 + i as i64,
                request_id: format!("r{i}"),
                key_id: Some("k".into()),
                model: "m".into(),
                route: "/v1/chat/completions".into(),
                status,
                prompt_tokens: 10,
                completion_tokens: completion,
                cost_micros: cost,
                attempt: attempt.map(str::to_string),
                ..Row::default()
            };
            // Queued together: one write batch, in order.
            acks.push(ledger.record(row));
        }
        assert!(ledger.flush().await.unwrap());
        for ack in acks {
            assert!(ack.await.unwrap());
        }
        let conn = super::super::db::open(&path).unwrap();
        assert_eq!(spent(&conn, "k", 0).unwrap(), 11_110_007);
        let lines = usage::usage(&conn, &UsageFilter::default()).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].requests, lines[0].completion_tokens), (6, 41));
        assert_eq!(ledger.attempt_cost("batch_c/0", 0).unwrap(), 7);
        assert_eq!(ledger.attempt_cost("batch_a/0", 0).unwrap(), 100_000);
        // The earlier attempts stay, marked.
        let kept: Vec<String> = conn
            .prepare("SELECT request_id FROM requests WHERE superseded = 1 ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(kept, ["r0", "r1", "r3"]);
    }
}
