//! What a reply's text must be: OpenAI's `response_format` (with our `regex` and `lark`),
//! llama.cpp's GBNF `grammar` and `json_schema`, and vLLM's `guided_*` and
//! `structured_outputs`, read into the structured layer's [`OutputFormat`].

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::structured::{lark_string, OutputFormat};

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
    /// Our extensions: `{"type": "regex", "regex": ...}`, `{"type": "lark", "lark": ...}`.
    pub regex: Option<String>,
    pub lark: Option<String>,
    /// llama.cpp's: `{"type": "json_object", "schema": {...}}` is that schema.
    pub schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// The format, and the field its errors name when it is not `response_format...`.
    fn output_format(&self) -> Result<(OutputFormat, Option<&'static str>), ApiError> {
        if self.kind == "json_object" {
            if let Some(schema) = self.schema.clone().filter(|s| !s.is_null()) {
                let format = OutputFormat::JsonSchema {
                    schema,
                    strict: false,
                };
                return Ok((format, Some("response_format.schema")));
            }
        }
        let missing = |field: &str| {
            ApiError::invalid(
                format!("response_format.{field}"),
                format!("response_format `{}` needs `{field}`", self.kind),
            )
        };
        Ok((match self.kind.as_str() {
            "text" => OutputFormat::Text,
            "json_object" => OutputFormat::JsonObject,
            "json_schema" => {
                let js = self.json_schema.as_ref().ok_or_else(|| missing("json_schema"))?;
                let schema = js
                    .schema
                    .clone()
                    .ok_or_else(|| missing("json_schema.schema"))?;
                OutputFormat::JsonSchema {
                    schema,
                    strict: js.strict.unwrap_or(false),
                }
            }
            "regex" => OutputFormat::Regex(self.regex.clone().ok_or_else(|| missing("regex"))?),
            "lark" => OutputFormat::Lark(self.lark.clone().ok_or_else(|| missing("lark"))?),
            other => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    format!("response_format `{other}` is not supported: use text, json_object, json_schema, regex or lark"),
                ))
            }
        }, None))
    }
}

/// The structured-output fields of other servers, as both completion requests declare them:
/// vLLM's older `guided_*` ones and newer `structured_outputs` object, and llama.cpp's
/// top-level `json_schema` and `grammar_lazy`.
#[derive(Debug, Default)]
pub struct Guided<'a> {
    /// A JSON schema, as an object or a string holding one.
    pub guided_json: Option<&'a Value>,
    pub guided_regex: Option<&'a String>,
    /// The reply is exactly one of these.
    pub guided_choice: Option<&'a Vec<String>>,
    /// GBNF (xgrammar's EBNF is its superset) when it has `::=`, else llguidance's Lark.
    pub guided_grammar: Option<&'a String>,
    pub structured_outputs: Option<&'a StructuredOutputs>,
    pub grammar_lazy: Option<bool>,
    /// llama.cpp's top-level schema.
    pub json_schema: Option<&'a Value>,
    pub guided_whitespace_pattern: Option<&'a Value>,
}

/// A request's [`Guided`] fields.
macro_rules! guided_of {
    ($t:ty) => {
        impl $t {
            pub fn guided(&self) -> $crate::api::formats::Guided<'_> {
                $crate::api::formats::Guided {
                    guided_json: self.guided_json.as_ref(),
                    guided_regex: self.guided_regex.as_ref(),
                    guided_choice: self.guided_choice.as_ref(),
                    guided_grammar: self.guided_grammar.as_ref(),
                    structured_outputs: self.structured_outputs.as_ref(),
                    grammar_lazy: self.grammar_lazy,
                    json_schema: self.json_schema.as_ref(),
                    guided_whitespace_pattern: self.guided_whitespace_pattern.as_ref(),
                }
            }
        }
    };
}
pub(crate) use guided_of;

/// vLLM's `structured_outputs`; its backend options (`disable_any_whitespace`, ...) are
/// ignored.
#[derive(Debug, Default, Deserialize)]
pub struct StructuredOutputs {
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
    pub structural_tag: Option<Value>,
    /// Options that change what is valid: refused when set.
    pub disable_additional_properties: Option<bool>,
    pub whitespace_pattern: Option<Value>,
}

