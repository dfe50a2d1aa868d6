//! The ledger's retention (`--ledger-retention-days`): rows that ended before the start of
//! the UTC day that many days ago are folded, then deleted:
//! - into their totals by day, model and key (`usage_days`), which the usage reports add to
//!   the rows kept, so a report reads the same before and after;
//! - into each key's spend by the hour from its creation (`spend_carried`), which the key's
//!   budget adds from its period's start, so a lifetime budget, or a period longer than the
//!   retention, still counts them, whatever `budget_duration` says then (exact for periods
//!   of whole hours; a shorter period starts after every folded row).
//!
//! Only the per-request detail goes: ids, statuses, timings, sessions, metadata.
//!
//! Knows rows and SQL; never HTTP.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::{db, GatewayError};

/// The shortest retention: a batch line's attempts all end within its 24-hour window, so a
/// later attempt never has to supersede a row already folded.
pub const MIN_DAYS: u32 = 2;

/// Rows folded per transaction (about: rows ending in the same millisecond go together), so
/// the ledger's writer waits at most one chunk.
const CHUNK: i64 = 5_000;

/// How often the retention runs after the first time, at the start.
const EVERY: Duration = Duration::from_secs(3_600);

const DAY_MS: i64 = 86_400_000;

/// The first millisecond kept at `now_ms`: the start (UTC) of the day `days` days before.
pub fn cutoff_ms(now_ms: i64, days: u32) -> i64 {
    (now_ms.div_euclid(DAY_MS) - i64::from(days)) * DAY_MS
}

/// Folds the rows that ended before `?1` into their daily totals.
const FOLD_DAYS: &str = "
    INSERT INTO usage_days (day, model, key_id, requests, prompt_tokens, cached_tokens,
                            completion_tokens, cost_micros)
    SELECT date(ts_ms / 1000, 'unixepoch'), model, COALESCE(key_id, ''), COUNT(*),
           SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), SUM(cost_micros)
    FROM requests WHERE ts_ms < ?1 AND superseded = 0
    GROUP BY 1, 2, 3
    ON CONFLICT (day, model, key_id) DO UPDATE SET
        requests = requests + excluded.requests,
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        cached_tokens = cached_tokens + excluded.cached_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens,
        cost_micros = cost_micros + excluded.cost_micros";

/// Folds the keys' spend in the rows that ended before `?1` into the hours from each key's
/// creation, where its budget periods start (`limits::period_start`: at the creation, then
/// every `budget_duration_secs`). A row from before the creation (no period counts it) goes
/// into the hour before.
const FOLD_SPEND: &str = "
    INSERT INTO spend_carried (key_id, hour_start, cost_micros)
    SELECT r.key_id,
           CASE WHEN r.ts_ms / 1000 >= k.created
                THEN k.created + (r.ts_ms / 1000 - k.created) / 3600 * 3600
                ELSE k.created - 3600 END,
           SUM(r.cost_micros)
    FROM requests r JOIN keys k ON k.id = r.key_id
    WHERE r.ts_ms < ?1 AND r.superseded = 0
    GROUP BY 1, 2
    ON CONFLICT (key_id, hour_start) DO UPDATE SET
        cost_micros = cost_micros + excluded.cost_micros";

/// Folds and deletes the rows that ended before `cutoff_ms`, about `chunk` rows per
/// transaction with `pause` between them; how many rows went.
pub fn prune(
    conn: &mut Connection,
    cutoff_ms: i64,
    chunk: i64,
    pause: Duration,
) -> rusqlite::Result<u64> {
    let mut total = 0;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // The chunk: the oldest rows, through the time index, up to the `chunk`-th one's time.
        let upper = tx
            .query_row(
                "SELECT ts_ms FROM requests WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT 1 OFFSET ?2",
                rusqlite::params![cutoff_ms, chunk.max(1) - 1],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map_or(cutoff_ms, |last| last + 1);
        tx.execute(FOLD_DAYS, [upper])?;
        tx.execute(FOLD_SPEND, [upper])?;
        let gone = tx.execute("DELETE FROM requests WHERE ts_ms < ?1", [upper])?;
        tx.commit()?;
        total += gone as u64;
        if gone == 0 || upper == cutoff_ms {
            return Ok(total);
        }
        std::thread::sleep(pause);
    }
}

