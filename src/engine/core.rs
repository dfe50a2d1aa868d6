//! The engine thread: the one owner of the model. It receives requests on a bounded channel,
//! asks the scheduler for a step, runs one packed forward over every token of the step,
//! samples, and sends each request its events on its own channel.
//!
//! Knows sequences, channels and metrics; never HTTP. Invariant: a request whose receiver is
//! gone (the client left) is dropped at the next step, whatever its phase, and its KV blocks
//! are freed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::active::Active;
use super::blocks::BlockManager;
use super::logprobs::PromptScores;
use super::pulse::{injected_fault, Fault, Heartbeat};
use super::request::{
    Cause, EndReport, Ending, Event, EventSender, Failure, FinishReason, GenerationRequest, Usage,
};
use super::sampler::Sampler;
use super::scheduler::{Scheduler, SchedulerConfig, SeqId, Step};
use super::sequence::{OutputState, DETOK_CONTEXT};
use crate::model::{Logits, ModelRunner, SeqInput, Tokenizer};
use crate::telemetry;

#[path = "draft.rs"]
mod draft;
pub(super) use draft::Draft;
#[path = "pool.rs"]
mod pool;
pub(super) use pool::Pooler;
#[path = "handle.rs"]
mod handle;
#[path = "token.rs"]
mod token;
pub use handle::EngineHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub kv_cache_tokens: usize,
    pub block_size: usize,
    pub max_queue: usize,
    /// Automatic prefix caching on the KV block pool.
    pub prefix_cache: bool,
    /// Draft tokens a decoding sequence may verify per step (prompt lookup; 0: none).
    pub speculate: usize,
    /// Tokens a background (low-priority) prompt computes a step at most, even with no
    /// interactive request near (0: `max_batch_tokens`): bounds the step an arriving
    /// interactive request waits for.
    pub background_chunk_tokens: usize,
}

pub enum Command {
    Submit(Box<GenerationRequest>, EventSender),
}

/// Why a request was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    ShuttingDown,
}

/// The logits a step may return for prompts being scored: each of their rows returns a
/// whole vocabulary's (64 MiB is 341 rows of a 49k vocabulary, 130 of a 128k one).
const SCORED_LOGITS_BYTES: usize = 64 << 20;

/// How many rows of prompts being scored one step may compute: what fits
/// [`SCORED_LOGITS_BYTES`], at least 16, at most the step's tokens.
fn max_scored_rows(vocab: usize, max_batch_tokens: usize) -> usize {
    (SCORED_LOGITS_BYTES / (4 * vocab.max(1)))
        .max(16)
        .min(max_batch_tokens)
}

/// Starts the engine thread over `model` (any [`ModelRunner`]: the CPU Llama, or a fake in
/// tests). It exits when every handle is dropped and its work is done.
pub fn start<M: ModelRunner>(
    mut model: M,
    tokenizer: Tokenizer,
    config: EngineConfig,
) -> Result<EngineHandle, crate::error::ModelError> {
    let n_blocks = config.kv_cache_tokens.div_ceil(config.block_size);
    model.allocate_kv(config.block_size, n_blocks)?;
    let scheduler = Scheduler::new(
        SchedulerConfig {
            max_batch_size: config.max_batch_size,
            max_batch_tokens: config.max_batch_tokens,
            max_scored_rows: max_scored_rows(tokenizer.vocab_size(), config.max_batch_tokens),
            max_draft_rows: 2 * config.speculate,
            max_background_rows: config.background_chunk_tokens,
        },
        BlockManager::new(n_blocks, config.block_size, config.prefix_cache),
    );
    let capacity = config.max_batch_size + config.max_queue;
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (failed_tx, failed) = tokio::sync::watch::channel(false);
    let heartbeat = Heartbeat::default();
    let cut = Arc::new(AtomicBool::new(false));
    let mut engine = Engine {
        heartbeat: heartbeat.clone(),
        model,
        tokenizer,
        scheduler,
        rx,
        active: HashMap::new(),
        next_id: 0,
        prefix_cache: config.prefix_cache,
        in_flight: in_flight.clone(),
        cut: cut.clone(),
        steps: 0,
        fault: injected_fault(),
        speculate: config.speculate,
    };
    std::thread::Builder::new()
        .name("edgeinfer-engine".into())
        .spawn(move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run()));
            if run.is_err() {
                // A bug outside the forward pass: the engine's state can no longer be
                // trusted. Fail every request it holds, then say so; the server stops
                // taking work and exits non-zero so a supervisor restarts it.
                tracing::error!("the engine thread panicked; failing its requests");
                // Health turns first, so no client sees its error before the 503.
                let _ = failed_tx.send(true);
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine.fail_all(
                        "the engine failed (an internal error); retry the request",
                        Ending::Failed,
                    )
                }));
            }
        })
        .expect("the OS can start the engine thread");
    Ok(EngineHandle {
        tx,
        in_flight,
        capacity,
        failed,
        kv_capacity: n_blocks * config.block_size,
        prefix_cache: config.prefix_cache,
        speculates: config.speculate > 0,
        max_batch_size: config.max_batch_size,
        heartbeat,
        cut,
        waiting: Default::default(),
    })
}

