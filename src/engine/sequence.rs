//! Per-sequence output rules shared by the CLI loop and the batched engine: incremental
//! detokenization, stop strings, end-of-turn tokens and the token budget.
//!
//! Knows token ids and text; never the model or HTTP. Invariant: the emitted pieces
//! concatenate to the final text, which never contains a stop string or a broken character.

use super::lines::{Cut, LineCut, LineLimits};
use super::request::FinishReason;
use super::stop::{StopMatcher, StopOutcome, StopsEnd};
use crate::error::ModelError;
use crate::model::detok::IncrementalDecoder;
use crate::model::Tokenizer;

pub use super::sampler::PENALTY_WINDOW;

/// Prompt tokens the detokenizer sees before the first generated one (as TGI does).
pub const DETOK_CONTEXT: usize = 5;

/// What one sampled token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOutcome {
    /// Generation goes on; `emit` is the new text (possibly empty).
    Continue { emit: String },
    /// Generation ended; `emit` is the last text. `counted` says whether the token is part of
    /// the completion (an end-of-turn token is not); `stop` is the stop string that matched.
    Finished {
        emit: String,
        reason: FinishReason,
        counted: bool,
        stop: Option<String>,
    },
}

pub struct OutputState {
    detok: IncrementalDecoder,
    stops: StopMatcher,
    max_tokens: usize,
    generated: usize,
    /// Control tokens emitted as their text (see `GenerationRequest::shown_tokens`).
    shown: Vec<u32>,
    /// Limits on the lines of the text emitted (see `GenerationRequest::lines`).
    lines: Option<LineCut>,
}

impl OutputState {
    /// `context`: the prompt's last few tokens, so the first piece decodes as it would
    /// mid-text.
    pub fn new(stop: Vec<String>, max_tokens: usize, context: &[u32]) -> Self {
        Self {
            detok: IncrementalDecoder::with_context(context),
            stops: StopMatcher::new(stop),
            max_tokens,
            generated: 0,
            shown: Vec::new(),
            lines: None,
        }
    }

    /// Ends the output at these limits on its lines (none: no change).
    pub fn cutting(mut self, limits: LineLimits) -> Self {
        self.lines = (limits != LineLimits::default()).then(|| LineCut::new(limits));
        self
    }

    /// Stop strings apply only before this text (see [`StopsEnd`]).
    pub fn ending(mut self, end: Option<StopsEnd>) -> Self {
        self.stops = std::mem::take(&mut self.stops).ending(end);
        self
    }

    /// Emits these control tokens' text instead of nothing.
    pub fn showing(mut self, shown: Vec<u32>) -> Self {
        self.shown = shown;
        self
    }

    /// Tokens counted as completion so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<TokenOutcome, ModelError> {
        let outcome = self.push_text(tok, id)?;
        let Some(lines) = &mut self.lines else {
            return Ok(outcome);
        };
        let now = std::time::Instant::now();
        Ok(match outcome {
            TokenOutcome::Continue { emit } => match lines.push(&emit, now) {
                (emit, None) => TokenOutcome::Continue { emit },
                (emit, Some(Cut::Indent)) => TokenOutcome::Finished {
                    emit,
                    reason: FinishReason::Length,
                    counted: true,
                    stop: None,
                },
                // Ended after this piece: what is held back comes out, as at `max_tokens`,
                // still within the indentation limit.
                (mut emit, Some(Cut::Time)) => {
                    let (rest, stop) = self.flush(tok)?;
                    let lines = self.lines.as_mut().expect("set above");
                    let (rest, cut) = lines.push(&rest, now);
                    emit.push_str(&rest);
                    let (reason, stop) = match (cut, stop) {
                        (Some(Cut::Indent), _) => (FinishReason::Length, None),
                        (_, Some(s)) => (FinishReason::Stop, Some(s)),
                        (_, None) => (FinishReason::Length, None),
                    };
                    if cut != Some(Cut::Indent) {
                        emit.push_str(&lines.flush());
                    }
                    TokenOutcome::Finished {
                        emit,
                        reason,
                        counted: true,
                        stop,
                    }
                }
            },
            TokenOutcome::Finished {
                emit,
                reason,
                counted,
                stop,
            } => match lines.push(&emit, now) {
                // A line the limit cut: the limit ended the reply.
                (emit, Some(Cut::Indent)) => TokenOutcome::Finished {
                    emit,
                    reason: FinishReason::Length,
                    counted,
                    stop: None,
                },
                (mut emit, None | Some(Cut::Time)) => {
                    emit.push_str(&lines.flush());
                    TokenOutcome::Finished {
                        emit,
                        reason,
                        counted,
                        stop,
                    }
                }
            },
        })
    }

    /// [`Self::push`] before the limits on lines.
    fn push_text(&mut self, tok: &Tokenizer, id: u32) -> Result<TokenOutcome, ModelError> {
        if tok.is_stop(id) {
            let (emit, stop) = self.flush(tok)?;
            return Ok(TokenOutcome::Finished {
                emit,
                reason: FinishReason::Stop,
                counted: false,
                stop,
            });
        }
        self.generated += 1;
        let shown = self.shown.contains(&id);
        let piece = if shown {
            // The text held back comes first; the decoder goes on after it as before.
            self.detok.flush(tok)?.unwrap_or_default()
        } else {
            self.detok.push(tok, id)?.unwrap_or_default()
        };
        let mut emit = match self.stops.push(&piece) {
            StopOutcome::Continue { emit } => emit,
            StopOutcome::Stopped { emit, stop } => {
                return Ok(TokenOutcome::Finished {
                    emit,
                    reason: FinishReason::Stop,
                    counted: true,
                    stop: Some(stop),
                })
            }
        };
        if shown {
            // A marker for the caller's parser, never part of a stop string: what the
            // matcher held back is released before it.
            emit.push_str(&self.stops.flush());
            let marker = tok.decode_with_control(&[id])?;
            self.stops.passed(&marker);
            emit.push_str(&marker);
        }
        if self.generated >= self.max_tokens {
            let (rest, stop) = self.flush(tok)?;
            emit.push_str(&rest);
            // The held-back text can complete a stop string: then that is why it ended.
            let reason = match stop {
                Some(_) => FinishReason::Stop,
                None => FinishReason::Length,
            };
            return Ok(TokenOutcome::Finished {
                emit,
                reason,
                counted: true,
                stop,
            });
        }
        Ok(TokenOutcome::Continue { emit })
    }

    /// Text held back at the end: an incomplete character and a possible stop-string prefix,
    /// and the stop string that this last text completed, if any.
    fn flush(&mut self, tok: &Tokenizer) -> Result<(String, Option<String>), ModelError> {
        let mut out = String::new();
        if let Some(piece) = self.detok.flush(tok)? {
            match self.stops.push(&piece) {
                StopOutcome::Continue { emit } => out.push_str(&emit),
                StopOutcome::Stopped { emit, stop } => return Ok((out + &emit, Some(stop))),
            }
        }
        out.push_str(&self.stops.flush());
        Ok((out, None))
    }
}