/// Starts the thread that keeps `days` of the ledger at `path`: now, then every hour.
pub fn keep(path: &Path, days: u32) -> Result<(), GatewayError> {
    let mut conn = db::open(path)?;
    std::thread::Builder::new()
        .name("edgeinfer-retention".into())
        .spawn(move || loop {
            let cutoff = cutoff_ms(db::unix_ms(), days);
            match prune(&mut conn, cutoff, CHUNK, Duration::from_millis(20)) {
                Ok(0) => {}
                Ok(rows) => tracing::info!(
                    rows,
                    days,
                    "ledger rows past the retention folded into daily totals"
                ),
                // Tried again at the next hour; the rows stay until then.
                Err(e) => tracing::warn!(error = %e, "ledger retention failed"),
            }
            std::thread::sleep(EVERY);
        })
        .map(|_| ())
        .map_err(|e| GatewayError::Store {
            path: path.to_path_buf(),
            reason: format!("cannot start the ledger's retention thread: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::ledger::{spent, Ledger, Row};
    use crate::gateway::usage::{usage, UsageFilter};

    #[test]
    fn the_cutoff_is_the_start_of_a_utc_day() {
        let dec6_noon = 1_796_558_400_000; // 2026-12-06T12:00:00Z
        assert_eq!(cutoff_ms(dec6_noon, 2), 1_796_342_400_000); // 2026-12-04T00:00:00Z
        assert_eq!(cutoff_ms(1_796_515_200_000, 0), 1_796_515_200_000);
    }

    /// A ledger with a key whose budget periods are 10 days (made 40 days before `now`) and
    /// one with a lifetime budget, and rows of both, of no key and of a superseded attempt,
    /// over 40 days.
    async fn ledger_of_forty_days(path: &Path, now: i64) -> Ledger {
        let conn = db::open(path).unwrap();
        let made = now / 1000 - 40 * 86_400;
        for (id, duration) in [("periodic", Some(10 * 86_400)), ("lifetime", None)] {
            conn.execute(
                "INSERT INTO keys (id, models, budget_duration_secs, metadata, created)
                 VALUES (?1, '[]', ?2, '{}', ?3)",
                rusqlite::params![id, duration, made],
            )
            .unwrap();
        }
        let ledger = Ledger::start(path).unwrap();
        for i in 0..410i64 {
            let key = ["periodic", "lifetime", ""][i as usize % 3];
            // Ten rows a day, and ten more at one millisecond (a chunk's edge among them).
            let at = if i < 400 {
                i * 8_640_000 + 1
            } else {
                10 * 86_400_000 + 7
            };
            let row = Row {
                ts_ms: made * 1000 + at,
                request_id: format!("r{i}"),
                key_id: (!key.is_empty()).then(|| key.to_string()),
                model: ["a", "b"][i as usize % 2].into(),
                route: "/v1/chat/completions".into(),
                status: "ok",
                prompt_tokens: 10 + i as u64,
                cached_tokens: i as u64 % 7,
                completion_tokens: 3 * i as u64,
                cost_micros: 1_000 + i as u64,
                // Every 50th row is a batch line's attempt, superseded by the next row.
                attempt: (i % 50 < 2).then(|| format!("b/{}", i / 50)),
                ..Row::default()
            };
            assert!(ledger.record(row).await.unwrap());
        }
        ledger
    }

    #[tokio::test]
    async fn folded_rows_leave_the_reports_and_budgets_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let now = 1_796_558_400_000; // 2026-12-06T12:00:00Z
        let _ledger = ledger_of_forty_days(&path, now).await;
        let mut conn = db::open(&path).unwrap();
        let made = now / 1000 - 40 * 86_400;
        let reports = |conn: &Connection| {
            let mut all = vec![];
            for key_id in [None, Some("periodic"), Some("lifetime")] {
                for (start, end) in [(None, None), (Some("2026-10-30"), Some("2026-11-20"))] {
                    let f = UsageFilter {
                        key_id: key_id.map(String::from),
                        start: start.map(String::from),
                        end: end.map(String::from),
                    };
                    all.push(usage(conn, &f).unwrap());
                }
            }
            // The periods' starts as the keys have them, and as other whole-hour durations
            // would (the key changed since).
            let periods = (0..5).map(|p| made + p * 10 * 86_400);
            let other_durations = [0, 1, 37, 24 * 9 + 5, 24 * 31].map(|h| made + h * 3_600);
            let budgets: Vec<u64> = periods
                .chain(other_durations)
                .flat_map(|since| ["periodic", "lifetime"].map(|k| spent(conn, k, since).unwrap()))
                .collect();
            (all, budgets)
        };
        let before = reports(&conn);
        // The budgets first (short to print), then the reports.
        let same = |conn: &Connection| {
            let now = reports(conn);
            assert_eq!(now.1, before.1, "the budgets' spend");
            assert!(now.0 == before.0, "the usage reports changed");
        };
        let rows = |conn: &Connection| -> i64 {
            conn.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(rows(&conn), 410);
        // Seven days kept; the older ones fold in chunks of 7 rows (a day's rows split
        // across chunks, and chunks across days).
        let cutoff = cutoff_ms(now, 7);
        let gone = prune(&mut conn, cutoff, 7, Duration::ZERO).unwrap();
        let kept: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM requests WHERE ts_ms >= ?1",
                [cutoff],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows(&conn), kept);
        assert_eq!(gone as i64 + kept, 410);
        assert!(gone > 300 && kept > 50, "{gone} {kept}");
        same(&conn);
        // Again: nothing more goes, and nothing counts twice.
        assert_eq!(prune(&mut conn, cutoff, 7, Duration::ZERO).unwrap(), 0);
        same(&conn);
        // Then everything, in one chunk.
        assert_eq!(
            prune(&mut conn, now + 1, 1_000, Duration::ZERO).unwrap() as i64,
            kept
        );
        assert_eq!(rows(&conn), 0);
        same(&conn);
    }
}
