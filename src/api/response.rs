//! OpenAI response shapes: the envelope every chunk and response of one request shares,
//! usage, tool calls, and the whole (non-streamed) answer.

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::choices::Choice;
use super::error::ApiError;
use super::gate::Tail;
use super::text_logprobs::{prompt_items, Item, TextLogprobs};
use crate::engine::request::FinishReason;
use crate::engine::request::{Event, EventReceiver, LogprobInfo, Usage};
use crate::structured::reasoning::{ReplyParser, Shown, ThinkSplitter, ThinkSyntax};
use crate::structured::toolcall::{ParsedCall, Piece};
use crate::structured::ToolFormat;

/// Fields shared by every chunk or response of one request.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub chat: bool,
    pub logprobs: bool,
    /// Set when the reply may hold tool calls: the text is parsed for them in this format.
    pub tools: Option<ToolFormat>,
    /// Set for a reasoning model's chat reply.
    pub reasoning: Option<Reasoning>,
    /// The API shape the answer is rendered in.
    pub surface: Surface,
    /// `best_of`: keep each prompt's best choices of those generated (whole answers only).
    pub pick: Option<Pick>,
}

/// A reasoning model's reply: its markers, whether its reasoning is already open when the
/// reply starts (the prompt opened it and the grammar, if any, begins with it), and where
/// the reasoning goes.
#[derive(Debug, Clone, Copy)]
pub struct Reasoning {
    pub syntax: ThinkSyntax,
    pub opened: bool,
    pub shown: Shown,
}

/// `best_of`: each prompt ran `of` choices; the answer keeps the `keep` whose tokens have
/// the highest mean logprob, best first (OpenAI's "highest log probability per token").
#[derive(Debug, Clone, Copy)]
pub struct Pick {
    pub of: usize,
    pub keep: usize,
}

impl Pick {
    /// Each group of `of` replies (prompt by prompt) cut to its best `keep`, best first; a
    /// tie keeps the order the choices ran in.
    fn best<T>(self, replies: Vec<T>, mean_logprob: impl Fn(&T) -> f64) -> Vec<T> {
        let mut out = Vec::with_capacity(replies.len() / self.of.max(1) * self.keep);
        let mut replies = replies.into_iter().peekable();
        while replies.peek().is_some() {
            let mut group: Vec<(f64, T)> = replies
                .by_ref()
                .take(self.of.max(1))
                .map(|r| (mean_logprob(&r), r))
                .collect();
            group.sort_by(|a, b| b.0.total_cmp(&a.0));
            out.extend(group.into_iter().take(self.keep).map(|(_, r)| r));
        }
        out
    }
}

/// The API shape of an answer: each renders the same engine events.
#[derive(Clone)]
pub enum Surface {
    OpenAi,
    /// Anthropic's Messages API; its stream announces the prompt's size first.
    Anthropic {
        prompt_tokens: usize,
    },
    /// Workers AI's `ai/run`; `json`: the reply was constrained to JSON, which its
    /// `response` then carries as a value.
    Workers {
        json: bool,
    },
    /// OpenAI's Responses API, with what its answer echoes and stores.
    Responses(std::sync::Arc<super::responses::ResponsesCtx>),
    /// llama-server's own shapes (`/completion`, `/infill`).
    LlamaCpp(std::sync::Arc<super::native::NativeCtx>),
}

impl Surface {
    /// The highest `temperature` the surface's API documents.
    pub fn max_temperature(&self) -> f32 {
        match self {
            Surface::OpenAi | Surface::Responses(_) => 2.0,
            Surface::Anthropic { .. } => 1.0,
            // llama.cpp sets none.
            Surface::Workers { .. } | Surface::LlamaCpp(_) => 5.0,
        }
    }

    /// The most stop strings a request may send (OpenAI's 4; llama.cpp and Anthropic set no
    /// limit and chat front-ends send more).
    pub fn max_stops(&self) -> usize {
        match self {
            Surface::LlamaCpp(_) | Surface::Anthropic { .. } => 64,
            _ => 4,
        }
    }
}

