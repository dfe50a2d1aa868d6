//! The text form of tool calls: each template's format, and the incremental parser that
//! turns generated text back into OpenAI's `tool_calls` as it streams (how tools and past
//! calls are shown to the model is in `toolprompt`).
//!
//! The generic format is the Hermes one most open models were tuned on: the tools as JSON
//! inside `<tools></tools>` in the system turn, each call as
//! `<tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>`, results in a user turn
//! as `<tool_response>\n...\n</tool_response>`. Templates that take `tools` themselves
//! (Hermes/Qwen style, Llama 3.1, Mistral) are given the tools and calls natively. Mistral's
//! calls are a JSON list after its `[TOOL_CALLS]` control token, which decodes to no text:
//! the grammar writes the token, the parser reads the list that follows. Later Mistral
//! models (Small 3.2, Devstral, Magistral, Ministral 3) write each call as
//! `[TOOL_CALLS]name[ARGS]{...}`: there the two control tokens are kept in the output's
//! text ([`ToolFormat::shown_tokens`]), and the parser reads the name between them.
//!
//! Invariant: feeding the parser the text in any split gives the same pieces concatenated,
//! so streamed deltas add up to the non-streamed call exactly.

use super::reasoning::held_from;
use super::toolprompt::is_short_id;
pub use super::toolprompt::{generic_messages, with_short_ids};

#[path = "toolcall_named.rs"]
mod named;
use named::{named_head, new_call_id, NamedHead};

/// How calls are written in the model's output. The grammar generates exactly
/// `[special] begin open {"name": "NAME", "ARGS_KEY": ARGS} close (sep open ... close)* end`,
/// or with an `args_token`, `(special NAME args_token ARGS)+`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolFormat {
    pub open: &'static str,
    pub close: &'static str,
    pub sep: &'static str,
    pub args_key: &'static str,
    /// Whether the format has several calls in one reply.
    pub parallel: bool,
    /// Text before the first call and after the last (Mistral's JSON list brackets).
    pub begin: &'static str,
    pub end: &'static str,
    /// A control token the model writes before its calls (`[TOOL_CALLS]`), "" for none;
    /// its id is looked up in the vocabulary by [`resolve`](Self::resolve).
    pub special: &'static str,
    pub special_id: Option<u32>,
    /// Call ids of 9 letters and digits, which Mistral's templates insist on.
    pub short_ids: bool,
    /// The control token between a call's bare name and its arguments (`[ARGS]`), "" for
    /// calls written as a JSON object; with it, `special` opens every call, not the list.
    pub args_token: &'static str,
    pub args_token_id: Option<u32>,
    /// With `args_token`: the id of `[CALL_ID]` when the vocabulary has it; a call may then
    /// carry its id, `name[CALL_ID]abcDEF123[ARGS]{...}` (Mistral's v11 tokenizers).
    pub call_id_token_id: Option<u32>,
}

/// The control token before a call's id in the named format.
const CALL_ID: &str = "[CALL_ID]";

impl ToolFormat {
    /// Hermes / Qwen style, and our generic format.
    pub const HERMES: Self = Self {
        open: "<tool_call>\n",
        close: "\n</tool_call>",
        sep: "\n",
        args_key: "arguments",
        parallel: true,
        begin: "",
        end: "",
        special: "",
        special_id: None,
        short_ids: false,
        args_token: "",
        args_token_id: None,
        call_id_token_id: None,
    };
    /// Llama 3.1's JSON tool calling: a bare object with `parameters`, one call a reply.
    pub const LLAMA3_JSON: Self = Self {
        open: "",
        close: "",
        sep: "",
        args_key: "parameters",
        parallel: false,
        begin: "",
        end: "",
        special: "",
        special_id: None,
        short_ids: false,
        args_token: "",
        args_token_id: None,
        call_id_token_id: None,
    };
    /// Mistral's (v0.3 and later): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.
    pub const MISTRAL: Self = Self {
        open: "",
        close: "",
        sep: ", ",
        args_key: "arguments",
        parallel: true,
        begin: " [",
        end: "]",
        special: "[TOOL_CALLS]",
        special_id: None,
        short_ids: true,
        args_token: "",
        args_token_id: None,
        call_id_token_id: None,
    };
    /// Mistral Nemo's: the list right after the token, `[TOOL_CALLS][{...}]`.
    pub const MISTRAL_NEMO: Self = Self {
        begin: "[",
        ..Self::MISTRAL
    };
    /// Mistral Small 3.2's and later: `[TOOL_CALLS]name[ARGS]{...}` for each call, both
    /// control tokens kept in the text the parser reads.
    pub const MISTRAL_ARGS: Self = Self {
        open: "[TOOL_CALLS]",
        close: "",
        sep: "",
        args_key: "",
        parallel: true,
        begin: "",
        end: "",
        special: "[TOOL_CALLS]",
        special_id: None,
        short_ids: true,
        args_token: "[ARGS]",
        args_token_id: None,
        call_id_token_id: None,
    };

