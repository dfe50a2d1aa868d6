//! llama-server's `/infill`: code completion between a prefix and a suffix, with other files'
//! text as extra context, in llama.cpp's own request and response shapes, as editor plugins
//! (llama.vim, llama.vscode) call it. The prompt is the model's fill-in-the-middle layout
//! ([`crate::model::fim`]); the reply is rendered from the same engine events as every surface.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::gate::Tail;
use super::generate::{run, Input, Output};
use super::handlers::{accept, fim_of, unix_now};
use super::response::{Deadline, Meta, Surface};
use super::{AppState, RequestId};
use crate::engine::request::{Event, EventReceiver, FinishReason, Usage};
use crate::gateway::Principal;

/// llama.cpp's sampling default for its own endpoints.
const DEFAULT_TEMPERATURE: f64 = 0.8;

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
    /// Lines after the first must be indented at least this much, or the reply ends there.
    #[serde(default)]
    pub n_indent: u64,
    /// Once this long has passed since the first token, the reply ends at its next newline.
    pub t_max_predict_ms: Option<u64>,
    /// Only these fields of the reply (`timings/prompt_n` reads into objects), under
    /// those names.
    #[serde(default)]
    pub response_fields: Vec<String>,
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

/// llama.cpp's sampling names as the OpenAI fields every generation reads: `n_predict` is
/// `max_tokens` (negative: no limit but the context; 0: only the prompt is computed, to warm
/// the prefix cache), `repeat_penalty` is `repetition_penalty`, a `seed` of -1 is none, and
/// `temperature` defaults to llama.cpp's 0.8.
fn to_sampling(mut v: Value) -> Result<Value, ApiError> {
    let o = v.as_object_mut().expect("parse_body returns objects");
    for openai in [
        "max_tokens",
        "max_completion_tokens",
        "n",
        "best_of",
        "logprobs",
    ] {
        if o.contains_key(openai) {
            return Err(ApiError::invalid(
                openai,
                format!("`{openai}` is not a field of /infill (`n_predict` is its token limit)"),
            ));
        }
    }
    match o.remove("n_predict") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_i64().is_some_and(|n| n < 0) => {}
        Some(n) if n.is_u64() => {
            o.insert("max_tokens".into(), n);
        }
        Some(n) => {
            return Err(ApiError::invalid(
                "n_predict",
                format!("`n_predict` must be an integer, got {n}"),
            ))
        }
    }
    if let Some(p) = o.remove("repeat_penalty") {
        o.insert("repetition_penalty".into(), p);
    }
    if o.get("seed").and_then(Value::as_i64) == Some(-1) {
        o.remove("seed");
    }
    o.entry("temperature").or_insert(json!(DEFAULT_TEMPERATURE));
    Ok(v)
}

