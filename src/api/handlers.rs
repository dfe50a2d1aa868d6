//! Route handlers: parse and validate, render and tokenize off the async threads, submit to
//! the engine, answer whole or streamed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::Value;

use super::error::ApiError;
use super::generate::{calls_open, per_prompt, run, Input, Output};
use super::response::{Meta, Reasoning, Surface};
use super::responses::ResponsesCtx;
use super::truncation::{render_fitting, Fit};
use super::types::{
    output_format, ChatCompletionRequest, CompletionRequest, PromptField, MAX_CHOICES,
};
use super::{AppState, Ready, RequestId};
use crate::gateway::Principal;
use crate::structured::reasoning::Shown;
use crate::structured::{ConstraintSpec, OutputFormat, ToolChoice};

#[path = "intake.rs"]
mod intake;
use intake::accept_with;
pub(super) use intake::{accept, body_or_error, check_model, ledger_terms, may_use, Served};

#[path = "render.rs"]
mod render;
use render::refuse_shaped_continuation;
pub(super) use render::{render, render_text};

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    chat(&state, rid, who, &headers, body, Api::OpenAi).await
}

/// The API a request came in through: how its body translates into the shared request, and
/// the route it is ledgered under.
pub(super) enum Api {
    OpenAi,
    Anthropic,
    /// Workers AI's `ai/run`, for the served model or one of its aliases.
    Workers {
        model: String,
    },
    /// OpenAI's Responses API, with the conversation so far.
    Responses(Arc<ResponsesCtx>),
    /// Mistral's fill-in-the-middle API (`/v1/fim/completions`): a completion's prompt and
    /// suffix, answered as a chat completion.
    MistralFim,
}

impl Api {
    fn translate(&self, v: Value) -> Result<Value, ApiError> {
        match self {
            Api::OpenAi => Ok(v),
            Api::Anthropic => super::anthropic::to_chat_request(v, false),
            Api::Workers { model } => super::workers::to_openai(v, model),
            Api::Responses(ctx) => super::responses::to_chat_request(v, &ctx.context),
            Api::MistralFim => mistral_fim_request(v),
        }
    }

    fn route(&self, chat: bool) -> &'static str {
        match (self, chat) {
            (Api::OpenAi, true) => "/v1/chat/completions",
            (Api::OpenAi, false) => "/v1/completions",
            (Api::Anthropic, _) => "/v1/messages",
            (Api::Workers { .. }, _) => "/ai/run",
            (Api::Responses(_), _) => "/v1/responses",
            (Api::MistralFim, _) => "/v1/fim/completions",
        }
    }
}

