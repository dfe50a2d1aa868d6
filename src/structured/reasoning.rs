//! Reasoning models' thinking, split from their answer: DeepSeek-R1's distills (Llama),
//! Magistral and others write `<think>...</think>` (or `[THINK]...[/THINK]`, two control
//! tokens the engine then shows as text) before the answer; the text between the markers
//! becomes `reasoning_content` and the rest the reply (content or tool calls).
//!
//! Invariant, as for the call parser: feeding the text in any split gives the same pieces
//! concatenated, so streamed deltas add up to the whole reply.

use super::toolcall::{CallParser, ParsedCall, Piece, ToolFormat};

/// The markers around a model's reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkSyntax {
    pub open: &'static str,
    pub close: &'static str,
}

impl ThinkSyntax {
    /// DeepSeek-R1 and most open reasoning models.
    pub const TAGS: Self = Self {
        open: "<think>",
        close: "</think>",
    };
    /// Magistral (2507 and later): two control tokens.
    pub const MISTRAL: Self = Self {
        open: "[THINK]",
        close: "[/THINK]",
    };

    /// The markers a model reasons in: the ones its chat template or its vocabulary
    /// (`has_token`) names; `None` when neither names them (a template that only strips
    /// thinking from past turns counts: its replies are split only if they open with it).
    pub fn detect(template: &str, has_token: impl Fn(&str) -> bool) -> Option<Self> {
        [Self::MISTRAL, Self::TAGS]
            .into_iter()
            .find(|s| template.contains(s.close) || has_token(s.close))
    }

    /// Whether a rendered prompt leaves the model inside its reasoning: the template's
    /// generation prompt opened it (DeepSeek-R1's ends in `<think>\n`).
    pub fn opened_by(&self, prompt: &str) -> bool {
        prompt.trim_end().ends_with(self.open)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not yet known whether the reply opens with its reasoning.
    Before,
    /// Inside the reasoning; `started` once its leading whitespace is behind.
    Inside { started: bool },
    /// After the reasoning; `lead` while the whitespace after the close marker is dropped.
    After { lead: bool },
}

/// Splits a reply into its reasoning and the rest. The reasoning's surrounding whitespace
/// is dropped, and so is the whitespace between the close marker and the answer. Inline,
/// the reasoning stays content, verbatim: only the answer goes on to be parsed for calls.
pub struct ThinkSplitter {
    syntax: ThinkSyntax,
    mode: Mode,
    buf: String,
    shown: Shown,
    /// Pushes (one a token) that were in the reasoning, whether this one is, and those not
    /// yet known (the start of an open marker).
    tokens: usize,
    thinking: bool,
    undecided: usize,
}

/// Where a reply's reasoning goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// Apart, as [`Piece::Reasoning`].
    Apart,
    /// Left in the content, verbatim (markers and whitespace included).
    Inline,
    /// Nowhere: split off and dropped (a surface whose client did not ask for it).
    Dropped,
}

impl ThinkSplitter {
    /// `opened`: the prompt already opened the reasoning ([`ThinkSyntax::opened_by`]).
    pub fn new(syntax: ThinkSyntax, opened: bool) -> Self {
        Self {
            syntax,
            mode: if opened {
                Mode::Inside { started: false }
            } else {
                Mode::Before
            },
            buf: String::new(),
            shown: Shown::Apart,
            tokens: 0,
            thinking: false,
            undecided: 0,
        }
    }

    /// The pushes that were (partly) reasoning: its tokens, when fed a token at a time
    /// (its markers and the whitespace before the open one included), however it is shown.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Where the reasoning goes (apart by default).
    pub fn shown(mut self, shown: Shown) -> Self {
        self.shown = shown;
        self
    }

    fn thought(&self, text: &str, out: &mut Vec<Piece>) {
        if self.shown == Shown::Apart && !text.is_empty() {
            out.push(Piece::Reasoning(text.to_string()));
        }
    }

    /// Feeds text: reasoning goes to `out`, and the answer's text is returned.
    pub fn push(&mut self, text: &str, out: &mut Vec<Piece>) -> String {
        self.thinking = matches!(self.mode, Mode::Inside { .. });
        let answer = self.split(text, out);
        match (
            self.thinking || matches!(self.mode, Mode::Inside { .. }),
            self.mode,
        ) {
            (false, Mode::Before) => self.undecided += 1,
            (false, _) => self.undecided = 0,
            (true, _) => {
                self.tokens += 1 + std::mem::take(&mut self.undecided);
            }
        }
        answer
    }

