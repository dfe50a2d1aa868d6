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

/// Where stop strings stop applying: at a text that opens what they must not cut (a tool
/// call's marker: its arguments are not prose). A stop string that starts before it still
/// ends the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopsEnd {
    pub text: String,
    /// Found anywhere in the output; `false`: only when the output starts with it (after
    /// whitespace).
    pub anywhere: bool,
    /// A part the output may open with, in which `text` is not looked for; "the output
    /// starts" then means after it.
    pub aside: Option<Aside>,
}

/// A part an output may open with (after whitespace), from `open` to `close`: a reasoning
/// model's thinking, which may mention what ends the stops without opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aside {
    pub open: String,
    pub close: String,
    /// The output starts inside it (its prompt ended with `open`).
    pub inside: bool,
}

/// Incremental matcher for a fixed set of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet emitted: a possible start of a stop string.
    pending: String,
    /// Where the stops end, until it is found or cannot be any more.
    end: Option<StopsEnd>,
    /// With `end`: the text received so far, less the first `dropped` bytes (an aside).
    seen: String,
    dropped: usize,
    /// With `end`: the aside the output may still open with or be in.
    aside: Option<Aside>,
    /// `end` was found: every stop string is off.
    ended: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            ..Self::default()
        }
    }

    /// Stop strings apply only before `end` (none: to the whole output).
    pub fn ending(mut self, end: Option<StopsEnd>) -> Self {
        self.end = end.filter(|e| !e.text.is_empty());
        self.aside = self.end.as_mut().and_then(|e| e.aside.take());
        self.aside = self.aside.take().filter(|a| !a.close.is_empty());
        self
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
        if self.stops.is_empty() || self.ended {
            // Nothing is ever held back, so `pending` is empty.
            return StopOutcome::Continue {
                emit: text.to_owned(),
            };
        }
        self.pending.push_str(text);
        let end = self.find_end(text);

        let before_end = |&(pos, _): &(usize, usize)| end.is_none_or(|e| pos < e);
        if let Some((pos, index)) = self.earliest_stop().filter(before_end) {
            let stop = self.stops[index].clone();
            // `pos` comes from `str::find`, so it is a char boundary.
            self.pending.truncate(pos);
            let emit = std::mem::take(&mut self.pending);
            return StopOutcome::Stopped { emit, stop };
        }
        if end.is_some() {
            self.ended = true;
            return StopOutcome::Continue {
                emit: std::mem::take(&mut self.pending),
            };
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

    /// Text sent out around the matcher (a control token's, for the caller's parser) after
    /// what it held back was flushed: the stops end if it holds their end.
    pub fn passed(&mut self, text: &str) {
        debug_assert!(self.pending.is_empty(), "held-back text not flushed first");
        if self.scan(text).is_some() {
            self.ended = true;
        }
    }

    /// Where in `pending` the stops end, once `text` (just added to it) is seen; 0 when the
    /// end began before `pending` (it was sent out, being no stop's start).
    fn find_end(&mut self, text: &str) -> Option<usize> {
        let at = self.scan(text)?;
        let total = self.dropped + self.seen.len();
        Some(at.saturating_sub(total - self.pending.len()))
    }

    /// Adds `text` to what was seen; where the end is (in bytes from the output's start),
    /// once found.
    fn scan(&mut self, text: &str) -> Option<usize> {
        self.end.as_ref()?;
        let before = self.dropped + self.seen.len();
        self.seen.push_str(text);
        if !self.past_aside(before) {
            return None;
        }
        let end = self.end.as_ref()?;
        let at = if end.anywhere {
            let mut from = before
                .saturating_sub(self.dropped)
                .saturating_sub(end.text.len());
            while !self.seen.is_char_boundary(from) {
                from -= 1;
            }
            self.seen[from..].find(&end.text).map(|p| from + p)
        } else {
            // The whitespace a call's parser lets before it (not all of Unicode's).
            let body = self.seen.trim_start_matches([' ', '\t', '\r', '\n']);
            let lead = self.seen.len() - body.len();
            if body.starts_with(&end.text) {
                Some(lead)
            } else {
                if !end.text.starts_with(body) {
                    // The output began otherwise: the stops apply to all of it.
                    self.end = None;
                    self.seen = String::new();
                }
                None
            }
        }?;
        Some(self.dropped + at)
    }

    /// Whether the output is past its aside (or has none), dropping the aside from `seen`;
    /// `before`: the output's length before the last text.
    fn past_aside(&mut self, before: usize) -> bool {
        let Some(aside) = self.aside.as_ref() else {
            return true;
        };
        if !aside.inside {
            let body = self.seen.trim_start();
            if let Some(rest) = body.strip_prefix(aside.open.as_str()) {
                let cut = self.seen.len() - rest.len();
                self.drop_seen(cut);
                self.aside.as_mut().expect("checked above").inside = true;
            } else if aside.open.starts_with(body) {
                return false; // Not known yet.
            } else {
                self.aside = None;
                return true;
            }
        }
        let close = &self.aside.as_ref().expect("checked above").close;
        let mut from = before
            .saturating_sub(self.dropped)
            .saturating_sub(close.len());
        while !self.seen.is_char_boundary(from) {
            from -= 1;
        }
        let Some(p) = self.seen[from..].find(close.as_str()) else {
            // Keep only what may start the close marker: a long thinking is not held.
            let mut keep = self.seen.len().saturating_sub(close.len());
            while !self.seen.is_char_boundary(keep) {
                keep -= 1;
            }
            self.drop_seen(keep);
            return false;
        };
        let cut = from + p + close.len();
        self.aside = None;
        self.drop_seen(cut);
        true
    }

    fn drop_seen(&mut self, n: usize) {
        self.seen.drain(..n);
        self.dropped += n;
    }

    /// `(byte position, index into stops)` of the earliest stop in `pending`.
    fn earliest_stop(&self) -> Option<(usize, usize)> {
        self.stops
            .iter()
            .enumerate()
            // A stop longer than the text cannot be in it (and `find` would first read the
            // whole stop).
            .filter(|(_, stop)| stop.len() <= self.pending.len())
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

    fn ending(stops: &[&str], end: &str, anywhere: bool) -> StopMatcher {
        matcher(stops).ending(Some(StopsEnd {
            text: end.into(),
            anywhere,
            aside: None,
        }))
    }

    fn thinking(stops: &[&str], end: &str, anywhere: bool, inside: bool) -> StopMatcher {
        matcher(stops).ending(Some(StopsEnd {
            text: end.into(),
            anywhere,
            aside: Some(Aside {
                open: "<think>".into(),
                close: "</think>".into(),
                inside,
            }),
        }))
    }

    /// Pushes `chunks` in order, collecting what goes out until a stop.
    fn run(m: &mut StopMatcher, chunks: &[&str]) -> (String, Option<String>) {
        let mut out = String::new();
        for c in chunks {
            match m.push(c) {
                StopOutcome::Continue { emit } => out.push_str(&emit),
                StopOutcome::Stopped { emit, stop } => {
                    out.push_str(&emit);
                    return (out, Some(stop));
                }
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stops_end_after_the_thinking() {
        let call = "<tool_call>\n{\"name\": \"f\"}</tool_call>";
        // A marker mentioned in the thinking does not end the stops; the call after it does.
        let reply = format!("<think>I could use é<tool_call> here.日</think>\n\né{call}");
        for size in [1, 2, 3, 5, 8, 100] {
            let chars: Vec<char> = reply.chars().collect();
            let chunks: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let mut m = thinking(&["\"", " here."], "<tool_call>", true, false);
            assert_eq!(
                run(&mut m, &chunks),
                (
                    "<think>I could use é<tool_call>".into(),
                    Some(" here.".into())
                ),
                "chunks of {size}"
            );
            let mut m = thinking(&["\""], "<tool_call>", true, false);
            assert_eq!(
                run(&mut m, &chunks),
                (reply.clone(), None),
                "chunks of {size}"
            );
        }
        // Inside from the start (the prompt opened it), the end only after the close.
        let mut m = thinking(&["\""], "<tool_call>", true, true);
        assert_eq!(
            run(&mut m, &["say <tool_call> \"x\"", "</think>", call]),
            ("say <tool_call> ".into(), Some("\"".into()))
        );
        let mut m = thinking(&["\""], "<tool_call>", true, true);
        let (out, stop) = run(&mut m, &["hmm</th", "ink>", call]);
        assert_eq!((out.as_str(), stop), (&*format!("hmm</think>{call}"), None));
        // At the start: the reply's start is after the thinking, past whitespace...
        let json = "{\"name\": \"f\", \"arguments\": {}}";
        let mut m = thinking(&["\""], "{", false, false);
        let (out, stop) = run(&mut m, &[" <thi", "nk>a</think>", "\n\n", json]);
        assert_eq!(
            (out.as_str(), stop),
            (&*format!(" <think>a</think>\n\n{json}"), None)
        );
        // ...and a reply without thinking is read as before.
        let mut m = thinking(&["\""], "{", false, false);
        assert_eq!(run(&mut m, &[json]), (json.into(), None));
        let mut m = thinking(&["\""], "{", false, false);
        assert_eq!(
            run(&mut m, &["Hi ", json]),
            ("Hi {".into(), Some("\"".into()))
        );
        // Prose after the thinking keeps the stops.
        let mut m = thinking(&["\""], "{", false, false);
        assert_eq!(
            run(&mut m, &["<think>a</think>", "Hi ", json]),
            ("<think>a</think>Hi {".into(), Some("\"".into()))
        );
        // The close marker as a control token, sent out around the matcher.
        let mut m = thinking(&["\""], "{", false, true);
        assert_eq!(m.push("a"), cont("a"));
        m.passed("</think>");
        assert_eq!(m.push(json), cont(json));
        // Magistral's markers are control tokens, sent out around the matcher, the open one
        // too: a call's marker and a list's start count after the close one only.
        for (end, anywhere, call) in [
            ("[TOOL_CALLS]", true, "[TOOL_CALLS]f[ARGS]{\"a\": \"b\"}"),
            ("[{", false, "[{\"name\": \"f\"}]"),
        ] {
            let magistral = |aside: bool| {
                matcher(&["\""]).ending(Some(StopsEnd {
                    text: end.into(),
                    anywhere,
                    aside: aside.then(|| Aside {
                        open: "[THINK]".into(),
                        close: "[/THINK]".into(),
                        inside: false,
                    }),
                }))
            };
            let (head, rest) = call.split_at(if anywhere { 12 } else { 0 });
            let mut m = magistral(true);
            assert_eq!(m.push(""), cont(""));
            m.passed("[THINK]");
            let musing = "no [TOOL_CALLS] or [{ yet";
            assert_eq!(m.push(musing), cont(musing));
            m.passed("[/THINK]");
            if anywhere {
                m.passed(head);
            }
            assert_eq!(m.push(rest), cont(rest), "{end}");
            // Stops apply in the thinking, after a mention of the marker too...
            let mut m = magistral(true);
            m.passed("[THINK]");
            let quoted = "[TOOL_CALLS] [{ \"x\"";
            assert_eq!(m.push(quoted), stopped("[TOOL_CALLS] [{ ", "\""), "{end}");
            // ...where, unaware of the thinking, the mention ended them, or the list's
            // start after it was missed.
            let mut m = magistral(false);
            m.passed("[THINK]");
            if anywhere {
                assert_eq!(m.push(quoted), cont(quoted), "{end}");
            } else {
                assert_eq!(m.push(musing), cont(musing));
                m.passed("[/THINK]");
                assert!(matches!(m.push(rest), StopOutcome::Stopped { .. }), "{end}");
            }
        }
    }

    #[test]
    fn stops_end_where_a_call_opens() {
        // The marker split across pushes, its start sent out (no stop's start).
        let mut m = ending(&["\""], "<tool_call>", true);
        assert_eq!(m.push("Sure. <tool"), cont("Sure. <tool"));
        assert_eq!(m.push("_call>\n{\"name\""), cont("_call>\n{\"name\""));
        assert_eq!(m.push(": \"f\"}"), cont(": \"f\"}"));
        // A stop before the marker still ends the output.
        let mut m = ending(&["\""], "<tool_call>", true);
        assert_eq!(m.push("Say \"hi <tool_call>"), stopped("Say ", "\""));
        // A stop's start held back, then the marker: all of it goes out.
        let mut m = ending(&["<tool_x"], "<tool_call>", true);
        assert_eq!(m.push("a <tool_"), cont("a "));
        assert_eq!(
            m.push("call>{\"<tool_x\"}"),
            cont("<tool_call>{\"<tool_x\"}")
        );
        // Only at the start: a reply that opens with it, after whitespace...
        let mut m = ending(&["\n"], "{", false);
        assert_eq!(m.push(" "), cont(" "));
        assert_eq!(m.push("{\"a\":\n1}"), cont("{\"a\":\n1}"));
        // ...not one that opens otherwise.
        let mut m = ending(&["\n"], "{", false);
        assert_eq!(m.push("Hi {"), cont("Hi {"));
        assert_eq!(m.push("\n"), stopped("", "\n"));
        // A control token's marker, sent out around the matcher.
        let mut m = ending(&["\""], "[TOOL_CALLS]", true);
        assert_eq!(m.push("ok"), cont("ok"));
        m.passed("[TOOL_CALLS]");
        assert_eq!(m.push("f[ARGS]{\"a\": 1}"), cont("f[ARGS]{\"a\": 1}"));
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