    /// Whether a call is `name[ARGS]{...}` rather than a `{"name": ..}` object.
    pub fn named(&self) -> bool {
        !self.args_token.is_empty()
    }

    /// Control tokens whose text the output keeps, for the parser to read (the named
    /// format's two markers); the JSON formats' opening token is dropped as usual.
    pub fn shown_tokens(&self) -> Vec<u32> {
        if !self.named() {
            return Vec::new();
        }
        self.special_id
            .into_iter()
            .chain(self.args_token_id)
            .chain(self.call_id_token_id)
            .collect()
    }

    /// Whether a call may follow some prose: formats whose calls open with a marker of
    /// their own (a bare JSON object, or a list after a token that decodes to no text,
    /// could not be told from text).
    pub fn calls_after_text(&self) -> bool {
        !self.open.is_empty()
    }

    /// The text that starts a call; a reply that starts with it is parsed as calls.
    pub fn trigger(&self) -> String {
        if self.open.is_empty() {
            format!("{}{{", self.begin.trim())
        } else {
            self.open.trim_end().to_string()
        }
    }

    /// Looks up the control token the format writes before its calls; `None` when the
    /// vocabulary has no such control token (then the format cannot be generated).
    pub fn resolve(self, control_id: impl Fn(&str) -> Option<u32>) -> Option<Self> {
        if self.special.is_empty() {
            return Some(self);
        }
        let id = control_id(self.special)?;
        let args_token_id = match self.args_token {
            "" => None,
            t => Some(control_id(t)?),
        };
        // Optional: a vocabulary without it has calls without ids.
        let call_id_token_id = args_token_id.and_then(|_| control_id(CALL_ID));
        Some(Self {
            special_id: Some(id),
            args_token_id,
            call_id_token_id,
            ..self
        })
    }

    /// The format a chat template was tuned with, and whether it renders tools itself
    /// (`true`), or needs the generic rendering (`false`, Hermes format).
    pub fn for_template(source: &str) -> (Self, bool) {
        if !source.contains("tools") {
            return (Self::HERMES, false);
        }
        if source.contains("<tool_call>") {
            (Self::HERMES, true)
        } else if source.contains("[TOOL_CALLS] [") && !source.contains("[ARGS]") {
            (Self::MISTRAL, true)
        } else if source.contains("[TOOL_CALLS][") && !source.contains("[ARGS]") {
            (Self::MISTRAL_NEMO, true)
        } else if source.contains("[TOOL_CALLS]") && source.contains("[ARGS]") {
            (Self::MISTRAL_ARGS, true)
        } else if source.contains("[TOOL_CALLS]") {
            // Another Mistral format, not parsed.
            (Self::HERMES, false)
        } else if source.contains("<|python_tag|>") || source.contains("\"parameters\"") {
            (Self::LLAMA3_JSON, true)
        } else {
            (Self::HERMES, false)
        }
    }

    /// One call as the model writes it, in a JSON-object format (the generic rendering's).
    pub fn call_text(&self, name: &str, arguments: &str) -> String {
        format!(
            "{}{{\"name\": \"{name}\", \"{}\": {arguments}}}{}",
            self.open, self.args_key, self.close
        )
    }
}

/// A call parsed from the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub id: String,
    pub name: String,
    /// The arguments exactly as generated (a JSON object's text).
    pub arguments: String,
}

