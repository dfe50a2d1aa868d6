//! The request ledger: one row per request (tokens, cost, status, timings, session and
//! metadata; never text), written by one thread in batched transactions.
//!
//! Knows rows and SQL; never HTTP. Invariant: a caller that awaits [`Ledger::record`]'s
//! acknowledgement holds a committed row, so a response sent after it survives `kill -9`.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};

use rusqlite::{params, Connection};
use serde::Serialize;
use tokio::sync::oneshot;

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

/// A line of `GET /v1/usage` and `edgeinfer usage`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UsageLine {
    pub day: String,
    pub model: String,
    pub key_id: Option<String>,
    pub key_alias: Option<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost_micros: u64,
}

/// Which rows a usage report covers.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub key_id: Option<String>,
    /// Inclusive `YYYY-MM-DD` bounds (UTC).
    pub start: Option<String>,
    pub end: Option<String>,
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
        usage(&self.reports.lock().unwrap_or_else(|p| p.into_inner()), f)
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

/// Whether `day` is a calendar date written `YYYY-MM-DD` (the usage report's bounds are
/// compared as text with the ledger's days, so `2025-1-5` or `2025-13-45` would silently
/// match nothing).
pub fn is_day(day: &str) -> bool {
    let b = day.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b.get(r.clone())?
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| day[r].parse().ok())?
    };
    let (Some(y), Some(m), Some(d)) = (digits(0..4), digits(5..7), digits(8..10)) else {
        return false;
    };
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    b.len() == 10 && b[4] == b'-' && b[7] == b'-' && (1..=days).contains(&d)
}

/// The first millisecond (unix) of a `YYYY-MM-DD` day, UTC; `None` if it is no day.
pub fn day_start_ms(day: &str) -> Option<i64> {
    if !is_day(day) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| day[r].parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    // Days since 1970-01-01 of a proleptic Gregorian date (years counted from March).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400_000)
}

pub fn spent(conn: &Connection, key_id: &str, since_unix: i64) -> Result<u64, GatewayError> {
    conn.query_row(
        "SELECT COALESCE(SUM(cost_micros), 0) FROM requests
         WHERE key_id = ?1 AND ts_ms >= ?2 AND superseded = 0",
        params![key_id, since_unix.saturating_mul(1000)],
        |r| r.get::<_, i64>(0),
    )
    .map(|x| x.max(0) as u64)
    .map_err(GatewayError::db)
}

/// Totals by day (UTC), model and key of the rows `$rows` picks, whose milliseconds are in
/// `?2`..`?3`.
macro_rules! usage_sql {
    ($rows:literal) => {
        concat!(
            "SELECT date(r.ts_ms / 1000, 'unixepoch') AS day, r.model, r.key_id, k.alias,
                    COUNT(*), SUM(r.prompt_tokens), SUM(r.cached_tokens),
                    SUM(r.completion_tokens), SUM(r.cost_micros)
             FROM requests r LEFT JOIN keys k ON k.id = r.key_id
             WHERE r.superseded = 0 AND ",
            $rows,
            " AND r.ts_ms >= ?2 AND r.ts_ms < ?3
             GROUP BY day, r.model, r.key_id ORDER BY day, r.model, k.alias, r.key_id"
        )
    };
}

/// Every key's, read through the time index (`?1` is NULL).
const USAGE_SQL: &str = usage_sql!("?1 IS NULL");

/// One key's (`?1`), read through the key's own index.
const KEY_USAGE_SQL: &str = usage_sql!("r.key_id = ?1");

