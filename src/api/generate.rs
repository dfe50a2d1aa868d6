//! The surface-neutral path of a generation request: validate its prompts against the
//! model, answer from the response cache or reserve its tokens with the gateway, submit one
//! engine request per choice, and hand the events to the surface's renderer.

use std::time::{Duration, Instant};

use axum::response::Response;
use tokio::sync::{mpsc, oneshot};

use super::choices::{split_meter, Choice};
use super::error::ApiError;
use super::gate::{add_headers, rate_headers, refusal_error, Gate, Tail};
use super::handlers::ledger_terms;
use super::replay::{replay_hit, Reply};
use super::response::{respond, Deadline, Meta, Pick, Reasoning, Surface};
use super::types::{SamplingFields, MAX_CHOICES};
use super::{AppState, Ready};
use crate::engine::constraint::TokenConstraint;
use crate::engine::request::GenerationRequest;
use crate::engine::stop::{Aside, StopsEnd};
use crate::gateway::cache::{self, Lookup};
use crate::gateway::limits::Ask;
use crate::structured::toolcall::ToolFormat;

/// One prompt of a request, as token ids, and the text `echo` puts before its choices.
pub(super) struct Input {
    pub prompt: Vec<u32>,
    pub echo: Option<String>,
}

/// What to produce besides text: logprobs, and the grammar the text must follow.
pub(super) struct Output {
    pub logprobs: bool,
    pub top_logprobs: usize,
    /// Score the prompt's tokens too (`echo` with `logprobs`), with `top_logprobs` each.
    pub prompt_logprobs: bool,
    /// `echo`: `max_tokens` may be 0.
    pub echo: bool,
    /// The grammar each choice's text must follow, one per choice; empty: free text.
    pub constraints: Vec<Box<dyn TokenConstraint>>,
    /// `best_of`: how many choices each prompt runs, of which the best `n` are answered.
    pub best_of: Option<u64>,
    /// Limits on the lines of a code completion (`/infill`'s).
    pub lines: crate::engine::lines::LineLimits,
    /// The reply is tool calls alone (a forced call): stop strings, which would cut a
    /// call's arguments, are not applied (they were checked).
    pub calls_only: bool,
    /// The reply may be calls (`tool_choice: auto`): stop strings apply only to the text
    /// before the first call's marker.
    pub stops_end: Option<StopsEnd>,
}

/// Where a reply that may hold calls in `format` opens them: stop strings apply only
/// before (see [`Output::stops_end`]). `think`: a reasoning model's thinking, which the
/// reply may open with (or start in, when the prompt opened it), and in which a call's
/// marker opens nothing.
pub(super) fn calls_open(format: ToolFormat, think: &Option<Reasoning>) -> StopsEnd {
    StopsEnd {
        text: format.trigger(),
        anywhere: format.calls_after_text(),
        aside: think.as_ref().map(|r| Aside {
            open: r.syntax.open.to_owned(),
            close: r.syntax.close.to_owned(),
            inside: r.opened,
        }),
    }
}