/// Both chat surfaces: OpenAI's chat completions and Anthropic's messages (by `route`).
pub(super) async fn chat(
    state: &AppState,
    rid: RequestId,
    who: Principal,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, ApiError> {
    let anthropic = matches!(api, Api::Anthropic);
    let checking = matches!(&api, Api::Responses(ctx) if ctx.check_only);
    let (ready, req, sampling, gate) = accept_with(
        state,
        &rid,
        who,
        headers,
        (api.route(true), !checking),
        body,
        |v| api.translate(v),
        |r: &ChatCompletionRequest| r.model.as_deref(),
    )?;
    let mut messages = req.validated_messages()?;
    let continues = req.continues(&mut messages)?;
    let kwargs = req.template_kwargs()?;
    let spec = req.constraint_spec(ready.tool_format)?;
    let tools = req.tools_json();
    let top = req.top_logprobs.unwrap_or(0);
    if top > 0 && !req.logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` requires `logprobs: true`",
        ));
    }
    if top > 20 {
        return Err(ApiError::invalid(
            "top_logprobs",
            format!("`top_logprobs` must be at most 20, got {top}"),
        ));
    }
    // Where a reasoning model's thinking goes. Workers AI's own shape has no place for it;
    // Anthropic's shows it only when the request enabled thinking (which sets the format).
    let shown = match req.reasoning_format.as_deref() {
        None if matches!(api, Api::Workers { .. }) => Shown::Inline,
        None if anthropic => Shown::Dropped,
        None if ready.split_reasoning => Shown::Apart,
        None | Some("none") => Shown::Inline,
        Some("auto" | "deepseek") => Shown::Apart,
        Some(other) => {
            return Err(ApiError::invalid(
                "reasoning_format",
                format!("`reasoning_format` must be `auto`, `deepseek` or `none`, got `{other}`"),
            ))
        }
    };
    // Regex and Lark grammars constrain the whole reply from its first token: no reasoning
    // is open when it starts, whatever the prompt opened.
    let starts_at_once = spec.format.starts_at_once();
    let effort = match req.reasoning_effort.as_deref() {
        None | Some("minimal" | "low" | "medium" | "high" | "xhigh") => None,
        Some("none") => Some(0),
        Some(other) => {
            return Err(ApiError::invalid(
                "reasoning_effort",
                format!(
                    "`reasoning_effort` must be none, minimal, low, medium, high or xhigh, got `{other}`"
                ),
            ))
        }
    };
    let budget = match req.reasoning_budget {
        None => effort,
        Some(-1) => None,
        Some(n) if n >= 0 => Some(n as u64),
        Some(other) => {
            return Err(ApiError::invalid(
                "reasoning_budget",
                format!(
                    "`reasoning_budget` must be -1 (no limit) or a number of tokens, got {other}"
                ),
            ))
        }
    };
    if continues {
        refuse_shaped_continuation(&spec, budget, anthropic)?;
    }
    let r = ready.clone();
    let tools_active = spec.calls_tools();
    let calls_only = tools_active && !matches!(spec.choice, ToolChoice::Auto);
    // Render, tokenize and compile the grammar off the async threads; a grammar error is
    // the client's (400 naming the field), before anything is queued.
    let n = sampling.n()?;
    let fit = match &api {
        Api::Responses(ctx) if ctx.truncate => Some(Fit {
            limit: ready.context_length.min(ready.engine.kv_capacity),
            max_tokens: sampling.max_tokens(false)?,
        }),
        _ => None,
    };
    let (prompt, opened, constraints) = tokio::task::spawn_blocking(move || {
        let (prompt, opened) = render_fitting(&r, messages, tools, &kwargs, continues, fit)?;
        // A reasoning model thinks (within its budget) before a constrained answer.
        let mut spec = spec;
        spec.think = r.reasoner.map(|x| x.spec(opened, budget));
        // One grammar state for each choice (compiled once: the compiler caches).
        let mut constraints = Vec::new();
        for _ in 0..n {
            constraints.extend(r.grammars.constraint(&spec)?);
        }
        Ok::<_, ApiError>((prompt, opened, constraints))
    })
    .await
    .map_err(|e| ApiError::internal(format!("templating failed: {e}")))??;
    let meta = Meta {
        id: if anthropic {
            format!("msg_{}", rid.0)
        } else {
            format!("chatcmpl-{}", rid.0)
        },
        created: unix_now(),
        model: gate.served.name.clone(),
        chat: true,
        logprobs: req.logprobs,
        tools: tools_active.then_some(ready.tool_format),
        // Where its thinking goes is `shown`, above.
        reasoning: ready.reasoner.map(|x| Reasoning {
            syntax: x.syntax,
            opened: opened && !starts_at_once,
            shown,
        }),
        surface: match api {
            Api::OpenAi => Surface::OpenAi,
            Api::Anthropic => Surface::Anthropic {
                prompt_tokens: prompt.len(),
            },
            Api::Workers { .. } => Surface::Workers {
                json: req
                    .response_format
                    .as_ref()
                    .is_some_and(|f| f.kind == "json_object" || f.kind == "json_schema"),
            },
            Api::Responses(ctx) => Surface::Responses(ctx.clone()),
            Api::MistralFim => Surface::OpenAi,
        },
        pick: None,
    };
    let out = Output {
        logprobs: req.logprobs,
        top_logprobs: top as usize,
        prompt_logprobs: false,
        echo: false,
        constraints,
        best_of: None,
        lines: Default::default(),
        calls_only,
        stops_end: (tools_active && !calls_only)
            .then(|| calls_open(ready.tool_format, &meta.reasoning)),
    };
    let input = Input { prompt, echo: None };
    run(
        state,
        &ready,
        vec![input],
        &sampling,
        out,
        meta,
        &rid.0,
        gate,
    )
    .await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    completion(&state, rid, who, &headers, body, Api::OpenAi).await
}

/// Mistral's `POST /v1/fim/completions` (Codestral's API): `prompt` and `suffix` filled in
/// the middle, answered in the chat completions' shapes.
pub async fn mistral_fim(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    completion(&state, rid, who, &headers, body, Api::MistralFim).await
}

/// Mistral's names as the completions API's: `random_seed` is `seed`, the suffix is `""`
/// when absent (the prompt is still filled as a prefix); `min_tokens` is refused, and so are
/// the completions API's fields Mistral's API does not have.
fn mistral_fim_request(mut v: Value) -> Result<Value, ApiError> {
    let o = v.as_object_mut().expect("parse_body returns objects");
    for field in ["echo", "best_of", "logprobs", "n"] {
        if o.contains_key(field) {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` is not a field of Mistral's fill-in-the-middle API"),
            ));
        }
    }
    if o.get("min_tokens")
        .is_some_and(|m| m.as_u64() != Some(0) && !m.is_null())
    {
        return Err(ApiError::invalid(
            "min_tokens",
            "`min_tokens` is not supported",
        ));
    }
    o.remove("min_tokens");
    if let Some(seed) = o.remove("random_seed") {
        o.insert("seed".into(), seed);
    }
    if o.get("suffix").is_none_or(Value::is_null) {
        o.insert("suffix".into(), Value::String(String::new()));
    }
    Ok(v)
}

