//! llama-server's `/infill`: code completion between a prefix and a suffix, with other files'
//! text as extra context, in llama.cpp's own request and response shapes (native.rs), as
//! editor plugins (llama.vim, llama.vscode) call it. The prompt is the model's
//! fill-in-the-middle layout ([`crate::model::fim`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use super::error::ApiError;
use super::generate::{run, Input};
use super::handlers::{accept, fim_of};
use super::llama_sampling::to_sampling;
use super::native::{line_limits, n_probs, native_meta, native_output, NativeCtx};
use super::{AppState, RequestId};
use crate::gateway::Principal;
use crate::model::fim::fit_fill;

#[derive(Debug, Deserialize)]
pub struct InfillRequest {
    pub model: Option<String>,
    pub input_prefix: String,
    pub input_suffix: String,
    /// Other files' text: `[{"filename": ..., "text": ...}]`, oldest first.
    #[serde(default)]
    pub input_extra: Vec<ExtraChunk>,
    /// The text typed so far on the current line: it continues the prefix.
    #[serde(default)]
    pub prompt: String,
    /// Lines after the first must be indented at least this much, or the reply ends there
    /// (0 or less: no limit).
    pub n_indent: Option<i64>,
    /// Once this long has passed since the first token, the reply ends at its next newline
    /// (0 or less: no limit).
    pub t_max_predict_ms: Option<i64>,
    /// Only these fields of the reply (`timings/prompt_n` reads into objects), under
    /// those names.
    #[serde(default)]
    pub response_fields: Vec<String>,
    /// Each token's logprob and those of the `n_probs` most likely, as `/completion`'s.
    pub n_probs: Option<i64>,
    pub post_sampling_probs: Option<bool>,
    /// Not taken here (refused when set, rather than ignored).
    pub grammar: Option<String>,
    pub json_schema: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct ExtraChunk {
    #[serde(default = "default_filename")]
    pub filename: String,
    pub text: String,
}

fn default_filename() -> String {
    "tmp".into()
}

pub async fn infill(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let state = &state;
    let (ready, mut req, sampling, gate) = accept(
        state,
        &rid,
        who,
        &headers,
        "/infill",
        body,
        |v| to_sampling(v, "/infill"),
        // Editor plugins send an empty name (llama-server serves one model and ignores it).
        |r: &InfillRequest| r.model.as_deref().filter(|m| !m.is_empty()),
    )?;
    fim_of(&ready, "input_suffix")?;
    if req.grammar.as_ref().is_some_and(|g| !g.is_empty()) || req.json_schema.is_some() {
        let field = if req.json_schema.is_some() {
            "json_schema"
        } else {
            "grammar"
        };
        return Err(ApiError::invalid(
            field,
            format!("`{field}` is not taken by /infill: use /completion"),
        ));
    }
    let probs = n_probs(req.n_probs)?;
    let lines = line_limits(req.n_indent, req.t_max_predict_ms);
    let fields = std::mem::take(&mut req.response_fields);
    let requested = sampling.max_tokens(true)?;
    let limit = ready.context_length.min(ready.engine.kv_capacity);
    let r = ready.clone();
    let (prompt, truncated) = tokio::task::spawn_blocking(move || {
        let tok = &r.tokenizer;
        let fim = tok.fim.as_ref().expect("checked");
        // As llama.cpp: code is text (control-token spellings in it stay text); the line
        // typed so far continues the prefix, tokenized apart (and as a prompt).
        let mut prefix = tok.encode_plain(&req.input_prefix)?;
        prefix.extend(tok.encode(&req.prompt, false)?);
        let mut suffix = fim.suffix_tokens(tok, &req.input_suffix)?;
        let chunks: Vec<(String, String)> = req
            .input_extra
            .into_iter()
            .map(|c| (c.filename, c.text))
            .collect();
        let context = fim.context(tok, &chunks)?;
        // Other files' chunks first: the newest whole ones in half the context, whatever
        // this request's size (so an editor's warm-up with `n_predict: 0` and the request
        // after it keep the same ones and the prefix cache serves them). The fill gets what
        // they leave beside the completion (`n_predict`, a quarter of the context without
        // one), its prefix's start and its suffix's end cut first if it must be (3:1). When
        // the completion leaves the fill nothing, the chunks get half of what it leaves; a
        // completion that leaves no room for the layout's own tokens is refused with the
        // prompt as sent.
        // (An `n_predict` past three quarters of the context reserves that much: the fill
        // keeps a quarter, and the reply writes to the context's end, as llama-server's.)
        let reserve = requested.unwrap_or(limit / 4).min(limit / 4 * 3);
        // The layout's tokens and the context's own (its head and tail) always go in.
        let frame = context.head.len() + context.tail.len();
        let layout = fim.prompt(tok, &[], &[], &[]).len() + frame;
        let free = limit.saturating_sub(reserve.saturating_add(layout));
        let (mut chosen, mut left_out) = context.fit(limit / 2 + frame);
        if free <= chosen.len() - frame {
            (chosen, left_out) = context.fit(free / 2 + frame);
        }
        let room = free.saturating_sub(chosen.len() - frame);
        let cut = room > 0 && fit_fill(&mut prefix, &mut suffix, room);
        let context = chosen;
        let prompt = fim.prompt(tok, &context, &prefix, &suffix);
        Ok::<_, crate::error::ModelError>((prompt, cut || left_out > 0))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let ctx = NativeCtx {
        started: gate.arrived,
        prompt_tokens: prompt.len(),
        truncated,
        fields,
        probs,
        post: req.post_sampling_probs == Some(true),
    };
    let meta = native_meta(&gate.served.name, &rid, "infill", ctx);
    let out = native_output(lines, Vec::new(), probs);
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
