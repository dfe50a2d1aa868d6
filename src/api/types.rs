//! OpenAI wire types for requests, and their validation into the engine's
//! [`GenerationRequest`]. Every rejection names the field and the allowed range.

use serde::Deserialize;
use serde_json::Value;

pub use super::body::{from_value, parse_body, without_nulls};
use super::error::ApiError;
use super::formats::guided_of;
pub use super::formats::{output_format, ResponseFormat, StructuredOutputs};
use crate::engine::sampler::{SamplingError, SamplingParams};
use crate::model::Message;
use crate::structured::{ConstraintSpec, ToolChoice, ToolFormat, ToolSpec};

#[path = "types_message.rs"]
mod message;
pub(crate) use message::push_part;

/// The most choices one request may ask for (prompts times `n`): each is a sequence in the
/// engine.
pub const MAX_CHOICES: u64 = 16;
/// The longest stop string, in bytes: the engine looks for each one after every token.
pub const MAX_STOP_BYTES: usize = 1024;

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
    /// llama.cpp's name for `repetition_penalty` (which wins when both are sent).
    pub repeat_penalty: Option<f32>,
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
    /// OpenAI's Predicted Outputs: `{"type": "content", "content": text or text parts}`.
    pub prediction: Option<Value>,
    /// llama.cpp's and vLLM's: the end-of-text and end-of-turn tokens are never sampled, so
    /// the reply runs to its budget (benchmarks send it).
    pub ignore_eos: Option<bool>,
    /// vLLM's, refused when they would change the reply (see [`Self::refuse_unsupported`]).
    pub min_tokens: Option<Value>,
    pub stop_token_ids: Option<Value>,
    pub include_stop_str_in_output: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// `null` is not given.
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u64>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoiceField>,
    pub parallel_tool_calls: Option<bool>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<ResponseFormat>,
    /// llama.cpp's: a GBNF grammar the reply follows (`""`: none).
    pub grammar: Option<String>,
    /// vLLM's structured-output fields (see [`Guided`]).
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub structured_outputs: Option<StructuredOutputs>,
    /// llama.cpp's: a grammar applied from a trigger on (refused).
    pub grammar_lazy: Option<bool>,
    /// llama.cpp's: a JSON schema the reply follows.
    pub json_schema: Option<Value>,
    /// vLLM's (refused: JSON is written in one layout).
    pub guided_whitespace_pattern: Option<Value>,
    /// Ours (llama.cpp's name): `none` leaves a reasoning model's thinking in `content`;
    /// `auto` (or `deepseek`) returns it as `reasoning_content`. Default: `--reasoning-format`.
    pub reasoning_format: Option<String>,
    /// Ours (llama.cpp's name): the most tokens a reasoning model thinks before its close
    /// marker is forced (`0`: it answers at once); `-1` (the default): no limit but
    /// `max_tokens`.
    pub reasoning_budget: Option<i64>,
    /// OpenAI's: `none` is budget 0; `minimal` to `xhigh` let the model think as it does.
    pub reasoning_effort: Option<String>,
    /// More variables for the chat template (vLLM's and llama.cpp's name), such as
    /// `enable_thinking`.
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// vLLM's (and Anthropic's prefill, which sets it): the reply continues the final
    /// assistant message instead of opening a new turn.
    pub continue_final_message: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceField {
    Mode(String),
    Function {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Debug, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    pub tool_calls: Option<Vec<WireToolCall>>,
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WireToolCall {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: WireFunctionCall,
}

#[derive(Debug, Deserialize)]
pub struct WireFunctionCall {
    pub name: String,
    /// A JSON object's text, as OpenAI sends it.
    pub arguments: String,
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
    /// vLLM's and llama.cpp's: the chat API's formats for the completion's text.
    pub response_format: Option<ResponseFormat>,
    /// llama.cpp's: a GBNF grammar the completion follows (`""`: none).
    pub grammar: Option<String>,
    /// vLLM's structured-output fields (see [`Guided`]).
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub structured_outputs: Option<StructuredOutputs>,
    /// llama.cpp's: a grammar applied from a trigger on (refused).
    pub grammar_lazy: Option<bool>,
    /// llama.cpp's: a JSON schema the reply follows.
    pub json_schema: Option<Value>,
    /// vLLM's (refused: JSON is written in one layout).
    pub guided_whitespace_pattern: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Many(Vec<String>),
    /// Token ids, as the OpenAI spec allows.
    Ids(Vec<u32>),
    ManyIds(Vec<Vec<u32>>),
}

impl ChatCompletionRequest {
    /// `chat_template_kwargs`, none of them a variable the server sets.
    pub fn template_kwargs(&self) -> Result<serde_json::Map<String, Value>, ApiError> {
        let kwargs = self.chat_template_kwargs.clone().unwrap_or_default();
        for key in kwargs.keys() {
            if crate::model::ChatTemplate::RESERVED.contains(&key.as_str()) {
                return Err(ApiError::invalid(
                    format!("chat_template_kwargs.{key}"),
                    format!("`{key}` is set by the server and cannot be passed"),
                ));
            }
        }
        Ok(kwargs)
    }

    /// The messages as template input; refuses what we would otherwise silently ignore.
    pub fn validated_messages(&self) -> Result<Vec<Message>, ApiError> {
        for (field, value) in [
            ("functions", &self.functions),
            ("function_call", &self.function_call),
        ] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid(
                    field,
                    format!("`{field}` is deprecated and not supported: use `tools`"),
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
            .map(|(i, m)| m.to_message(i))
            .collect()
    }

    /// Whether the reply continues `messages`' last (an assistant message, without tool
    /// calls); with an empty one there is nothing to continue and it is dropped.
    pub fn continues(&self, messages: &mut Vec<Message>) -> Result<bool, ApiError> {
        if self.continue_final_message != Some(true) {
            return Ok(false);
        }
        match messages.last() {
            Some(m) if m.role == "assistant" && m.tool_calls.is_none() => {}
            _ => {
                return Err(ApiError::invalid(
                    "continue_final_message",
                    "`continue_final_message` needs the last message to be an assistant's, without tool calls",
                ))
            }
        }
        if messages.last().is_some_and(|m| m.content.is_empty()) {
            messages.pop();
            return Ok(false);
        }
        Ok(true)
    }

    /// The tools as OpenAI-shaped JSON, for the chat template or the generic tool prompt.
    pub fn tools_json(&self) -> Vec<Value> {
        self.tools
            .iter()
            .flatten()
            .map(|t| {
                let mut f = serde_json::Map::new();
                f.insert("name".into(), Value::from(t.function.name.clone()));
                if let Some(d) = &t.function.description {
                    f.insert("description".into(), Value::from(d.clone()));
                }
                f.insert(
                    "parameters".into(),
                    ToolSpec::parameters_of(t.function.parameters.as_ref()),
                );
                serde_json::json!({"type": "function", "function": f})
            })
            .collect()
    }

    /// What the reply must look like: its format, and the tools it may or must call.
    pub fn constraint_spec(&self, tool_format: ToolFormat) -> Result<ConstraintSpec, ApiError> {
        let (format, format_field) = output_format(
            self.response_format.as_ref(),
            self.grammar.as_deref(),
            &self.guided(),
        )?;
        // OpenAI's limit: each tool's grammar is compiled and cached, shared by every client.
        if self.tools.as_ref().is_some_and(|t| t.len() > 128) {
            return Err(ApiError::invalid("tools", "at most 128 tools"));
        }
        let mut tools = Vec::new();
        for (i, t) in self.tools.iter().flatten().enumerate() {
            if t.kind != "function" {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!("tool type `{}` is not supported; only `function`", t.kind),
                ));
            }
            tools.push(ToolSpec {
                name: t.function.name.clone(),
                parameters: ToolSpec::parameters_of(t.function.parameters.as_ref()),
                strict: t.function.strict.unwrap_or(false),
            });
        }
        let choice = match &self.tool_choice {
            None if tools.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
            Some(ToolChoiceField::Mode(m)) => match m.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!(
                        "`tool_choice` must be none, auto, required or a function, got `{other}`"
                    ),
                    ))
                }
            },
            Some(ToolChoiceField::Function { kind, function }) => {
                if kind != "function" {
                    return Err(ApiError::invalid(
                        "tool_choice.type",
                        format!("`tool_choice.type` must be `function`, got `{kind}`"),
                    ));
                }
                ToolChoice::Named(function.name.clone())
            }
        };
        Ok(ConstraintSpec {
            format,
            tools,
            choice,
            parallel: self.parallel_tool_calls.unwrap_or(true) && tool_format.parallel,
            tool_format,
            think: None,
            format_field,
        })
    }
}