struct Engine<M> {
    model: M,
    tokenizer: Tokenizer,
    scheduler: Scheduler,
    rx: mpsc::Receiver<Command>,
    active: HashMap<SeqId, Active>,
    next_id: SeqId,
    prefix_cache: bool,
    in_flight: Arc<AtomicUsize>,
    cut: Arc<AtomicBool>,
    /// Steps run so far, and a fault to inject at one of them.
    steps: u64,
    fault: Option<Fault>,
    heartbeat: Heartbeat,
    speculate: usize,
}

impl<M: ModelRunner> Engine<M> {
    fn run(&mut self) {
        loop {
            if self.scheduler.is_idle() {
                self.update_gauges();
                self.heartbeat.idle();
                match self.rx.blocking_recv() {
                    Some(cmd) => {
                        // Work arrived: the stall clock starts now.
                        self.heartbeat.beat();
                        self.accept(cmd)
                    }
                    None => break,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.accept(cmd);
            }
            if self.cut.load(Ordering::SeqCst) {
                // Cancelled as a client that left is: what was computed is billed.
                self.fail_all(
                    "the server is shutting down; retry the request",
                    Ending::Cancelled,
                );
                break;
            }
            self.drop_cancelled();
            self.offer_drafts();
            let step = self.scheduler.schedule();
            if !step.preempted.is_empty() {
                telemetry::preempted(step.preempted.len());
            }
            for id in &step.admitted {
                let cached = self.scheduler.cached_tokens(*id);
                if let Some(a) = self.active.get_mut(id) {
                    a.cached_tokens = cached;
                    a.prompt_done = a.prompt_done.max(cached);
                    telemetry::admitted(
                        a.req.received.elapsed().as_secs_f64(),
                        a.req.prompt.len(),
                        cached,
                        self.prefix_cache && a.req.cache_prompt,
                    );
                }
            }
            if !step.chunks.is_empty() {
                self.steps += 1;
                for c in &step.chunks {
                    if let Some(a) = self.active.get_mut(&c.id) {
                        a.stepped = true;
                    }
                }
                match self.fault {
                    Some(Fault::PanicAt(n)) if n == self.steps => {
                        panic!("injected fault: the engine thread panics at step {n}")
                    }
                    Some(Fault::StallAt(n)) if n == self.steps => loop {
                        std::thread::sleep(Duration::from_secs(3600))
                    },
                    Some(Fault::PanicOnMaxTokens(n))
                        if step.chunks.iter().any(|c| {
                            self.active
                                .get(&c.id)
                                .is_some_and(|a| a.req.max_tokens == n)
                        }) =>
                    {
                        panic!("injected fault: the engine thread panics on a request of max_tokens {n}")
                    }
                    _ => {}
                }
                let started = std::time::Instant::now();
                self.run_step(&step);
                // Progress: a finished step (a turn with nothing to run is not one).
                self.heartbeat.beat();
                tracing::debug!(
                    sequences = step.chunks.len(),
                    tokens = step.chunks.iter().map(|c| c.len).sum::<usize>(),
                    admitted = step.admitted.len(),
                    waiting = self.scheduler.waiting_count(),
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "step"
                );
            } else if !self.scheduler.is_idle() {
                // Nothing fits right now (cannot happen with validated requests); yield.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.update_gauges();
        }
        tracing::info!("engine stopped");
    }

    fn accept(&mut self, cmd: Command) {
        let Command::Submit(mut req, events) = cmd;
        let id = self.next_id;
        self.next_id += 1;
        // Scoring the prompt needs the logits of every position: none come from the cache.
        // An embedding needs the hidden state of positions it pools: none from the cache;
        // and it is not scored.
        if req.embed.is_some() {
            req.prompt_logprobs = None;
        }
        req.cache_prompt &= req.prompt_logprobs.is_none() && req.embed.is_none();
        if req.prompt_logprobs.is_some() {
            self.scheduler.add_scoring(id, &req.prompt);
        } else {
            self.scheduler.add(id, &req.prompt, req.cache_prompt);
        }
        self.scheduler.set_tenant(id, req.tenant);
        if let Some(a) = req.adapter {
            self.scheduler
                .set_cache_root(id, super::blocks::adapter_root(a));
        }
        let context = &req.prompt[req.prompt.len().saturating_sub(DETOK_CONTEXT)..];
        let active = Active {
            constraint: req.constraint.take(),
            tokens: req.prompt.clone(),
            sampler: Sampler::new(req.sampling.clone()),
            output: OutputState::new(req.stop.clone(), req.max_tokens, context)
                .showing(std::mem::take(&mut req.shown_tokens))
                .ending(req.stops_end.take())
                .cutting(req.lines),
            events,
            last_token_at: None,
            first_token_at: None,
            scores: req.prompt_logprobs.map(PromptScores::new),
            pooler: req
                .embed
                .map(|p| Pooler::new(p, self.model.embedding_length(), req.prompt.len())),
            cached_tokens: 0,
            end_logprob: None,
            stepped: false,
            prompt_done: 0,
            draft: Default::default(),
            ending: Ending::Cancelled,
            on_end: req.on_end.take(),
            in_flight: self.in_flight.clone(),
            req: *req,
        };
        self.active.insert(id, active);
    }

    /// Ends every request with an error (the engine cannot go on, or the server stops), each
    /// running one metered as `ending`.
    fn fail_all(&mut self, message: &str, ending: Ending) {
        // New submissions now get `ShuttingDown`; queued ones are failed like the rest.
        self.rx.close();
        while let Ok(Command::Submit(mut req, events)) = self.rx.try_recv() {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            // Metered as failed (nothing computed), as the client is told.
            if let Some(sink) = req.on_end.take() {
                sink.call(EndReport {
                    ending: Ending::Failed,
                    usage: Usage::default(),
                    first_token_at: None,
                });
            }
            let nothing = Failure::new(message, Cause::Stopping).with_usage(Usage::default());
            let _ = events.send(Event::Failed(nothing));
        }
        for (_, mut a) in self.active.drain() {
            a.ending = ending;
            // A failed engine (not a shutdown) with a request that had run in it (its step
            // may be the one that failed, before it computed anything).
            let usage = a.usage();
            let cause = match ending {
                Ending::Failed if a.stepped || usage.total_tokens > 0 => Cause::Engine,
                _ => Cause::Stopping,
            };
            let failure = Failure::new(message, cause).with_usage(usage);
            let _ = a.events.send(Event::Failed(failure));
        }
        let (cached_blocks, evictions) = self.scheduler.cache_stats();
        telemetry::gauges(0, 0, 0.0, cached_blocks, evictions);
    }

    /// Requests whose client went away: free them now, in any phase.
    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            if let Some(a) = self.active.remove(&id) {
                tracing::info!(request_id = %a.req.request_id, "client disconnected; request dropped");
                telemetry::finished("cancelled", None);
            }
            self.scheduler.remove(id);
        }
    }

