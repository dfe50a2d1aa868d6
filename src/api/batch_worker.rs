//! Runs the Batch API's stored requests in the background, through this server's own router:
//! each one takes the same path as a client's (validation, limits, ledger, cache) as the
//! batch's owner, at low priority (`x-edgeinfer-priority: low`: admitted only when no other
//! request waits). At most half of `--max-batch-size` run at once, oldest batch first.
//!
//! A request refused for the moment (the key's rate window, a full queue, a restart) is tried
//! again later; any other answer is its result. A batch ends `completed` when every request
//! has one, `cancelled` when asked, `expired` past its window; its output and error files are
//! written then. State lives in the store, so a restarted server goes on where it stopped
//! (a request running at the stop runs again).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tower::ServiceExt;

use super::batches::store;
use super::gate::BatchCall;
use super::AppState;
use crate::gateway::batches::{new_id, ActiveBatch, Line};

/// What one request came to.
enum Outcome {
    /// Its output line; `ok`: answered 2xx.
    Done { ok: bool, result: Value },
    /// Refused for now: try again after this long.
    Retry(Duration),
}

type Running = HashMap<(String, i64), JoinHandle<()>>;

/// Starts the worker; it runs until the process ends.
pub fn spawn(state: Arc<AppState>, app: Router, max_running: usize) {
    tokio::spawn(run(state, app, max_running.max(1)));
}

async fn run(state: Arc<AppState>, app: Router, max_running: usize) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<((String, i64), Outcome)>();
    let mut running: Running = HashMap::new();
    // A batch whose request was refused for now starts nothing before this.
    let mut paused: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            Some((key, outcome)) = rx.recv() => {
                running.remove(&key);
                if let Outcome::Retry(after) = outcome {
                    paused.insert(key.0, Instant::now() + after);
                }
                drain(&mut rx, &mut running, &mut paused);
            }
            _ = state.batch_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if state.shutting_down() || state.ready().is_err() {
            continue;
        }
        if let Err(e) = step(&state, &app, &tx, &mut running, &mut paused, max_running).await {
            tracing::error!(error = %e.message, "the batch worker's step failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Takes in the completions already queued, so a step sees them all.
fn drain(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<((String, i64), Outcome)>,
    running: &mut Running,
    paused: &mut HashMap<String, Instant>,
) {
    while let Ok((key, outcome)) = rx.try_recv() {
        running.remove(&key);
        if let Outcome::Retry(after) = outcome {
            paused.insert(key.0, Instant::now() + after);
        }
    }
}

/// One look at every batch with work left: ends those that are done, cancelled or expired,
/// and starts requests while there is room.
async fn step(
    state: &Arc<AppState>,
    app: &Router,
    tx: &tokio::sync::mpsc::UnboundedSender<((String, i64), Outcome)>,
    running: &mut Running,
    paused: &mut HashMap<String, Instant>,
    max_running: usize,
) -> Result<(), super::error::ApiError> {
    let now = crate::gateway::db::unix_now();
    paused.retain(|_, until| *until > Instant::now());
    for batch in store(state, |b| b.active()).await? {
        let mine: Vec<i64> = running
            .keys()
            .filter(|(b, _)| *b == batch.id)
            .map(|k| k.1)
            .collect();
        let stop = |running: &mut Running| {
            for line in &mine {
                if let Some(h) = running.remove(&(batch.id.clone(), *line)) {
                    h.abort();
                }
            }
        };
        if batch.object["status"] == "cancelling" {
            stop(running);
            conclude(state, batch, "cancelled").await?;
            continue;
        }
        let room = max_running.saturating_sub(running.len());
        let (id, busy) = (batch.id.clone(), mine.clone());
        let todo = store(state, move |b| b.pending(&id, &busy, room.max(1))).await?;
        if todo.is_empty() && mine.is_empty() {
            conclude(state, batch, "completed").await?;
            continue;
        }
        if batch.object["expires_at"]
            .as_i64()
            .is_some_and(|t| now >= t)
        {
            stop(running);
            conclude(state, batch, "expired").await?;
            continue;
        }
        if room == 0 || paused.contains_key(&batch.id) {
            continue;
        }
        for line in todo.into_iter().take(room) {
            let key = (batch.id.clone(), line.line);
            let call = BatchCall {
                owner_kind: batch.owner_kind.clone(),
                owner: batch.owner.clone(),
            };
            let (app, tx, batch_id) = (app.clone(), tx.clone(), batch.id.clone());
            let state = state.clone();
            let handle = tokio::spawn(async move {
                let line_no = line.line;
                let outcome = call_one(app, call, &batch_id, line).await;
                let outcome = match outcome {
                    Outcome::Done { ok, result } => {
                        let id = batch_id.clone();
                        let saved = result.clone();
                        match store(&state, move |b| b.finish_line(&id, line_no, ok, &saved)).await
                        {
                            Ok(()) => Outcome::Done { ok, result },
                            Err(e) => {
                                tracing::error!(error = %e.message, "a batch result could not be stored");
                                Outcome::Retry(Duration::from_secs(1))
                            }
                        }
                    }
                    retry => retry,
                };
                let _ = tx.send(((batch_id, line_no), outcome));
            });
            running.insert(key, handle);
        }
    }
    Ok(())
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
        .body(Body::from(line.body.to_string()));
    let req = match req {
        Ok(r) => r,
        Err(e) => return done(&request_id, &line, None, Some(&e.to_string())),
    };
    let Ok(resp) = app.oneshot(req).await;
    let status = resp.status();
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
    let bytes = match axum::body::to_bytes(resp.into_body(), 256 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return done(
                &request_id,
                &line,
                None,
                Some(&format!("reading the reply: {e}")),
            )
        }
    };
    let body: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&bytes).into_owned()));
    let over_quota = body["error"]["type"] == "insufficient_quota";
    if (status == StatusCode::TOO_MANY_REQUESTS && !final_refusal && !over_quota)
        || status == StatusCode::SERVICE_UNAVAILABLE
    {
        return Outcome::Retry(retry_after);
    }
    done(&request_id, &line, Some((status, body)), None)
}

