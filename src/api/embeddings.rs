//! OpenAI's `/v1/embeddings`: each input's final hidden states pooled into one vector of unit
//! length. The inputs run as engine sequences that only prefill, a key's parallel slots at
//! a time, packed into the same steps as generation; the gateway meters their tokens as
//! prompt tokens, and caches whole replies like any deterministic request.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::choices::{split_meter, Refusal};
use super::error::ApiError;
use super::gate::{add_headers, rate_headers, recorded_bytes, refusal_error, Gate, Recorded};
use super::generate::in_time;
use super::handlers::{accept, ledger_terms};
use super::types::PromptField;
use super::{AppState, Ready, RequestId};
use crate::engine::core::{EngineHandle, SubmitError};
use crate::engine::request::{Event, EventReceiver, GenerationRequest, Usage};
use crate::engine::sampler::SamplingParams;
use crate::gateway::cache::{self, Lookup};
use crate::gateway::limits::Ask;
use crate::gateway::Principal;

/// Most inputs one request may embed (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// The API a request came in through: its body, its reply's shape, its ledger route.
pub(super) enum Shape {
    OpenAi,
    /// Workers AI's `ai/run` for an embedding model: `{"text": ...}` in,
    /// `{"result": {"shape", "data", "pooling"}}` out.
    Workers {
        model: String,
    },
}

impl Shape {
    fn route(&self) -> &'static str {
        match self {
            Shape::OpenAi => "/v1/embeddings",
            // Apart from `ai/run`'s generations: a custom cache key never mixes the two.
            Shape::Workers { .. } => "/ai/run/embeddings",
        }
    }

    fn translate(&self, v: Value) -> Result<Value, ApiError> {
        let Shape::Workers { model } = self else {
            return Ok(v);
        };
        let Value::Object(mut b) = v else {
            return Err(ApiError::bad_request(
                "The request body must be a JSON object",
            ));
        };
        let text = b.remove("text").unwrap_or(Value::Null);
        Ok(
            json!({"input": text, "model": model, "pooling": b.remove("pooling"),
                  "lora": b.remove("lora")}),
        )
    }
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub input: PromptField,
    pub model: Option<String>,
    /// `float` (the default) or `base64` (each vector's little-endian `f32`s).
    pub encoding_format: Option<String>,
    /// Must be the model's own: its vectors are not trained to be cut short.
    pub dimensions: Option<u64>,
    /// (Workers AI) Must be the server's (`--pooling`).
    pub pooling: Option<String>,
}

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    serve(&state, rid, who, &headers, body, Shape::OpenAi).await
}

/// Both surfaces of embeddings (by `shape`).
pub(super) async fn serve(
    state: &AppState,
    rid: RequestId,
    who: Principal,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    shape: Shape,
) -> Result<Response, ApiError> {
    let route = shape.route();
    let translate = |v| shape.translate(v);
    let (ready, req, _, mut gate) =
        accept(state, &rid, who, headers, route, body, translate, model_of)?;
    // The cached vectors do not depend on how they are sent (the official clients ask for
    // base64 by default, other code for floats): one entry for both.
    if let Some(b) = gate.body.as_object_mut() {
        b.remove("encoding_format");
        b.remove("pooling");
    }
    if let Some(p) = req.pooling.filter(|p| p.parse() != Ok(ready.pooling)) {
        return Err(ApiError::invalid(
            "pooling",
            format!(
                "this server pools `{}` (its --pooling), got `{p}`",
                ready.pooling.name()
            ),
        ));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, got `{f}`"),
            ))
        }
    };
    if let Some(d) = req
        .dimensions
        .filter(|&d| d != ready.embedding_length as u64)
    {
        return Err(ApiError::invalid(
            "dimensions",
            format!(
                "this model's embeddings have {} dimensions, got `dimensions: {d}`",
                ready.embedding_length
            ),
        ));
    }
    let prompts = tokenize(&ready, req.input).await?;
    let vectors = embed(state, &ready, prompts, &gate, &rid.0).await?;
    let (vectors, prompt_tokens, headers) = vectors;
    if let Shape::Workers { .. } = shape {
        let result = WorkersResult {
            shape: [vectors.len(), ready.embedding_length],
            data: &vectors,
            pooling: ready.pooling.name(),
        };
        let body = Workers {
            result,
            success: true,
            errors: [],
            messages: [],
        };
        let mut resp = Json(body).into_response();
        add_headers(&mut resp, headers);
        return Ok(resp);
    }
    // Serialized straight from the vectors (no JSON value per float: 2,048 inputs of a
    // 4,096-wide model are 8M of them).
    let data: Vec<Item> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| Item {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Vector::Floats(v)
            },
        })
        .collect();
    let mut resp = Json(List {
        object: "list",
        data,
        model: &gate.served.name,
        usage: json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}),
    })
    .into_response();
    add_headers(&mut resp, headers);
    Ok(resp)
}

