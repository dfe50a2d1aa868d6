//! Speculative decoding by prompt lookup: a decoding sequence whose last few tokens occurred
//! earlier in its prompt or output offers the tokens that followed them as a draft (under a
//! grammar, first the tokens the grammar forces next; with the client's `prediction`, the
//! prediction's tokens from where the output has got to in it). One step
//! runs its last token and the draft together (a few more rows of a step whose cost is
//! mostly reading the weights), and the token sampled from each row is kept while it equals
//! the draft token that row was fed: the output is the one plain decoding gives, token for
//! token and with the same random draws, only faster when the text repeats its context
//! (tool calls quoting their arguments, edits of given code or JSON, quotations).
//!
//! A child of `core`: it works on the engine's private state.

use super::{Active, Engine, ModelRunner};
use crate::engine::scheduler::{Chunk, SeqId, DRAFTING_MAX_SEQUENCES};
use crate::telemetry;

/// Longest and shortest suffix looked up; a 1-token match proposes too much noise.
const MAX_NGRAM: usize = 4;
const MIN_NGRAM: usize = 2;
/// How far back a suffix is looked for.
const WINDOW: usize = 8192;
/// Most steps a sequence waits between drafts after drafts that all failed.
const MAX_PAUSE: u32 = 32;

/// A sequence's drafting: the draft offered for the next step, and how much each source
/// (the context, the client's prediction) offers.
#[derive(Debug, Default)]
pub struct Draft {
    /// The tokens offered for the next step.
    tokens: Vec<u32>,
    /// How much the context (0) and the prediction (1) offer, each learning from its own.
    pace: [Pace; 2],
    /// Whether the tokens offered come from the client's prediction, and where in it the
    /// last such draft started.
    from_prediction: bool,
    at: usize,
    /// Prediction tokens verified so far: kept, and not kept.
    pub(in crate::engine) predicted: (usize, usize),
}

/// How much one source offers. A draft costs a row each even when it fails (on a small
/// model, a 5-row step takes about 1.7x a 1-row one), so a source whose drafts fail offers
/// less: after a draft whose first token failed it pauses, 1, 2, 4, ... of the steps it is
/// asked, and after a partly kept one it offers one more token than it kept; a draft kept
/// whole brings the full length back.
#[derive(Debug, Default)]
struct Pace {
    /// Most tokens to offer next (`None` until a draft was verified: the full length).
    len: Option<usize>,
    /// Steps left to wait before offering again, and how long the last wait was.
    wait: u32,
    pause: u32,
}

impl Pace {
    /// Whether to offer now (else a step of its pause passes).
    fn ready(&mut self) -> bool {
        if self.wait > 0 {
            self.wait -= 1;
            return false;
        }
        true
    }

    /// How many tokens to offer, at most `most`.
    fn take(&self, most: usize) -> usize {
        self.len.unwrap_or(most).min(most)
    }

    /// Takes a verified draft's outcome: `kept` of `offered` tokens.
    fn learn(&mut self, offered: usize, kept: usize, most: usize) {
        if kept == 0 {
            self.pause = (self.pause * 2).clamp(1, MAX_PAUSE);
            self.wait = self.pause;
            self.len = Some(1);
        } else {
            self.pause = 0;
            self.len = Some(if kept == offered { most } else { kept + 1 });
        }
    }
}

/// Up to `k` tokens of `prediction` where `output` has got to in it, appended to `draft`:
/// after the output when the prediction starts with it (a short output), else after the
/// first occurrence of the output's last `n` tokens (the longest `n` that occurs) at or
/// after `at`, else anywhere. Moves `at` to where the draft starts.
pub fn predicted(
    output: &[u32],
    prediction: &[u32],
    at: &mut usize,
    k: usize,
    draft: &mut Vec<u32>,
) {
    let m = output.len();
    let start = if m < MIN_NGRAM {
        prediction.starts_with(output).then_some(m)
    } else {
        (MIN_NGRAM..=MAX_NGRAM.min(m)).rev().find_map(|n| {
            let suffix = &output[m - n..];
            let find = |from: usize| {
                let hay = prediction.get(from..)?;
                let i = hay.windows(n).position(|w| w == suffix)?;
                Some(from + i + n)
            };
            find(at.saturating_sub(n)).or_else(|| find(0))
        })
    };
    if let Some(s) = start.filter(|&s| s < prediction.len()) {
        *at = s;
        draft.extend(&prediction[s..(s + k).min(prediction.len())]);
    }
}

