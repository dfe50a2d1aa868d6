//! What a request asks the output to be ([`ConstraintSpec`]), checked piece by piece and
//! turned into one llguidance grammar.
//!
//! JSON is generated in one canonical layout (`", "` and `": "` separators, no other
//! whitespace): a model cannot wander into endless whitespace, and a tool call's arguments
//! are the exact text the model produced.

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

use super::lark_string as lit;
use super::reasoning::ThinkSpec;
use super::toolcall::ToolFormat;
use super::StructuredError;

#[path = "grammar_checks.rs"]
mod checks;
use checks::{check_object_schema, valid_tool_name};

/// The shape of a reply's text.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against `schema`; `strict` applies OpenAI's strict-mode rules first.
    JsonSchema {
        schema: Value,
        strict: bool,
    },
    /// Our extension: text matching a regular expression (Rust regex syntax, whole output).
    Regex(String),
    /// Our extension: a Lark grammar in llguidance's dialect.
    Lark(String),
    /// llama.cpp's `grammar`: GBNF, or Lark in llguidance's dialect when it starts with
    /// `%llguidance` (as llama.cpp built with llguidance reads it).
    Gbnf(String),
}

impl OutputFormat {
    /// Whether the format is a grammar of the whole reply from its first token (so no
    /// reasoning part comes before it).
    pub fn starts_at_once(&self) -> bool {
        matches!(self, Self::Regex(_) | Self::Lark(_) | Self::Gbnf(_))
    }
}

/// Turns GBNF into Lark for this vocabulary (its token references resolved).
pub(crate) type GbnfToLark<'a> = &'a dyn Fn(&str) -> Result<String, String>;

/// The most lines a Lark grammar sent as text may have (so rules): llguidance's compiler
/// recurses along chains of rules, and its stack is large but not endless.
const MAX_LARK_LINES: usize = 5_000;

/// Checks a Lark grammar sent as text: no llguidance options that loosen enforcement, no
/// lexeme that ends at the model's EOS (`stop=""`: our stop tokens end only a complete
/// grammar), not too many rules.
fn check_lark(param: &str, src: &str) -> Result<(), StructuredError> {
    let refuse = |m: &str| Err(StructuredError::new(param, m));
    if src.contains("x-guidance") {
        return refuse("`x-guidance` is not accepted in grammars");
    }
    let squeezed: String = src.chars().filter(|c| !c.is_whitespace()).collect();
    if squeezed.contains("stop=\"\"") {
        return refuse("lexemes that end at the model's end token (`stop=\"\"`) are not supported");
    }
    if src.lines().count() > MAX_LARK_LINES {
        return refuse(&format!(
            "a Lark grammar of more than {MAX_LARK_LINES} lines"
        ));
    }
    Ok(())
}

/// A `grammar` field's Lark: converted from GBNF, or as sent when it is Lark already.
fn gbnf_lark(src: &str, gbnf: GbnfToLark) -> Result<String, StructuredError> {
    if src.trim_start().starts_with("%llguidance") {
        check_lark("grammar", src)?;
        return Ok(src.to_string());
    }
    gbnf(src).map_err(|m| StructuredError::new("grammar", format!("GBNF: {m}")))
}

/// One callable function.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    /// A JSON schema of type object for the arguments.
    pub parameters: Value,
    pub strict: bool,
}

impl ToolSpec {
    /// A function's `parameters` as its arguments' schema: none takes none, and a schema
    /// that names no `type` (`{}`, or only `properties`) is an object's, as arguments always
    /// are (`["object"]` is `object`); otherwise the model could write a number or `null`.
    pub fn parameters_of(p: Option<&Value>) -> Value {
        let mut p = p
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        if let Some(o) = p.as_object_mut() {
            let object = match o.get("type") {
                None => true,
                Some(Value::Array(a)) => a.len() == 1 && a[0] == "object",
                Some(_) => false,
            };
            if object {
                o.insert("type".into(), Value::from("object"));
            }
        }
        p
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call a tool.
    None,
    /// Text or calls, as the model chooses; a call, once started, follows the schemas.
    Auto,
    /// At least one call, from the first token.
    Required,
    /// A call of this function, from the first token.
    Named(String),
}

/// Everything that constrains one reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstraintSpec {
    pub format: OutputFormat,
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    /// Whether several calls may come in one reply.
    pub parallel: bool,
    pub tool_format: ToolFormat,
    /// A reasoning model's thinking before the constrained part (set after the prompt is
    /// rendered, which says whether it opened the reasoning).
    pub think: Option<ThinkSpec>,
    /// The request field the format came from when it is not `response_format` or
    /// `grammar` (vLLM's `guided_json`, ...): the format's errors name it.
    pub format_field: Option<&'static str>,
}

