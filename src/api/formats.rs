//! What a reply's text must be: OpenAI's `response_format` (with our `regex` and `lark`) and
//! llama.cpp's GBNF `grammar`, read into the structured layer's [`OutputFormat`].

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::structured::OutputFormat;

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
    /// Our extensions: `{"type": "regex", "regex": ...}`, `{"type": "lark", "lark": ...}`.
    pub regex: Option<String>,
    pub lark: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
}

impl ResponseFormat {
    fn output_format(&self) -> Result<OutputFormat, ApiError> {
        let missing = |field: &str| {
            ApiError::invalid(
                format!("response_format.{field}"),
                format!("response_format `{}` needs `{field}`", self.kind),
            )
        };
        Ok(match self.kind.as_str() {
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
        })
    }
}

/// The reply's format from `response_format` and `grammar` (`""`: none), which cannot both
/// shape it.
pub fn output_format(
    response_format: Option<&ResponseFormat>,
    grammar: Option<&str>,
) -> Result<OutputFormat, ApiError> {
    match (response_format, grammar.filter(|g| !g.is_empty())) {
        (Some(f), Some(_)) if f.kind != "text" => Err(ApiError::invalid(
            "grammar",
            "`grammar` and `response_format` cannot both shape the reply: send one",
        )),
        (_, Some(g)) => Ok(OutputFormat::Gbnf(g.to_string())),
        (Some(f), None) => f.output_format(),
        (None, None) => Ok(OutputFormat::Text),
    }
}
