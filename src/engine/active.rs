//! One request inside the engine: its sequence's tokens, sampler, output rules and channel,
//! and how it ends. Every ending reports its usage exactly once, when it leaves the engine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::constraint::TokenConstraint;
use super::logprobs::PromptScores;
use super::request::{
    EndReport, Ending, Event, EventSender, FinishReason, GenerationRequest, Usage, UsageSink,
};
use super::sampler::Sampler;
use super::sequence::OutputState;
use crate::telemetry;

pub(super) struct Active {
    pub(super) req: GenerationRequest,
    /// Taken out of `req`: the grammar this sequence's tokens must follow.
    pub(super) constraint: Option<Box<dyn TokenConstraint>>,
    /// Prompt then generated tokens.
    pub(super) tokens: Vec<u32>,
    pub(super) events: EventSender,
    pub(super) sampler: Sampler,
    pub(super) output: OutputState,
    pub(super) last_token_at: Option<Instant>,
    pub(super) first_token_at: Option<Instant>,
    /// The prompt's logprobs, when asked for.
    pub(super) scores: Option<PromptScores>,
    /// An embedding request's pooling.
    pub(super) pooler: Option<super::core::Pooler>,
    /// Prompt tokens taken from the prefix cache.
    pub(super) cached_tokens: usize,
    /// Prompt tokens whose keys and values exist (cached or computed), for metering.
    pub(super) prompt_done: usize,
    /// The logprob of the stop token that ended the reply, for [`Event::Finished`].
    pub(super) end_logprob: Option<f32>,
    /// Speculation: the draft offered for the next step, and how much to offer.
    pub(super) draft: super::core::Draft,
    /// How the request ends if it is dropped now; set when it finishes or fails.
    pub(super) ending: Ending,
    /// It has been in a step (its first chunk counts from the step's start): an engine
    /// that fails now failed with it running, and it may be what failed it.
    pub(super) stepped: bool,
    pub(super) on_end: Option<UsageSink>,
    /// The engine's count of requests not yet ended.
    pub(super) in_flight: Arc<AtomicUsize>,
}

impl Active {
    /// Ends the request: its last event, metrics and log line.
    pub(super) fn end(&mut self, reason: FinishReason, stop_sequence: Option<String>) {
        self.ending = Ending::Finished(reason);
        let usage = self.usage();
        let _ = self.events.send(Event::Finished {
            reason,
            usage,
            stop_sequence,
            end_logprob: self.end_logprob,
        });
        let label = match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        };
        let seconds = self.req.received.elapsed().as_secs_f64();
        telemetry::finished(label, Some(seconds));
        tracing::info!(
            request_id = %self.req.request_id,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            cached_tokens = usage.cached_tokens,
            finish_reason = label,
            seconds,
            "request finished"
        );
    }

    /// What this request has computed so far.
    pub(super) fn usage(&self) -> Usage {
        let prompt = self.prompt_done.min(self.req.prompt.len());
        let completion = self.output.generated();
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: self.cached_tokens.min(prompt),
            accepted_prediction_tokens: self.draft.predicted.0,
            rejected_prediction_tokens: self.draft.predicted.1,
            reasoning_tokens: 0,
        }
    }
}

/// Every ending reports its usage exactly once: when the sequence leaves the engine, in
/// whatever way (finished, failed, the client left, the engine stopped).
impl Drop for Active {
    fn drop(&mut self) {
        if let Some(sink) = self.on_end.take() {
            sink.call(EndReport {
                ending: self.ending,
                usage: self.usage(),
                first_token_at: self.first_token_at,
            });
        }
        // After the report: a server draining for shutdown waits for none in flight, and
        // then for the ledger rows queued before, so the report is among them.
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
