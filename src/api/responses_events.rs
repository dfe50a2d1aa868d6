//! A background response's stream (`background: true` with `stream: true`): the run's typed
//! events are kept as they come, so the client that created it, and any that joins later
//! with `GET /v1/responses/{id}?stream=true&starting_after=N` (a dropped connection, as
//! OpenAI's SDKs resume), reads them from where it was, then follows the run to its end.
//! The run goes on whoever reads it. The node keeps the events of its last
//! [`KEPT_ENDED`] ended runs, each up to [`MAX_BYTES`], in memory.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Body;
use axum::response::sse::Event as SseEvent;
use axum::response::Response;
use futures_util::stream::{self, StreamExt};
use tokio::sync::Notify;

use super::error::ApiError;

/// Ended runs whose events are kept (the oldest go first).
pub const KEPT_ENDED: usize = 64;
/// A run's events are kept up to this many bytes; past them its stream cannot be joined.
pub const MAX_BYTES: usize = 4 << 20;

/// One run's events, in order (an event's place is its `sequence_number`).
#[derive(Default)]
pub struct EventLog {
    inner: Mutex<Log>,
    changed: Notify,
}

#[derive(Default)]
struct Log {
    events: Vec<(String, String)>,
    bytes: usize,
    ended: bool,
    /// Past [`MAX_BYTES`]: no more are kept, and no one may join.
    overflowed: bool,
}

impl EventLog {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps one event (`name`, its JSON `data`) for its readers.
    pub fn push(&self, name: &str, data: &str) {
        let mut log = self.lock();
        log.bytes += name.len() + data.len();
        if log.bytes > MAX_BYTES {
            log.overflowed = true;
        } else {
            log.events.push((name.to_string(), data.to_string()));
        }
        drop(log);
        self.changed.notify_waiters();
    }

    /// How many events it holds (the next one's `sequence_number`).
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// No more events: readers end once they have read them.
    pub fn end(&self) {
        self.lock().ended = true;
        self.changed.notify_waiters();
    }

    /// The event at `at`; `Some(None)`: there is none and will be none; `None`: not yet.
    fn at(&self, at: usize) -> Option<Option<SseEvent>> {
        let l = self.lock();
        match l.events.get(at) {
            Some((name, data)) => Some(Some(SseEvent::default().event(name).data(data))),
            None if l.ended || l.overflowed => Some(None),
            None => None,
        }
    }

    /// The stream from the event after `after` (from the first without it), following the
    /// run until it ends.
    pub fn follow(
        self: Arc<Self>,
        after: Option<u64>,
        keep_alive: std::time::Duration,
    ) -> Result<Response, ApiError> {
        if self.lock().overflowed {
            return Err(ApiError::bad_request(format!(
                "this response's events outgrew the {MAX_BYTES} bytes the node keeps; GET it without `stream`"
            )));
        }
        let from = after.map_or(0, |a| a.saturating_add(1) as usize);
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
                    Some(Some(ev)) => return Some((Ok::<_, Infallible>(ev), (log, at + 1))),
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
        log.end();
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
            // Keep-alive comments carry no data.
            if !payload.is_empty() {
                log.push(name, &payload.join("\n"));
            }
        }
    }
}