    fn split(&mut self, text: &str, out: &mut Vec<Piece>) -> String {
        self.buf.push_str(text);
        let mut answer = String::new();
        loop {
            match self.mode {
                Mode::Before => {
                    let t = self.buf.trim_start();
                    if let Some(rest) = t.strip_prefix(self.syntax.open) {
                        let rest = rest.to_string();
                        if self.shown == Shown::Inline {
                            let opening = self.buf.len() - rest.len();
                            out.push(Piece::Content(self.buf[..opening].to_string()));
                        }
                        self.buf = rest;
                        self.mode = Mode::Inside { started: false };
                        self.thinking = true;
                    } else if self.syntax.open.starts_with(t) {
                        return answer;
                    } else {
                        self.mode = Mode::After { lead: false };
                    }
                }
                Mode::Inside { .. } if self.shown == Shown::Inline => {
                    let (upto, next) = match self.buf.find(self.syntax.close) {
                        Some(at) => (at + self.syntax.close.len(), Mode::After { lead: false }),
                        None => (held_from(&self.buf, self.syntax.close), self.mode),
                    };
                    if upto > 0 {
                        out.push(Piece::Content(self.buf.drain(..upto).collect()));
                    }
                    if next == self.mode {
                        return answer;
                    }
                    self.mode = next;
                }
                Mode::Inside { started } => {
                    if !started {
                        let t = self.buf.trim_start();
                        if t.is_empty() {
                            self.buf.clear();
                            return answer;
                        }
                        self.buf = t.to_string();
                        self.mode = Mode::Inside { started: true };
                    }
                    if let Some(at) = self.buf.find(self.syntax.close) {
                        self.thought(self.buf[..at].trim_end(), out);
                        self.buf.drain(..at + self.syntax.close.len());
                        self.mode = Mode::After { lead: true };
                        continue;
                    }
                    // Hold back what may start the close marker, and the whitespace before
                    // it (dropped if the marker follows).
                    let held = held_from(&self.buf, self.syntax.close);
                    let sent = self.buf[..held].trim_end().len();
                    if sent > 0 {
                        let thought: String = self.buf.drain(..sent).collect();
                        self.thought(&thought, out);
                    }
                    return answer;
                }
                Mode::After { lead } => {
                    let rest = std::mem::take(&mut self.buf);
                    let rest = if lead { rest.trim_start() } else { &rest };
                    if !rest.is_empty() {
                        self.mode = Mode::After { lead: false };
                    }
                    answer.push_str(rest);
                    return answer;
                }
            }
        }
    }

    /// The end of the reply: reasoning cut short is reasoning, undecided text is answer.
    pub fn finish(&mut self, out: &mut Vec<Piece>) -> String {
        match self.mode {
            Mode::Before => std::mem::take(&mut self.buf),
            Mode::Inside { .. } if self.shown == Shown::Inline => {
                let rest = std::mem::take(&mut self.buf);
                if !rest.is_empty() {
                    out.push(Piece::Content(rest));
                }
                String::new()
            }
            Mode::Inside { .. } => {
                let thought = std::mem::take(&mut self.buf);
                self.thought(thought.trim_end(), out);
                String::new()
            }
            Mode::After { .. } => String::new(),
        }
    }
}

/// Where the longest end of `text` that begins `marker` starts (`text.len()` if none).
pub(super) fn held_from(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .map(|n| text.len() - n)
        .find(|&i| text.is_char_boundary(i) && marker.starts_with(&text[i..]))
        .unwrap_or(text.len())
}

/// A chat reply's parser: its reasoning split off first, then tool calls parsed from the
/// rest when the reply may make any.
pub struct ReplyParser {
    think: Option<ThinkSplitter>,
    calls: Option<CallParser>,
}

impl ReplyParser {
    pub fn new(think: Option<ThinkSplitter>, tools: Option<ToolFormat>) -> Self {
        Self {
            think,
            calls: tools.map(CallParser::new),
        }
    }

    fn answer(&mut self, text: String, out: &mut Vec<Piece>) {
        match &mut self.calls {
            Some(c) => out.extend(c.push(&text)),
            None if text.is_empty() => {}
            None => out.push(Piece::Content(text)),
        }
    }

