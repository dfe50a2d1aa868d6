//! Usage reports: the ledger's totals by day (UTC), model and key, for `GET /v1/usage`, the
//! console and `edgeinfer usage`. Rows past the ledger's retention are read from their
//! daily totals (see [`super::retention`]), so a report is the same before and after.
//!
//! Knows rows and SQL; never HTTP.

use rusqlite::{params, Connection};
use serde::Serialize;

use super::GatewayError;

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

/// Totals by day (UTC), model and key of the rows `$rows` picks: the ledger's rows whose
/// milliseconds are in `?2`..`?3`, and the daily totals of the rows past the retention
/// whose days are in `?4..=?5`.
macro_rules! usage_sql {
    ($rows:literal) => {
        concat!(
            "SELECT u.day, u.model, u.key_id, k.alias,
                    SUM(u.n), SUM(u.p), SUM(u.c), SUM(u.o), SUM(u.cost)
             FROM (
                SELECT date(r.ts_ms / 1000, 'unixepoch') AS day, r.model AS model,
                       r.key_id AS key_id, COUNT(*) AS n, SUM(r.prompt_tokens) AS p,
                       SUM(r.cached_tokens) AS c, SUM(r.completion_tokens) AS o,
                       SUM(r.cost_micros) AS cost
                FROM requests r
                WHERE r.superseded = 0 AND ",
            $rows,
            " AND r.ts_ms >= ?2 AND r.ts_ms < ?3
                GROUP BY 1, 2, 3
                UNION ALL
                SELECT r.day, r.model, NULLIF(r.key_id, ''), r.requests, r.prompt_tokens,
                       r.cached_tokens, r.completion_tokens, r.cost_micros
                FROM usage_days r
                WHERE ",
            $rows,
            " AND r.day >= ?4 AND r.day <= ?5
             ) u LEFT JOIN keys k ON k.id = u.key_id
             GROUP BY u.day, u.model, u.key_id ORDER BY u.day, u.model, k.alias, u.key_id"
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
    let days = (
        f.start.as_deref().unwrap_or(""),
        f.end.as_deref().unwrap_or("9999-12-31"),
    );
    let rows = stmt
        .query_map(params![f.key_id, start, end, days.0, days.1], |r| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::ledger::{Ledger, Row};

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
        let conn = super::super::db::open(&path).unwrap();
        let plan = |sql: &str, key: Option<&str>| -> String {
            conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map(params![key, 0, 1, "2026-01-01", "2026-01-02"], |r| {
                    r.get::<_, String>(3)
                })
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .join("; ")
        };
        // Without a key, by the time index (not a scan of every row); with one, by the key's
        // own indexes, the rows' and the daily totals'.
        let all = plan(USAGE_SQL, None);
        assert!(all.contains("requests_ts"), "{all}");
        let one = plan(KEY_USAGE_SQL, Some("k"));
        assert!(one.contains("requests_key_ts"), "{one}");
        assert!(one.contains("usage_days_key"), "{one}");
    }
}
