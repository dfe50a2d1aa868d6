//! OpenAI wire types for requests, and their validation into the engine's
//! [`GenerationRequest`]. Every rejection names the field and the allowed range.

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::engine::sampler::{SamplingError, SamplingParams};
use crate::model::Message;

/// Fields of both completion endpoints that shape generation.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u64>,
    pub min_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Our extension (as llama.cpp's server names it): false bypasses the prefix cache.
    pub cache_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u64>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<ResponseFormat>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptField,
    /// The completions API's logprobs: how many alternatives per token.
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Many(Vec<String>),
}

/// Parses a request body as a JSON object.
pub fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::bad_request("The request body is not valid UTF-8"));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object",
        ));
    }
    Ok(v)
}

/// Reads typed fields out of a parsed body, naming the field whose type is wrong.
pub fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            // A missing required field: serde names it in the message.
            let msg = inner.to_string();
            let field = msg.split('`').nth(1).unwrap_or("").to_string();
            ApiError::invalid(field, format!("Invalid request: {msg}"))
        } else {
            ApiError::invalid(path.clone(), format!("Invalid value for `{path}`: {inner}"))
        }
    })
}

impl ChatCompletionRequest {
    /// The messages as template input; refuses what we would otherwise silently ignore.
    pub fn validated_messages(&self) -> Result<Vec<Message>, ApiError> {
        for (field, value) in [
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
            ("functions", &self.functions),
            ("function_call", &self.function_call),
        ] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid(
                    field,
                    format!("`{field}` is not supported yet"),
                ));
            }
        }
        if let Some(f) = &self.response_format {
            if f.kind != "text" {
                return Err(ApiError::invalid(
                    "response_format",
                    format!("response_format `{}` is not supported; only `text`", f.kind),
                ));
            }
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must not be empty",
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !["system", "user", "assistant", "developer"].contains(&m.role.as_str()) {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "unsupported role `{}`: use system, user or assistant",
                            m.role
                        ),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid(
                                        format!("messages[{i}].content[{j}]"),
                                        format!(
                                        "content part of type `{}` is not supported; only `text`",
                                        p.kind
                                    ),
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                let role = if m.role == "developer" {
                    "system"
                } else {
                    &m.role
                };
                Ok(Message::new(role, &content))
            })
            .collect()
    }
}

impl SamplingFields {
    pub fn sampling_params(&self) -> Result<SamplingParams, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    "n",
                    format!("`n` must be 1 (got {n}); several choices are not supported yet"),
                ));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::invalid(
                "logit_bias",
                "`logit_bias` is not supported yet",
            ));
        }
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0) as usize,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            seed: self.seed,
        };
        p.validate().map_err(|e| match &e {
            SamplingError::OutOfRange { field, .. } => ApiError::invalid(*field, e.to_string()),
        })?;
        Ok(p)
    }

    pub fn stops(&self) -> Result<Vec<String>, ApiError> {
        let stops = match &self.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stops.len() > 4 {
            return Err(ApiError::invalid(
                "stop",
                format!("at most 4 stop sequences (got {})", stops.len()),
            ));
        }
        Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// `max_completion_tokens` (or the older `max_tokens`); `None` means "until the context".
    pub fn max_tokens(&self) -> Result<Option<usize>, ApiError> {
        let (field, value) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => ("max_completion_tokens", v),
            (None, Some(v)) => ("max_tokens", v),
            (None, None) => return Ok(None),
        };
        if value == 0 {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` must be at least 1"),
            ));
        }
        Ok(Some(usize::try_from(value).unwrap_or(usize::MAX)))
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}
