//! Logprobs: of a sampled token with its most likely alternatives, and of the prompt's own
//! tokens (the completions API's `echo` with `logprobs`, which evaluation harnesses use to
//! score text).
//!
//! Knows logits, token ids and their text; never the model or HTTP.

use super::request::{Event, LogprobInfo, TokenLogprob};
use super::sampler::LogSoftmax;
use super::scheduler::Chunk;
use crate::model::Tokenizer;

/// `chosen`'s logprob under `logits` (temperature 1), with the `top` most likely tokens.
/// One pass of exponentials for all of them (scoring a prompt runs this on every row).
pub fn logprob_info(tok: &Tokenizer, logits: &[f32], chosen: u32, top: usize) -> LogprobInfo {
    let ls = LogSoftmax::new(logits);
    let entry = |id: u32| entry(tok, id, ls.of(logits, id));
    let mut top_logprobs = Vec::new();
    if top > 0 && !logits.is_empty() {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = top.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        idx.truncate(k);
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        top_logprobs = idx.iter().map(|&i| entry(i)).collect();
    }
    LogprobInfo {
        chosen: entry(chosen),
        top_logprobs,
    }
}

/// `chosen`'s entry from llama.cpp's distribution after its chain (llama.cpp's
/// `post_sampling_probs`): its probability `p` and the likeliest tokens then (`finals`, most
/// likely first), the first `top` of them, each probability as its log.
pub fn final_info(
    tok: &Tokenizer,
    chosen: u32,
    p: f32,
    finals: &[(u32, f32)],
    top: usize,
) -> LogprobInfo {
    LogprobInfo {
        chosen: entry(tok, chosen, p.ln()),
        top_logprobs: finals
            .iter()
            .take(top)
            .map(|&(id, p)| entry(tok, id, p.ln()))
            .collect(),
    }
}

fn entry(tok: &Tokenizer, id: u32, logprob: f32) -> TokenLogprob {
    TokenLogprob {
        id,
        token: tok.token_text_decoded(id),
        bytes: tok.token_bytes_of(id),
        logprob,
    }
}

/// The logprobs of a prompt's tokens, gathered over its prefill chunks. Position `p`'s comes
/// from the logits of position `p - 1`; the first token has none.
///
/// Invariant: each position is scored once, in order, so a sequence preempted and
/// recomputed (from position 0) neither repeats nor skips one.
#[derive(Debug)]
pub struct PromptScores {
    top: usize,
    /// The next prompt position to score.
    next: usize,
    scored: Vec<LogprobInfo>,
    sent: bool,
}

impl PromptScores {
    pub fn new(top: usize) -> Self {
        Self {
            top,
            next: 1,
            scored: Vec::new(),
            sent: false,
        }
    }

    /// Whether the chunk of `len` positions from `start` predicts a prompt position still
    /// to score (row `j` predicts position `start + j + 1`): then it needs every row's
    /// logits. A chunk recomputed after preemption over scored positions does not.
    pub fn wants_rows(&self, prompt_len: usize, start: usize, len: usize) -> bool {
        self.next < prompt_len && start < self.next && start + len >= self.next
    }

    /// Takes one chunk's output: scores its rows when it computed every row (`every`), and
    /// returns what to sample from: the last row, when the chunk asked for it.
    pub fn on_chunk(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        chunk: &Chunk,
        logits: Option<Vec<f32>>,
        every: bool,
    ) -> Option<Vec<f32>> {
        let mut rows = logits?;
        if every {
            let vocab = rows.len() / chunk.len.max(1);
            self.absorb(tok, prompt, chunk.start, &rows, vocab);
            if !chunk.logits {
                return None;
            }
            rows = rows.split_off(rows.len() - vocab);
        }
        chunk.logits.then_some(rows)
    }

    /// Scores what one chunk's rows predict: `logits` holds a row of `vocab` values for
    /// each position from `start` on.
    fn absorb(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        start: usize,
        logits: &[f32],
        vocab: usize,
    ) {
        for (j, row) in logits.chunks_exact(vocab.max(1)).enumerate() {
            let p = start + j + 1;
            if p == self.next && p < prompt.len() {
                self.scored
                    .push(logprob_info(tok, row, prompt[p], self.top));
                self.next += 1;
            }
        }
    }

    /// The prompt's event, once every position is scored; only the first time.
    pub fn finish(&mut self, tok: &Tokenizer, prompt: &[u32]) -> Option<Event> {
        if self.sent || self.next < prompt.len() {
            return None;
        }
        self.sent = true;
        Some(Event::Prompt {
            // As a text's first token reads (a SentencePiece word drops its space there).
            first: prompt
                .first()
                .and_then(|&t| tok.decode_with_control(&[t]).ok())
                .unwrap_or_default(),
            logprobs: std::mem::take(&mut self.scored),
        })
    }
}
