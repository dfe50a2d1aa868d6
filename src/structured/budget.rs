//! A reasoning budget: a reasoning model thinks at most N tokens, then its close marker is
//! forced and the reply's grammar goes on as usual. (llguidance cannot cap a lazy rule by
//! tokens, so the count is kept here, around the grammar's constraint.)

use llguidance::toktrie::TokEnv;

use super::reasoning::{Marker, ThinkSpec};
use crate::engine::constraint::{ConstraintError, TokenConstraint};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not yet known whether the reply opens a reasoning.
    Before,
    /// Inside it, this many tokens spent.
    Thinking(usize),
    /// The budget is spent: the close marker's token `i` is next.
    Closing(usize),
    /// After the reasoning (or with none).
    Done,
}

/// A grammar's constraint with a budget on the reasoning it starts with.
pub(crate) struct Budgeted {
    inner: Box<dyn TokenConstraint>,
    env: TokEnv,
    open: Marker,
    close: Marker,
    /// What is forced: the rest of the close marker, as tokens.
    closing: Vec<u32>,
    budget: usize,
    /// Token ids the model has: a forced token past them is never drafted.
    vocab: u32,
    /// Stop tokens a free-text reply may end with while it thinks (as it may with no
    /// budget, when no grammar runs); empty when an answer must follow.
    free_stops: Vec<u32>,
    state: State,
    /// The reply's bytes while undecided; then the last few, to see the close marker.
    text: Vec<u8>,
}

impl std::fmt::Debug for Budgeted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgeted")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Budgeted {
    /// `inner` must allow the reasoning `think` describes; `budget` is at least 1.
    pub(crate) fn new(
        inner: Box<dyn TokenConstraint>,
        env: TokEnv,
        think: &ThinkSpec,
        budget: usize,
        free_stops: Vec<u32>,
        vocab: u32,
    ) -> Self {
        Self {
            inner,
            env,
            open: think.open,
            close: think.close,
            closing: Vec::new(),
            budget,
            vocab,
            free_stops,
            state: if think.opened {
                State::Thinking(0)
            } else {
                State::Before
            },
            text: Vec::new(),
        }
    }

    fn advance(&mut self, token: u32) {
        let bytes = self.env.tok_trie().token(token).to_vec();
        self.state = match self.state {
            State::Before => {
                // Some(opened), or None while it may still open (whitespace, a marker's start).
                let opened = match self.open {
                    Marker::Token(id) if token == id => Some(true),
                    Marker::Token(_) if !bytes.is_empty() && bytes.trim_ascii().is_empty() => None,
                    Marker::Token(_) => Some(false),
                    Marker::Text(open) => {
                        self.text.extend(&bytes);
                        let t = self.text.trim_ascii_start();
                        if t.starts_with(open.as_bytes()) {
                            Some(true)
                        } else if open.as_bytes().starts_with(t) {
                            None
                        } else {
                            Some(false)
                        }
                    }
                };
                match opened {
                    None => State::Before,
                    Some(true) => {
                        self.text.clear();
                        State::Thinking(0)
                    }
                    Some(false) => State::Done,
                }
            }
            State::Thinking(spent) => {
                let closed = match self.close {
                    Marker::Token(id) => token == id,
                    Marker::Text(close) => {
                        self.text.extend(&bytes);
                        let found = self
                            .text
                            .windows(close.len())
                            .any(|w| w == close.as_bytes());
                        let keep = self.text.len().saturating_sub(close.len());
                        self.text.drain(..keep);
                        found
                    }
                };
                match (closed, spent + 1 >= self.budget) {
                    (true, _) => State::Done,
                    // Over budget: closed as soon as the marker may come (not inside a
                    // character a token split).
                    (false, true) if self.start_closing() => State::Closing(0),
                    (false, _) => State::Thinking(spent + 1),
                }
            }
            State::Closing(i) if i + 1 < self.closing.len() => State::Closing(i + 1),
            State::Closing(_) | State::Done => State::Done,
        };
    }
}

impl Budgeted {
    /// What the close marker still needs (a model may have begun it), as tokens; whether
    /// the grammar takes it now.
    fn start_closing(&mut self) -> bool {
        self.closing = match self.close {
            Marker::Token(id) => vec![id],
            Marker::Text(close) => {
                let close = close.as_bytes();
                let begun = (1..close.len().min(self.text.len() + 1))
                    .rev()
                    .find(|&n| self.text.ends_with(&close[..n]))
                    .unwrap_or(0);
                self.env.tokenize_bytes(&close[begun..])
            }
        };
        match self.closing.first() {
            Some(&first) => self.inner.allows(first).unwrap_or(false),
            None => false,
        }
    }

    /// Free text after its reasoning: nothing left to enforce.
    fn free_after(&self) -> bool {
        self.state == State::Done && !self.free_stops.is_empty()
    }
}

impl TokenConstraint for Budgeted {
    fn allows(&mut self, token: u32) -> Result<bool, ConstraintError> {
        match self.state {
            State::Closing(i) => Ok(self.closing[i] == token),
            State::Thinking(_) if self.free_stops.contains(&token) => Ok(true),
            _ if self.free_after() => Ok(true),
            _ => self.inner.allows(token),
        }
    }

    fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        if self.free_after() {
            return Ok(());
        }
        let State::Closing(i) = self.state else {
            let free: &[u32] = match self.state {
                State::Thinking(_) => &self.free_stops,
                _ => &[],
            };
            let kept: Vec<(usize, f32)> = free
                .iter()
                .map(|&t| t as usize)
                .filter(|&t| t < logits.len())
                .map(|t| (t, logits[t]))
                .collect();
            self.inner.mask(logits)?;
            for (t, l) in kept {
                logits[t] = l;
            }
            return Ok(());
        };
        let next = self.closing[i] as usize;
        if next >= logits.len() || !self.inner.allows(next as u32)? {
            return Err(ConstraintError(
                "the reasoning's close marker cannot be written here".into(),
            ));
        }
        for (t, l) in logits.iter_mut().enumerate() {
            if t != next {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        if self.free_after() {
            return Ok(());
        }
        self.inner.commit(token)?;
        self.advance(token);
        Ok(())
    }

    fn forced(&mut self) -> Vec<u32> {
        match self.state {
            State::Closing(i) => {
                let vocab = self.vocab;
                self.closing[i..]
                    .iter()
                    .copied()
                    .take_while(|&t| t < vocab)
                    .collect()
            }
            _ if self.free_after() => Vec::new(),
            _ => self.inner.forced(),
        }
    }
}
