//! llama.cpp's GBNF grammars, read as llama.cpp's parser reads them and written as Lark for
//! llguidance.
//!
//! GBNF is a character-level grammar: `name ::= alternatives`, string literals, character
//! classes (`[a-z]`, `[^"\\]`), `.` for any character, groups, `* + ? {m} {m,} {m,n}`,
//! `#` comments, and tokens (`<[123]>`, `<|tok|>`, `!<...>` for any token but that one).
//! Lark splits a lexer (terminals) from the parser (rules), and llguidance's lexer is greedy:
//! a terminal `[a-z]+` followed by `"b"` would swallow the `b`, and a literal `"ab"` beside
//! `"a" "b"` would hide the second reading. GBNF has no lexer, so each character is its own
//! lexeme here and the grammar means exactly what it means in llama.cpp. That costs more
//! per full token mask than hand-written Lark with multi-character terminals (`%llguidance`
//! grammars are taken as they are, for that).

mod lark;

use std::collections::HashMap;

use lark::Writer;

/// llama.cpp's cap on a repetition's count.
const MAX_REPETITION: u32 = 2000;
/// Deepest nesting of groups taken (a bound on recursion, not a rule of GBNF).
const MAX_DEPTH: usize = 128;
/// Parentheses nested in one Lark rule before a group is written as a rule of its own.
const MAX_PARENS: usize = 8;
/// The most rules a grammar becomes: llguidance's compiler recurses along chains of rules,
/// and its stack is large but not endless.
const MAX_RULES: usize = 10_000;
/// Repetition marks taken in a row on one item (`x*?`), a bound on recursion.
const MAX_MARKS: usize = 4;

#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// A literal string, as characters.
    Lit(String),
    /// A character class: ranges (inclusive), negated or not.
    Class(bool, Vec<(char, char)>),
    /// `.`: any one character.
    Any,
    /// A token by id; `true`: any token but this one.
    Token(u32, bool),
    /// A reference to a rule, by its index.
    Ref(usize),
    Seq(Vec<Node>),
    Alt(Vec<Node>),
    /// `(item, min, max)`; `None`: no upper bound.
    Repeat(Box<Node>, u32, Option<u32>),
}

/// A parsed grammar: rule names in order of first mention, and their bodies.
struct Grammar {
    names: Vec<String>,
    bodies: Vec<Option<Node>>,
}

struct Parser<'a, 't> {
    src: &'a str,
    pos: usize,
    token: &'t dyn Fn(&str) -> Option<u32>,
    vocab: u32,
    names: HashMap<String, usize>,
    g: Grammar,
    depth: usize,
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

impl<'a, 't> Parser<'a, 't> {
    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn err(&self, what: impl std::fmt::Display) -> String {
        err_at(self.src, self.pos, what)
    }

    /// Spaces, tabs and comments; newlines too where `newlines`.
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.pos += 1,
                '\r' | '\n' if newlines => self.pos += 1,
                '#' => {
                    let rest = self.rest();
                    self.pos += rest.find(['\r', '\n']).unwrap_or(rest.len());
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Result<&'a str, String> {
        let rest = self.rest();
        let len = rest.find(|c| !is_word(c)).unwrap_or(rest.len());
        if len == 0 {
            return Err(self.err("expected a rule name"));
        }
        self.pos += len;
        Ok(&rest[..len])
    }

    fn int(&mut self) -> Result<u32, String> {
        let rest = self.rest();
        let len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if len == 0 {
            return Err(self.err("expected a number"));
        }
        let n = rest[..len].parse::<u64>().unwrap_or(u64::MAX);
        self.pos += len;
        Ok(n.min(u32::MAX as u64) as u32)
    }

    fn rule_index(&mut self, name: &str) -> usize {
        if let Some(&i) = self.names.get(name) {
            return i;
        }
        let i = self.g.names.len();
        self.names.insert(name.to_string(), i);
        self.g.names.push(name.to_string());
        self.g.bodies.push(None);
        i
    }