/// Totals by day (UTC), model and key.
pub fn usage(conn: &Connection, f: &UsageFilter) -> Result<Vec<UsageLine>, GatewayError> {
    let sql = match f.key_id {
        Some(_) => KEY_USAGE_SQL,
        None => USAGE_SQL,
    };
    let mut stmt = conn.prepare(sql).map_err(GatewayError::db)?;
    // The days as bounds on the indexed time, so a report of a few days reads those rows.
    let bound = |day: &Option<String>, or: i64| -> Result<i64, GatewayError> {
        day.as_deref().map_or(Ok(or), |d| {
            day_start_ms(d)
                .ok_or_else(|| GatewayError::Db(format!("'{d}' is not a YYYY-MM-DD day")))
        })
    };
    let start = bound(&f.start, i64::MIN)?;
    let end = bound(&f.end, i64::MAX - 86_400_000)? + 86_400_000;
    let rows = stmt
        .query_map(params![f.key_id, start, end], |r| {
            let n = |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)?.max(0) as u64) };
            Ok(UsageLine {
                day: r.get(0)?,
                model: r.get(1)?,
                key_id: r.get(2)?,
                key_alias: r.get(3)?,
                requests: n(4)?,
                prompt_tokens: n(5)?,
                cached_tokens: n(6)?,
                completion_tokens: n(7)?,
                total_tokens: n(5)? + n(7)?,
                cost_micros: n(8)?,
            })
        })
        .map_err(GatewayError::db)?;
    rows.collect::<Result<_, _>>().map_err(GatewayError::db)
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

    #[test]
    fn days_are_calendar_dates() {
        for d in ["2026-12-06", "2024-02-29", "2000-02-29", "1999-12-31"] {
            assert!(is_day(d), "{d}");
        }
        for d in [
            "2025-1-5",
            "2025-13-01",
            "2025-02-29",
            "1900-02-29",
            "2025-04-31",
            "2025-00-10",
            "2025-12-00",
            "2025-12-061",
            "2025/12/06",
            "２０２５-12-06",
            "",
        ] {
            assert!(!is_day(d), "{d}");
        }
    }

    #[test]
    fn days_start_at_their_first_millisecond() {
        for (day, ms) in [
            ("1970-01-01", 0),
            ("2026-01-01", 1_767_225_600_000),
            ("2024-02-29", 1_709_164_800_000),
            ("2000-03-01", 951_868_800_000),
            ("1969-12-31", -86_400_000),
        ] {
            assert_eq!(day_start_ms(day), Some(ms), "{day}");
        }
        assert_eq!(day_start_ms("2025-02-29"), None);
    }

    #[tokio::test]
    async fn a_report_of_some_days_reads_only_their_rows_through_the_time_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::start(&path).unwrap();
        let jan2 = 1_767_312_000_000; // 2026-01-02T00:00:00Z
        for (i, ts) in [jan2 - 1, jan2, jan2 + 86_400_000 - 1, jan2 + 86_400_000]
            .into_iter()
            .enumerate()
        {
            let row = Row {
                ts_ms: ts,
                request_id: format!("r{i}"),
                model: "m".into(),
                route: "/v1/chat/completions".into(),
                status: "ok",
                cost_micros: 1 << i,
                ..Row::default()
            };
            assert!(ledger.record(row).await.unwrap());
        }
        let day = |start: &str, end: &str| UsageFilter {
            start: Some(start.into()),
            end: Some(end.into()),
            ..UsageFilter::default()
        };
        let lines = ledger.usage(&day("2026-01-02", "2026-01-02")).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(
            (lines[0].day.as_str(), lines[0].cost_micros),
            ("2026-01-02", 0b0110)
        );
        let lines = ledger.usage(&day("2026-01-01", "2026-01-03")).unwrap();
        let costs: Vec<u64> = lines.iter().map(|l| l.cost_micros).collect();
        assert_eq!(costs, [1, 6, 8]);
        // Without a key, by the time index (not a scan of every row).
        let conn = super::super::db::open(&path).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {USAGE_SQL}"))
            .unwrap()
            .query_map(params![Option::<String>::None, 0, 1], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(plan.iter().any(|p| p.contains("requests_ts")), "{plan:?}");
        // A key's, by its own index.
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {KEY_USAGE_SQL}"))
            .unwrap()
            .query_map(params!["k", 0, 1], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|p| p.contains("requests_key_ts")),
            "{plan:?}"
        );
    }

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
        let lines = usage(&other, &UsageFilter::default()).unwrap();
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
        assert!(usage(&other, &f).unwrap().is_empty());
        let f = UsageFilter {
            key_id: Some("k".into()),
            ..UsageFilter::default()
        };
        assert_eq!(usage(&other, &f).unwrap(), lines);
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
        let lines = usage(&conn, &UsageFilter::default()).unwrap();
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