guided_of!(ChatCompletionRequest);
guided_of!(CompletionRequest);

impl SamplingFields {
    /// vLLM's fields this server does not implement, refused by name when set to anything
    /// that would change the reply (silently ignored, a benchmark would measure short
    /// replies): `min_tokens` over 0, `stop_token_ids` naming a token that does not end a
    /// reply already (`stop_ids`: the model's own, which clients often list), and
    /// `include_stop_str_in_output` true.
    pub fn refuse_unsupported(&self, stop_ids: &[u32]) -> Result<(), ApiError> {
        let set = [
            (
                "min_tokens",
                self.min_tokens
                    .as_ref()
                    .is_some_and(|v| !v.is_null() && v.as_u64() != Some(0)),
            ),
            (
                "stop_token_ids",
                self.stop_token_ids.as_ref().is_some_and(|v| {
                    !v.is_null()
                        && v.as_array().is_none_or(|a| {
                            a.iter().any(|id| {
                                id.as_u64()
                                    .is_none_or(|id| !stop_ids.iter().any(|&s| u64::from(s) == id))
                            })
                        })
                }),
            ),
            (
                "include_stop_str_in_output",
                self.include_stop_str_in_output
                    .as_ref()
                    .is_some_and(|v| !v.is_null() && v.as_bool() != Some(false)),
            ),
        ];
        match set.into_iter().find(|(_, set)| *set) {
            Some((field, _)) => Err(ApiError::invalid(
                field,
                format!("`{field}` is not supported by this server"),
            )),
            None => Ok(()),
        }
    }