#[derive(Serialize)]
struct List<'a> {
    object: &'static str,
    data: Vec<Item<'a>>,
    model: &'a str,
    usage: Value,
}

/// Cloudflare's envelope around Workers AI's embedding result.
#[derive(Serialize)]
struct Workers<'a> {
    result: WorkersResult<'a>,
    success: bool,
    errors: [(); 0],
    messages: [(); 0],
}

#[derive(Serialize)]
struct WorkersResult<'a> {
    shape: [usize; 2],
    data: &'a [Vec<f32>],
    pooling: &'static str,
}

#[derive(Serialize)]
struct Item<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    Floats(&'a [f32]),
    Base64(String),
}

fn model_of(r: &EmbeddingRequest) -> Option<&str> {
    r.model.as_deref()
}

/// Each input as token ids (texts with the model's special tokens, ids as given), checked
/// against the vocabulary and the context.
async fn tokenize(ready: &Ready, input: PromptField) -> Result<Vec<Vec<u32>>, ApiError> {
    let inputs: Vec<Result<String, Vec<u32>>> = match input {
        PromptField::Text(t) => vec![Ok(t)],
        PromptField::Ids(ids) => vec![Err(ids)],
        PromptField::Many(v) => v.into_iter().map(Ok).collect(),
        PromptField::ManyIds(v) => v.into_iter().map(Err).collect(),
    };
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "`input` must hold 1 to {MAX_INPUTS} inputs, got {}",
                inputs.len()
            ),
        ));
    }
    if inputs.iter().any(|i| match i {
        Ok(t) => t.is_empty(),
        Err(ids) => ids.is_empty(),
    }) {
        return Err(ApiError::invalid("input", "an input is empty"));
    }
    let r = ready.clone();
    let prompts = tokio::task::spawn_blocking(move || {
        inputs
            .into_iter()
            .map(|i| match i {
                Ok(text) => r.tokenizer.encode(&text, true).map(|mut ids| {
                    // As llama.cpp: the EOS a model asks for (its last token is pooled).
                    if r.tokenizer.add_eos {
                        ids.extend(r.tokenizer.eos);
                    }
                    ids
                }),
                Err(ids) => Ok(ids),
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let limit = ready.context_length.min(ready.engine.kv_capacity);
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            // A --tokenizer whose normalizer drops the whole text.
            return Err(ApiError::invalid(
                "input",
                format!("input {i} has no tokens"),
            ));
        }
        if let Some(bad) = p.iter().find(|&&t| t as usize >= ready.vocab_size) {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "input {i} has token id {bad}, outside the model's vocabulary of {}",
                    ready.vocab_size
                ),
            ));
        }
        if p.len() > limit {
            return Err(ApiError::context_length("input", format!(
                "This model's maximum context length is {limit} tokens, however input {i} has {} tokens. Please shorten it.",
                p.len()
            )));
        }
    }
    Ok(prompts)
}