/// Up to `k` tokens that followed the latest earlier occurrence of the last `n` tokens of
/// `tokens` (the longest `n` that occurs), appended to `draft`. When they run into the end
/// of `tokens` (a match less than `k` tokens back: a repeating run), the run goes on.
pub fn propose(tokens: &[u32], k: usize, draft: &mut Vec<u32>) {
    let len = tokens.len();
    let floor = len.saturating_sub(WINDOW);
    if k == 0 {
        return;
    }
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if len <= n {
            continue;
        }
        let suffix = &tokens[len - n..];
        // Latest first; a match may overlap the suffix but is never it, so at least one
        // token follows it.
        if let Some(i) = (floor..len - n)
            .rev()
            .find(|&i| tokens[i..i + n] == *suffix)
        {
            let start = draft.len();
            for j in i + n..i + n + k {
                let t = if j < len {
                    tokens[j]
                } else {
                    draft[start + j - len]
                };
                draft.push(t);
            }
            return;
        }
    }
}

impl<M: ModelRunner> Engine<M> {
    /// Offers each decoding sequence's draft to the scheduler for the next step.
    pub(super) fn offer_drafts(&mut self) {
        if self.speculate == 0 {
            return;
        }
        let context = self.model.context_length();
        // Steps of more sequences take no drafts (see the scheduler).
        let small = self.scheduler.running_count() <= DRAFTING_MAX_SEQUENCES;
        for (&id, a) in self.active.iter_mut() {
            let d = &mut a.draft;
            d.tokens.clear();
            let decoding = small && a.scores.is_none() && a.tokens.len() > a.req.prompt.len();
            // Every draft token accepted still leaves room for the token after them, in the
            // request's budget and in the context.
            let budget = a.req.max_tokens.saturating_sub(a.output.generated() + 1);
            let room = context.saturating_sub(a.tokens.len() + 1);
            let most = self.speculate.min(budget).min(room);
            let most_predicted = budget.min(room);
            // What a grammar forces comes first, whatever earlier drafts did (it is the
            // only text the grammar allows); else what the context suggests.
            if let Some(c) = a.constraint.as_deref_mut().filter(|_| decoding && most > 0) {
                d.tokens.extend(c.forced().into_iter().take(most));
            }
            let forced = !d.tokens.is_empty();
            d.from_prediction = false;
            // The client's prediction first (drafts twice as long: it is meant to be the
            // reply), then the context.
            let prediction = &a.req.prediction;
            if decoding && !forced && !prediction.is_empty() && d.pace[1].ready() {
                let k = d.pace[1].take((2 * self.speculate).min(most_predicted));
                let output = &a.tokens[a.req.prompt.len()..];
                predicted(output, prediction, &mut d.at, k, &mut d.tokens);
                d.from_prediction = !d.tokens.is_empty();
            }
            if decoding && d.tokens.is_empty() && d.pace[0].ready() {
                propose(&a.tokens, d.pace[0].take(most), &mut d.tokens);
            }
            // Always said, so the step never takes a draft this sequence does not hold.
            self.scheduler.set_draft(id, d.tokens.len());
        }
    }

    /// Puts the drafts the step took after their sequences' tokens, so each chunk's tokens
    /// are one slice; [`Self::verify`] takes them off again.
    pub(super) fn place_drafts(&mut self, chunks: &[Chunk]) {
        for c in chunks.iter().filter(|c| c.draft > 0) {
            if let Some(a) = self.active.get_mut(&c.id) {
                let Active { tokens, draft, .. } = a;
                tokens.extend_from_slice(&draft.tokens[..c.draft]);
            }
        }
    }

    /// Takes a step's drafts off their sequences' tokens (before sampling, or when the
    /// step failed).
    pub(super) fn remove_drafts(&mut self, chunks: &[Chunk]) {
        for c in chunks.iter().filter(|c| c.draft > 0) {
            if let Some(a) = self.active.get_mut(&c.id) {
                a.tokens.truncate(c.start + 1);
            }
        }
    }

