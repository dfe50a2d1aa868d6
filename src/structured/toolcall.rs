//! The text form of tool calls: how the tool list and past calls are shown to a model whose
//! chat template has no tool support, and the incremental parser that turns generated text
//! back into OpenAI's `tool_calls` as it streams.
//!
//! The generic format is the Hermes one most open models were tuned on: the tools as JSON
//! inside `<tools></tools>` in the system turn, each call as
//! `<tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>`, results in a user turn
//! as `<tool_response>\n...\n</tool_response>`. Templates that take `tools` themselves
//! (Hermes/Qwen style, Llama 3.1) are given the tools and calls natively.
//!
//! Invariant: feeding the parser the text in any split gives the same pieces concatenated,
//! so streamed deltas add up to the non-streamed call exactly.

use serde_json::Value;

use crate::model::Message;

/// How calls are written in the model's output. The grammar generates exactly
/// `open {"name": "NAME", "ARGS_KEY": ARGS} close`, calls separated by `sep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolFormat {
    pub open: &'static str,
    pub close: &'static str,
    pub sep: &'static str,
    pub args_key: &'static str,
    /// Whether the format has several calls in one reply.
    pub parallel: bool,
}

impl ToolFormat {
    /// Hermes / Qwen style, and our generic format.
    pub const HERMES: Self = Self {
        open: "<tool_call>\n",
        close: "\n</tool_call>",
        sep: "\n",
        args_key: "arguments",
        parallel: true,
    };
    /// Llama 3.1's JSON tool calling: a bare object with `parameters`, one call a reply.
    pub const LLAMA3_JSON: Self = Self {
        open: "",
        close: "",
        sep: "",
        args_key: "parameters",
        parallel: false,
    };

    /// The text that starts a call; a reply that starts with it is parsed as calls.
    pub fn trigger(&self) -> &'static str {
        if self.open.is_empty() {
            "{"
        } else {
            self.open.trim_end()
        }
    }

    /// The format a chat template was tuned with, and whether it renders tools itself
    /// (`true`), or needs the generic rendering (`false`, Hermes format).
    pub fn for_template(source: &str) -> (Self, bool) {
        if !source.contains("tools") {
            return (Self::HERMES, false);
        }
        if source.contains("<tool_call>") {
            (Self::HERMES, true)
        } else if source.contains("<|python_tag|>") || source.contains("\"parameters\"") {
            (Self::LLAMA3_JSON, true)
        } else {
            (Self::HERMES, false)
        }
    }

    /// One call as the model writes it.
    pub fn call_text(&self, name: &str, arguments: &str) -> String {
        format!(
            "{}{{\"name\": \"{name}\", \"{}\": {arguments}}}{}",
            self.open, self.args_key, self.close
        )
    }
}

/// The system text that shows the tools to a model whose template cannot (generic format).
pub fn generic_tools_prompt(tools: &[Value]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to help with the user's request. \
         The functions are described by JSON schemas inside <tools></tools>:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\n\nTo call a function, reply with a JSON object holding its name and arguments \
         inside <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \
         \"arguments\": <arguments-object>}\n</tool_call>",
    );
    s
}

/// Rewrites tool-call turns and tool results for a template without tool support (generic
/// format): calls become the assistant's text, consecutive tool results one user turn, and
/// the tool list joins (or becomes) the system turn.
pub fn generic_messages(messages: Vec<Message>, tools: &[Value]) -> Vec<Message> {
    let f = ToolFormat::HERMES;
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        out.push(Message::new("system", &generic_tools_prompt(tools)));
    }
    for m in messages {
        match m.role.as_str() {
            "system" if out.len() == 1 && !tools.is_empty() => {
                let tools_text = std::mem::take(&mut out[0].content);
                out[0].content = format!("{}\n\n{tools_text}", m.content);
            }
            "assistant" if m.tool_calls.is_some() => {
                let calls: Vec<String> = m
                    .tool_calls
                    .iter()
                    .flatten()
                    .map(|c| {
                        let name = c["function"]["name"].as_str().unwrap_or_default();
                        let args = &c["function"]["arguments"];
                        f.call_text(name, &args.to_string())
                    })
                    .collect();
                let mut text = m.content.clone();
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&calls.join(f.sep));
                out.push(Message::new("assistant", &text));
            }
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    Some(prev)
                        if prev.role == "user" && prev.content.ends_with("</tool_response>") =>
                    {
                        prev.content.push('\n');
                        prev.content.push_str(&block);
                    }
                    _ => out.push(Message::new("user", &block)),
                }
            }
            _ => out.push(Message {
                tool_calls: None,
                tool_call_id: None,
                ..m
            }),
        }
    }
    out
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
}

impl CallParser {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            mode: Mode::Undecided,
            buf: String::new(),
            calls: Vec::new(),
        }
    }

    pub fn calls(&self) -> &[ParsedCall] {
        &self.calls
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

    /// Makes one move; false when it needs more text.
    fn step(&mut self, out: &mut Vec<Piece>) -> bool {
        let f = self.format;
        match self.mode {
            Mode::Undecided => {
                let t = self.buf.trim_start();
                if t.starts_with(f.trigger()) {
                    self.buf = t.to_string();
                    self.mode = Mode::Head;
                    true
                } else if f.trigger().starts_with(t) {
                    false
                } else {
                    self.mode = Mode::Text;
                    true
                }
            }
            Mode::Text => {
                if !self.buf.is_empty() {
                    out.push(Piece::Content(std::mem::take(&mut self.buf)));
                }
                false
            }
            Mode::Head => {
                let head = format!("{}{{\"name\": \"", f.open);
                let Some(rest) = self.buf.strip_prefix(head.as_str()) else {
                    return false;
                };
                let Some(end) = rest.find('"') else {
                    return false;
                };
                let name = rest[..end].to_string();
                let tail = format!("\", \"{}\": ", f.args_key);
                let Some(after) = rest[end..].strip_prefix(tail.as_str()) else {
                    return false;
                };
                self.buf = after.to_string();
                let index = self.calls.len();
                let id = new_call_id();
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
                let tail = format!("}}{}", f.close);
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

fn new_call_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("call_{n:016x}")
}
