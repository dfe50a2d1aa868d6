//! The handle HTTP handlers hold on the engine thread: submitting requests (room for all of
//! a request's choices or none), its capacity and health, the end of a shutdown's drain, and
//! telling a stalled engine's requests so from outside its thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::super::pulse::Heartbeat;
use super::super::request::{Cause, Event, Failure, GenerationRequest};
use super::{Command, SubmitError};

/// A cheap handle to the engine thread, shared by the HTTP handlers.
#[derive(Clone)]
pub struct EngineHandle {
    pub(super) tx: mpsc::Sender<Command>,
    /// Requests inside the engine (waiting or running): admission and draining.
    pub(super) in_flight: Arc<AtomicUsize>,
    /// In-flight requests at most: a full batch plus `max_queue` waiting.
    pub(super) capacity: usize,
    /// Turns true, once, if the engine thread dies (a panic outside the forward pass).
    pub(super) failed: tokio::sync::watch::Receiver<bool>,
    /// Positions the KV pool holds: no request may need more.
    pub kv_capacity: usize,
    /// Whether requests may share computed prompts through the prefix cache.
    pub prefix_cache: bool,
    /// Whether sequences draft (a request's `prediction` is used only then).
    pub speculates: bool,
    /// Sequences a step runs at most.
    pub max_batch_size: usize,
    pub(super) heartbeat: Heartbeat,
    /// Set once, at the end of a shutdown's drain: the engine ends what it holds.
    pub(super) cut: Arc<AtomicBool>,
    /// Every request's event channel while it lives, so that a stalled engine's requests
    /// can be told so from outside its thread ([`abandon`](Self::abandon)).
    pub(super) waiting: Arc<std::sync::Mutex<Vec<mpsc::WeakUnboundedSender<Event>>>>,
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned receiver.
    pub fn submit(
        &self,
        req: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let mut rxs = self.submit_many(vec![req])?;
        rxs.pop().ok_or(SubmitError::QueueFull)
    }

    /// Queues several requests at once, or none: room for all of them is reserved first, so
    /// a request of several choices is never half refused.
    pub fn submit_many(
        &self,
        reqs: Vec<GenerationRequest>,
    ) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, SubmitError> {
        let n = reqs.len();
        // Reserve the slots first, so a flood cannot overshoot the capacity.
        let prev = self.in_flight.fetch_add(n, Ordering::SeqCst);
        if prev + n > self.capacity {
            self.in_flight.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        let mut rxs = Vec::with_capacity(n);
        for req in reqs {
            let (tx, rx) = mpsc::unbounded_channel();
            self.watch(&tx);
            if let Err(e) = self.tx.try_send(Command::Submit(Box::new(req), tx)) {
                // Those sent are cancelled as their receivers drop; the rest never ran.
                self.in_flight.fetch_sub(n - rxs.len(), Ordering::SeqCst);
                return Err(match e {
                    mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => SubmitError::ShuttingDown,
                });
            }
            rxs.push(rx);
        }
        Ok(rxs)
    }

    /// Queues one request, or hands it back with the reason it could not be, so that a
    /// caller feeding several in turn (an embeddings request's inputs) can retry it.
    pub fn try_submit(
        &self,
        req: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, (SubmitError, Box<GenerationRequest>)> {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err((SubmitError::QueueFull, Box::new(req)));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.watch(&tx);
        match self.tx.try_send(Command::Submit(Box::new(req), tx)) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                let (why, Command::Submit(req, _)) = (
                    match &e {
                        mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
                        mpsc::error::TrySendError::Closed(_) => SubmitError::ShuttingDown,
                    },
                    e.into_inner(),
                );
                Err((why, req))
            }
        }
    }

    /// Requests the engine holds at most (running and waiting).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether a request submitted now would find room: a cheap early check, so a flood
    /// is refused before any rendering or tokenizing. `submit` decides.
    pub fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) < self.capacity
    }

    /// Requests submitted and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Whether the engine thread has died. Read from a watch channel, never from the thread.
    pub fn has_failed(&self) -> bool {
        *self.failed.borrow()
    }

    /// How long the engine thread has held work without finishing a step (zero while it
    /// waits for work). A step of a large prompt takes seconds; minutes mean it is stuck.
    pub fn silent_for(&self) -> Duration {
        self.heartbeat.silent_for()
    }

    /// Keeps a weak handle on a request's events (those of ended requests are dropped as the
    /// list grows).
    fn watch(&self, tx: &mpsc::UnboundedSender<Event>) {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() >= 2 * self.capacity.max(16) {
            w.retain(|s| s.strong_count() > 0);
        }
        w.push(tx.downgrade());
    }

    /// A stalled engine (its thread stuck in a step) can tell its requests nothing: each
    /// that still waits is told `message` from here, so its client gets an ending (a
    /// stream's error event) instead of waiting for ever. How many were told.
    pub fn abandon(&self, message: &str) -> usize {
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        waiting
            .iter()
            .filter_map(mpsc::WeakUnboundedSender::upgrade)
            .filter(|tx| {
                let stalled = Failure::new(message, Cause::Engine);
                tx.send(Event::Failed(stalled)).is_ok()
            })
            .count()
    }

    /// The end of a shutdown's drain: every request still held ends now, each told so (a
    /// stream's error event) and metered with what it computed, and no more are taken.
    pub fn cut_off(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Resolves when the engine thread dies; never if it stops normally.
    pub async fn failure(&self) {
        let mut rx = self.failed.clone();
        if rx.wait_for(|f| *f).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