    /// The sampling settings; `max_temperature` is the surface's own bound (OpenAI's 2).
    pub fn sampling_params(&self, max_temperature: f32) -> Result<SamplingParams, ApiError> {
        if let Some(t) = self.temperature.filter(|t| *t > max_temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("`temperature` must be in [0, {max_temperature}], got {t}"),
            ));
        }
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0) as usize,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self
                .repetition_penalty
                .or(self.repeat_penalty)
                .unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            seed: self.seed,
            logit_bias: self.logit_bias()?,
            llama_cpp_order: false,
            llama: None,
        };
        p.validate().map_err(|e| match &e {
            SamplingError::OutOfRange { field, .. } => ApiError::invalid(*field, e.to_string()),
        })?;
        Ok(p)
    }

    /// `logit_bias`: token ids (decimal strings) to numbers in [-100, 100], ids ascending;
    /// the ids are checked against the vocabulary by the caller.
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(map) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        let mut bias = Vec::with_capacity(map.len());
        for (key, value) in map {
            let bad = |reason: String| ApiError::invalid("logit_bias", reason);
            // Plain decimal: no sign, no leading zeros.
            let canonical =
                key.bytes().all(|b| b.is_ascii_digit()) && (key == "0" || !key.starts_with('0'));
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|_| canonical)
                .ok_or_else(|| {
                    bad(format!(
                        "`logit_bias` keys must be token ids (non-negative integers), got {key:?}"
                    ))
                })?;
            let b = value
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    bad(format!(
                        "`logit_bias[{key:?}]` must be a number in [-100, 100], got {value}"
                    ))
                })?;
            bias.push((id, b as f32));
        }
        bias.sort_by_key(|&(id, _)| id);
        if let Some(w) = bias.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("`logit_bias` names token {} twice", w[0].0),
            ));
        }
        Ok(bias)
    }

    /// `n`: how many choices to generate for each prompt, 1 to [`MAX_CHOICES`].
    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_CHOICES => Ok(n as usize),
            n => Err(ApiError::invalid(
                "n",
                format!("`n` must be in [1, {MAX_CHOICES}], got {n}"),
            )),
        }
    }

    /// The stop strings, at most `max` (OpenAI's 4; llama.cpp's shapes take more).
    pub fn stops(&self, max: usize) -> Result<Vec<String>, ApiError> {
        let stops = match &self.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stops.len() > max {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {max} stop sequences (got {})", stops.len()),
            ));
        }
        if let Some(long) = stops.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "a stop sequence may be at most {MAX_STOP_BYTES} bytes long (got one of {})",
                    long.len()
                ),
            ));
        }
        Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// `max_completion_tokens` (or the older `max_tokens`); `None` means "until the context".
    /// `echo`: 0 is allowed (the prompt alone, scored when `logprobs` is set).
    pub fn max_tokens(&self, echo: bool) -> Result<Option<usize>, ApiError> {
        let (field, value) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => ("max_completion_tokens", v),
            (None, Some(v)) => ("max_tokens", v),
            (None, None) => return Ok(None),
        };
        if value == 0 && !echo {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` must be at least 1 (0 only with `echo`)"),
            ));
        }
        Ok(Some(usize::try_from(value).unwrap_or(usize::MAX)))
    }

    /// `stream_options.include_usage`. `stream_options` on a request that does not stream is
    /// refused, as OpenAI and vLLM refuse it.
    pub fn include_usage(&self) -> Result<bool, ApiError> {
        match &self.stream_options {
            Some(_) if !self.stream => Err(ApiError::invalid(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            )),
            o => Ok(o.as_ref().and_then(|o| o.include_usage).unwrap_or(false)),
        }
    }

    /// The text of `prediction`, when given: its `content`, a string or text parts joined.
    pub fn prediction(&self) -> Result<Option<String>, ApiError> {
        let Some(p) = self.prediction.as_ref().filter(|p| !p.is_null()) else {
            return Ok(None);
        };
        let bad = || {
            ApiError::invalid(
                "prediction",
                "`prediction` must be {\"type\": \"content\", \"content\": a string or an array of text parts}",
            )
        };
        if p.get("type").and_then(Value::as_str) != Some("content") {
            return Err(bad());
        }
        match p.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|part| match (part.get("type"), part.get("text")) {
                    (Some(t), Some(Value::String(text))) if t == "text" => Ok(text.as_str()),
                    _ => Err(bad()),
                })
                .collect::<Result<String, _>>()
                .map(Some),
            _ => Err(bad()),
        }
    }
}