/// The JSON layout we generate (llguidance's options, set by us only), after the schema's
/// rewrites (`oneOf` of disjoint branches as `anyOf`, unknown string formats dropped).
fn with_layout(schema: &Value) -> Value {
    let mut s = schema.clone();
    super::schema::rewritten_for_llguidance(&mut s);
    if let Some(obj) = s.as_object_mut() {
        obj.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    s
}

fn json_grammar(schema: &Value) -> TopLevelGrammar {
    TopLevelGrammar::from_json_schema(with_layout(schema))
}

/// A regex matching `s` literally, every non-alphanumeric character hex-escaped.
fn regex_literal(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_string()
            } else {
                format!("\\x{{{:X}}}", c as u32)
            }
        })
        .collect()
}

impl ConstraintSpec {
    /// A spec that constrains nothing.
    pub fn text() -> Self {
        Self {
            format: OutputFormat::Text,
            tools: Vec::new(),
            choice: ToolChoice::Auto,
            parallel: true,
            tool_format: ToolFormat::HERMES,
            think: None,
            format_field: None,
        }
    }

    /// Whether a reply may contain tool calls (so its text is parsed for them).
    pub fn calls_tools(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }

    /// Whether the reply is the format's alone: no tools, or tools that may not be called
    /// under a format that starts at once (a regex, grammar or choice: as vLLM takes it,
    /// the format is the reply, which opens no call).
    fn format_alone(&self) -> bool {
        self.tools.is_empty() || (self.choice == ToolChoice::None && self.format.starts_at_once())
    }

