//! llama-server's own shapes (its native endpoints, not the OpenAI-compatible ones): the
//! sampling names they take, the reply object (`content`, `stop_type`, `tokens_predicted`,
//! `timings`, ...) whole and streamed, and `POST /completion`. `/infill` (infill.rs) answers
//! in them too. Every reply is rendered from the same engine events as every surface.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::Event as SseEvent;
use axum::response::Response;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::gate::Tail;
use super::generate::{run, Input, Output};
use super::handlers::{accept, unix_now};
use super::llama_sampling::to_sampling;
use super::response::{Meta, Surface};
use super::{AppState, RequestId};
use crate::engine::lines::LineLimits;
use crate::engine::request::{
    Event, EventReceiver, FinishReason, LogprobInfo, TokenLogprob, Usage,
};
use crate::gateway::Principal;
use crate::structured::{ConstraintSpec, OutputFormat, ToolChoice};

/// llama.cpp's `n_indent` and `t_max_predict_ms` (0 or less, or absent: no limit).
pub(super) fn line_limits(n_indent: Option<i64>, t_max_predict_ms: Option<i64>) -> LineLimits {
    let positive = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).filter(|&v| v > 0);
    LineLimits {
        n_indent: positive(n_indent).map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
        t_max: positive(t_max_predict_ms).map(Duration::from_millis),
    }
}

/// `POST /completion`'s fields besides sampling.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    /// Read by [`native_prompt`]: a string or token ids.
    pub prompt: Value,
    pub n_indent: Option<i64>,
    pub t_max_predict_ms: Option<i64>,
    #[serde(default)]
    pub response_fields: Vec<String>,
    /// Each token's logprob and those of the `n_probs` most likely (`logprobs` is its alias).
    pub n_probs: Option<i64>,
    /// Probabilities after the sampling chain (refused: the model's own are given).
    pub post_sampling_probs: Option<bool>,
    /// A GBNF grammar the reply follows (`""`: none).
    pub grammar: Option<String>,
    /// A grammar applied from a trigger on (refused).
    pub grammar_lazy: Option<bool>,
    /// JSON valid against this schema.
    pub json_schema: Option<Value>,
}

