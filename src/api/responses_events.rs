//! A background response's stream (`background: true` with `stream: true`): the run's typed
//! events are kept as they come, so the client that created it, and any that joins later
//! with `GET /v1/responses/{id}?stream=true&starting_after=N` (a dropped connection, as
//! OpenAI's SDKs resume), reads them from where it was, then follows the run to its end.
//! The run goes on whoever reads it. The node keeps the events of its last
//! [`KEPT_ENDED`] ended runs, the last [`MAX_BYTES`] of each, in memory.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Body;
use axum::response::sse::Event as SseEvent;
use axum::response::Response;
use futures_util::stream::{self, StreamExt};
use serde_json::Value;
use tokio::sync::Notify;

use super::error::ApiError;

/// Ended runs whose events are kept (the oldest go first).
pub const KEPT_ENDED: usize = 64;
/// A run's last events kept, in bytes: a stream can be joined again from within them.
pub const MAX_BYTES: usize = 4 << 20;

/// One run's events, in order, each with its `sequence_number`: the last [`MAX_BYTES`] of
/// them (the oldest go first, so the end is always there for the readers at it).
#[derive(Default)]
pub struct EventLog {
    inner: Mutex<Log>,
    changed: Notify,
}

#[derive(Default)]
struct Log {
    events: VecDeque<(String, String)>,
    /// The `sequence_number` of `events[0]`.
    first: usize,
    bytes: usize,
    ended: bool,
}

impl EventLog {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the next event: `data` gets its `type` (`name`) and `sequence_number`.
    pub fn push(&self, name: &str, mut data: Value) {
        let mut log = self.lock();
        data["type"] = Value::from(name);
        data["sequence_number"] = Value::from(log.first + log.events.len());
        let data = data.to_string();
        log.bytes += name.len() + data.len();
        log.events.push_back((name.to_string(), data));
        while log.bytes > MAX_BYTES && log.events.len() > 1 {
            if let Some((n, d)) = log.events.pop_front() {
                log.bytes -= n.len() + d.len();
                log.first += 1;
            }
        }
        drop(log);
        self.changed.notify_waiters();
    }

    /// No more events: readers end once they have read them. Whether it had not ended.
    pub fn end(&self) -> bool {
        let was = std::mem::replace(&mut self.lock().ended, true);
        self.changed.notify_waiters();
        !was
    }

    /// Whether it still holds its first event.
    pub fn whole(&self) -> bool {
        self.lock().first == 0
    }

    /// The event at `at` and where to read next; `Some(None)`: there is none and will be none;
    /// `None`: not yet. A reader fallen behind what is kept gets an `error` event, then nothing.
    fn at(&self, at: usize) -> Option<Option<(SseEvent, usize)>> {
        if at == usize::MAX {
            return Some(None);
        }
        let l = self.lock();
        match at.checked_sub(l.first).map(|i| l.events.get(i)) {
            None => {
                let e = serde_json::json!({"type": "error", "code": "events_not_kept",
                    "message": format!("events before {} are no longer kept; GET the response without `stream`", l.first),
                    "param": null});
                // After it, nothing more.
                Some(Some((
                    SseEvent::default().event("error").data(e.to_string()),
                    usize::MAX,
                )))
            }
            Some(Some((name, data))) => {
                Some(Some((SseEvent::default().event(name).data(data), at + 1)))
            }
            Some(None) if l.ended => Some(None),
            Some(None) => None,
        }
    }

    /// The stream from the event after `after` (from the first without it), following the
    /// run until it ends.
    pub fn follow(
        self: Arc<Self>,
        after: Option<u64>,
        keep_alive: std::time::Duration,
    ) -> Result<Response, ApiError> {
        let from = after.map_or(0, |a| a.saturating_add(1) as usize);
        let first = self.lock().first;
        if from < first {
            let param = if after.is_some() {
                "starting_after"
            } else {
                "stream"
            };
            return Err(ApiError::invalid(
                param,
                format!("this response's events before {first} are no longer kept (the node keeps the last {MAX_BYTES} bytes); join after {} or GET it without `stream`", first - 1),
            ));
        }
        let events = stream::unfold((self, from), |(log, at)| async move {
            loop {
                let step = {
                    let changed = log.changed.notified();
                    tokio::pin!(changed);
                    // Registered before the log is read: an event pushed in between wakes it.
                    changed.as_mut().enable();
                    let step = log.at(at);
                    if step.is_none() {
                        changed.await;
                    }
                    step
                };
                match step {
                    Some(Some((ev, next))) => return Some((Ok::<_, Infallible>(ev), (log, next))),
                    Some(None) => return None,
                    None => continue,
                }
            }
        });
        Ok(super::stream::sse_of(events, keep_alive))
    }
}