/// When a request's reply must have begun (a stream) or be done (a whole reply), and the
/// limit that set it: past it the request is answered 504.
pub type Deadline = Option<(tokio::time::Instant, std::time::Duration)>;

/// The answer to one request in its surface's shape, whole or streamed. Only OpenAI's
/// shapes carry several choices; the other surfaces get one. `deadline` bounds the wait
/// for a whole reply's events (a stream's first event is awaited before).
pub async fn respond(
    choices: Vec<Choice>,
    meta: Meta,
    stream: bool,
    include_usage: bool,
    tail: Tail,
    keep_alive: std::time::Duration,
    deadline: Deadline,
) -> Result<Response, ApiError> {
    if !stream {
        return collect(choices, meta, tail, deadline).await;
    }
    if let Surface::OpenAi = meta.surface {
        let sse = super::stream::sse_response(choices, meta, include_usage, tail, keep_alive);
        return Ok(sse);
    }
    let Some(Choice { rx, .. }) = choices.into_iter().next() else {
        return Err(ApiError::internal(
            "a reply without a choice. This is a bug.",
        ));
    };
    Ok(match meta.surface.clone() {
        Surface::Anthropic { prompt_tokens } => {
            super::anthropic_sse::sse(rx, meta, prompt_tokens, tail, keep_alive)
        }
        Surface::Workers { .. } => super::workers::sse(rx, meta, tail, keep_alive),
        Surface::Responses(ctx) => super::responses_sse::sse(rx, meta, ctx, tail, keep_alive),
        Surface::LlamaCpp(ctx) => super::native::sse(rx, meta, ctx, tail, keep_alive),
        Surface::OpenAi => {
            let choice = Choice::new(rx, None, true);
            super::stream::sse_response(vec![choice], meta, include_usage, tail, keep_alive)
        }
    })
}

/// Adds one choice's usage to a request's. A prompt whose choices share it through the
/// prefix cache counts once (as OpenAI counts `n`): only its first choice `counts_prompt`.
/// Choices that each compute it (scored prompts, the cache off) each count it.
pub fn add_usage(total: &mut Usage, u: Usage, counts_prompt: bool) {
    if counts_prompt {
        total.prompt_tokens += u.prompt_tokens;
        total.cached_tokens += u.cached_tokens;
    }
    total.completion_tokens += u.completion_tokens;
    total.total_tokens = total.prompt_tokens + total.completion_tokens;
    total.accepted_prediction_tokens += u.accepted_prediction_tokens;
    total.rejected_prediction_tokens += u.rejected_prediction_tokens;
    total.reasoning_tokens += u.reasoning_tokens;
}

pub fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": u.accepted_prediction_tokens,
            "rejected_prediction_tokens": u.rejected_prediction_tokens,
            "reasoning_tokens": u.reasoning_tokens,
        },
    })
}