pub async fn infill(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let state = &state;
    let (ready, req, sampling, gate) = accept(
        state,
        &rid,
        who,
        &headers,
        "/infill",
        body,
        to_sampling,
        |r: &InfillRequest| r.model.as_deref(),
    )?;
    fim_of(&ready, "input_suffix")?;
    let mut req = req;
    let mut ctx = InfillCtx {
        started: Instant::now(),
        truncated: false,
        prompt_tokens: 0,
        n_indent: usize::try_from(req.n_indent).unwrap_or(usize::MAX),
        t_max_predict: req
            .t_max_predict_ms
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis),
        fields: std::mem::take(&mut req.response_fields),
    };
    let requested = sampling.max_tokens(true)?;
    let limit = ready.context_length.min(ready.engine.kv_capacity);
    let r = ready.clone();
    let (prompt, left_out) = tokio::task::spawn_blocking(move || {
        let tok = &r.tokenizer;
        let fim = tok.fim.as_ref().expect("checked");
        // As llama.cpp: the line typed so far continues the prefix, tokenized apart.
        let mut prefix = tok.encode(&req.input_prefix, false)?;
        prefix.extend(tok.encode(&req.prompt, false)?);
        let suffix = tok.encode(&req.input_suffix, false)?;
        let chunks: Vec<(String, String)> = req
            .input_extra
            .into_iter()
            .map(|c| (c.filename, c.text))
            .collect();
        let context = fim.context(tok, &chunks)?;
        // The newest chunks that fit beside the fill and its completion (without
        // `n_predict`, a quarter of the context is kept for it); the fill is never cut.
        let fill = fim.prompt(tok, &[], &prefix, &suffix).len();
        let reserve = requested.unwrap_or(limit / 4);
        let (context, left_out) = context.fit(limit.saturating_sub(fill + reserve));
        Ok::<_, crate::error::ModelError>((fim.prompt(tok, &context, &prefix, &suffix), left_out))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    ctx.truncated = left_out > 0;
    ctx.prompt_tokens = prompt.len();
    let meta = Meta {
        id: format!("infill-{}", rid.0),
        created: unix_now(),
        model: state.model_name.clone(),
        chat: false,
        logprobs: false,
        tools: None,
        reasoning: None,
        surface: Surface::Infill(Arc::new(ctx)),
        pick: None,
    };
    let out = Output {
        logprobs: false,
        top_logprobs: 0,
        prompt_logprobs: false,
        // `n_predict: 0` computes the prompt alone (editors warm the cache with it).
        echo: true,
        constraints: Vec::new(),
        best_of: None,
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

/// What an `/infill` reply needs besides the engine's events.
#[derive(Debug)]
pub struct InfillCtx {
    /// When the request was read (its prompt's time counts from there).
    pub started: Instant,
    /// Extra context chunks were left out to fit.
    pub truncated: bool,
    /// The prompt's size (what a reply cut by a limit reports: no usage comes then).
    pub prompt_tokens: usize,
    pub n_indent: usize,
    pub t_max_predict: Option<Duration>,
    pub fields: Vec<String>,
}

/// llama.cpp's limits on a fill's text, applied as its tokens arrive: a line after the first
/// indented less than `n_indent` ends the reply before its first non-blank character (an
/// empty line too, as llama.cpp counts its newline as one); past `t_max_predict` from the
/// first token, a piece with a newline ends it after that piece.
struct Cut {
    n_indent: usize,
    t_max: Option<Duration>,
    first: Option<Instant>,
    /// In a new line's indentation (after the first newline), and how deep so far.
    indenting: Option<usize>,
    held: String,
}

impl Cut {
    fn new(ctx: &InfillCtx) -> Self {
        Self {
            n_indent: ctx.n_indent,
            t_max: ctx.t_max_predict,
            first: None,
            indenting: None,
            held: String::new(),
        }
    }

    /// The text of one token's piece to show, and whether the reply ends with it.
    fn push(&mut self, piece: &str, now: Instant) -> (String, bool) {
        let first = *self.first.get_or_insert(now);
        let mut out = String::new();
        for c in piece.chars() {
            if let Some(depth) = self.indenting {
                if c == ' ' || c == '\t' {
                    self.held.push(c);
                    self.indenting = Some(depth + 1);
                    continue;
                }
                out.push_str(&std::mem::take(&mut self.held));
                self.indenting = None;
                if depth < self.n_indent {
                    return (out, true);
                }
            }
            out.push(c);
            if c == '\n' && self.n_indent > 0 {
                self.indenting = Some(0);
            }
        }
        let late = self.t_max.is_some_and(|t| now.duration_since(first) > t);
        (out, late && piece.contains('\n'))
    }
}

/// An `/infill` reply as it is gathered.
struct Fill {
    content: String,
    tokens: usize,
    /// When the engine made the first and the last token.
    first: Option<Instant>,
    last: Option<Instant>,
    /// How it ended: the engine's end, or `None` when a limit cut it.
    end: Option<(FinishReason, Option<String>, Usage)>,
}

impl Fill {
    fn new() -> Self {
        Self {
            content: String::new(),
            tokens: 0,
            first: None,
            last: None,
            end: None,
        }
    }

    /// llama.cpp's final object.
    fn value(&self, meta: &Meta, ctx: &InfillCtx, content: &str) -> Value {
        let now = Instant::now();
        let first = self.first.unwrap_or(now);
        let last = self.last.unwrap_or(first);
        let (stop_type, word, usage) = match &self.end {
            Some((FinishReason::Stop, Some(w), u)) => ("word", w.clone(), *u),
            Some((FinishReason::Stop, None, u)) => ("eos", String::new(), *u),
            Some((_, _, u)) => ("limit", String::new(), *u),
            None => ("limit", String::new(), Usage::default()),
        };
        let prompt = if self.end.is_some() {
            usage.prompt_tokens
        } else {
            ctx.prompt_tokens
        };
        let predicted = if self.end.is_some() {
            usage.completion_tokens
        } else {
            self.tokens
        };
        let computed = prompt.saturating_sub(usage.cached_tokens);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let prompt_ms = ms(first.saturating_duration_since(ctx.started));
        let predicted_ms = ms(last.saturating_duration_since(first));
        let per = |n: usize, t: f64| (t / n.max(1) as f64, n as f64 * 1e3 / t.max(1e-9));
        let timings = json!({
            "cache_n": usage.cached_tokens,
            "prompt_n": computed, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": per(computed, prompt_ms).0,
            "prompt_per_second": per(computed, prompt_ms).1,
            "predicted_n": predicted, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": per(predicted, predicted_ms).0,
            "predicted_per_second": per(predicted, predicted_ms).1,
        });
        let all = json!({
            "index": 0, "content": content, "tokens": [], "id_slot": -1, "stop": true,
            "model": meta.model, "tokens_predicted": predicted, "tokens_evaluated": prompt,
            "has_new_line": self.content.contains('\n'), "truncated": ctx.truncated,
            "stop_type": stop_type, "stopping_word": word,
            "tokens_cached": prompt + predicted, "timings": timings,
        });
        pick_fields(all, &ctx.fields)
    }
}

/// llama.cpp's `response_fields`: each path (`timings/prompt_n`) that exists, under its
/// own name; none asked: everything.
fn pick_fields(all: Value, fields: &[String]) -> Value {
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

/// The whole reply.
pub async fn whole(
    mut rx: EventReceiver,
    meta: Meta,
    ctx: Arc<InfillCtx>,
    mut tail: Tail,
    deadline: Deadline,
) -> Result<Response, ApiError> {
    let mut fill = Fill::new();
    let mut cut = Cut::new(&ctx);
    let gather = async {
        while let Some(ev) = rx.recv().await {
            tail.observe(&ev).await;
            match ev {
                Event::Token { text, at, .. } => {
                    fill.first.get_or_insert(at);
                    fill.last = Some(at);
                    fill.tokens += 1;
                    let (shown, stop) = cut.push(&text, at);
                    fill.content.push_str(&shown);
                    if stop {
                        // Dropping the receiver cancels the sequence in the engine.
                        return Ok(());
                    }
                }
                Event::Finished {
                    reason,
                    usage,
                    stop_sequence,
                    ..
                } => {
                    fill.end = Some((reason, stop_sequence, usage));
                    return Ok(());
                }
                Event::Failed(msg) => return Err(ApiError::internal(msg)),
                Event::Prompt { .. } | Event::Embedding(_) => {}
            }
        }
        Err(ApiError::engine_stopped())
    };
    match deadline {
        None => gather.await?,
        Some((at, limit)) => tokio::time::timeout_at(at, gather)
            .await
            .map_err(|_| ApiError::request_timeout(limit))??,
    }
    let v = fill.value(&meta, &ctx, &fill.content);
    Ok(Json(v).into_response())
}

/// The streamed reply: one object per piece of text, then the final object (its `content`
/// empty), as llama.cpp streams its own endpoints (no `[DONE]`).
pub fn sse(
    rx: EventReceiver,
    meta: Meta,
    ctx: Arc<InfillCtx>,
    tail: Tail,
    keep_alive: Duration,
) -> Response {
    let state = Streamed {
        cut: Cut::new(&ctx),
        rx: Some(rx),
        fill: Fill::new(),
        meta,
        ctx,
        tail,
        pending: VecDeque::new(),
    };
    super::stream::sse_of(events(state), keep_alive)
}

struct Streamed {
    /// `None` once the reply has ended (or a limit cut it, which cancels it).
    rx: Option<EventReceiver>,
    cut: Cut,
    fill: Fill,
    meta: Meta,
    ctx: Arc<InfillCtx>,
    tail: Tail,
    pending: VecDeque<Value>,
}

impl Streamed {
    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Token { text, at, .. }) => {
                self.fill.first.get_or_insert(at);
                self.fill.last = Some(at);
                self.fill.tokens += 1;
                let (shown, stop) = self.cut.push(&text, at);
                self.fill.content.push_str(&shown);
                if !shown.is_empty() {
                    self.pending.push_back(json!({
                        "index": 0, "content": shown, "tokens": [], "stop": false,
                        "id_slot": -1, "tokens_predicted": self.fill.tokens,
                        "tokens_evaluated": self.ctx.prompt_tokens}));
                }
                if stop {
                    // The receiver goes: the engine cancels the sequence.
                    self.rx = None;
                    let v = self.fill.value(&self.meta, &self.ctx, "");
                    self.pending.push_back(v);
                }
            }
            Some(Event::Finished {
                reason,
                usage,
                stop_sequence,
                ..
            }) => {
                self.fill.end = Some((reason, stop_sequence, usage));
                self.rx = None;
                let v = self.fill.value(&self.meta, &self.ctx, "");
                self.pending.push_back(v);
            }
            Some(Event::Failed(msg)) => {
                self.rx = None;
                self.pending.push_back(ApiError::internal(msg).body());
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

    fn ctx(n_indent: usize, t_max: Option<u64>) -> InfillCtx {
        InfillCtx {
            started: Instant::now(),
            truncated: false,
            prompt_tokens: 0,
            n_indent,
            t_max_predict: t_max.map(Duration::from_millis),
            fields: Vec::new(),
        }
    }

    /// The text shown of `pieces` fed one by one at `step` apart, and the piece it ended on.
    fn feed(c: &InfillCtx, pieces: &[&str], step: Duration) -> (String, Option<usize>) {
        let mut cut = Cut::new(c);
        let t0 = Instant::now();
        let mut out = String::new();
        for (i, p) in pieces.iter().enumerate() {
            let (shown, stop) = cut.push(p, t0 + step * i as u32);
            out.push_str(&shown);
            if stop {
                return (out, Some(i));
            }
        }
        (out, None)
    }

    #[test]
    fn a_line_indented_less_than_n_indent_ends_the_fill_in_any_split() {
        let text = "x = 1\n    y = 2\n  z = 3\n";
        for at in 0..=text.len() {
            let (a, b) = text.split_at(at);
            let (shown, stop) = feed(&ctx(4, None), &[a, b], Duration::ZERO);
            assert_eq!(shown, "x = 1\n    y = 2\n  ", "split at {at}");
            assert!(stop.is_some());
        }
        // The first line is never checked; deep enough lines pass; 0 checks nothing.
        assert_eq!(
            feed(&ctx(4, None), &["a\n    b\n"], Duration::ZERO),
            ("a\n    b\n".into(), None)
        );
        assert_eq!(
            feed(&ctx(0, None), &["a\nb\n"], Duration::ZERO),
            ("a\nb\n".into(), None)
        );
        // An empty line counts as no indentation, as in llama.cpp.
        assert_eq!(
            feed(&ctx(1, None), &["a\n", "\n b"], Duration::ZERO).0,
            "a\n"
        );
        // Tabs indent.
        assert_eq!(
            feed(&ctx(2, None), &["a\n\t\tb"], Duration::ZERO),
            ("a\n\t\tb".into(), None)
        );
    }

    #[test]
    fn past_the_time_limit_the_next_newline_ends_the_fill() {
        let pieces = ["a", "b\n", "c", "d\n", "e"];
        let (shown, stop) = feed(&ctx(0, Some(100)), &pieces, Duration::from_millis(60));
        // 120 ms at the third piece, which has no newline; the fourth ends it.
        assert_eq!((shown.as_str(), stop), ("ab\ncd\n", Some(3)));
        assert_eq!(feed(&ctx(0, None), &pieces, Duration::from_secs(9)).1, None);
    }

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

    #[test]
    fn llama_cpp_sampling_names_translate() {
        let v = to_sampling(json!({"n_predict": 16, "repeat_penalty": 1.1, "seed": -1})).unwrap();
        assert_eq!(v["max_tokens"], 16);
        assert_eq!(v["repetition_penalty"], 1.1);
        assert!(v.get("seed").is_none() && v.get("n_predict").is_none());
        assert_eq!(v["temperature"], DEFAULT_TEMPERATURE);
        let v = to_sampling(json!({"n_predict": -1, "temperature": 0})).unwrap();
        assert!(v.get("max_tokens").is_none());
        assert_eq!(v["temperature"], 0);
        assert!(to_sampling(json!({"n_predict": "x"})).is_err());
        assert!(to_sampling(json!({"max_tokens": 3})).is_err());
    }
}