/// Each format a request sets, with the field it came from.
type Found = Vec<(&'static str, OutputFormat)>;

fn guided_formats(g: &Guided, found: &mut Found) -> Result<(), ApiError> {
    let o = g.structured_outputs;
    // Each kind under its names, read into a format by `make`.
    fn each<T: ?Sized>(
        found: &mut Found,
        named: &[(&'static str, Option<&T>)],
        make: impl Fn(&'static str, &T) -> Result<OutputFormat, ApiError>,
    ) -> Result<(), ApiError> {
        for &(field, v) in named {
            if let Some(v) = v {
                found.push((field, make(field, v)?));
            }
        }
        Ok(())
    }
    fn not_null(v: Option<&Value>) -> Option<&Value> {
        v.filter(|v| !v.is_null())
    }
    let json = [
        ("json_schema", not_null(g.json_schema)),
        ("guided_json", not_null(g.guided_json)),
        (
            "structured_outputs.json",
            not_null(o.and_then(|o| o.json.as_ref())),
        ),
    ];
    each(found, &json, json_schema)?;
    let regex = [
        ("guided_regex", g.guided_regex),
        ("structured_outputs.regex", o.and_then(|o| o.regex.as_ref())),
    ];
    each(found, &regex, |_, rx| Ok(OutputFormat::Regex(rx.clone())))?;
    let choice = [
        ("guided_choice", g.guided_choice),
        (
            "structured_outputs.choice",
            o.and_then(|o| o.choice.as_ref()),
        ),
    ];
    each(found, &choice, |field, c| one_of(field, c))?;
    let grammar = [
        ("guided_grammar", g.guided_grammar),
        (
            "structured_outputs.grammar",
            o.and_then(|o| o.grammar.as_ref()),
        ),
    ];
    each(found, &grammar, |_, src| {
        Ok(if src.contains("::=") {
            OutputFormat::Gbnf(src.clone())
        } else {
            OutputFormat::Lark(src.clone())
        })
    })?;
    let refused = [
        (
            "guided_whitespace_pattern",
            g.guided_whitespace_pattern.is_some_and(|v| !v.is_null()),
        ),
        (
            "structured_outputs.whitespace_pattern",
            o.and_then(|o| o.whitespace_pattern.as_ref())
                .is_some_and(|v| !v.is_null()),
        ),
        (
            "structured_outputs.disable_additional_properties",
            o.and_then(|o| o.disable_additional_properties) == Some(true),
        ),
    ];
    if let Some((field, _)) = refused.iter().find(|(_, set)| *set) {
        return Err(ApiError::invalid(
            *field,
            format!("`{field}` is not supported: JSON is written in one layout, and a schema says itself what it allows (`additionalProperties: false`)"),
        ));
    }
    if let Some(o) = o {
        if o.json_object == Some(true) {
            found.push(("structured_outputs.json_object", OutputFormat::JsonObject));
        }
        if o.structural_tag.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ApiError::invalid(
                "structured_outputs.structural_tag",
                "`structural_tag` is not supported: use `tools`, or a `grammar`",
            ));
        }
    }
    Ok(())
}

/// A schema sent as an object or as a string holding one.
fn json_schema(field: &str, v: &Value) -> Result<OutputFormat, ApiError> {
    let schema = match v {
        Value::String(s) => serde_json::from_str(s).map_err(|e| {
            ApiError::invalid(field, format!("`{field}` is not a JSON schema: {e}"))
        })?,
        v => v.clone(),
    };
    Ok(OutputFormat::JsonSchema {
        schema,
        strict: false,
    })
}

/// A reply that is exactly one of `choices`.
fn one_of(field: &str, choices: &[String]) -> Result<OutputFormat, ApiError> {
    if choices.is_empty() {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` needs at least one choice"),
        ));
    }
    let alts: Vec<String> = choices.iter().map(|c| lark_string(c)).collect();
    Ok(OutputFormat::Lark(format!("start: {}\n", alts.join(" | "))))
}

/// llama.cpp's `grammar_lazy` (a grammar that starts at a trigger word or token), which is
/// not taken: refused rather than applied from the first token.
pub fn lazy_refused(lazy: Option<bool>) -> Result<(), ApiError> {
    match lazy {
        Some(true) => Err(ApiError::invalid(
            "grammar_lazy",
            "lazy grammars are not supported: send a grammar that allows the text before its part, or `tools`",
        )),
        _ => Ok(()),
    }
}

/// The reply's format from `response_format`, llama.cpp's `grammar` (`""`: none) and vLLM's
/// fields, of which one at most may shape it; and the field to name in the format's errors
/// when it is not `response_format` or `grammar`.
pub fn output_format(
    response_format: Option<&ResponseFormat>,
    grammar: Option<&str>,
    guided: &Guided,
) -> Result<(OutputFormat, Option<&'static str>), ApiError> {
    lazy_refused(guided.grammar_lazy)?;
    let mut found: Found = Vec::new();
    let mut response_format_field = None;
    if let Some(f) = response_format.filter(|f| f.kind != "text") {
        let (format, field) = f.output_format()?;
        response_format_field = field;
        found.push(("response_format", format));
    }
    if let Some(g) = grammar.filter(|g| !g.is_empty()) {
        found.push(("grammar", OutputFormat::Gbnf(g.to_string())));
    }
    guided_formats(guided, &mut found)?;
    if let [(first, _), (second, _), ..] = found.as_slice() {
        return Err(ApiError::invalid(
            *second,
            format!("`{first}` and `{second}` cannot both shape the reply: send one"),
        ));
    }
    Ok(match found.pop() {
        None => (OutputFormat::Text, None),
        Some(("response_format", format)) => (format, response_format_field),
        Some((field, format)) => (format, (field != "grammar").then_some(field)),
    })
}