/// OpenAI's finish reason; a reply that made calls and stopped by itself says `tool_calls`.
pub fn finish_name(r: FinishReason, made_calls: bool) -> &'static str {
    match r {
        FinishReason::Stop if made_calls => "tool_calls",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn tool_call_json(c: &ParsedCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

/// The chat delta of one parsed piece, in OpenAI's streaming shape.
pub fn delta_json(piece: &Piece) -> Value {
    match piece {
        Piece::Content(text) => json!({"content": text}),
        Piece::Reasoning(text) => json!({"reasoning_content": text}),
        Piece::CallStart { index, id, name } => json!({"tool_calls": [{
            "index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": ""},
        }]}),
        Piece::Arguments { index, text } => {
            json!({"tool_calls": [{"index": index, "function": {"arguments": text}}]})
        }
    }
}

impl Meta {
    pub fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, true) => "chat.completion.chunk",
            (true, false) => "chat.completion",
            (false, _) => "text_completion",
        }
    }

    /// A parser for this reply's reasoning and tool calls, when it may hold either. Left
    /// inline, the reasoning is still found, so that calls after it are parsed.
    pub fn call_parser(&self) -> Option<ReplyParser> {
        let think = self.splitter();
        if self.tools.is_none() && think.is_none() {
            return None;
        }
        Some(ReplyParser::new(think, self.tools))
    }

    /// A reasoning model's splitter: it finds the reasoning (so that calls after it are
    /// parsed, even when it stays inline) and counts its tokens.
    fn splitter(&self) -> Option<ThinkSplitter> {
        self.reasoning
            .map(|r| ThinkSplitter::new(r.syntax, r.opened).shown(r.shown))
    }

    /// One streamed chunk. `delta` is the chat delta (for text completions its `content`
    /// becomes `text`).
    pub fn chunk(
        &self,
        index: usize,
        delta: Value,
        finish: Option<&str>,
        logprobs: Value,
    ) -> Value {
        let choice = if self.chat {
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        } else {
            let text = delta.get("content").cloned().unwrap_or(json!(""));
            json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "system_fingerprint": Value::Null, "choices": [choice]})
    }

    pub fn usage_chunk(&self, usage: Usage) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "system_fingerprint": Value::Null, "choices": [],
               "usage": usage_json(usage)})
    }

    /// Chat logprobs for one token (`{"content": [...]}`), or null when not requested.
    pub fn logprobs_value(&self, info: Option<&LogprobInfo>) -> Value {
        match info {
            Some(info) if self.logprobs => json!({"content": [info]}),
            _ => Value::Null,
        }
    }

    /// The whole answer, once the engine finished every choice.
    /// With `best_of`, usage counts every choice generated, kept or not.
    fn whole(&self, replies: Vec<(Reply, Option<String>, bool)>) -> Value {
        let mut usage = Usage::default();
        for (r, _, counts_prompt) in &replies {
            add_usage(&mut usage, r.usage, *counts_prompt);
        }
        let kept = match self.pick {
            Some(pick) => pick.best(replies, |(r, _, _)| r.mean_logprob()),
            None => replies,
        };
        let choices: Vec<Value> = kept
            .into_iter()
            .enumerate()
            .map(|(i, (r, echo, _))| self.choice(i, r, echo))
            .collect();
        json!({"id": self.id, "object": self.object(false), "created": self.created,
               "model": self.model, "system_fingerprint": Value::Null,
               "choices": choices, "usage": usage_json(usage)})
    }

    /// One whole choice; `echo`: the text put before it.
    fn choice(&self, index: usize, r: Reply, echo: Option<String>) -> Value {
        let Reply {
            text,
            lps,
            prompt,
            reason,
            ..
        } = r;
        let logprobs = match (self.logprobs, self.chat) {
            (false, _) => Value::Null,
            (true, true) => json!({"content": lps}),
            (true, false) => {
                // The prompt's scores only beside its echoed text.
                let shown = echo.as_deref().map(|e| (e, prompt.as_ref()));
                let prompt = shown
                    .and_then(|(e, p)| p.map(|(f, p)| prompt_items(f, p, e)))
                    .into_iter()
                    .flatten();
                TextLogprobs::default().value(prompt.chain(lps.iter().map(Item::Scored)))
            }
        };
        let text = match echo {
            Some(echo) => echo + &text,
            None => text,
        };
        if !self.chat {
            return json!({"index": index, "text": text, "logprobs": logprobs,
                          "finish_reason": finish_name(reason, false)});
        }
        let (reasoning, content, calls) = match self.call_parser() {
            None => (None, Some(text), Vec::new()),
            Some(p) => {
                let (reasoning, content, calls) = p.whole(&text);
                (
                    reasoning,
                    content,
                    calls.iter().map(tool_call_json).collect(),
                )
            }
        };
        let mut message = json!({"role": "assistant", "content": content});
        if let Some(r) = reasoning {
            message["reasoning_content"] = Value::String(r);
        }
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls.clone());
        }
        json!({"index": index, "message": message, "logprobs": logprobs,
               "finish_reason": finish_name(reason, !calls.is_empty())})
    }
}