/// How many choices each prompt runs: `best_of` (from `n` to the most a request may run;
/// more than `n` only whole, as they are ranked at the end), else `n`.
pub(super) fn per_prompt(best_of: Option<u64>, n: usize, stream: bool) -> Result<usize, ApiError> {
    let Some(b) = best_of else { return Ok(n) };
    if b < n as u64 || b > MAX_CHOICES {
        return Err(ApiError::invalid(
            "best_of",
            format!("`best_of` must be in [n, {MAX_CHOICES}] (n is {n}), got {b}"),
        ));
    }
    if b > n as u64 && stream {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` greater than `n` cannot be streamed: the choices are ranked once all have finished",
        ));
    }
    Ok(b as usize)
}

/// Checks one prompt against the model; its completion budget (`requested`, or the rest of
/// the context).
fn budget(
    prompt: &[u32],
    requested: Option<usize>,
    ready: &Ready,
    gate: &Gate,
) -> Result<usize, ApiError> {
    let field = input_field(gate);
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= ready.vocab_size) {
        // Token ids a client sent, or a --tokenizer larger than the model's vocabulary.
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "the prompt has token id {bad}, outside the model's vocabulary of {}",
                ready.vocab_size
            ),
        ));
    }
    let limit = ready.context_length.min(ready.engine.kv_capacity);
    // llama-server's `n_predict` is a most, not a promise: past the free context the reply
    // ends there (`stop_type: "limit"`); only a prompt that fills the context is refused.
    let requested = match gate.route {
        "/completion" | "/infill" if prompt.len() < limit => {
            requested.map(|m| m.min(limit - prompt.len()))
        }
        _ => requested,
    };
    match requested {
        Some(m) if prompt.len().saturating_add(m) > limit => Err(ApiError::context_length(field, format!(
            "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({} in the {field}, {m} in the completion). Please reduce the length of the {field} or completion.",
            prompt.len().saturating_add(m),
            prompt.len()
        ))),
        Some(m) => Ok(m),
        None if prompt.len() >= limit => Err(ApiError::context_length(field, format!(
            "This model's maximum context length is {limit} tokens. However, your {field} resulted in {} tokens. Please reduce the length of the {field}.",
            prompt.len()
        ))),
        None => Ok(limit - prompt.len()),
    }
}

/// The field that holds a request's input on its route's own surface (Workers AI's route
/// takes a `prompt` or `messages`).
fn input_field(gate: &Gate) -> &'static str {
    match gate.route {
        "/v1/completions" | "/completion" | "/v1/fim/completions" => "prompt",
        "/infill" => "input_prefix",
        "/v1/responses" => "input",
        "/ai/run" if gate.body.get("prompt").is_some() => "prompt",
        _ => "messages",
    }
}

/// Validates budgets, answers from the response cache or reserves the request's tokens,
/// submits its choices (`n` for each prompt), and answers whole or streamed.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    state: &AppState,
    ready: &Ready,
    inputs: Vec<Input>,
    fields: &SamplingFields,
    out: Output,
    mut meta: Meta,
    request_id: &str,
    gate: Gate,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let mut sampling = fields.sampling_params(meta.surface.max_temperature())?;
    super::llama_chain::apply(&mut sampling, &meta.surface, ready, &gate.body).await?;
    let stop = fields.stops(meta.surface.max_stops())?;
    let stop = if out.calls_only { Vec::new() } else { stop };
    let keep = fields.n()?;
    // Each prompt's choices: `n`, or `best_of` of which the best `n` are answered.
    let n = per_prompt(out.best_of, keep, fields.stream)?;
    // Whole answers with `best_of` come best first (streams only when it equals `n`).
    let ranked = out.best_of.is_some() && n > 1 && !fields.stream;
    meta.pick = ranked.then_some(Pick { of: n, keep });
    let count = inputs.len() * n;
    let field = if out.best_of.is_some() {
        "best_of"
    } else {
        "n"
    };
    if count as u64 > MAX_CHOICES {
        return Err(ApiError::invalid(
            field,
            format!(
                "at most {MAX_CHOICES} choices a request (prompts times `{field}`), got {count}"
            ),
        ));
    }
    if count > 1 && !matches!(meta.surface, Surface::OpenAi) {
        return Err(ApiError::invalid(field, "this API answers one choice"));
    }
    // Each choice holds one of the key's parallel slots: more than it has is never admissible.
    let slots = match &gate.principal {
        crate::gateway::Principal::Key(k) => k.limit_spec().max_parallel,
        _ => None,
    };
    if let Some(max) = slots.filter(|&m| count as u64 > m) {
        return Err(ApiError::invalid(
            field,
            format!("{count} choices exceed this key's {max} parallel requests (`max_parallel_requests`)"),
        ));
    }
    if count > ready.engine.capacity() {
        // Never admissible here: not a 429 a client would retry.
        return Err(ApiError::invalid(
            field,
            format!(
                "{count} choices exceed this node's {} requests in flight",
                ready.engine.capacity()
            ),
        ));
    }
    if let Some(&(bad, _)) = sampling
        .logit_bias
        .last()
        .filter(|(id, _)| *id as usize >= ready.vocab_size)
    {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "`logit_bias` names token {bad}, outside the model's vocabulary of {}",
                ready.vocab_size
            ),
        ));
    }
    fields.refuse_unsupported(&ready.tokenizer.stop_ids)?;
    if fields.ignore_eos == Some(true) {
        // A grammar's (and a tool call's) only way to end is the end-of-text token.
        if !out.constraints.is_empty() || meta.tools.is_some() {
            return Err(ApiError::invalid(
                "ignore_eos",
                "`ignore_eos` cannot be combined with a grammar, an output format or tools, \
                 which end with the end-of-text token",
            ));
        }
        // As llama.cpp: the tokens that end a reply are never sampled.
        let banned = ready.tokenizer.stop_ids.iter();
        sampling
            .logit_bias
            .extend(banned.map(|&id| (id, f32::NEG_INFINITY)));
    }
    let requested = fields.max_tokens(out.echo)?;
    let prediction = predicted_tokens(fields, ready).await?;
    // Each choice's completion budget, in choice order (prompt by prompt, `n` each).
    let mut budgets = Vec::with_capacity(count);
    for input in &inputs {
        let m = budget(&input.prompt, requested, ready, &gate)?;
        budgets.extend(std::iter::repeat_n(m, n));
    }
    if matches!(&meta.surface, Surface::Responses(ctx) if ctx.check_only) {
        return Ok(axum::response::IntoResponse::into_response(
            axum::http::StatusCode::NO_CONTENT,
        ));
    }
    // A prompt's choices share its computation through the prefix cache, unless it is off
    // or the prompt is scored (each choice then computes it): shared, it counts once.
    let shared =
        ready.engine.prefix_cache && fields.cache_prompt.unwrap_or(true) && !out.prompt_logprobs;
    let counts_prompt: Vec<bool> = (0..count).map(|c| !shared || c % n == 0).collect();
    let prompt_total: usize = inputs
        .iter()
        .map(|i| i.prompt.len() * if shared { 1 } else { n })
        .sum();
    let max_total: usize = budgets.iter().sum();
    let (labels, price) = ledger_terms(state, &gate, request_id);
    let include_usage = fields.include_usage()?;
    // The first part of the response (a whole reply, a stream's first event) must be ready
    // by then, or the request is cancelled and answered 504.
    let deadline = gate
        .directives
        .request_timeout
        .map(|t| (tokio::time::Instant::from_std(gate.arrived + t), t));

    // The response cache (one choice only): replay a hit, wait for an identical request
    // under way, or lead. An `Idempotency-Key` keeps any reply (sampled too) for a day.
    let deterministic = sampling.is_deterministic();
    let mut leader = None;
    let idempotent = gate.idempotency_key(&ready.model_hash, &ready.template_hash);
    if idempotent.is_some() && count > 1 {
        return Err(ApiError::invalid(
            "idempotency-key",
            "`Idempotency-Key` is for requests of one choice (one prompt, `n` 1)",
        ));
    }
    let (key, ttl) = match idempotent {
        Some(k) => (Some(k), IDEMPOTENCY_TTL),
        None => (
            gate.cache_key(deterministic, &ready.model_hash, &ready.template_hash),
            gate.directives.cache_ttl.unwrap_or_default(),
        ),
    };
    let store = if idempotent.is_some() {
        &state.idempotency
    } else {
        &state.cache
    };
    if let Some(key) = key.filter(|_| count == 1) {
        loop {
            let hit = match store.lookup(key, ttl) {
                Lookup::Hit(hit) => hit,
                // Made, and no longer held: never generated twice.
                Lookup::Gone => return Err(ApiError::idempotency_gone()),
                // A stream does not wait for an identical one under way (a waiter gets the
                // whole reply at its end: no first token for the whole generation, and a
                // silent connection that proxies cut): it runs by itself.
                Lookup::Wait(_) if fields.stream && idempotent.is_none() => break,
                // A streamed retry of an idempotent request must not generate again: it is
                // answered at once and kept alive (`--sse-keep-alive`) until the first
                // attempt's reply is replayed (within its deadline, if it has one, as below).
                Lookup::Wait(rx) if fields.stream && deadline.is_none() => {
                    let reply = Reply {
                        echo: inputs.into_iter().next().and_then(|i| i.echo),
                        meta,
                        stream: true,
                        include_usage,
                    };
                    let terms = (price, labels, received);
                    return Ok(super::replay::when_replayed(state, gate, rx, terms, reply));
                }
                Lookup::Wait(rx) => match in_time(deadline, cache::wait(rx)).await {
                    Ok(Some(hit)) => hit,
                    Ok(None) => continue, // its leader gave up: look again
                    Err(e) => {
                        let who = gate.principal.key_id();
                        state.gateway.record_timed_out(who, &labels, received);
                        return Err(e);
                    }
                },
                Lookup::Lead(l) => {
                    leader = Some(l);
                    break;
                }
            };
            let echo = inputs.into_iter().next().and_then(|i| i.echo);
            let reply = Reply {
                meta,
                echo,
                stream: fields.stream,
                include_usage,
            };
            let replayed = idempotent.is_some();
            return replay_hit(
                (&state.gateway, state.sse_keep_alive),
                &gate,
                &hit,
                (price, replayed),
                &labels,
                reply,
                received,
            )
            .await;
        }
    }

    // Past its deadline already (templating, grammars): answered before it is queued.
    if deadline.is_some_and(|(at, _)| tokio::time::Instant::now() >= at) {
        let limit = deadline.map(|(_, t)| t).unwrap_or_default();
        state
            .gateway
            .record_timed_out(gate.principal.key_id(), &labels, received);
        return Err(ApiError::request_timeout(limit));
    }
    // Reserve the prompts plus the completion budgets against every window that applies.
    let ask = Ask {
        prompt: prompt_total as u64,
        max_tokens: max_total as u64,
        explicit: requested.is_some(),
        price,
        sequences: count as u64,
    };
    let meter = state
        .gateway
        .admit(&gate.principal, ask, labels)
        .map_err(|(refusal, rate)| refusal_error(refusal, prompt_total, max_total, rate))?;
    share(&mut budgets, meter.max_tokens() as usize);
    if idempotent.is_none() && (meter.max_tokens() as usize) < max_total {
        // Cut short by the key's token window or budget: that reply is this moment's, not
        // the request's, so it is not cached (a retry's is: it is the same reply).
        leader = None;
    }
    let mut headers = rate_headers(meter.rate);
    if idempotent.is_some() {
        // Not the response cache's business.
    } else if leader.is_some() {
        headers.push(("cf-aig-cache-status", "MISS".into()));
    } else if key.is_some() {
        // Several choices are never cached; a stream with a deadline does not wait.
        headers.push(("cf-aig-cache-status", "BYPASS".into()));
    }
    let (committed_tx, committed) = oneshot::channel();
    // One meter for every choice; refused by the queue, the request is ledgered rejected.
    let (sinks, refusal) = split_meter(meter, committed_tx, &counts_prompt);
    let mut sinks = sinks.into_iter();
    let mut constraints = out.constraints.into_iter();
    let tenant = gate.tenant();
    // Control tokens the reply's parsers read as text: a tool format's markers, and a
    // reasoning model's in a chat (even unsplit, so its reasoning stays delimited).
    let mut shown = meta.tools.map(|f| f.shown_tokens()).unwrap_or_default();
    if meta.chat {
        shown.extend(ready.reasoner.iter().flat_map(|r| r.shown_tokens()));
    }
    let mut reqs = Vec::with_capacity(count);
    let mut echoes = Vec::with_capacity(count);
    for (c, (input, j)) in inputs
        .iter()
        .flat_map(|input| (0..n).map(move |j| (input, j)))
        .enumerate()
    {
        let mut sampling = sampling.clone();
        // Seeded choices differ from each other and repeat; a prompt's choices do not
        // depend on the prompts beside it.
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(j as u64));
        reqs.push(GenerationRequest {
            prompt: input.prompt.clone(),
            max_tokens: budgets[c],
            sampling,
            stop: stop.clone(),
            stops_end: out.stops_end.clone(),
            top_logprobs: out.top_logprobs,
            // Ranking reads each token's logprob, shown or not.
            logprobs: out.logprobs || ranked,
            prompt_logprobs: out.prompt_logprobs.then_some(out.top_logprobs),
            request_id: request_id.to_string(),
            received,
            cache_prompt: fields.cache_prompt.unwrap_or(true),
            constraint: constraints.next(),
            on_end: sinks.next(),
            tenant,
            prediction: prediction.clone(),
            embed: None,
            shown_tokens: shown.clone(),
            lines: out.lines,
            adapter: gate.served.adapter,
        });
        echoes.push(input.echo.clone());
    }
    let rxs = ready
        .engine
        .submit_many(reqs)
        .inspect_err(|_| refusal.refused())?;
    // An idempotent reply is recorded apart from its client, which may leave and retry.
    // Its ledger row is awaited there, before the reply is kept and its end passed on.
    let mut rxs = rxs;
    let mut committed = Some(committed);
    if let (Some(_), [rx]) = (idempotent, &mut rxs[..]) {
        if let (Some(l), Some(c)) = (leader.take(), committed.take()) {
            let (_, closed) = tokio::sync::mpsc::unbounded_channel();
            let (relayed, done) = super::gate::detach(std::mem::replace(rx, closed), l, c);
            (*rx, committed) = (relayed, Some(done));
        }
    }
    let mut choices: Vec<Choice> = rxs
        .into_iter()
        .zip(echoes)
        .zip(counts_prompt)
        .map(|((rx, echo), counts)| Choice::new(rx, echo, counts))
        .collect();
    let tail = Tail::new(committed, leader);
    let keep_alive = state.sse_keep_alive;
    // An error past admission (a timeout, a failure) still tells the key's rate state.
    let with_rate = |mut e: ApiError| {
        e.headers.extend(headers.iter().cloned());
        e
    };
    if fields.stream && deadline.is_some() {
        choices = in_time(deadline, first_event(choices))
            .await
            .map_err(with_rate)?;
    }
    // Dropped on time out, the choices' receivers close: the engine drops the sequences in
    // its next step and their meter ledgers what they computed as cancelled.
    let mut resp = respond(
        choices,
        meta,
        fields.stream,
        include_usage,
        tail,
        keep_alive,
        deadline,
    )
    .await
    .map_err(with_rate)?;
    add_headers(&mut resp, headers);
    Ok(resp)
}

/// How long an `Idempotency-Key` request's reply is kept for its retries.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// `fut`'s output, or the request-timeout error once `deadline` passes.
pub(super) async fn in_time<T>(
    deadline: Deadline,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ApiError> {
    match deadline {
        None => Ok(fut.await),
        Some((at, limit)) => tokio::time::timeout_at(at, fut)
            .await
            .map_err(|_| ApiError::request_timeout(limit)),
    }
}

/// Waits until one of the choices has an event (its stream can begin), passing every
/// event on through a relay so that none is lost. A relay ends when its reader goes away,
/// closing the engine's channel then, even while the sequence waits in the queue.
async fn first_event(choices: Vec<Choice>) -> Vec<Choice> {
    let (seen_tx, mut seen) = mpsc::channel::<()>(choices.len().max(1));
    let relayed = choices
        .into_iter()
        .map(|c| {
            let (tx, rx) = mpsc::unbounded_channel();
            let (mut from, seen) = (c.rx, seen_tx.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        ev = from.recv() => {
                            let Some(ev) = ev else { break };
                            let _ = seen.try_send(());
                            if tx.send(ev).is_err() {
                                break;
                            }
                        }
                        _ = tx.closed() => break,
                    }
                }
            });
            Choice { rx, ..c }
        })
        .collect();
    drop(seen_tx);
    seen.recv().await;
    relayed
}

/// The tokens of the request's `prediction` (none when it has none, or when the engine does
/// not draft), at most a context's, up to the first the model does not have (a `--tokenizer`
/// larger than its vocabulary): drafted, it would fail the step of every request in it.
async fn predicted_tokens(fields: &SamplingFields, ready: &Ready) -> Result<Vec<u32>, ApiError> {
    let Some(text) = fields.prediction()?.filter(|_| ready.engine.speculates) else {
        return Ok(Vec::new());
    };
    let r = ready.clone();
    let mut ids = tokio::task::spawn_blocking(move || r.tokenizer.encode(&text, false))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if ids.len() > ready.context_length {
        return Err(ApiError::invalid(
            "prediction",
            format!(
                "`prediction` has {} tokens, more than the model's context of {}",
                ids.len(),
                ready.context_length
            ),
        ));
    }
    let known = ids.iter().take_while(|&&t| (t as usize) < ready.vocab_size);
    ids.truncate(known.count());
    Ok(ids)
}

/// Fits the choices' completion budgets into `granted` tokens when a budget granted fewer
/// than asked: shares in proportion, the remainder a token at a time from the first.
fn share(budgets: &mut [usize], granted: usize) {
    let total: usize = budgets.iter().sum();
    if granted >= total {
        return;
    }
    for m in budgets.iter_mut() {
        *m = (*m as u128 * granted as u128 / total as u128) as usize;
    }
    let left = granted - budgets.iter().sum::<usize>();
    for m in budgets.iter_mut().take(left) {
        *m += 1;
    }
}

#[cfg(test)]
#[path = "generate_tests.rs"]
mod tests;
