//! llama.cpp's limits on a code completion's lines, applied as its text is emitted: a line
//! after the first indented less than `n_indent` ends the reply before its first non-blank
//! character (an empty line too, as llama.cpp counts its newline as one); past `t_max` from
//! the first token, a piece with a newline ends it after that piece.

use std::time::{Duration, Instant};

/// The limits a request asks for (llama-server's `n_indent` and `t_max_predict_ms`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineLimits {
    /// 0: no indentation limit.
    pub n_indent: usize,
    pub t_max: Option<Duration>,
}

/// Which limit ended a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A line indented too little: the text ends before its first non-blank character.
    Indent,
    /// The time limit: the text ends after this piece (nothing of it is lost).
    Time,
}

/// The limits' state over one reply.
#[derive(Debug)]
pub struct LineCut {
    limits: LineLimits,
    first: Option<Instant>,
    /// In a new line's indentation (after the first newline), and how deep so far.
    indenting: Option<usize>,
    /// That indentation, shown once the line's first character says it may be.
    held: String,
}

impl LineCut {
    pub fn new(limits: LineLimits) -> Self {
        Self {
            limits,
            first: None,
            indenting: None,
            held: String::new(),
        }
    }

    /// The text of one token's piece to show, and the limit that ends the reply with it.
    pub fn push(&mut self, piece: &str, now: Instant) -> (String, Option<Cut>) {
        let first = *self.first.get_or_insert(now);
        let mut out = String::new();
        for c in piece.chars() {
            if let Some(depth) = self.indenting {
                if c == ' ' || c == '\t' {
                    self.held.push(c);
                    self.indenting = Some(depth + 1);
                    continue;
                }
                out.push_str(&std::mem::take(&mut self.held));
                self.indenting = None;
                if depth < self.limits.n_indent {
                    return (out, Some(Cut::Indent));
                }
            }
            out.push(c);
            if c == '\n' && self.limits.n_indent > 0 {
                self.indenting = Some(0);
            }
        }
        let late = self
            .limits
            .t_max
            .is_some_and(|t| now.duration_since(first) > t);
        (out, (late && piece.contains('\n')).then_some(Cut::Time))
    }

    /// The indentation still held when the reply ends for another reason.
    pub fn flush(&mut self) -> String {
        self.indenting = None;
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(n_indent: usize, t_max: Option<u64>) -> LineLimits {
        LineLimits {
            n_indent,
            t_max: t_max.map(Duration::from_millis),
        }
    }

    /// The text shown of `pieces` fed one by one at `step` apart (and what is held at the
    /// end when nothing cut it), and the piece it ended on.
    fn feed(l: LineLimits, pieces: &[&str], step: Duration) -> (String, Option<usize>) {
        let mut cut = LineCut::new(l);
        let t0 = Instant::now();
        let mut out = String::new();
        for (i, p) in pieces.iter().enumerate() {
            let (shown, stop) = cut.push(p, t0 + step * i as u32);
            out.push_str(&shown);
            if stop.is_some() {
                if stop == Some(Cut::Time) {
                    out.push_str(&cut.flush());
                }
                return (out, Some(i));
            }
        }
        out.push_str(&cut.flush());
        (out, None)
    }

    #[test]
    fn a_line_indented_less_than_n_indent_ends_the_reply_in_any_split() {
        let text = "x = 1\n    y = 2\n  z = 3\n";
        for at in 0..=text.len() {
            let (a, b) = text.split_at(at);
            let (shown, stop) = feed(limits(4, None), &[a, b], Duration::ZERO);
            assert_eq!(shown, "x = 1\n    y = 2\n  ", "split at {at}");
            assert!(stop.is_some());
        }
        let zero = Duration::ZERO;
        // The first line is never checked; deep enough lines pass; 0 checks nothing.
        assert_eq!(
            feed(limits(4, None), &["a\n    b\n"], zero),
            ("a\n    b\n".into(), None)
        );
        assert_eq!(
            feed(limits(0, None), &["a\nb\n"], zero),
            ("a\nb\n".into(), None)
        );
        // An empty line counts as no indentation, as in llama.cpp.
        assert_eq!(feed(limits(1, None), &["a\n", "\n b"], zero).0, "a\n");
        // Tabs indent.
        assert_eq!(
            feed(limits(2, None), &["a\n\t\tb"], zero),
            ("a\n\t\tb".into(), None)
        );
        // Indentation the reply ends in is kept.
        assert_eq!(
            feed(limits(4, None), &["a\n", "  "], zero),
            ("a\n  ".into(), None)
        );
    }

    #[test]
    fn past_the_time_limit_the_next_newline_ends_the_reply() {
        let pieces = ["a", "b\n", "c", "d\n", "e"];
        let (shown, stop) = feed(limits(0, Some(100)), &pieces, Duration::from_millis(60));
        // 120 ms at the third piece, which has no newline; the fourth ends it.
        assert_eq!((shown.as_str(), stop), ("ab\ncd\n", Some(3)));
        // With an indentation limit too, the indentation it holds is kept.
        let pieces = ["a\n", "  b\n", "    "];
        let (shown, stop) = feed(limits(2, Some(1)), &pieces, Duration::from_millis(5));
        assert_eq!((shown.as_str(), stop), ("a\n  b\n", Some(1)));
        let mut cut = LineCut::new(limits(2, Some(1)));
        let t0 = Instant::now();
        assert_eq!(cut.push("a\n ", t0), ("a\n".into(), None));
        // The held space is shown once the time limit ends the reply at the next newline.
        assert_eq!(
            cut.push(" b\n", t0 + Duration::from_millis(5)),
            ("  b\n".into(), Some(Cut::Time))
        );
        assert_eq!(
            feed(limits(0, None), &pieces, Duration::from_secs(9)).1,
            None
        );
    }
}