/// One choice's reply, from its events.
struct Reply {
    text: String,
    lps: Vec<LogprobInfo>,
    /// The prompt's first token and the others' logprobs, when asked for.
    prompt: Option<(String, Vec<LogprobInfo>)>,
    reason: FinishReason,
    usage: Usage,
    stop_sequence: Option<String>,
    /// The logprob of the stop token that ended it, when no entry of `lps` holds it.
    end_logprob: Option<f32>,
    /// When the engine made its first and its last token.
    made: (Option<std::time::Instant>, Option<std::time::Instant>),
}

impl Reply {
    /// The mean logprob of the reply's tokens, the stop token that ended it included (as
    /// choosing to stop is part of the reply); 0 for none.
    fn mean_logprob(&self) -> f64 {
        let lps = self.lps.iter().map(|l| l.chosen.logprob);
        let all: Vec<f64> = lps.chain(self.end_logprob).map(f64::from).collect();
        all.iter().sum::<f64>() / all.len().max(1) as f64
    }
}

/// One choice's events up to its end; an error if it failed or the engine went away.
async fn gather(mut rx: EventReceiver) -> Result<Vec<Event>, ApiError> {
    let mut events = Vec::new();
    while let Some(ev) = rx.recv().await {
        let end = matches!(ev, Event::Finished { .. });
        if let Event::Failed(f) = ev {
            return Err(ApiError::engine(f));
        }
        events.push(ev);
        if end {
            return Ok(events);
        }
    }
    Err(ApiError::engine_stopped())
}

/// One choice's reply; `counter` counts the tokens of its reasoning, token by token.
fn reply(events: Vec<Event>, mut counter: Option<ThinkSplitter>) -> Reply {
    let mut r = Reply {
        text: String::new(),
        lps: Vec::new(),
        prompt: None,
        reason: FinishReason::Stop,
        usage: Usage::default(),
        stop_sequence: None,
        end_logprob: None,
        made: (None, None),
    };
    for ev in events {
        match ev {
            Event::Prompt { first, logprobs } => r.prompt = Some((first, logprobs)),
            Event::Embedding(_) => {} // not a generation's
            Event::Token { text, logprob, at } => {
                r.made = (r.made.0.or(Some(at)), Some(at));
                if let Some(c) = &mut counter {
                    c.push(&text, &mut Vec::new());
                }
                r.text.push_str(&text);
                r.lps.extend(logprob);
            }
            Event::Finished {
                reason,
                usage,
                stop_sequence,
                end_logprob,
            } => {
                (r.reason, r.usage, r.stop_sequence) = (reason, usage, stop_sequence);
                r.end_logprob = end_logprob;
            }
            Event::Failed(_) => {}
        }
    }
    set_reasoning_tokens(&mut r.usage, counter.map_or(0, |c| c.tokens()));
    r
}

/// The reasoning's share of a reply's completion tokens (the text an end-of-turn token
/// flushes comes as one more event, which is not a completion token).
pub fn set_reasoning_tokens(usage: &mut Usage, counted: usize) {
    usage.reasoning_tokens = counted.min(usage.completion_tokens);
}

