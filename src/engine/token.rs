//! What a step's logits become: the scores of a prompt's own tokens (when asked), and each
//! sequence's next token with its events.
//!
//! A child of `core`: it works on the engine's private state.

use std::time::Instant;

use super::{Engine, ModelRunner};
use crate::engine::logprobs::{final_info, logprob_info};
use crate::engine::request::{Ending, Event, Failure, FinishReason};
use crate::engine::scheduler::{Chunk, SeqId};
use crate::engine::sequence::TokenOutcome;
use crate::telemetry;

impl<M: ModelRunner> Engine<M> {
    /// Scores the prompt positions a chunk's rows predict (when its request asked) and
    /// sends the prompt's event once the last is scored. Returns the logits to sample from:
    /// the last row's, when the chunk asked for them.
    pub(super) fn score_prompt(
        &mut self,
        c: &Chunk,
        logits: Option<Vec<f32>>,
        every: bool,
    ) -> Option<Vec<f32>> {
        let Some(a) = self.active.get_mut(&c.id) else {
            return logits;
        };
        let Some(scores) = a.scores.as_mut() else {
            return logits;
        };
        let logits = scores.on_chunk(&self.tokenizer, &a.req.prompt, c, logits, every);
        if let Some(ev) = scores.finish(&self.tokenizer, &a.req.prompt) {
            let _ = a.events.send(ev);
        }
        logits
    }

    /// Samples the next token of `id` and sends its events; returns the token and whether
    /// the request finished.
    pub(super) fn on_logits(&mut self, id: SeqId, mut logits: Vec<f32>) -> (u32, bool) {
        let a = self
            .active
            .get_mut(&id)
            .expect("scheduled ids are active. This is a bug.");
        let logprobs = a.req.logprobs.then(|| logits.clone());
        let token = match a.constraint.as_deref_mut() {
            None => a.sampler.sample(&mut logits, &a.tokens),
            Some(c) => match a.sampler.sample_constrained(&mut logits, &a.tokens, c) {
                Ok(t) => t,
                Err(e) => {
                    // The grammar error may quote generated text: the client gets it, the log does not.
                    tracing::error!(request_id = %a.req.request_id, "constrained sampling failed");
                    a.ending = Ending::Failed;
                    let failure = Failure::request(e.to_string()).with_usage(a.usage());
                    let _ = a.events.send(Event::Failed(failure));
                    return (0, true);
                }
            },
        };
        a.tokens.push(token);
        let now = Instant::now();
        match a.last_token_at {
            None => {
                a.first_token_at = Some(now);
                telemetry::token_latency(true, (now - a.req.received).as_secs_f64())
            }
            Some(prev) => telemetry::token_latency(false, (now - prev).as_secs_f64()),
        }
        a.last_token_at = Some(now);
        let outcome = match a.output.push(&self.tokenizer, token) {
            Ok(o) => o,
            Err(e) => {
                a.ending = Ending::Failed;
                let failure = Failure::request(format!("detokenization failed: {e}"));
                let _ = a.events.send(Event::Failed(failure.with_usage(a.usage())));
                return (token, true);
            }
        };
        let (text, finish, counted) = match outcome {
            TokenOutcome::Continue { emit } => (emit, None, true),
            TokenOutcome::Finished {
                emit,
                reason,
                counted,
                stop,
            } => (emit, Some((reason, stop)), counted),
        };
        // A scored prompt's end-of-turn token keeps its logprob (not its text): the lists
        // hold one entry per token computed, as harnesses slice them.
        let scoring = a.req.prompt_logprobs.is_some();
        if counted {
            telemetry::generated();
        }
        let shown = counted || scoring;
        // llama.cpp's `post_sampling_probs`: the probabilities after its chain instead.
        let tok = &self.tokenizer;
        let top = a.req.top_logprobs;
        let post = (a.req.logprobs.then(|| a.sampler.final_probs()).flatten())
            .map(|(p, finals)| final_info(tok, token, p, finals, top));
        if let Some(l) = logprobs.as_ref().filter(|_| !shown) {
            a.end_logprob = Some(match &post {
                Some(info) => info.chosen.logprob,
                None => logprob_info(tok, l, token, 0).chosen.logprob,
            });
        }
        if shown || !text.is_empty() {
            let logprob = logprobs
                .filter(|_| shown)
                .map(|l| post.unwrap_or_else(|| logprob_info(tok, &l, token, top)));
            // A closed receiver is noticed at the next step.
            let at = std::time::Instant::now();
            let _ = a.events.send(Event::Token { text, logprob, at });
        }
        // The KV pool must hold the next position too.
        let full = a.tokens.len() >= self.model.context_length();
        let (reason, stop_sequence) = match (finish, full) {
            (Some(r), _) => r,
            (None, true) => (FinishReason::Length, None),
            (None, false) => return (token, false),
        };
        a.end(reason, stop_sequence);
        (token, true)
    }
}
