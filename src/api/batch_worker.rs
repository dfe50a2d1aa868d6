//! Runs the Batch API's stored requests in the background, through this server's own router:
//! each one takes the same path as a client's (validation, limits, ledger, cache) as the
//! batch's owner, at low priority (`x-edgeinfer-priority: low`: admitted only when no other
//! request waits, and giving its place to one that finds every place taken). At most half of
//! `--max-batch-size` run at once, shared evenly among the batches with work left (oldest
//! first), and no more than half of a key's `max_parallel_requests`, so its own traffic keeps
//! the rest.
//!
//! A request refused for the moment (the key's rate window, a full queue) is tried again
//! later; any other answer is its result. A batch ends `completed` when every request has one,
//! `cancelled` when asked, `expired` past its window; its output and error files are written
//! then. Once a minute it also deletes the files that have expired. State lives in the store,
//! so a restarted server goes on where it stopped (a request running at the stop runs again).
//! At shutdown the running requests are dropped at once, to run again after the restart, so
//! they never hold the drain.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use futures_util::FutureExt;
use serde_json::{json, Value};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tower::ServiceExt;

use super::batch_output::conclude;
use super::batches::store;
use super::error::ApiError;
use super::gate::BatchCall;
use super::AppState;
use crate::gateway::batches::{new_id, ActiveBatch, Line};
use crate::gateway::{AuthError, Principal};

/// What one request came to.
enum Outcome {
    /// Its output line; `ok`: answered 2xx.
    Done { ok: bool, result: Value },
    /// Refused for now: try again after this long.
    Retry(Duration),
    /// The engine failed or stalled with it running: try again after this long, the attempt
    /// counted as one the process did not outlive.
    Cut(Duration),
}

/// What the worker hears of a request: its result stored, or refused for now.
enum Heard {
    Stored,
    Retry(Duration),
}

/// A running request: (batch id, line).
type Key = (String, i64);

struct Worker {
    state: Arc<AppState>,
    app: Router,
    max_running: usize,
    tx: UnboundedSender<(Key, Heard)>,
    /// Each running request's task and its batch's owner.
    running: HashMap<Key, (JoinHandle<()>, String)>,
    /// A batch whose request was refused for now starts nothing before this.
    paused: HashMap<String, Instant>,
    /// Rotates which batch the places are offered to first.
    turn: usize,
    /// When expired files were last deleted.
    swept: Option<Instant>,
    /// A request running alone: its last attempt was one the process or the engine did not
    /// outlive, so it may be what fails them, and nothing runs beside it.
    alone: Option<Key>,
    /// Such a request waits for the running ones to end: nothing new starts.
    hold: bool,
}

/// How often the worker deletes the files that have expired (readers stop seeing a file the
/// moment it expires; this frees its space).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Rounds (of a few files each) one pass of the sweep takes at most.
const SWEEP_ROUNDS: usize = 16;

/// Starts the worker; it runs until the process ends.
pub fn spawn(state: Arc<AppState>, app: Router, max_running: usize) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = Worker {
        state,
        app,
        max_running: max_running.max(1),
        tx,
        running: HashMap::new(),
        paused: HashMap::new(),
        turn: 0,
        swept: None,
        alone: None,
        hold: false,
    };
    tokio::spawn(worker.run(rx));
}

