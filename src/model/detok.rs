//! Incremental detokenization: turns a growing list of token ids into text deltas.
//!
//! Knows only the tokenizer's `decode`. Invariant: a delta never ends in the middle of a UTF-8
//! character (a token holding half of an emoji waits for the next one; bytes no token can
//! complete any more come out as U+FFFD), and the deltas
//! concatenate to the decoding of all tokens after the context. A context that ends inside a
//! character (a prompt of token ids cut there) decodes to U+FFFD at its end: the first delta
//! then holds the whole character, its first bytes the context's.

use super::tokenizer::Tokenizer;
use crate::error::ModelError;

/// The most bytes an unfinished character can have (a fourth completes or breaks it).
const COMPLETABLE: usize = 3;

/// Decodes a window of recent tokens, so each step costs O(window), not O(sequence).
pub struct IncrementalDecoder {
    tokens: Vec<u32>,
    /// Start of the window decoded for context (the decoder may strip or merge at its start).
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self {
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// A decoder that continues after `context` (e.g. the prompt's last tokens), so decoders
    /// that strip a leading space (SentencePiece) keep the space of the first new token.
    pub fn with_context(context: &[u32]) -> Self {
        Self {
            tokens: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Adds `token` and returns the new complete text, if any.
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> Result<Option<String>, ModelError> {
        self.tokens.push(token);
        let prefix = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.tokens[self.prefix_offset..])?;
        if full.ends_with('\u{FFFD}') {
            return self.emit_permanent(tok, &prefix, &full);
        }
        match delta(&prefix, &full) {
            Some(delta) if !delta.is_empty() => {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.tokens.len();
                Ok(Some(delta))
            }
            _ => Ok(None),
        }
    }

    /// While the text ends in U+FFFD: what lies before the last tokens that hold
    /// [`COMPLETABLE`] bytes, and decodes the same with them, can never change, so it is
    /// emitted, invalid bytes as U+FFFD. A reply of lone bytes that never
    /// complete a character (a `logit_bias` on one) would otherwise hold its whole text
    /// back, decoding it all again at each token.
    fn emit_permanent(
        &mut self,
        tok: &Tokenizer,
        prefix: &str,
        full: &str,
    ) -> Result<Option<String>, ModelError> {
        // Only where each invalid byte decodes on its own (GPT-2's byte level):
        // SentencePiece's byte fallback makes a whole run U+FFFD, so a run's start can
        // still change.
        if !tok.byte_level_decoder() {
            return Ok(None);
        }
        // The last tokens that hold at least the bytes an unfinished character can have
        // (control tokens decode to nothing, so they hold none).
        let mut cut = self.tokens.len();
        let mut held = 0;
        while cut > self.read_offset && held < COMPLETABLE {
            cut -= 1;
            let id = self.tokens[cut];
            if !tok.is_control(id) {
                held += tok.token_bytes_of(id).len();
            }
        }
        if held < COMPLETABLE {
            return Ok(None);
        }
        let upto = tok.decode(&self.tokens[self.prefix_offset..cut])?;
        if !full.starts_with(&upto) {
            return Ok(None);
        }
        match delta(prefix, &upto).filter(|d| !d.is_empty()) {
            Some(d) => {
                let d = d.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = cut;
                Ok(Some(d))
            }
            None => Ok(None),
        }
    }

    /// Text held back at the end (an incomplete character is emitted as U+FFFD).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>, ModelError> {
        if self.read_offset == self.tokens.len() {
            return Ok(None);
        }
        let prefix = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Ok(delta(&prefix, &full)
            .filter(|d| !d.is_empty())
            .map(str::to_string))
    }
}

/// What `full` adds to `prefix`. A prefix that ends inside a character (a context cut
/// there: a prompt of token ids) decodes to U+FFFD where `full` has the character: the
/// character, whole, is then part of what is added.
fn delta<'a>(prefix: &str, full: &'a str) -> Option<&'a str> {
    if full.starts_with(prefix) {
        return full.get(prefix.len()..);
    }
    let whole = prefix.trim_end_matches('\u{FFFD}');
    (whole.len() < prefix.len() && full.starts_with(whole)).then(|| &full[whole.len()..])
}