    /// One character of a literal or class, escapes decoded.
    fn char(&mut self) -> Result<char, String> {
        let Some(c) = self.peek() else {
            return Err(self.err("unexpected end of the grammar"));
        };
        if c != '\\' {
            self.pos += c.len_utf8();
            return Ok(c);
        }
        let start = self.pos;
        let Some(e) = self.src[start + 1..].chars().next() else {
            return Err(self.err("unexpected end of the grammar after `\\`"));
        };
        self.pos += 1 + e.len_utf8();
        let hex = match e {
            'x' => 2,
            'u' => 4,
            'U' => 8,
            't' => return Ok('\t'),
            'r' => return Ok('\r'),
            'n' => return Ok('\n'),
            '\\' | '"' | '[' | ']' | '-' => return Ok(e),
            _ => return Err(err_at(self.src, start, format!("unknown escape `\\{e}`"))),
        };
        let digits = self.rest().get(..hex).unwrap_or("");
        if digits.len() != hex || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err_at(
                self.src,
                start,
                format!("`\\{e}` needs {hex} hexadecimal digits"),
            ));
        }
        self.pos += hex;
        u32::from_str_radix(digits, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| err_at(self.src, start, "the escape is not a Unicode character"))
    }

    fn literal(&mut self) -> Result<Node, String> {
        self.pos += 1;
        let mut s = String::new();
        while self.peek() != Some('"') {
            s.push(self.char()?);
        }
        self.pos += 1;
        Ok(Node::Lit(s))
    }

    fn class(&mut self) -> Result<Node, String> {
        let start = self.pos;
        self.pos += 1;
        let negated = self.peek() == Some('^');
        if negated {
            self.pos += 1;
        }
        let mut ranges = Vec::new();
        while self.peek() != Some(']') {
            let lo = self.char()?;
            let rest = self.rest();
            let hi = if rest.starts_with('-') && !rest.starts_with("-]") && rest.len() > 1 {
                self.pos += 1;
                self.char()?
            } else {
                lo
            };
            if hi < lo {
                return Err(err_at(
                    self.src,
                    start,
                    format!("the range `{lo}-{hi}` runs backwards"),
                ));
            }
            ranges.push((lo, hi));
        }
        self.pos += 1;
        if ranges.is_empty() {
            return Err(err_at(self.src, start, "an empty character class"));
        }
        Ok(Node::Class(negated, ranges))
    }

    /// `<[id]>` or `<text>` (a text that is exactly one token), after an optional `!`.
    fn token(&mut self) -> Result<Node, String> {
        let start = self.pos;
        let negated = self.peek() == Some('!');
        if negated {
            self.pos += 1;
        }
        if self.peek() != Some('<') {
            return Err(self.err("expected `<` after `!`"));
        }
        let rest = self.rest();
        let Some(end) = rest.find('>') else {
            return Err(self.err("a token reference without its closing `>`"));
        };
        let text = &rest[..=end];
        self.pos += end + 1;
        let id = if let Some(num) = text.strip_prefix("<[").and_then(|t| t.strip_suffix("]>")) {
            let digits = !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit());
            digits
                .then(|| num.parse::<u32>().ok())
                .flatten()
                .filter(|&id| id < self.vocab)
                .ok_or_else(|| {
                    err_at(
                        self.src,
                        start,
                        format!(
                            "`{text}` is not a token id of this model (it has {})",
                            self.vocab
                        ),
                    )
                })?
        } else {
            (self.token)(text).ok_or_else(|| {
                err_at(
                    self.src,
                    start,
                    format!("`{text}` is not one token of this model"),
                )
            })?
        };
        Ok(Node::Token(id, negated))
    }

    /// Items and repetition marks up to `|`, `)`, or (at a rule's top) a newline.
    fn sequence(&mut self, nested: bool) -> Result<Node, String> {
        let mut items: Vec<Node> = Vec::new();
        while let Some(c) = self.peek() {
            let item = match c {
                '"' => self.literal()?,
                '[' => self.class()?,
                '<' | '!' => self.token()?,
                '.' => {
                    self.pos += 1;
                    Node::Any
                }
                '(' => {
                    let at = self.pos;
                    if self.depth >= MAX_DEPTH {
                        return Err(self.err(format!("groups nest deeper than {MAX_DEPTH}")));
                    }
                    self.depth += 1;
                    self.pos += 1;
                    self.space(true);
                    let alt = self.alternatives(true)?;
                    self.depth -= 1;
                    if self.peek() != Some(')') {
                        return Err(err_at(self.src, at, "a `(` without its `)`"));
                    }
                    self.pos += 1;
                    alt
                }
                '*' | '+' | '?' | '{' => {
                    let at = self.pos;
                    let (min, max) = self.repetition()?;
                    let Some(last) = items.pop() else {
                        return Err(err_at(self.src, at, format!("`{c}` follows nothing")));
                    };
                    let mut marks = 1;
                    let mut x = &last;
                    while let Node::Repeat(inner, ..) = x {
                        marks += 1;
                        x = inner;
                    }
                    if marks > MAX_MARKS {
                        return Err(err_at(
                            self.src,
                            at,
                            format!("more than {MAX_MARKS} repetition marks in a row"),
                        ));
                    }
                    items.push(Node::Repeat(Box::new(last), min, max));
                    self.space(nested);
                    continue;
                }
                c if is_word(c) => {
                    let name = self.name()?;
                    Node::Ref(self.rule_index(name))
                }
                _ => break,
            };
            items.push(item);
            self.space(nested);
        }
        Ok(match items.len() {
            1 => items.pop().expect("one item"),
            _ => Node::Seq(items),
        })
    }

    fn repetition(&mut self) -> Result<(u32, Option<u32>), String> {
        let c = self.peek().expect("a repetition mark");
        self.pos += 1;
        let (min, max) = match c {
            '*' => (0, None),
            '+' => (1, None),
            '?' => (0, Some(1)),
            _ => {
                self.space(true);
                let min = self.int()?;
                self.space(true);
                let max = match self.peek() {
                    Some('}') => Some(min),
                    Some(',') => {
                        self.pos += 1;
                        self.space(true);
                        let max = match self.peek() {
                            Some(d) if d.is_ascii_digit() => Some(self.int()?),
                            _ => None,
                        };
                        self.space(true);
                        if self.peek() != Some('}') {
                            return Err(self.err("expected `}`"));
                        }
                        max
                    }
                    _ => return Err(self.err("expected `,` or `}`")),
                };
                self.pos += 1;
                if min > MAX_REPETITION {
                    return Err(self.err(format!(
                        "a repetition of at least {min}: at most {MAX_REPETITION} is taken"
                    )));
                }
                if let Some(m) = max.filter(|&m| m < min) {
                    return Err(self.err(format!("the repetition `{{{min},{m}}}` runs backwards")));
                }
                // As llama.cpp: an upper bound past the cap is no bound.
                (min, max.filter(|&m| m <= MAX_REPETITION))
            }
        };
        Ok((min, max))
    }

    fn alternatives(&mut self, nested: bool) -> Result<Node, String> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some('|') {
            self.pos += 1;
            self.space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(match alts.len() {
            1 => alts.pop().expect("one alternative"),
            _ => Node::Alt(alts),
        })
    }

    fn rule(&mut self) -> Result<(), String> {
        let at = self.pos;
        let name = self.name()?;
        self.space(false);
        if !self.rest().starts_with("::=") {
            return Err(self.err("expected `::=`"));
        }
        self.pos += 3;
        self.space(true);
        let body = self.alternatives(false)?;
        match self.peek() {
            None => {}
            Some('\r') => {
                self.pos += if self.rest().starts_with("\r\n") {
                    2
                } else {
                    1
                }
            }
            Some('\n') => self.pos += 1,
            Some(_) => return Err(self.err("expected the end of the rule (a newline)")),
        }
        let i = self.rule_index(name);
        if self.g.bodies[i].is_some() {
            return Err(err_at(
                self.src,
                at,
                format!("rule `{name}` is defined twice"),
            ));
        }
        self.g.bodies[i] = Some(body);
        self.space(true);
        Ok(())
    }
}