/// OpenAI's legacy completions API writes 16 tokens when `max_tokens` is not given (vLLM's
/// does too), not the rest of the context as chat does.
fn default_completion_length(api: &Api, mut v: Value) -> Value {
    if let (Api::OpenAi, Some(o)) = (api, v.as_object_mut()) {
        if !o.contains_key("max_tokens") && !o.contains_key("max_completion_tokens") {
            o.insert("max_tokens".into(), Value::from(16));
        }
    }
    v
}

pub(super) async fn completion(
    state: &AppState,
    rid: RequestId,
    who: Principal,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, ApiError> {
    let (ready, req, sampling, gate) = accept(
        state,
        &rid,
        who,
        headers,
        api.route(false),
        body,
        |v| api.translate(v).map(|v| default_completion_length(&api, v)),
        |r: &CompletionRequest| r.model.as_deref(),
    )?;
    let (format, format_field) = output_format(
        req.response_format.as_ref(),
        req.grammar.as_deref(),
        &req.guided(),
    )?;
    // Each prompt: its text (`Ok`) or its token ids (`Err`); an empty list is one empty
    // prompt (refused in `run`).
    let prompts: Vec<Result<String, Vec<u32>>> = match req.prompt {
        PromptField::Text(t) => vec![Ok(t)],
        PromptField::Ids(ids) => vec![Err(ids)],
        PromptField::Many(v) if v.is_empty() => vec![Err(Vec::new())],
        PromptField::Many(v) => v.into_iter().map(Ok).collect(),
        PromptField::ManyIds(v) => v.into_iter().map(Err).collect(),
    };
    if prompts.len() as u64 > MAX_CHOICES {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "at most {MAX_CHOICES} prompts a request, got {}",
                prompts.len()
            ),
        ));
    }
    let suffix = req.suffix;
    if suffix.is_some() {
        fim_of(&ready, "suffix")?;
        if req.echo == Some(true) {
            return Err(ApiError::invalid(
                "echo",
                "`echo` cannot be used with `suffix`",
            ));
        }
    }
    let top = req.logprobs.unwrap_or(0);
    if top > 5 {
        return Err(ApiError::invalid(
            "logprobs",
            format!("`logprobs` must be at most 5, got {top}"),
        ));
    }
    let echo = req.echo == Some(true);
    // A grammar's state for each choice (compiled once: the compiler caches); past the
    // most choices a request may run, `run` refuses it.
    let runs = prompts.len() * per_prompt(req.best_of, sampling.n()?, sampling.stream)?;
    let spec =
        (format != OutputFormat::Text && runs as u64 <= MAX_CHOICES).then(|| ConstraintSpec {
            format,
            format_field,
            ..ConstraintSpec::text()
        });
    // Token ids are taken as given (checked against the vocabulary in `run`); echoed, they
    // come back as their text, control tokens included.
    let r = ready.clone();
    let (inputs, constraints) = tokio::task::spawn_blocking(move || {
        // With a suffix, each prompt is the prefix of a fill in the middle; code is text
        // (a control token's spelling in it stays text), token ids are taken as given.
        let fill = match (&suffix, &r.tokenizer.fim) {
            (Some(s), Some(fim)) => {
                let suffix = fim
                    .suffix_tokens(&r.tokenizer, s)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                Some((fim, suffix))
            }
            _ => None,
        };
        let input = |prompt: Result<String, Vec<u32>>| match prompt {
            prompt if fill.is_some() => {
                let (fim, suffix) = fill.as_ref().expect("checked");
                let prefix = match prompt {
                    Ok(text) => r.tokenizer.encode_plain(&text)?,
                    Err(ids) => ids,
                };
                Ok(Input {
                    prompt: fim.prompt(&r.tokenizer, &[], &prefix, suffix),
                    echo: None,
                })
            }
            Err(ids) if echo => {
                let ids_ok = ids.iter().all(|&t| (t as usize) < r.vocab_size);
                let text = ids_ok.then(|| r.tokenizer.decode_with_control(&ids).ok());
                let echo = Some(text.flatten().unwrap_or_default());
                Ok(Input { prompt: ids, echo })
            }
            Err(ids) => Ok(Input {
                prompt: ids,
                echo: None,
            }),
            Ok(text) => Ok(Input {
                prompt: r.tokenizer.encode(&text, true)?,
                echo: echo.then_some(text),
            }),
        };
        let inputs = prompts
            .into_iter()
            .map(input)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e: crate::error::ModelError| ApiError::bad_request(e.to_string()))?;
        let mut constraints = Vec::new();
        for _ in 0..spec.as_ref().map_or(0, |_| runs) {
            constraints.extend(r.grammars.constraint(spec.as_ref().expect("checked"))?);
        }
        Ok::<_, ApiError>((inputs, constraints))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))??;
    let meta = Meta {
        id: format!("cmpl-{}", rid.0),
        created: unix_now(),
        model: gate.served.name.clone(),
        chat: matches!(api, Api::MistralFim),
        logprobs: req.logprobs.is_some(),
        tools: None,
        reasoning: None,
        surface: match api {
            Api::Workers { .. } => Surface::Workers { json: false },
            _ => Surface::OpenAi,
        },
        pick: None,
    };
    let out = Output {
        logprobs: req.logprobs.is_some(),
        top_logprobs: top as usize,
        prompt_logprobs: echo && req.logprobs.is_some(),
        echo,
        constraints,
        best_of: req.best_of,
        lines: Default::default(),
        calls_only: false,
        stops_end: None,
    };
    run(state, &ready, inputs, &sampling, out, meta, &rid.0, gate).await
}

/// The model's fill-in-the-middle tokens, or the error for a fill it cannot do.
pub(super) fn fim_of<'a>(
    ready: &'a Ready,
    field: &str,
) -> Result<&'a crate::model::fim::Fim, ApiError> {
    ready.tokenizer.fim.as_ref().ok_or_else(|| {
        ApiError::invalid(
            field,
            "this model cannot fill in the middle: its vocabulary has no fill-in-the-middle tokens (code models such as CodeLlama, DeepSeek-Coder or Codestral have them)",
        )
    })
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