/// An output line: the reply, or an error where there was none.
fn done(
    request_id: &str,
    line: &Line,
    reply: Option<(StatusCode, Value)>,
    error: Option<&str>,
) -> Outcome {
    let ok = reply.as_ref().is_some_and(|(s, _)| s.is_success());
    let response = reply.map_or(Value::Null, |(status, body)| {
        json!({"status_code": status.as_u16(), "request_id": request_id, "body": body})
    });
    let error = error.map_or(
        Value::Null,
        |m| json!({"code": "internal_error", "message": m}),
    );
    Outcome::Done {
        ok,
        result: json!({"id": request_id, "custom_id": line.custom_id, "response": response, "error": error}),
    }
}

/// Ends a batch `completed`, `cancelled` or `expired`: successes to the output file, the rest
/// (failed requests, and those never run with a code saying why) to the error file.
async fn conclude(
    state: &AppState,
    batch: ActiveBatch,
    ending: &'static str,
) -> Result<(), super::error::ApiError> {
    let ActiveBatch {
        id, owner, object, ..
    } = batch;
    let expect = object["status"].as_str().unwrap_or_default().to_string();
    store(state, move |b| {
        let results = b.results(&id)?;
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        let (mut completed, mut failed) = (0u64, 0u64);
        for (custom_id, result) in &results {
            let (ok, line) = match result {
                Some((ok, line)) => (*ok, line.clone()),
                None => {
                    let (code, message) = if ending == "expired" {
                        ("batch_expired", "This request could not be executed before the completion window expired.")
                    } else {
                        ("batch_cancelled", "This request was not executed: the batch was cancelled.")
                    };
                    let line = json!({"id": new_id("batch_req_"), "custom_id": custom_id,
                        "response": null, "error": {"code": code, "message": message}});
                    (false, line)
                }
            };
            let into = if ok { &mut output } else { &mut errors };
            into.extend_from_slice(line.to_string().as_bytes());
            into.push(b'\n');
            if ok {
                completed += 1;
            } else if result.is_some() {
                failed += 1;
            }
        }
        let now = crate::gateway::db::unix_now();
        let mut object = object;
        object["status"] = ending.into();
        object[format!("{ending}_at")] = now.into();
        if ending == "completed" && object["finalizing_at"].is_null() {
            object["finalizing_at"] = now.into();
        }
        object["request_counts"] =
            json!({"total": results.len(), "completed": completed, "failed": failed});
        b.conclude(&owner, &mut object, &output, &errors, &expect)
    })
    .await?;
    Ok(())
}