/// A prompt as text (control-token spellings are the tokens, BOS added if the model asks)
/// or token ids (taken as given).
#[derive(Debug)]
pub enum NativePrompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt` as one of the forms taken, or the error that says which are.
fn native_prompt(v: Value) -> Result<NativePrompt, ApiError> {
    match v {
        Value::String(s) => Ok(NativePrompt::Text(s)),
        Value::Array(a) => a
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()
            .map(NativePrompt::Ids)
            .ok_or(()),
        _ => Err(()),
    }
    .map_err(|()| {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string or an array of token ids (mixed arrays, several prompts and `prompt_string` objects are not supported)",
        )
    })
}

/// llama-server's `POST /completion`: a raw prompt continued, in llama.cpp's shapes, with
/// its sampling names, `n_indent`, `t_max_predict_ms`, `response_fields` and `json_schema`.
pub async fn completion(
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
        "/completion",
        body,
        |v| to_sampling(v, "/completion"),
        |r: &CompletionRequest| r.model.as_deref().filter(|m| !m.is_empty()),
    )?;
    let probs = n_probs(req.n_probs)?;
    super::formats::lazy_refused(req.grammar_lazy)?;
    let grammar = req.grammar.take().filter(|g| !g.is_empty());
    let schema = req.json_schema.take().filter(|s| !s.is_null());
    if grammar.is_some() && schema.is_some() {
        return Err(ApiError::invalid(
            "grammar",
            "`grammar` and `json_schema` cannot both shape the reply: send one",
        ));
    }
    let lines = line_limits(req.n_indent, req.t_max_predict_ms);
    let fields = std::mem::take(&mut req.response_fields);
    let prompt = native_prompt(std::mem::take(&mut req.prompt))?;
    // llama.cpp reads `{}` as any object.
    let format = schema
        .map(|s| match s.as_object() {
            Some(o) if o.is_empty() => json!({"type": "object"}),
            _ => s,
        })
        .map(|schema| OutputFormat::JsonSchema {
            schema,
            strict: false,
        })
        .or(grammar.map(OutputFormat::Gbnf));
    let r = ready.clone();
    let (prompt, constraints) = tokio::task::spawn_blocking(move || {
        let prompt = match prompt {
            NativePrompt::Text(text) => r
                .tokenizer
                .encode(&text, true)
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
            NativePrompt::Ids(ids) => ids,
        };
        let mut constraints = Vec::new();
        if let Some(format) = format {
            let spec = ConstraintSpec {
                format,
                tools: Vec::new(),
                choice: ToolChoice::None,
                parallel: false,
                tool_format: r.tool_format,
                think: None,
                format_field: None,
            };
            // Its errors name the field as the chat API has it.
            let named = |e: crate::structured::StructuredError| {
                let mut e = ApiError::from(e);
                e.param = e
                    .param
                    .map(|p| p.replace("response_format.json_schema", "json_schema"));
                e
            };
            constraints.extend(r.grammars.constraint(&spec).map_err(named)?);
        }
        Ok::<_, ApiError>((prompt, constraints))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))??;
    let ctx = NativeCtx {
        started: gate.arrived,
        prompt_tokens: prompt.len(),
        truncated: false,
        fields,
        probs,
        post: req.post_sampling_probs == Some(true),
    };
    let meta = native_meta(&gate.served.name, &rid, "cmpl", ctx);
    let out = native_output(lines, constraints, probs);
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

/// The envelope of a reply in llama.cpp's shapes.
pub(super) fn native_meta(model: &str, rid: &RequestId, kind: &str, ctx: NativeCtx) -> Meta {
    Meta {
        id: format!("{kind}-{}", rid.0),
        created: unix_now(),
        model: model.to_string(),
        chat: false,
        logprobs: false,
        tools: None,
        reasoning: None,
        surface: Surface::LlamaCpp(Arc::new(ctx)),
        pick: None,
    }
}

/// The most alternatives `n_probs` may ask for (as the chat API's `top_logprobs`: each is
/// decoded on the engine thread at every step).
const MAX_PROBS: i64 = 20;

/// llama.cpp's `n_probs` (0 or less: none) as the alternatives each token's entry lists,
/// `None` when no probabilities are asked for.
pub(super) fn n_probs(n: Option<i64>) -> Result<Option<usize>, ApiError> {
    match n {
        Some(n) if n > MAX_PROBS => Err(ApiError::invalid(
            "n_probs",
            format!("`n_probs` must be at most {MAX_PROBS}, got {n}"),
        )),
        Some(n) if n > 0 => Ok(Some(n as usize)),
        _ => Ok(None),
    }
}

/// One choice of text; `n_predict: 0` computes the prompt alone (editors warm the cache
/// with it); `probs`: each token's logprob with that many alternatives.
pub(super) fn native_output(
    lines: LineLimits,
    constraints: Vec<Box<dyn crate::engine::constraint::TokenConstraint>>,
    probs: Option<usize>,
) -> Output {
    Output {
        logprobs: probs.is_some(),
        top_logprobs: probs.unwrap_or(0),
        prompt_logprobs: false,
        echo: true,
        constraints,
        best_of: None,
        lines,
        calls_only: false,
        stops_end: None,
    }
}

/// What a reply in llama.cpp's shapes needs besides the engine's events.
#[derive(Debug)]
pub struct NativeCtx {
    /// When the request was read (its prompt's time counts from there).
    pub started: Instant,
    /// The prompt's size (streamed pieces carry it before the usage comes).
    pub prompt_tokens: usize,
    /// The prompt was cut to fit (`/infill`: its prefix or suffix, or extra context chunks).
    pub truncated: bool,
    pub fields: Vec<String>,
    /// `n_probs`: `completion_probabilities` with each token.
    pub probs: Option<usize>,
    /// `post_sampling_probs`: they are probabilities after llama.cpp's chain (`prob`,
    /// `top_probs`), not the model's logprobs.
    pub post: bool,
}

/// How a reply ended: the engine's reason, the stop string, the usage.
pub type End = (FinishReason, Option<String>, Usage);

/// A token's entry in `completion_probabilities`, as llama.cpp writes it (`post`: the
/// probabilities after its chain, as `prob` and `top_probs`).
fn prob_entry(info: &LogprobInfo, post: bool) -> Value {
    let entry = |t: &TokenLogprob| {
        let mut v = json!({"id": t.id, "token": t.token, "bytes": t.bytes});
        match post {
            true => v["prob"] = json!(t.logprob.exp()),
            false => v["logprob"] = json!(t.logprob),
        }
        v
    };
    let mut v = entry(&info.chosen);
    let top = if post { "top_probs" } else { "top_logprobs" };
    v[top] = info.top_logprobs.iter().map(entry).collect();
    v
}

/// A reply as it is gathered.
#[derive(Default)]
struct Fill {
    content: String,
    /// With `n_probs`: each token's entry.
    probs: Vec<Value>,
    /// When the engine made the first and the last token.
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Fill {
    fn token(&mut self, text: &str, at: Instant) {
        self.first.get_or_insert(at);
        self.last = Some(at);
        self.content.push_str(text);
    }

    /// llama.cpp's final object; `whole`: the reply's, not a stream's last piece.
    fn value(&self, meta: &Meta, ctx: &NativeCtx, content: &str, end: &End, whole: bool) -> Value {
        let (reason, stop, usage) = end;
        let (stop_type, word) = match (reason, stop) {
            (FinishReason::Stop, Some(w)) => ("word", w.clone()),
            (FinishReason::Stop, None) => ("eos", String::new()),
            (_, _) => ("limit", String::new()),
        };
        let (prompt, predicted) = (usage.prompt_tokens, usage.completion_tokens);
        let computed = prompt.saturating_sub(usage.cached_tokens);
        let now = Instant::now();
        let first = self.first.unwrap_or(now);
        let last = self.last.unwrap_or(first);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let prompt_ms = ms(first.saturating_duration_since(ctx.started));
        let predicted_ms = ms(last.saturating_duration_since(first));
        // Per token and per second (llama.cpp's; 0 where nothing was timed).
        let per = |n: usize, t: f64| match (n, t > 0.0) {
            (0, _) | (_, false) => (0.0, 0.0),
            (n, true) => (t / n as f64, n as f64 * 1e3 / t),
        };
        let timings = json!({
            "cache_n": usage.cached_tokens,
            "prompt_n": computed, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": per(computed, prompt_ms).0,
            "prompt_per_second": per(computed, prompt_ms).1,
            "predicted_n": predicted, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": per(predicted, predicted_ms).0,
            "predicted_per_second": per(predicted, predicted_ms).1,
        });
        let mut all = json!({
            "index": 0, "content": content, "tokens": [], "id_slot": -1, "stop": true,
            "model": meta.model, "tokens_predicted": predicted, "tokens_evaluated": prompt,
            "has_new_line": self.content.contains('\n'), "truncated": ctx.truncated,
            "stop_type": stop_type, "stopping_word": word,
            "tokens_cached": prompt + predicted, "timings": timings,
        });
        // Whole: the tokens of the content (a stop string's are left out, as llama.cpp
        // leaves them); streamed, the pieces carried them.
        if ctx.probs.is_some() && whole && !self.probs.is_empty() {
            let mut at = 0;
            let kept: Vec<Value> = self
                .probs
                .iter()
                .take_while(|p| {
                    let start = at;
                    at += p["bytes"].as_array().map_or(0, Vec::len);
                    stop_type != "word" || start < content.len()
                })
                .cloned()
                .collect();
            if !kept.is_empty() {
                all["completion_probabilities"] = Value::Array(kept);
            }
        }
        pick_fields(all, &ctx.fields)
    }
}

/// llama.cpp's `response_fields`: each path (`timings/prompt_n`) that exists, under its
/// own name; none asked: everything.
pub(super) fn pick_fields(all: Value, fields: &[String]) -> Value {
    if fields.is_empty() {
        return all;
    }
    let mut out = serde_json::Map::new();
    for f in fields {
        if let Some(v) = f.split('/').try_fold(&all, |v, k| v.get(k)) {
            out.insert(f.clone(), v.clone());
        }
    }
    Value::Object(out)
}

/// The whole reply, from what the shared path gathered: its text, how it ended, and when
/// the engine made its first and last token.
pub fn whole(
    meta: &Meta,
    ctx: &NativeCtx,
    content: String,
    lps: &[LogprobInfo],
    end: End,
    made: (Option<Instant>, Option<Instant>),
) -> Value {
    let fill = Fill {
        content,
        probs: lps.iter().map(|l| prob_entry(l, ctx.post)).collect(),
        first: made.0,
        last: made.1,
    };
    fill.value(meta, ctx, &fill.content, &end, true)
}

/// The streamed reply: one object per piece of text, then the final object (its `content`
/// empty), as llama.cpp streams its own endpoints (no `[DONE]`).
pub fn sse(
    rx: EventReceiver,
    meta: Meta,
    ctx: Arc<NativeCtx>,
    tail: Tail,
    keep_alive: Duration,
) -> Response {
    let state = Streamed {
        rx: Some(rx),
        fill: Fill::default(),
        tokens: 0,
        meta,
        ctx,
        tail,
        pending: VecDeque::new(),
    };
    super::stream::sse_of(events(state), keep_alive)
}

struct Streamed {
    /// `None` once the reply has ended.
    rx: Option<EventReceiver>,
    fill: Fill,
    /// Pieces so far (the final object counts the engine's tokens).
    tokens: usize,
    meta: Meta,
    ctx: Arc<NativeCtx>,
    tail: Tail,
    pending: VecDeque<Value>,
}

impl Streamed {
    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Token { text, at, logprob }) => {
                let probs = logprob.as_ref().filter(|_| self.ctx.probs.is_some());
                self.fill.token(&text, at);
                self.tokens += 1;
                if !text.is_empty() || probs.is_some() {
                    let mut piece = json!({
                        "index": 0, "content": text, "tokens": [], "stop": false,
                        "id_slot": -1, "tokens_predicted": self.tokens,
                        "tokens_evaluated": self.ctx.prompt_tokens});
                    if let Some(info) = probs {
                        let entry = prob_entry(info, self.ctx.post);
                        piece["completion_probabilities"] = json!([entry]);
                    }
                    self.pending.push_back(piece);
                }
            }
            Some(Event::Finished {
                reason,
                usage,
                stop_sequence,
                ..
            }) => {
                self.rx = None;
                let end = (reason, stop_sequence, usage);
                let v = self.fill.value(&self.meta, &self.ctx, "", &end, false);
                self.pending.push_back(v);
            }
            Some(Event::Failed(f)) => {
                self.rx = None;
                self.pending.push_back(ApiError::engine(f).body());
            }
            Some(Event::Prompt { .. } | Event::Embedding(_)) => {}
            None => {
                self.rx = None;
                self.pending.push_back(ApiError::engine_stopped().body());
            }
        }
    }
}

fn events(state: Streamed) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(v) = s.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(v.to_string())), s));
            }
            let ev = s.rx.as_mut()?.recv().await;
            if let Some(ev) = &ev {
                s.tail.observe(ev).await;
            }
            s.on_event(ev);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_fields_read_into_objects_under_their_paths() {
        let all = json!({"content": "x", "timings": {"prompt_n": 3}, "stop": true});
        let fields = ["content", "timings/prompt_n", "timings/nope", "missing"].map(String::from);
        assert_eq!(
            pick_fields(all.clone(), &fields),
            json!({"content": "x", "timings/prompt_n": 3})
        );
        assert_eq!(pick_fields(all.clone(), &[]), all);
    }
}
