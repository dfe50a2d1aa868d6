//! The parsed grammar written as Lark: one lexeme per character, groups nested deep written
//! as rules of their own, and only the rules `root` uses.

use std::collections::BTreeSet;
use std::fmt::Write;

use super::{Node, MAX_PARENS, MAX_RULES};

/// Writes the parsed rules as Lark.
pub(super) struct Writer<'g> {
    pub names: &'g [String],
    pub bodies: &'g [Node],
    pub root: usize,
    /// Groups written as rules of their own (`g0: ...`).
    pub groups: Vec<String>,
}

impl Writer<'_> {
    fn name(&self, i: usize) -> String {
        if i == self.root {
            return "start".into();
        }
        let base: String = self.names[i]
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        // The index keeps names unique (`a-b` and `a_b`) and starting with a letter.
        format!("r{i}_{base}")
    }

    /// The Lark text, or the error of a grammar of more than [`MAX_RULES`] rules.
    pub fn write(mut self) -> Result<String, String> {
        let mut used = BTreeSet::new();
        reach(self.bodies, self.root, &mut used);
        let n = used.len();
        let mut out = String::new();
        let (bodies, root) = (self.bodies, self.root);
        for i in std::iter::once(root).chain(used.into_iter().filter(|&i| i != root)) {
            let body = self.expr(&bodies[i], 0, 0);
            let _ = writeln!(out, "{}: {body}", self.name(i));
        }
        if n + self.groups.len() > MAX_RULES {
            return Err(format!(
                "more than {MAX_RULES} rules (with groups nested deep, each a rule)"
            ));
        }
        for g in &self.groups {
            let _ = writeln!(out, "{g}");
        }
        Ok(out)
    }

    /// `prec`: 0 at the top, 1 inside a sequence, 2 under a repetition; `depth`: the
    /// parentheses open around it. Past [`MAX_PARENS`] a group becomes a rule of its own
    /// (llguidance's Lark parser takes only so many).
    fn expr(&mut self, n: &Node, prec: u8, depth: usize) -> String {
        let parens = match n {
            Node::Lit(s) => prec >= 2 && s.chars().count() > 1,
            Node::Seq(items) => prec >= 2 && !items.is_empty(),
            Node::Alt(_) => prec >= 1,
            Node::Repeat(..) => prec >= 2,
            _ => false,
        };
        if parens && depth >= MAX_PARENS {
            let body = self.expr(n, 0, 0);
            let name = format!("g{}", self.groups.len());
            self.groups.push(format!("{name}: {body}"));
            return name;
        }
        let d = depth + usize::from(parens);
        let s = match n {
            // One lexeme per character: see the module's note.
            Node::Lit(s) if s.chars().count() > 1 => {
                let chars: Vec<String> =
                    s.chars().map(|c| lit(c.encode_utf8(&mut [0; 4]))).collect();
                chars.join(" ")
            }
            Node::Lit(s) => lit(s),
            Node::Class(neg, ranges) => format!("/{}/", class(*neg, ranges)),
            Node::Any => "/(?s:.)/".into(),
            Node::Token(id, false) => format!("<[{id}]>"),
            Node::Token(id, true) => format!("<[^{id}]>"),
            Node::Ref(i) => self.name(*i),
            Node::Seq(items) if items.is_empty() => "\"\"".into(),
            Node::Seq(items) => {
                let parts: Vec<String> = items.iter().map(|x| self.expr(x, 1, d)).collect();
                parts.join(" ")
            }
            Node::Alt(alts) => {
                let parts: Vec<String> = alts.iter().map(|x| self.expr(x, 0, d)).collect();
                parts.join(" | ")
            }
            // Nothing, as llama.cpp reads `{0}` (Lark has no `{0}`).
            Node::Repeat(_, _, Some(0)) => "\"\"".into(),
            Node::Repeat(inner, min, max) => {
                let mark = match (min, max) {
                    (0, None) => "*".to_string(),
                    (1, None) => "+".to_string(),
                    (0, Some(1)) => "?".to_string(),
                    (m, Some(x)) if m == x => format!("{{{m}}}"),
                    (m, None) => format!("{{{m},}}"),
                    (m, Some(x)) => format!("{{{m},{x}}}"),
                };
                format!("{}{mark}", self.expr(inner, 2, d))
            }
        };
        if parens {
            format!("({s})")
        } else {
            s
        }
    }
}

/// The rules `i` uses, directly or not.
fn reach(bodies: &[Node], i: usize, seen: &mut BTreeSet<usize>) {
    seen.insert(i);
    let mut stack = vec![&bodies[i]];
    while let Some(n) = stack.pop() {
        match n {
            Node::Ref(j) if seen.insert(*j) => stack.push(&bodies[*j]),
            Node::Seq(xs) | Node::Alt(xs) => stack.extend(xs),
            Node::Repeat(x, ..) => stack.push(x),
            _ => {}
        }
    }
}

use crate::structured::lark_string as lit;

/// A regex class, every character hex-escaped (no character is special inside).
fn class(negated: bool, ranges: &[(char, char)]) -> String {
    let mut s = String::from(if negated { "[^" } else { "[" });
    for &(lo, hi) in ranges {
        let _ = write!(s, "\\x{{{:X}}}", lo as u32);
        if hi != lo {
            let _ = write!(s, "-\\x{{{:X}}}", hi as u32);
        }
    }
    s.push(']');
    s
}
