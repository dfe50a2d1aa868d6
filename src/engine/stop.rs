//! Stop-string matching over streamed text.
//!
//! Owns: deciding, chunk by chunk, which decoded text may be sent to the
//! client and whether a stop string has been reached. Text that could still
//! grow into a stop string is held back until it either completes one (and is
//! dropped) or turns out not to (and is released).
//!
//! Must not know: tokens, the model, sampling or HTTP. It sees `&str` chunks
//! only, so every split it makes is on a UTF-8 character boundary.
//!
//! Invariant: no emitted text is ever part of a stop string, and no text that
//! precedes the first stop found is ever lost (it is emitted by `push` or
//! returned by `flush`). Like OpenAI, the stop string itself is not emitted.

/// What the caller may send after one [`StopMatcher::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop yet: send `emit` (possibly empty) and keep generating.
    Continue { emit: String },
    /// `stop` was found: send `emit`, the text before it, and end generation.
    Stopped { emit: String, stop: String },
}

/// Incremental matcher for a fixed set of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet emitted: a possible start of a stop string.
    pending: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            pending: String::new(),
        }
    }

    /// The active (non-empty) stop strings.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Appends `text` and reports what can be emitted now.
    ///
    /// If a stop string occurs in the pending text, everything before the
    /// earliest occurrence is emitted and the rest dropped; among stops
    /// starting at the same place the shortest wins (then the first listed).
    /// Otherwise everything is emitted except the longest suffix that is a
    /// proper prefix of some stop string. After `Stopped` the caller should
    /// stop pushing; a further push starts afresh.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            // Nothing is ever held back, so `pending` is empty.
            return StopOutcome::Continue {
                emit: text.to_owned(),
            };
        }
        self.pending.push_str(text);

        if let Some((pos, index)) = self.earliest_stop() {
            let stop = self.stops[index].clone();
            // `pos` comes from `str::find`, so it is a char boundary.
            self.pending.truncate(pos);
            let emit = std::mem::take(&mut self.pending);
            return StopOutcome::Stopped { emit, stop };
        }

        // The held suffix equals a stop prefix cut at one of the stop's char
        // boundaries, so `split` is a char boundary of `pending` too.
        let split = self.pending.len() - self.held_back_len();
        let held = self.pending.split_off(split);
        let emit = std::mem::replace(&mut self.pending, held);
        StopOutcome::Continue { emit }
    }

    /// Returns the held-back text; call once generation ends without a stop.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// `(byte position, index into stops)` of the earliest stop in `pending`.
    fn earliest_stop(&self) -> Option<(usize, usize)> {
        self.stops
            .iter()
            .enumerate()
            .filter_map(|(i, stop)| self.pending.find(stop.as_str()).map(|pos| (pos, i)))
            // `min_by_key` keeps the first of equal keys: the first listed.
            .min_by_key(|&(pos, i)| (pos, self.stops[i].len()))
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper
    /// prefix of some stop string.
    fn held_back_len(&self) -> usize {
        self.stops
            .iter()
            .filter_map(|stop| {
                // Stops are non-empty, so `stop.len() - 1` cannot underflow.
                let longest = (stop.len() - 1).min(self.pending.len());
                (1..=longest)
                    .rev()
                    .find(|&n| stop.is_char_boundary(n) && self.pending.ends_with(&stop[..n]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| (*s).to_owned()).collect())
    }

    fn cont(emit: &str) -> StopOutcome {
        StopOutcome::Continue {
            emit: emit.to_owned(),
        }
    }

    fn stopped(emit: &str, stop: &str) -> StopOutcome {
        StopOutcome::Stopped {
            emit: emit.to_owned(),
            stop: stop.to_owned(),
        }
    }

    #[test]
    fn stop_inside_one_chunk() {
        let mut m = matcher(&["\n\n"]);
        assert_eq!(m.push("foo\n\nbar"), stopped("foo", "\n\n"));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn stop_spanning_chunks() {
        let mut m = matcher(&["llo"]);
        assert_eq!(m.push("Hel"), cont("He"));
        assert_eq!(m.push("lo"), stopped("", "llo"));
    }

    #[test]
    fn held_back_prefix_released_when_it_does_not_match() {
        let mut m = matcher(&["llo"]);
        assert_eq!(m.push("Hel"), cont("He"));
        assert_eq!(m.push("p!"), cont("lp!"));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn held_back_prefix_released_on_flush() {
        let mut m = matcher(&["llo"]);
        assert_eq!(m.push("Hel"), cont("He"));
        assert_eq!(m.flush(), "l");
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        for stops in [["world", "lo"], ["lo", "world"]] {
            let mut m = matcher(&stops);
            assert_eq!(m.push("Hello world"), stopped("Hel", "lo"));
        }
        let mut m = matcher(&["abc", "ab"]);
        assert_eq!(m.push("xabcd"), stopped("x", "ab"));
    }

    #[test]
    fn multi_byte_characters() {
        let mut m = matcher(&["é!"]);
        assert_eq!(m.push("café!"), stopped("caf", "é!"));

        let mut m = matcher(&["é!"]);
        assert_eq!(m.push("caf"), cont("caf"));
        assert_eq!(m.push("é"), cont(""));
        assert_eq!(m.push("!"), stopped("", "é!"));

        let mut m = matcher(&["é!"]);
        assert_eq!(m.push("café"), cont("caf"));
        assert_eq!(m.push(" au lait"), cont("é au lait"));

        // A stop prefix is only held at the stop's own char boundaries.
        let mut m = matcher(&["日本"]);
        assert_eq!(m.push("x日"), cont("x"));
        assert_eq!(m.push("語"), cont("日語"));
    }

    #[test]
    fn empty_stop_list_emits_everything() {
        for mut m in [matcher(&[]), matcher(&[""])] {
            assert!(m.stops().is_empty());
            assert_eq!(m.push("abc"), cont("abc"));
            assert_eq!(m.push("llo"), cont("llo"));
            assert_eq!(m.flush(), "");
        }
    }

    #[test]
    fn result_does_not_depend_on_chunking() {
        let text = "The answer is 42.\nUser: ça va?";
        let chars: Vec<char> = text.chars().collect();
        for size in 1..=6 {
            let mut m = matcher(&["\nUser:", "42!"]);
            let mut out = String::new();
            let mut found = None;
            for chunk in chars.chunks(size) {
                match m.push(&chunk.iter().collect::<String>()) {
                    StopOutcome::Continue { emit } => out.push_str(&emit),
                    StopOutcome::Stopped { emit, stop } => {
                        out.push_str(&emit);
                        found = Some(stop);
                        break;
                    }
                }
            }
            assert_eq!(out, "The answer is 42.", "chunk size {size}");
            assert_eq!(found.as_deref(), Some("\nUser:"), "chunk size {size}");
        }
    }
}