/// The event logs of background runs, by response id: those running, and the last
/// [`KEPT_ENDED`] ended.
#[derive(Default)]
pub struct Logs {
    inner: Mutex<Kept>,
}

/// The logs by id, and the ids of the ended ones, oldest first.
type Kept = (HashMap<String, Arc<EventLog>>, VecDeque<String>);

impl Logs {
    fn lock(&self) -> MutexGuard<'_, Kept> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new log for the run of `id`.
    pub fn open(&self, id: &str) -> Arc<EventLog> {
        let log = Arc::new(EventLog::default());
        self.lock().0.insert(id.to_string(), log.clone());
        log
    }

    /// The run of `id` ended: its log ends, and is kept among the last ended.
    pub fn end(&self, id: &str) {
        let mut g = self.lock();
        let Some(log) = g.0.get(id).cloned() else {
            return;
        };
        if !log.end() {
            return;
        }
        g.1.push_back(id.to_string());
        while g.1.len() > KEPT_ENDED {
            if let Some(old) = g.1.pop_front() {
                g.0.remove(&old);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<EventLog>> {
        self.lock().0.get(id).cloned()
    }

    /// Forgets the events of `id` (deleted).
    pub fn remove(&self, id: &str) {
        let mut g = self.lock();
        if let Some(log) = g.0.remove(id) {
            log.end();
        }
        g.1.retain(|x| x != id);
    }
}

/// Reads a streamed answer's server-sent events into `log` until it ends.
pub async fn record(body: Body, log: &EventLog) {
    let mut data = body.into_data_stream();
    // Bytes: a chunk may end inside a character.
    let mut buf: Vec<u8> = Vec::new();
    while let Some(Ok(chunk)) = data.next().await {
        buf.extend_from_slice(&chunk);
        while let Some(at) = buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buf.drain(..at + 2).collect();
            let frame = String::from_utf8_lossy(&frame);
            let (mut name, mut payload) = ("message", Vec::new());
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim_start();
                } else if let Some(v) = line.strip_prefix("data:") {
                    payload.push(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            // Keep-alive comments carry no data; the run's `response.created` came first.
            let data: Value = serde_json::from_str(&payload.join("\n")).unwrap_or_default();
            if !payload.is_empty() && name != "response.created" {
                log.push(name, data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_long_runs_last_events_are_kept_and_earlier_joins_refused() {
        let log = Arc::new(EventLog::default());
        let delta = "x".repeat(1000);
        let n = MAX_BYTES / 1000 + 500;
        for _ in 0..n {
            log.push(
                "response.output_text.delta",
                serde_json::json!({"delta": delta}),
            );
        }
        log.push("response.completed", serde_json::json!({"response": {}}));
        let l = log.lock();
        assert!(
            l.first > 0 && l.bytes <= MAX_BYTES,
            "{} {}",
            l.first,
            l.bytes
        );
        // The end is kept, numbered in order from the first.
        let (name, data) = l.events.back().unwrap();
        assert_eq!(name, "response.completed");
        let data: Value = serde_json::from_str(data).unwrap();
        assert_eq!(data["sequence_number"], n);
        assert_eq!(data["type"], "response.completed");
        let first = l.first as u64;
        drop(l);
        let keep_alive = std::time::Duration::from_secs(15);
        assert!(log.clone().follow(None, keep_alive).is_err());
        assert!(log.clone().follow(Some(first - 2), keep_alive).is_err());
        assert!(log.clone().follow(Some(first - 1), keep_alive).is_ok());
    }

    #[test]
    fn a_log_ended_twice_is_kept_once() {
        let logs = Logs::default();
        for i in 0..KEPT_ENDED + 1 {
            logs.open(&i.to_string());
            logs.end(&i.to_string());
            logs.end(&i.to_string());
        }
        // Only the oldest went: each ended log counts once.
        assert!(logs.get("0").is_none() && logs.get("1").is_some());
        assert_eq!(logs.lock().1.len(), KEPT_ENDED);
    }
}