/// `line L, column C: what`, with the text there.
fn err_at(src: &str, pos: usize, what: impl std::fmt::Display) -> String {
    let before = &src[..pos];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    let near: String = src[pos..].chars().take(24).collect();
    format!("line {line}, column {col}: {what} (at `{near}`)")
}

/// Parses `src` as GBNF and writes it as Lark for llguidance. `token` gives the id of a
/// `<text>` token reference (`None`: not one token); `vocab` bounds `<[id]>`.
pub fn to_lark(
    src: &str,
    token: &dyn Fn(&str) -> Option<u32>,
    vocab: u32,
) -> Result<String, String> {
    let mut p = Parser {
        src,
        pos: 0,
        token,
        vocab,
        names: HashMap::new(),
        g: Grammar {
            names: Vec::new(),
            bodies: Vec::new(),
        },
        depth: 0,
    };
    p.space(true);
    while p.pos < src.len() {
        p.rule()?;
    }
    if p.g.names.len() > MAX_RULES {
        return Err(format!("more than {MAX_RULES} rules"));
    }
    let Some(&root) = p.names.get("root") else {
        return Err("the grammar has no `root` rule".into());
    };
    let g = p.g;
    if let Some(i) = g.bodies.iter().position(Option::is_none) {
        return Err(format!("rule `{}` is used but never defined", g.names[i]));
    }
    let bodies: Vec<Node> = g.bodies.into_iter().flatten().collect();
    Writer {
        names: &g.names,
        bodies: &bodies,
        root,
        groups: Vec::new(),
    }
    .write()
}

#[cfg(test)]
mod tests;