    /// Checks each piece on its own, so that an error names its field; `compile` compiles
    /// one grammar and reports its error text.
    pub(crate) fn check(
        &self,
        gbnf: GbnfToLark,
        compile: impl Fn(&str, TopLevelGrammar) -> Result<(), StructuredError>,
    ) -> Result<(), StructuredError> {
        match &self.format {
            OutputFormat::Text | OutputFormat::JsonObject => {}
            OutputFormat::JsonSchema { schema, strict } => {
                let param = "response_format.json_schema";
                check_object_schema(schema, param, *strict)?;
                compile(param, json_grammar(schema))?;
            }
            OutputFormat::Regex(rx) => {
                compile("response_format.regex", TopLevelGrammar::from_regex(rx))?
            }
            OutputFormat::Lark(src) => {
                let param = "response_format.lark";
                check_lark(param, src)?;
                compile(param, TopLevelGrammar::from_lark(src.clone()))?;
            }
            OutputFormat::Gbnf(src) => {
                compile("grammar", TopLevelGrammar::from_lark(gbnf_lark(src, gbnf)?))?
            }
        }
        if self.calls_tools() && self.format.starts_at_once() {
            let field = match (&self.format, self.format_field) {
                (_, Some(field)) => field,
                (OutputFormat::Gbnf(_), None) => "grammar",
                (_, None) => {
                    return Err(StructuredError::new(
                        "response_format",
                        "`regex` and `lark` formats cannot be combined with tool calls",
                    ))
                }
            };
            return Err(StructuredError::new(
                field,
                format!("`{field}` cannot be combined with tool calls"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.tools.iter().enumerate() {
            if !valid_tool_name(&t.name) {
                return Err(StructuredError::new(
                    format!("tools[{i}].function.name"),
                    format!(
                        "invalid function name `{}`: use 1 to 64 of a-z, A-Z, 0-9, _ and -",
                        t.name
                    ),
                ));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(StructuredError::new(
                    format!("tools[{i}].function.name"),
                    format!("function `{}` is declared twice", t.name),
                ));
            }
            let param = format!("tools[{i}].function.parameters");
            check_object_schema(&t.parameters, &param, t.strict)?;
            if t.parameters.get("type").is_some_and(|ty| ty != "object") {
                return Err(StructuredError::new(
                    &param,
                    "function parameters must be a schema of `type: \"object\"`",
                ));
            }
            compile(&param, json_grammar(&t.parameters))?;
        }
        match &self.choice {
            ToolChoice::Named(name) if !self.tools.iter().any(|t| &t.name == name) => {
                Err(StructuredError::new(
                    "tool_choice",
                    format!("`tool_choice` names function `{name}`, which is not in `tools`"),
                ))
            }
            ToolChoice::Named(_) | ToolChoice::Required if self.tools.is_empty() => Err(
                StructuredError::new("tool_choice", "`tool_choice` requires `tools`"),
            ),
            _ => Ok(()),
        }
    }

    /// The one grammar for the whole reply and the field to blame if it fails to compile;
    /// `None` when nothing is constrained.
    pub(crate) fn grammar(
        &self,
        gbnf: GbnfToLark,
    ) -> Result<Option<(&'static str, TopLevelGrammar)>, StructuredError> {
        if let Some(think) = &self.think {
            if let Some(g) = self.with_thinking(think) {
                return Ok(Some(g));
            }
        }
        if self.format_alone() {
            return Ok(match &self.format {
                OutputFormat::Text => None,
                OutputFormat::JsonObject => {
                    Some(("response_format", json_grammar(&json!({"type": "object"}))))
                }
                OutputFormat::JsonSchema { schema, .. } => {
                    Some(("response_format.json_schema", json_grammar(schema)))
                }
                OutputFormat::Regex(rx) => {
                    Some(("response_format.regex", TopLevelGrammar::from_regex(rx)))
                }
                OutputFormat::Lark(src) => Some((
                    "response_format.lark",
                    TopLevelGrammar::from_lark(src.clone()),
                )),
                OutputFormat::Gbnf(src) => {
                    Some(("grammar", TopLevelGrammar::from_lark(gbnf_lark(src, gbnf)?)))
                }
            });
        }
        Ok(Some(("tools", TopLevelGrammar::from_lark(self.lark()))))
    }

    /// The grammar with the reasoning first, when the rest can follow it in Lark: tool
    /// calls, JSON, or text under a budget (`None`: regex and Lark formats, which then
    /// start at once, and free text with no budget, which needs no grammar).
    fn with_thinking(&self, think: &ThinkSpec) -> Option<(&'static str, TopLevelGrammar)> {
        let (field, main) = if !self.format_alone() {
            let lark = self.lark();
            let (first, rest) = lark.split_once('\n')?;
            let start = first.strip_prefix("start: ")?;
            (
                "tools",
                format!("start: think_part THINK_WS? ({start})\n{rest}"),
            )
        } else {
            let (field, body) = match &self.format {
                OutputFormat::Text if think.budget.is_some() => {
                    // Text that does not open a reasoning of its own, nor start with the
                    // whitespace that is `THINK_WS`'s.
                    let any = "/(?s:([^ \\t\\r\\n].*)?)/";
                    let body = match think.open_text() {
                        Some(open) => format!("{any} & ~/(?s:{}.*)/", regex_literal(open)),
                        None => any.to_string(),
                    };
                    ("reasoning_budget", format!("ANSWER\nANSWER: {body}"))
                }
                OutputFormat::JsonObject => (
                    "response_format",
                    format!("%json {}", with_layout(&json!({"type": "object"}))),
                ),
                OutputFormat::JsonSchema { schema, .. } => (
                    "response_format.json_schema",
                    format!("%json {}", with_layout(schema)),
                ),
                _ => return None,
            };
            (
                field,
                format!("start: think_part THINK_WS? main\nmain: {body}\n"),
            )
        };
        let g = format!("{main}{}", think.lark());
        Some((field, TopLevelGrammar::from_lark(g)))
    }

    /// The prose before a call, `text` that holds something besides whitespace: for a
    /// marker written as text it ends lazily at the marker (`suffix=`), for a control
    /// token where that token comes.
    fn prose_lark(&self, text: &str) -> String {
        let f = &self.tool_format;
        let body = format!("{text} & /(?s:.*[^ \\t\\r\\n].*)/");
        match f.named() {
            true => format!("prose: PROSE\nPROSE: {body}\n"),
            false => format!("prose[suffix={}]: {body}\n", lit(&f.trigger())),
        }
    }

    /// The Lark grammar of a reply that may (or must) be tool calls.
    fn lark(&self) -> String {
        let f = &self.tool_format;
        let mut g = String::new();
        // With `auto`, a format whose calls open with a marker of their own may also call
        // after some prose ("Let me look that up." then `<tool_call>`), as models write.
        let prose = self.choice == ToolChoice::Auto
            && f.calls_after_text()
            && matches!(self.format, OutputFormat::Text);
        let start = match self.choice {
            ToolChoice::None => "text",
            ToolChoice::Auto if prose => "calls | text | prose calls_after_prose",
            ToolChoice::Auto => "calls | text",
            ToolChoice::Required | ToolChoice::Named(_) => "calls",
        };
        g.push_str(&format!("start: {start}\n"));
        let text = match &self.format {
            OutputFormat::JsonObject => {
                format!("%json {}", with_layout(&json!({"type": "object"})))
            }
            OutputFormat::JsonSchema { schema, .. } => format!("%json {}", with_layout(schema)),
            // Text that does not open a tool call, nor a reasoning outside the grammar's
            // reasoning part (regex and lark were refused with tools).
            _ => {
                let trigger = regex_literal(&f.trigger());
                // A format whose calls open with a marker of their own (`<tool_call>`) has
                // it nowhere in text, so the markup never reaches the content unparsed: a
                // call after prose is the grammar's `prose` part. A bare JSON call's `{` is
                // only kept from opening the reply.
                let marked = if f.open.is_empty() {
                    String::new()
                } else {
                    format!(" & ~/(?s:.*{trigger}.*)/")
                };
                let body = match &self.think {
                    None => format!("/(?s:.*)/ & ~/(?s:[ \\t\\r\\n]*{trigger}.*)/{marked}"),
                    // After the reasoning the whitespace is `THINK_WS`'s: text starting
                    // with some would be a longer lexeme than it, and take a call's place.
                    Some(t) => {
                        let opens = match t.open_text() {
                            Some(open) => format!("({trigger}|{})", regex_literal(open)),
                            None => trigger.clone(),
                        };
                        format!("/(?s:([^ \\t\\r\\n].*)?)/ & ~/(?s:{opens}.*)/{marked}")
                    }
                };
                g.push_str(&format!("TEXT: {body}\n"));
                if prose {
                    g.push_str(&self.prose_lark(&body));
                }
                "TEXT".to_string()
            }
        };
        g.push_str(&format!("text: {text}\n"));
        let wrap = |s: &str| if s.is_empty() { String::new() } else { lit(s) };
        // The control token that opens the calls, by id (`<[id]>`).
        let special = f
            .special_id
            .map(|id| format!("<[{id}]> "))
            .unwrap_or_default();
        let more = if self.parallel {
            format!("({} call)*", wrap(f.sep))
        } else {
            String::new()
        };
        if f.named() {
            // The token opens each call: `<[tc]> name <[args]> {...}`, calls back to back.
            g.push_str(&format!("calls: call {more}\n"));
        } else {
            g.push_str(&format!(
                "calls: {special}{} call {more} {}\n",
                wrap(f.begin),
                wrap(f.end)
            ));
        }
        let declared: Vec<(usize, &ToolSpec)> = self
            .tools
            .iter()
            .enumerate()
            .filter(|(_, t)| match &self.choice {
                ToolChoice::Named(n) => &t.name == n,
                _ => true,
            })
            .collect();
        let alts: Vec<String> = declared.iter().map(|(i, _)| format!("fn_{i}")).collect();
        if prose {
            // The prose's end wrote the marker (`suffix=`) unless a control token opens calls.
            let after = match f.named() {
                true => "calls".to_string(),
                false => format!(
                    "{} ({}) {} {more}",
                    wrap(&f.open[f.trigger().len()..]),
                    alts.join(" | "),
                    wrap(f.close)
                ),
            };
            g.push_str(&format!("calls_after_prose: {after}\n"));
        }
        if let (true, Some(args)) = (f.named(), f.args_token_id) {
            g.push_str(&format!("call: {special}({})\n", alts.join(" | ")));
            // A call may carry its id where the vocabulary has `[CALL_ID]`.
            let id = match f.call_id_token_id {
                Some(cid) => {
                    g.push_str("CALL_ID: /[A-Za-z0-9]{9}/\n");
                    format!("(<[{cid}]> CALL_ID)? ")
                }
                None => String::new(),
            };
            for (i, t) in declared {
                g.push_str(&format!(
                    "fn_{i}: {} {id}<[{args}]> args_{i}\n",
                    lit(&t.name)
                ));
                g.push_str(&format!("args_{i}: %json {}\n", with_layout(&t.parameters)));
            }
            return g;
        }
        g.push_str(&format!(
            "call: {} ({}) {}\n",
            wrap(f.open),
            alts.join(" | "),
            wrap(f.close)
        ));
        for (i, t) in declared {
            let head = format!("{{\"name\": \"{}\", \"{}\": ", t.name, f.args_key);
            g.push_str(&format!("fn_{i}: {} args_{i} \"}}\"\n", lit(&head)));
            g.push_str(&format!("args_{i}: %json {}\n", with_layout(&t.parameters)));
        }
        g
    }
}