impl Worker {
    async fn run(mut self, mut rx: UnboundedReceiver<(Key, Heard)>) {
        loop {
            tokio::select! {
                Some((key, outcome)) = rx.recv() => self.finished(key, outcome),
                _ = self.state.batch_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            while let Ok((key, outcome)) = rx.try_recv() {
                self.finished(key, outcome);
            }
            if self.state.shutting_down() {
                // Their attempts are taken back as they drop (see `Begun`).
                for (_, (handle, _)) in self.running.drain() {
                    handle.abort();
                }
                continue;
            }
            if self.swept.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
                self.swept = Some(Instant::now());
                if self.sweep().await {
                    // More to do: the next pass, after the batches have had their turn.
                    self.swept = None;
                }
            }
            if self.state.ready().is_err() {
                continue;
            }
            if let Err(e) = self.step().await {
                tracing::error!(error = %e.message, "the batch worker's step failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// Deletes the files that have expired, a few at a time (each round one short
    /// transaction, so the store's other writers get the lock in between), for at most
    /// [`SWEEP_ROUNDS`] rounds; whether some may be left (then the next pass goes on).
    async fn sweep(&self) -> bool {
        const ROUND: usize = 4;
        let now = crate::gateway::db::unix_now();
        let mut deleted = 0;
        let mut more = false;
        for _ in 0..SWEEP_ROUNDS {
            match store(&self.state, move |b| b.delete_expired(now, ROUND)).await {
                Ok(n) => {
                    deleted += n;
                    more = n == ROUND;
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e.message, "deleting expired batch files failed");
                    more = false;
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(files = deleted, "deleted expired batch files");
        }
        more
    }

    fn finished(&mut self, key: Key, heard: Heard) {
        self.running.remove(&key);
        if let Heard::Retry(after) = heard {
            self.paused.insert(key.0, Instant::now() + after);
        }
    }

    /// The lines of `batch` running now.
    fn lines_of(&self, batch: &str) -> Vec<i64> {
        let keys = self.running.keys().filter(|(b, _)| b == batch);
        keys.map(|k| k.1).collect()
    }

    fn stop(&mut self, batch: &str) {
        for line in self.lines_of(batch) {
            if let Some((h, _)) = self.running.remove(&(batch.to_string(), line)) {
                h.abort();
            }
        }
    }

    /// One look at every batch with work left: ends those that are done, cancelled or
    /// expired, and starts requests while there is room: first each batch's even share (the
    /// batches taken in turn from a rotating start, so none waits behind older ones for
    /// ever), then what is left, in the same order. A batch the store refuses to end (its
    /// output too large) or whose key is gone is marked failed; a passing store error is
    /// retried at the next step. Neither holds up the other batches.
    async fn step(&mut self) -> Result<(), ApiError> {
        let now = crate::gateway::db::unix_now();
        self.paused.retain(|_, until| *until > Instant::now());
        let mut active = store(&self.state, |b| b.active()).await?;
        if active.is_empty() {
            return Ok(());
        }
        self.turn = self.turn.wrapping_add(1);
        let start = self.turn % active.len();
        active.rotate_left(start);
        self.hold = self.isolate(&active).await?;
        let share = (self.max_running / active.len()).max(1);
        let mut more = Vec::new();
        for batch in active {
            let id = batch.id.clone();
            match self.look_at(&batch, now, share).await {
                Ok(true) => more.push(batch),
                Ok(false) => {}
                Err(e) => self.failed(&id, e).await,
            }
        }
        for batch in more {
            if self.running.len() >= self.max_running || self.hold {
                break;
            }
            let id = batch.id.clone();
            if let Err(e) = self.look_at(&batch, now, self.max_running).await {
                self.failed(&id, e).await;
            }
        }
        Ok(())
    }

    /// Runs alone the first request whose last attempt the process or the engine did not
    /// outlive (those that ran beside it are then not counted with it again: a request that
    /// fails the engine every time is given up alone); whether nothing else may start.
    async fn isolate(&mut self, active: &[ActiveBatch]) -> Result<bool, ApiError> {
        if let Some(key) = &self.alone {
            if self.running.contains_key(key) {
                return Ok(true);
            }
            self.alone = None;
        }
        for batch in active {
            if self.paused.contains_key(&batch.id) || batch.object["status"] == "cancelling" {
                continue;
            }
            let (id, busy) = (batch.id.clone(), self.lines_of(&batch.id));
            let Some(line) = store(&self.state, move |b| b.suspect(&id, &busy)).await? else {
                continue;
            };
            // It waits for the running ones to end.
            if self.running.is_empty() {
                self.alone = Some((batch.id.clone(), line.line));
                self.start(batch, line);
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// A batch's step failed: a refusal (400: what the store will not hold, or a key that
    /// is gone) fails the batch; anything else is logged and tried again.
    async fn failed(&mut self, id: &str, e: ApiError) {
        if e.status != StatusCode::BAD_REQUEST {
            tracing::error!(batch = %id, error = %e.message, "a batch's step failed; retrying");
            return;
        }
        tracing::warn!(batch = %id, error = %e.message, "a batch failed");
        self.stop(id);
        let (id, message) = (id.to_string(), e.message);
        if let Err(e) = store(&self.state, move |b| b.fail(&id, &message)).await {
            tracing::error!(error = %e.message, "a failed batch could not be marked");
        }
    }

    /// Ends `batch` if it is done, cancelled or expired, else starts up to `share` of its
    /// requests while there is room; whether it has requests left to start.
    async fn look_at(
        &mut self,
        batch: &ActiveBatch,
        now: i64,
        share: usize,
    ) -> Result<bool, ApiError> {
        if batch.object["status"] == "cancelling" {
            self.stop(&batch.id);
            return conclude(&self.state, batch, "cancelled")
                .await
                .map(|_| false);
        }
        let cap = match self.owner_cap(batch) {
            Ok(cap) => cap,
            Err(gone) => {
                self.stop(&batch.id);
                return Err(ApiError::bad_request(gone));
            }
        };
        let mine = self.lines_of(&batch.id);
        let owner_running = self
            .running
            .values()
            .filter(|(_, o)| *o == batch.owner)
            .count();
        let room = self
            .max_running
            .saturating_sub(if self.hold {
                usize::MAX
            } else {
                self.running.len()
            })
            .min(share.saturating_sub(mine.len()))
            .min(cap.saturating_sub(owner_running));
        let (id, busy) = (batch.id.clone(), mine.clone());
        let todo = store(&self.state, move |b| b.pending(&id, &busy, room + 1)).await?;
        if todo.is_empty() && mine.is_empty() {
            return conclude(&self.state, batch, "completed")
                .await
                .map(|_| false);
        }
        if batch.object["expires_at"]
            .as_i64()
            .is_some_and(|t| now >= t)
        {
            self.stop(&batch.id);
            return conclude(&self.state, batch, "expired").await.map(|_| false);
        }
        if self.paused.contains_key(&batch.id) {
            return Ok(false);
        }
        let left = todo.len() > room;
        for line in todo.into_iter().take(room) {
            self.start(batch, line);
        }
        Ok(left)
    }

    /// Starts one of `batch`'s requests.
    fn start(&mut self, batch: &ActiveBatch, line: Line) {
        let key = (batch.id.clone(), line.line);
        let call = BatchCall {
            owner_kind: batch.owner_kind.clone(),
            owner: batch.owner.clone(),
            attempt: format!("{}/{}", batch.id, line.line),
        };
        let task = run_line(
            self.state.clone(),
            self.app.clone(),
            call,
            batch.id.clone(),
            line,
        );
        let tx = self.tx.clone();
        let handle = tokio::spawn(async move {
            let (key, outcome) = task.await;
            let _ = tx.send((key, outcome));
        });
        self.running.insert(key, (handle, batch.owner.clone()));
    }

    /// How many of a batch's owner's requests may run at once: half its key's
    /// `max_parallel_requests` (at least one), so its own traffic keeps the rest. Err: the
    /// key that made it is revoked or expired (or auth changed under it), why.
    fn owner_cap(&self, batch: &ActiveBatch) -> Result<usize, String> {
        match self
            .state
            .gateway
            .principal_of(&batch.owner_kind, &batch.owner)
        {
            Ok(Principal::Key(k)) => Ok(k
                .max_parallel_requests
                .map_or(usize::MAX, |p| (p as usize / 2).max(1))),
            Ok(_) => Ok(usize::MAX),
            // The key store could not be read: nothing new starts this time round.
            Err(AuthError::Unavailable) => Ok(0),
            Err(_) => Err(
                "The key that made this batch was revoked or has expired (or the server's keys changed); its remaining requests were not run."
                    .into(),
            ),
        }
    }
}

/// Attempts at one request that may end with the process before it is given up.
const MAX_CUT_ATTEMPTS: i64 = 3;

/// Runs one request and stores its result; a panic in it is its (failed) result.
async fn run_line(
    state: Arc<AppState>,
    app: Router,
    call: BatchCall,
    batch_id: String,
    line: Line,
) -> (Key, Heard) {
    let line_no = line.line;
    let custom_id = line.custom_id.clone();
    // A request whose attempts the process or the engine did not outlive is not tried for
    // ever (it may be what stops them): after `MAX_CUT_ATTEMPTS`, its answer is an error.
    let id = batch_id.clone();
    let started = store(&state, move |b| b.begin_attempt(&id, line_no))
        .await
        .unwrap_or(1);
    let mut begun = Begun {
        state: state.clone(),
        batch: batch_id.clone(),
        line: line_no,
        open: true,
    };
    let outcome = if started > MAX_CUT_ATTEMPTS {
        failed(
            &custom_id,
            &format!("The request was not tried again: each of its last {MAX_CUT_ATTEMPTS} attempts ended with the server stopping, or its engine failing or stalling, while it ran."),
        )
    } else {
        AssertUnwindSafe(call_one(app, call, &batch_id, line))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| failed(&custom_id, "The request failed inside the server."))
    };
    // An attempt the engine could not finish stays counted, as one the process did not
    // outlive (it may be what fails or stalls the engine).
    let id = batch_id.clone();
    let ran = match outcome {
        Outcome::Done { .. } => Some(true),
        Outcome::Retry(_) => Some(false),
        Outcome::Cut(_) => None,
    };
    begun.open = false;
    if let Some(ran) = ran {
        if let Err(e) = store(&state, move |b| b.end_attempt(&id, line_no, ran)).await {
            tracing::error!(error = %e.message, "a batch request's attempt could not be closed");
        }
    }
    let heard = match outcome {
        Outcome::Done { ok, result } => {
            let id = batch_id.clone();
            match store(&state, move |b| b.finish_line(&id, line_no, ok, &result)).await {
                Ok(()) => Heard::Stored,
                Err(e) => {
                    tracing::error!(error = %e.message, "a batch result could not be stored");
                    Heard::Retry(Duration::from_secs(1))
                }
            }
        }
        Outcome::Retry(after) | Outcome::Cut(after) => Heard::Retry(after),
    };
    ((batch_id, line_no), heard)
}

/// An attempt begun and not yet ended. Dropped so (the worker stopped it: a graceful
/// shutdown, its batch cancelled or ended), it is taken back: the stop was not the
/// request's doing (it runs again after a restart, not alone). Unless the engine has failed
/// or stalled, which the request may have done: then it stays counted.
struct Begun {
    state: Arc<AppState>,
    batch: String,
    line: i64,
    open: bool,
}

impl Drop for Begun {
    fn drop(&mut self) {
        let engine_ok = (self.state.ready.get())
            .is_some_and(|r| !r.engine.has_failed() && !self.state.stalled(r));
        if !self.open || !engine_ok {
            return;
        }
        let batches = &self.state.gateway.batches;
        if let Err(e) = batches.end_attempt(&self.batch, self.line, false) {
            tracing::error!(error = %e, "a stopped batch request's attempt could not be taken back");
        }
    }
}

/// Runs one request through the router as the batch's owner.
async fn call_one(app: Router, call: BatchCall, batch_id: &str, line: Line) -> Outcome {
    let request_id = new_id("batch_req_");
    let req = Request::post(&line.url)
        .header("content-type", "application/json")
        .header("x-request-id", &request_id)
        .header("x-edgeinfer-priority", "low")
        // A batch has a day: no per-request deadline.
        .header("cf-aig-request-timeout", "0")
        .header("cf-aig-metadata", json!({"batch_id": batch_id}).to_string())
        .extension(call)
        .body(Body::from(line.body.clone()));
    let req = match req {
        Ok(r) => r,
        Err(e) => return failed(&line.custom_id, &e.to_string()),
    };
    let Ok(resp) = app.oneshot(req).await;
    let status = resp.status();
    let cut = resp
        .extensions()
        .get::<super::error::EngineUnavailable>()
        .is_some();
    let headers = resp.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header("retry-after-ms")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .or_else(|| {
            header("retry-after")
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs)
        })
        .unwrap_or(Duration::from_secs(1))
        .clamp(Duration::from_millis(100), Duration::from_secs(60));
    let final_refusal = header("x-should-retry").as_deref() == Some("false");
    let timed = header("retry-after").is_some();
    let bytes = match axum::body::to_bytes(resp.into_body(), 256 << 20).await {
        Ok(b) => b,
        Err(e) => return failed(&line.custom_id, &format!("reading the reply: {e}")),
    };
    let body: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&bytes).into_owned()));
    // Read from the headers, which every surface sends alike (an Anthropic or Workers AI
    // body has no OpenAI error code): a refusal that says when to come back (a rate window,
    // a spent budget that resets) waits for it; one marked final without a time (a budget
    // that never resets) is the request's answer.
    let later = timed || !final_refusal;
    if cut {
        return Outcome::Cut(retry_after);
    }
    if (status == StatusCode::TOO_MANY_REQUESTS && later)
        || status == StatusCode::SERVICE_UNAVAILABLE
    {
        return Outcome::Retry(retry_after);
    }
    Outcome::Done {
        ok: status.is_success(),
        result: json!({"id": request_id, "custom_id": line.custom_id,
            "response": {"status_code": status.as_u16(), "request_id": request_id, "body": body},
            "error": null}),
    }
}

/// An output line for a request that got no reply.
fn failed(custom_id: &str, message: &str) -> Outcome {
    Outcome::Done {
        ok: false,
        result: json!({"id": new_id("batch_req_"), "custom_id": custom_id, "response": null,
            "error": {"code": "internal_error", "message": message}}),
    }
}