type Embedded = (Vec<Vec<f32>>, usize, Vec<(&'static str, String)>);

/// The vectors of `prompts`: from the response cache, or computed and metered (and cached
/// when asked); with the prompt tokens and the headers to send.
async fn embed(
    state: &AppState,
    ready: &Ready,
    prompts: Vec<Vec<u32>>,
    gate: &Gate,
    request_id: &str,
) -> Result<Embedded, ApiError> {
    let received = Instant::now();
    let (labels, price) = ledger_terms(state, gate, request_id);
    let deadline = gate
        .directives
        .request_timeout
        .map(|t| (tokio::time::Instant::from_std(gate.arrived + t), t));
    let timed_out = || {
        let who = gate.principal.key_id();
        state.gateway.record_timed_out(who, &labels, received);
    };
    // Deterministic: cached whenever the request asks (`cf-aig-cache-ttl`).
    let key = gate.cache_key(true, &ready.model_hash, &ready.template_hash);
    let ttl = gate.directives.cache_ttl.unwrap_or_default();
    let mut leader = None;
    if let Some(key) = key {
        loop {
            let hit = match state.cache.lookup(key, ttl) {
                Lookup::Hit(hit) => hit,
                Lookup::Wait(rx) => match in_time(deadline, cache::wait(rx)).await {
                    Ok(Some(hit)) => hit,
                    Ok(None) => continue, // its leader gave up: look again
                    Err(e) => {
                        timed_out();
                        return Err(e);
                    }
                },
                Lookup::Gone => return Err(ApiError::idempotency_gone()),
                Lookup::Lead(l) => {
                    leader = Some(l);
                    break;
                }
            };
            let (vectors, usage) = from_recorded(&hit.value);
            let committed = state
                .gateway
                .admit_cache_hit(&gate.principal, usage, price, false, &labels, received)
                .map_err(|(refusal, rate)| refusal_error(refusal, usage.prompt_tokens, 0, rate))?;
            if !matches!(committed.await, Ok(true)) {
                tracing::error!("the ledger row of a cache hit was not committed");
            }
            let mut headers = rate_headers(state.gateway.rate_info(&gate.principal));
            headers.push(("cf-aig-cache-status", "HIT".into()));
            headers.push(("age", hit.age().to_string()));
            return Ok((vectors, usage.prompt_tokens, headers));
        }
    }
    if let Some((_, limit)) = deadline.filter(|&(at, _)| tokio::time::Instant::now() >= at) {
        timed_out();
        return Err(ApiError::request_timeout(limit));
    }
    // The inputs run a window at a time: the key's free parallel slots (one, to be refused
    // when it has none), at most a step's worth.
    let slots = state.gateway.free_slots(&gate.principal);
    let width = prompts
        .len()
        .min(slots.map_or(usize::MAX, |s| s.max(1) as usize))
        .min(ready.engine.max_batch_size.max(1));
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let ask = Ask {
        prompt: prompt_tokens as u64,
        max_tokens: 0,
        explicit: true,
        price,
        sequences: width as u64,
    };
    let meter = state
        .gateway
        .admit(&gate.principal, ask, labels)
        .map_err(|(refusal, rate)| refusal_error(refusal, prompt_tokens, 0, rate))?;
    let mut headers = rate_headers(meter.rate);
    if leader.is_some() {
        headers.push(("cf-aig-cache-status", "MISS".into()));
    }
    let (committed_tx, committed) = oneshot::channel();
    let (sinks, refusal) = split_meter(meter, committed_tx, &vec![true; prompts.len()]);
    let tenant = gate.tenant();
    let reqs = prompts
        .into_iter()
        .zip(sinks)
        .map(|(prompt, sink)| GenerationRequest {
            prompt,
            max_tokens: 0,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stops_end: None,
            top_logprobs: 0,
            logprobs: false,
            prompt_logprobs: None,
            request_id: request_id.to_string(),
            received,
            cache_prompt: false,
            constraint: None,
            on_end: Some(sink),
            tenant,
            prediction: Vec::new(),
            shown_tokens: Vec::new(),
            lines: Default::default(),
            embed: Some(ready.pooling),
            adapter: gate.served.adapter,
        })
        .collect();
    // Timed out, the sequences' receivers close: the engine drops them at its next step
    // and their meter ledgers what they computed as cancelled.
    let with_rate = |mut e: ApiError| {
        e.headers.extend(headers.iter().cloned());
        e
    };
    let vectors = in_time(deadline, run(&ready.engine, reqs, width, &refusal))
        .await
        .and_then(|r| r)
        .map_err(with_rate)?;
    if !matches!(committed.await, Ok(true)) {
        tracing::error!("the ledger row of an embeddings request was not committed");
    }
    if let Some(l) = leader {
        let usage = Usage {
            prompt_tokens,
            total_tokens: prompt_tokens,
            ..Usage::default()
        };
        let recorded = to_recorded(&vectors, usage);
        let bytes = recorded_bytes(&recorded);
        l.fill(recorded, bytes);
    }
    Ok((vectors, prompt_tokens, headers))
}

/// Runs `reqs`, `width` in flight at a time, and returns their embeddings in order. The
/// first is refused as any request is when the queue is full; a later one that finds the
/// queue full waits for room (its request was admitted and is partly computed).
async fn run(
    engine: &EngineHandle,
    reqs: Vec<GenerationRequest>,
    width: usize,
    refusal: &Refusal,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let mut out = vec![Vec::new(); reqs.len()];
    let mut pending = reqs.into_iter().enumerate();
    let mut held: Option<(usize, Box<GenerationRequest>)> = None;
    let mut running = FuturesUnordered::new();
    let mut started = false;
    loop {
        while running.len() < width {
            let next = held
                .take()
                .or_else(|| pending.next().map(|(i, r)| (i, Box::new(r))));
            let Some((i, req)) = next else { break };
            match engine.try_submit(*req) {
                Ok(rx) => {
                    started = true;
                    running.push(vector(i, rx));
                }
                Err((SubmitError::QueueFull, req)) if started => {
                    held = Some((i, req));
                    break;
                }
                Err((e, _)) => {
                    if !started {
                        refusal.refused();
                    }
                    return Err(e.into());
                }
            }
        }
        match running.next().await {
            Some(done) => {
                let (i, v) = done?;
                out[i] = v;
            }
            None if held.is_none() => return Ok(out),
            // The queue is full of other requests' work: wait for room.
            None => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// Input `i`'s embedding, once its sequence has finished.
async fn vector(i: usize, mut rx: EventReceiver) -> Result<(usize, Vec<f32>), ApiError> {
    let mut vector = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Embedding(v) => vector = Some(v),
            Event::Finished { .. } => {
                return vector
                    .map(|v| (i, v))
                    .ok_or_else(|| ApiError::internal("the engine sent no embedding"))
            }
            Event::Failed(f) => return Err(ApiError::engine(f)),
            _ => {}
        }
    }
    Err(ApiError::engine_stopped())
}

/// A reply as the response cache keeps it: its vectors, then its usage.
fn to_recorded(vectors: &[Vec<f32>], usage: Usage) -> Recorded {
    let mut events: Vec<Event> = vectors.iter().cloned().map(Event::Embedding).collect();
    events.push(Event::Finished {
        reason: crate::engine::request::FinishReason::Stop,
        usage,
        stop_sequence: None,
        end_logprob: None,
    });
    events
}

fn from_recorded(events: &Recorded) -> (Vec<Vec<f32>>, Usage) {
    let mut vectors = Vec::new();
    let mut usage = Usage::default();
    for ev in events {
        match ev {
            Event::Embedding(v) => vectors.push(v.clone()),
            Event::Finished { usage: u, .. } => usage = *u,
            _ => {}
        }
    }
    (vectors, usage)
}