    /// Feeds the next text; returns what it completed.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        let answer = match &mut self.think {
            Some(t) => t.push(text, &mut out),
            None => text.to_string(),
        };
        self.answer(answer, &mut out);
        out
    }

    /// The end of the output: what was held back.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        if let Some(t) = &mut self.think {
            let answer = t.finish(&mut out);
            self.answer(answer, &mut out);
        }
        if let Some(c) = &mut self.calls {
            out.extend(c.finish());
        }
        out
    }

    pub fn calls(&self) -> &[ParsedCall] {
        self.calls.as_ref().map_or(&[], |c| c.calls())
    }

    /// The reasoning's tokens so far, when fed a token at a time.
    pub fn reasoning_tokens(&self) -> usize {
        self.think.as_ref().map_or(0, ThinkSplitter::tokens)
    }

    /// A whole reply's reasoning and content (`None` when it made calls and wrote no text).
    pub fn whole(mut self, text: &str) -> (Option<String>, Option<String>, Vec<ParsedCall>) {
        let (mut reasoning, mut content) = (String::new(), String::new());
        for piece in self.push(text).into_iter().chain(self.finish()) {
            match piece {
                Piece::Reasoning(t) => reasoning.push_str(&t),
                Piece::Content(t) => content.push_str(&t),
                _ => {}
            }
        }
        let calls = self.calls().to_vec();
        let content = (calls.is_empty() || !content.is_empty()).then_some(content);
        ((!reasoning.is_empty()).then_some(reasoning), content, calls)
    }
}

/// A reasoning marker as a grammar writes it: text, or a control token by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Text(&'static str),
    Token(u32),
}

impl Marker {
    fn lark(self) -> String {
        match self {
            Marker::Text(t) => serde_json::to_string(t).expect("a string serializes"),
            Marker::Token(id) => format!("<[{id}]>"),
        }
    }
}

/// How a served model reasons: its markers, and their ids where they are control tokens
/// (the grammar writes those by id, and the engine shows them as text for the splitter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reasoner {
    pub syntax: ThinkSyntax,
    pub open_id: Option<u32>,
    pub close_id: Option<u32>,
}

impl Reasoner {
    /// The model's markers; `control_id` gives a control token's id.
    pub fn new(syntax: ThinkSyntax, control_id: impl Fn(&str) -> Option<u32>) -> Self {
        Self {
            syntax,
            open_id: control_id(syntax.open),
            close_id: control_id(syntax.close),
        }
    }

    pub fn shown_tokens(&self) -> Vec<u32> {
        self.open_id.into_iter().chain(self.close_id).collect()
    }

    /// The grammar's view of a reply's reasoning: `opened` by the prompt, and its budget.
    pub fn spec(&self, opened: bool, budget: Option<u64>) -> ThinkSpec {
        let marker = |id: Option<u32>, text| id.map_or(Marker::Text(text), Marker::Token);
        ThinkSpec {
            open: marker(self.open_id, self.syntax.open),
            close: marker(self.close_id, self.syntax.close),
            opened,
            budget,
        }
    }
}

/// The reasoning a constrained reply may start with: the grammar lets the model think
/// before the constrained part, or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkSpec {
    pub open: Marker,
    pub close: Marker,
    /// The prompt opened the reasoning: it must be closed first.
    pub opened: bool,
    /// `Some(0)`: no reasoning at all (the close marker at once, if the prompt opened it);
    /// `None`: as long as the model likes (within `max_tokens`).
    pub budget: Option<u64>,
}

impl ThinkSpec {
    /// The open marker's text, which answer text must not start with (or thinking would
    /// escape the grammar's reasoning part); `None` for a token marker, which no text
    /// spells.
    pub(crate) fn open_text(&self) -> Option<&'static str> {
        match self.open {
            Marker::Text(t) => Some(t),
            Marker::Token(_) => None,
        }
    }

    /// Lark rules for `think_part` (the reasoning, perhaps none) and `THINK_WS` (the
    /// whitespace a model writes around it, a little: a model cannot wander in it; answer
    /// text after it must not start with whitespace, or its longer lexeme would win).
    pub(crate) fn lark(&self) -> String {
        let close = self.close.lark();
        let mut g = String::from("THINK_WS: /[ \\t\\r\\n]{1,8}/\n");
        match (self.budget, self.opened) {
            (Some(0), true) => g.push_str(&format!("think_part: {close}\n")),
            (Some(0), false) => g.push_str("think_part: \"\"\n"),
            (_, opened) => {
                match self.close {
                    // Text: lazy, to the first close marker.
                    Marker::Text(_) => {
                        g.push_str(&format!("think_body[suffix={close}]: /(?s:.*)/\n"))
                    }
                    // A control token ends any text (no text can spell it); llguidance
                    // takes no token as a suffix.
                    Marker::Token(_) => g.push_str(&format!("think_body: /(?s:.*)/ {close}\n")),
                }
                if opened {
                    g.push_str("think_part: think_body\n");
                } else {
                    // A model may write a line or two before it opens its reasoning.
                    let open = self.open.lark();
                    g.push_str(&format!("think_part: (THINK_WS? {open} think_body)?\n"));
                }
            }
        }
        g
    }
}