    fn run_step(&mut self, step: &Step) {
        let copied = step
            .copies
            .iter()
            .try_for_each(|c| self.model.copy_kv(c.src, c.dst, c.rows));
        self.place_drafts(&step.chunks);
        let inputs: Vec<SeqInput> = step
            .chunks
            .iter()
            .map(|c| {
                let a = &self.active[&c.id];
                let every = a
                    .scores
                    .as_ref()
                    .is_some_and(|s| s.wants_rows(a.req.prompt.len(), c.start, c.len));
                let logits = match &a.pooler {
                    Some(p) => match p.wants(c.start, c.len) {
                        Some((from, to)) => Logits::Hidden { from, to },
                        None => Logits::Skip,
                    },
                    None if every || c.draft > 0 => Logits::All,
                    None => c.logits.into(),
                };
                SeqInput {
                    tokens: &a.tokens[c.start..c.start + c.len],
                    start: c.start,
                    blocks: self.scheduler.blocks(c.id),
                    logits,
                    adapter: a.req.adapter,
                }
            })
            .collect();
        let every: Vec<bool> = inputs.iter().map(|i| i.logits == Logits::All).collect();
        // A panic in the forward (a bug) must fail this step's requests, not kill the engine.
        let forward = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            copied?;
            self.model.forward(&inputs)
        }))
        .unwrap_or_else(|_| {
            Err(crate::error::ModelError::Candle(candle_core::Error::Msg(
                "the forward pass panicked. This is a bug.".into(),
            )))
        });
        self.remove_drafts(&step.chunks);
        let outputs = match forward {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "forward failed; failing the step's requests");
                for c in &step.chunks {
                    if let Some(mut a) = self.active.remove(&c.id) {
                        a.ending = Ending::Failed;
                        let failure = Failure::request(format!("model computation failed: {e}"));
                        let _ = a.events.send(Event::Failed(failure.with_usage(a.usage())));
                    }
                    self.scheduler.discard(c.id);
                }
                return;
            }
        };
        // Prompt positions computed this step (counted before any response can complete).
        let mut prefill = 0;
        for c in &step.chunks {
            if let Some(a) = self.active.get_mut(&c.id) {
                let end = (c.start + c.len).min(a.req.prompt.len());
                prefill += end.saturating_sub(c.start);
                a.prompt_done = a.prompt_done.max(end);
            }
        }
        telemetry::prompt_computed(prefill);
        let mut sampled = Vec::new();
        let mut finished = Vec::new();
        for ((c, logits), every) in step.chunks.iter().zip(outputs).zip(every) {
            if self.active.get(&c.id).is_some_and(|a| a.pooler.is_some()) {
                if self.pool(c, logits) {
                    finished.push(c.id);
                }
                continue;
            }
            let logits = self.score_prompt(c, logits, every);
            let Some(logits) = logits else { continue };
            if c.draft > 0 {
                if self.verify(c, logits, &mut sampled) {
                    finished.push(c.id);
                }
                continue;
            }
            if let Some(a) = self.active.get_mut(&c.id).filter(|a| a.req.max_tokens == 0) {
                // Only the prompt was asked for (`echo`, scoring it): nothing to sample.
                a.end(FinishReason::Length, None);
                finished.push(c.id);
                continue;
            }
            let (token, done) = self.on_logits(c.id, logits);
            sampled.push((c.id, token));
            if done {
                finished.push(c.id);
            }
        }
        self.scheduler.complete(step, &sampled);
        for id in finished {
            self.active.remove(&id);
            self.scheduler.remove(id);
        }
    }

    fn update_gauges(&self) {
        let (cached_blocks, evictions) = self.scheduler.cache_stats();
        telemetry::gauges(
            self.scheduler.running_count(),
            self.scheduler.waiting_count() + self.rx.len(),
            self.scheduler.kv_usage(),
            cached_blocks,
            evictions,
        );
    }
}