/// What a piece of output turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Content(String),
    /// The model's reasoning before its answer (see `reasoning`); never from `CallParser`.
    Reasoning(String),
    /// A call began: its index among this reply's calls, id and name.
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s arguments text.
    Arguments {
        index: usize,
        text: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not yet known whether the reply is text or calls.
    Undecided,
    Text,
    /// Before a call's name.
    Head,
    /// Inside the arguments object.
    Args {
        depth: usize,
        in_str: bool,
        esc: bool,
    },
    /// After the arguments: `}` and the close text.
    Tail,
    /// After a call: a separator and another call, or the end.
    Between,
}

/// Splits streamed output into content and tool calls.
pub struct CallParser {
    format: ToolFormat,
    mode: Mode,
    buf: String,
    calls: Vec<ParsedCall>,
    /// The whitespace before what looked like a call: content again if it is not.
    lead: String,
    /// In text, where to look for a call's marker next (past one that opened no call).
    skip: usize,
}

impl CallParser {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            mode: Mode::Undecided,
            buf: String::new(),
            calls: Vec::new(),
            lead: String::new(),
            skip: 0,
        }
    }

    /// What looked like the start of a call is not one: all of it is content.
    fn not_a_call(&mut self) -> bool {
        let lead = std::mem::take(&mut self.lead);
        self.skip = lead.len() + 1;
        self.buf.insert_str(0, &lead);
        self.mode = Mode::Text;
        true
    }

    pub fn calls(&self) -> &[ParsedCall] {
        &self.calls
    }

    /// A call begins: its name read, its arguments next.
    fn start_call(&mut self, name: String, id: Option<String>, out: &mut Vec<Piece>) {
        let index = self.calls.len();
        // A model's id once per reply (a repeated one would make two calls one).
        let id = id
            .filter(|id| self.calls.iter().all(|c| &c.id != id))
            .unwrap_or_else(|| new_call_id(self.format.short_ids));
        self.calls.push(ParsedCall {
            id: id.clone(),
            name: name.clone(),
            arguments: String::new(),
        });
        out.push(Piece::CallStart { index, id, name });
        self.mode = Mode::Args {
            depth: 0,
            in_str: false,
            esc: false,
        };
    }

    /// Feeds the next text; returns what it completed.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out) {}
        out
    }

    /// The end of the output: text still held back is content (a reply cut short inside a
    /// call keeps the call as far as it got).
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = self.push("");
        if matches!(self.mode, Mode::Undecided | Mode::Text) && !self.buf.is_empty() {
            out.push(Piece::Content(std::mem::take(&mut self.buf)));
        }
        out
    }

    /// Text: content up to a call's marker, where the format lets calls follow prose; the
    /// whitespace before the marker goes with the call (the template writes its own), and
    /// the start of a marker, with the whitespace before it, waits for what follows.
    fn text(&mut self, out: &mut Vec<Piece>) -> bool {
        let ws = [' ', '\t', '\r', '\n'];
        let trigger = self.format.trigger();
        let from = self.skip.min(self.buf.len());
        let marker = self.format.calls_after_text().then(|| {
            self.buf[from..]
                .find(&trigger)
                .map(|p| (from + p, true))
                .unwrap_or_else(|| (held_from(&self.buf, &trigger).max(from), false))
        });
        let Some((at, found)) = marker else {
            if !self.buf.is_empty() {
                out.push(Piece::Content(std::mem::take(&mut self.buf)));
            }
            return false;
        };
        let upto = self.buf[..at].trim_end_matches(ws).len();
        let rest = self.buf.split_off(upto);
        self.skip = from.saturating_sub(upto);
        if !self.buf.is_empty() {
            out.push(Piece::Content(std::mem::take(&mut self.buf)));
        }
        self.buf = rest;
        if found {
            let at = at - upto;
            self.lead = self.buf.drain(..at).collect();
            self.skip = 0;
            self.mode = Mode::Head;
        }
        found
    }

    /// Makes one move; false when it needs more text.
    fn step(&mut self, out: &mut Vec<Piece>) -> bool {
        let f = self.format;
        match self.mode {
            Mode::Undecided => {
                // The whitespace the grammar lets before a call (not all of Unicode's).
                let t = self.buf.trim_start_matches([' ', '\t', '\r', '\n']);
                let trigger = f.trigger();
                if t.starts_with(&trigger) {
                    let t = t.to_string();
                    self.buf.truncate(self.buf.len() - t.len());
                    self.lead = std::mem::replace(&mut self.buf, t);
                    self.mode = Mode::Head;
                    true
                } else if trigger.starts_with(t) {
                    false
                } else {
                    self.mode = Mode::Text;
                    true
                }
            }
            Mode::Text => self.text(out),
            Mode::Head => {
                // The list's opening before the first call (the space before it was trimmed).
                let begin = if self.calls.is_empty() {
                    f.begin.trim_start()
                } else {
                    ""
                };
                let head = if f.named() {
                    format!("{begin}{}", f.open)
                } else {
                    format!("{begin}{}{{\"name\": \"", f.open)
                };
                // Before the first call, text that stops matching a call is content (a JSON
                // reply that starts as a call would); later, the grammar wrote it.
                let first = self.calls.is_empty();
                let Some(rest) = self.buf.strip_prefix(head.as_str()) else {
                    if first && !head.starts_with(self.buf.as_str()) {
                        return self.not_a_call();
                    }
                    return false;
                };
                if f.named() {
                    return match named_head(&f, rest) {
                        NamedHead::More => false,
                        NamedHead::NotACall if first => self.not_a_call(),
                        NamedHead::NotACall => false,
                        NamedHead::Call { name, id, len } => {
                            let id = id.filter(|id| is_short_id(id));
                            self.buf = rest[len..].to_string();
                            self.start_call(name, id, out);
                            true
                        }
                    };
                }
                let tail = format!("\", \"{}\": ", f.args_key);
                let Some(end) = rest.find('"') else {
                    return false;
                };
                let name = rest[..end].to_string();
                let Some(after) = rest[end..].strip_prefix(tail.as_str()) else {
                    if first && !tail.starts_with(&rest[end..]) {
                        return self.not_a_call();
                    }
                    return false;
                };
                self.buf = after.to_string();
                self.start_call(name, None, out);
                true
            }
            Mode::Args {
                mut depth,
                mut in_str,
                mut esc,
            } => {
                let mut taken = self.buf.len();
                let mut done = false;
                for (i, c) in self.buf.char_indices() {
                    if in_str {
                        match (esc, c) {
                            (true, _) => esc = false,
                            (false, '\\') => esc = true,
                            (false, '"') => in_str = false,
                            _ => {}
                        }
                    } else {
                        match c {
                            '"' => in_str = true,
                            '{' | '[' => depth += 1,
                            '}' | ']' => depth = depth.saturating_sub(1),
                            _ => {}
                        }
                    }
                    if depth == 0 && !in_str && !c.is_whitespace() {
                        taken = i + c.len_utf8();
                        done = true;
                        break;
                    }
                }
                let piece: String = self.buf.drain(..taken).collect();
                let index = self.calls.len() - 1;
                if !piece.is_empty() {
                    self.calls[index].arguments.push_str(&piece);
                    out.push(Piece::Arguments { index, text: piece });
                }
                self.mode = if done {
                    Mode::Tail
                } else {
                    Mode::Args { depth, in_str, esc }
                };
                done
            }
            Mode::Tail => {
                let tail = if f.named() {
                    f.close.to_string()
                } else {
                    format!("}}{}", f.close)
                };
                if self.buf.len() < tail.len() {
                    return false;
                }
                // The grammar writes exactly `tail`; unconstrained text may not, and is
                // cut at a character boundary, never inside one (found by fuzzing).
                let mut cut = tail.len();
                while !self.buf.is_char_boundary(cut) {
                    cut += 1;
                }
                self.buf.drain(..cut);
                self.mode = Mode::Between;
                true
            }
            Mode::Between => {
                let next = format!("{}{}", f.sep, f.open);
                if self.buf.is_empty() || next.is_empty() {
                    return false;
                }
                if self.buf.starts_with(&next) {
                    self.buf.drain(..f.sep.len());
                    self.mode = Mode::Head;
                    return true;
                }
                false
            }
        }
    }
}