/// Collects every choice of one request into the whole answer.
async fn collect(
    choices: Vec<Choice>,
    meta: Meta,
    mut tail: Tail,
    deadline: Deadline,
) -> Result<Response, ApiError> {
    let (rxs, shown): (Vec<_>, Vec<_>) = choices
        .into_iter()
        .map(|c| (c.rx, (c.echo, c.counts_prompt)))
        .unzip();
    let several = rxs.len() > 1;
    // Only the engine's part is timed: once every choice has ended, the ledger and the
    // cache are waited for whatever the time (the request was computed and charged).
    let gathered = futures_util::future::try_join_all(rxs.into_iter().map(gather));
    let gathered = match deadline {
        None => gathered.await?,
        Some((at, limit)) => tokio::time::timeout_at(at, gathered)
            .await
            .map_err(|_| ApiError::request_timeout(limit))??,
    };
    // One choice: every event (the response cache records them); several: the end of the
    // last, which waits for the one ledger row.
    for events in &gathered {
        let events = if several {
            &events[events.len() - 1..]
        } else {
            &events[..]
        };
        for ev in events {
            tail.observe(ev).await;
        }
    }
    let mut replies: Vec<(Reply, Option<String>, bool)> = gathered
        .into_iter()
        .map(|events| reply(events, meta.splitter()))
        .zip(shown)
        .map(|(r, (echo, counts))| (r, echo, counts))
        .collect();
    let whole = match &meta.surface {
        Surface::OpenAi => meta.whole(replies),
        surface => {
            let (r, echo, _) = replies.swap_remove(0);
            match surface {
                Surface::Anthropic { .. } => {
                    super::anthropic::whole(&meta, r.text, r.reason, r.stop_sequence, r.usage)
                }
                Surface::Workers { json } => super::workers::whole(&meta, r.text, *json, r.usage),
                Surface::Responses(ctx) => {
                    let lps = meta.logprobs.then_some(&r.lps[..]);
                    super::responses::whole(&meta, ctx, (r.text, lps), r.reason, r.usage)
                }
                Surface::LlamaCpp(ctx) => {
                    let end = (r.reason, r.stop_sequence, r.usage);
                    super::native::whole(&meta, ctx, r.text, &r.lps, end, r.made)
                }
                Surface::OpenAi => meta.whole(vec![(r, echo, true)]),
            }
        }
    };
    Ok(Json(whole).into_response())
}

#[cfg(test)]
mod tests {
    use super::{Pick, Reply};
    use crate::engine::request::{FinishReason, LogprobInfo, TokenLogprob, Usage};

    #[test]
    fn a_replys_mean_logprob_counts_the_stop_token_that_ended_it() {
        let info = |logprob: f32| LogprobInfo {
            chosen: TokenLogprob {
                id: 0,
                token: "t".into(),
                logprob,
                bytes: vec![b't'],
            },
            top_logprobs: Vec::new(),
        };
        let reply = |lps: Vec<LogprobInfo>, end_logprob: Option<f32>| Reply {
            text: String::new(),
            lps,
            prompt: None,
            reason: FinishReason::Stop,
            usage: Usage::default(),
            stop_sequence: None,
            end_logprob,
            made: (None, None),
        };
        assert_eq!(
            reply(vec![info(-1.0), info(-2.0)], Some(-3.0)).mean_logprob(),
            -2.0
        );
        assert_eq!(
            reply(vec![info(-1.0), info(-2.0)], None).mean_logprob(),
            -1.5
        );
        // Stopping at once is not free: its stop token's logprob is the reply's.
        assert_eq!(reply(Vec::new(), Some(-4.0)).mean_logprob(), -4.0);
        assert_eq!(reply(Vec::new(), None).mean_logprob(), 0.0);
    }

    #[test]
    fn best_of_keeps_each_prompts_best_first() {
        // Two prompts, three choices each, scored by their value.
        let scores = [-1.0, -0.5, -2.0, -0.1, -0.1, -3.0];
        let kept = Pick { of: 3, keep: 2 }.best((0..6).collect(), |&i: &usize| scores[i]);
        // Best first within each prompt; a tie keeps the order the choices ran in.
        assert_eq!(kept, vec![1, 0, 3, 4]);
        let one = Pick { of: 3, keep: 1 }.best((0..6).collect(), |&i: &usize| scores[i]);
        assert_eq!(one, vec![1, 3]);
    }
}