    /// Samples from a drafted chunk's rows in order while each sampled token equals the
    /// draft token the next row was fed; the first that differs (or the last row's) is
    /// kept too. Records the tokens in `sampled`; returns whether the request finished.
    pub(super) fn verify(
        &mut self,
        c: &Chunk,
        logits: Vec<f32>,
        sampled: &mut Vec<(SeqId, u32)>,
    ) -> bool {
        let vocab = logits.len() / c.len;
        let (draft, before) = match self.active.get_mut(&c.id) {
            Some(a) => (std::mem::take(&mut a.draft.tokens), a.draft.predicted),
            None => return false,
        };
        let mut accepted = 0;
        let mut done = false;
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            // A row may end the reply, whose usage is written then: it counts this step's
            // prediction tokens as they stand (the rest of the draft rejected).
            if let Some(a) = self
                .active
                .get_mut(&c.id)
                .filter(|a| a.draft.from_prediction)
            {
                a.draft.predicted = (before.0 + accepted, before.1 + c.draft - accepted);
            }
            let (token, finished) = self.on_logits(c.id, row.to_vec());
            sampled.push((c.id, token));
            done = finished;
            if done || i == c.draft || draft.get(i) != Some(&token) {
                break;
            }
            accepted += 1;
        }
        telemetry::drafted(c.draft, accepted);
        if let Some(a) = self.active.get_mut(&c.id) {
            if a.draft.from_prediction {
                a.draft.predicted = (before.0 + accepted, before.1 + c.draft - accepted);
            }
            let source = usize::from(a.draft.from_prediction);
            let most = self.speculate * (1 + source);
            a.draft.pace[source].learn(c.draft, accepted, most);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::propose;

    fn draft(tokens: &[u32], k: usize) -> Vec<u32> {
        let mut d = Vec::new();
        propose(tokens, k, &mut d);
        d
    }

    #[test]
    fn the_latest_longest_match_proposes_what_followed_it() {
        // "2 3" occurred twice before; the latest occurrence was followed by 7 8.
        let t = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 6, 2, 3];
        assert_eq!(draft(&t, 2), [7, 8]);
        assert_eq!(draft(&t, 5), [7, 8, 6, 2, 3]);
        // Past the end, the run repeats: 7 8 6 2 3 then 7 8 6 ...
        assert_eq!(draft(&t, 8), [7, 8, 6, 2, 3, 7, 8, 6]);
        assert!(draft(&t, 0).is_empty());
        // A longer suffix wins over a later, shorter one.
        let t = [5, 6, 7, 1, 9, 6, 7, 2, 5, 6, 7];
        assert_eq!(draft(&t, 1), [1]);
        // No repeated pair: nothing.
        assert!(draft(&[1, 2, 3, 4, 1], 3).is_empty());
        // A run goes on.
        assert_eq!(draft(&[4, 4, 4], 3), [4, 4, 4]);
        assert_eq!(draft(&[9, 1, 2, 1, 2], 3), [1, 2, 1]);
    }

    #[test]
    fn a_prediction_is_followed_from_where_the_output_got_to() {
        let p = [10, 11, 12, 13, 10, 11, 14, 15];
        let run = |output: &[u32], at: &mut usize, k: usize| {
            let mut d = Vec::new();
            super::predicted(output, &p, at, k, &mut d);
            d
        };
        let mut at = 0;
        // A short output that starts the prediction: what follows it.
        assert_eq!(run(&[10], &mut at, 3), [11, 12, 13]);
        assert_eq!(at, 1);
        assert!(run(&[99], &mut at, 3).is_empty());
        // "10 11" occurs twice: the first at or after where the last draft started...
        assert_eq!(run(&[5, 10, 11], &mut at, 2), [12, 13]);
        at = 4;
        // ... which, once past the first, is the second.
        assert_eq!(run(&[5, 10, 11], &mut at, 5), [14, 15]);
        assert_eq!(at, 6);
        // Behind `at`, anywhere; at the prediction's end, nothing.
        assert_eq!(run(&[12, 13], &mut at, 1), [10]);
        assert!(run(&[14, 15], &mut at, 4).is_empty());
        // No prediction: nothing.
        let mut d = Vec::new();
        super::predicted(&[10, 11], &[], &mut 0, 4, &mut d);
        assert!(d.is_empty());
    }
}
