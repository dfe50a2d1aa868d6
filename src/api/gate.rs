//! The gateway at the HTTP edge: who is asking (`auth`, re-exported here), the AI Gateway
//! request headers (`cf-aig-*`, `x-session-id`), OpenAI's
//! `x-ratelimit-*` answer headers, refusals as 429s, and the [`Tail`] that holds a reply's
//! end until its ledger row is committed and records it for the response cache.
//!
//! Knows headers and status codes; the decisions themselves live in `crate::gateway`.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use super::auth::{authenticate, presented_key, BatchCall};
use super::error::ApiError;
use super::AppState;
use crate::engine::request::{Event, EventReceiver, Tenant};
use crate::gateway::cache::{canonical_json, Leader};
use crate::gateway::limits::{RateInfo, Refusal, Scope};
use crate::gateway::price::Price;
use crate::gateway::Principal;

/// A recorded reply: the engine's events, replayed on a hit.
pub type Recorded = Vec<Event>;

/// Runs `f` on the gateway's stores on a blocking thread (a large conversation or file must
/// not hold an async worker); `what` names the store if the task itself fails. A store's
/// refusal of a field is a 400 naming it; any other store error a 500.
pub async fn on_store<T: Send + 'static>(
    state: &AppState,
    what: &'static str,
    f: impl FnOnce(&crate::gateway::Gateway) -> Result<T, crate::gateway::GatewayError> + Send + 'static,
) -> Result<T, ApiError> {
    use crate::gateway::GatewayError;
    let gateway = state.gateway.clone();
    tokio::task::spawn_blocking(move || f(&gateway))
        .await
        .map_err(|e| ApiError::internal(format!("the {what} store task failed: {e}")))?
        .map_err(|e| match e {
            GatewayError::Invalid { field, reason } => {
                ApiError::invalid(field.clone(), format!("`{field}` {reason}"))
            }
            e => ApiError::internal(e.to_string()),
        })
}

/// What a request's headers ask of the gateway.
#[derive(Debug, Clone, Default)]
pub struct Directives {
    /// Cache the reply for this long (`cf-aig-cache-ttl`, or the server default).
    pub cache_ttl: Option<Duration>,
    /// `cf-aig-skip-cache: true`: neither read nor write the cache.
    pub skip_cache: bool,
    /// `cf-aig-cache-key`: replaces the computed key (within the caller's key).
    pub cache_key: Option<String>,
    /// `cf-aig-custom-cost`.
    pub custom_cost: Option<Price>,
    pub session_id: Option<String>,
    /// `Idempotency-Key`: a retry with the same key and body gets the first attempt's reply.
    pub idempotency_key: Option<String>,
    /// `cf-aig-metadata`, canonical JSON.
    pub metadata: Option<String>,
    /// `cf-aig-request-timeout` (or the server default): the first part of the response
    /// must be ready within this time of the request's arrival, or the request is
    /// cancelled and answered 504.
    pub request_timeout: Option<Duration>,
    /// `x-edgeinfer-priority: low` (a batch's requests send it): admitted only when no other
    /// request waits, and preempted first.
    pub background: bool,
}

/// The server's defaults for requests whose headers do not say.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectiveDefaults {
    pub cache_ttl: Option<Duration>,
    pub request_timeout: Option<Duration>,
}

/// The longest `cf-aig-request-timeout`, in milliseconds (an hour).
const MAX_REQUEST_TIMEOUT_MS: u64 = 3_600_000;

impl Directives {
    pub fn from_headers(h: &HeaderMap, defaults: DirectiveDefaults) -> Result<Self, ApiError> {
        let text = |name: &'static str| -> Result<Option<&str>, ApiError> {
            match h.get(name) {
                None => Ok(None),
                Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| {
                    ApiError::invalid(name, format!("header `{name}` must be visible ASCII"))
                }),
            }
        };
        let cache_ttl = match text("cf-aig-cache-ttl")? {
            None => defaults.cache_ttl,
            Some(v) => match v.parse::<u64>() {
                Ok(0) => None,
                Ok(s) if s <= 31 * 86_400 => Some(Duration::from_secs(s)),
                _ => return Err(ApiError::invalid(
                    "cf-aig-cache-ttl",
                    "header `cf-aig-cache-ttl` must be whole seconds from 0 to 2678400 (31 days)",
                )),
            },
        };
        let skip_cache = match text("cf-aig-skip-cache")? {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(_) => {
                return Err(ApiError::invalid(
                    "cf-aig-skip-cache",
                    "header `cf-aig-skip-cache` must be true or false",
                ))
            }
        };
        let bounded = |name: &'static str, v: Option<&str>| -> Result<Option<String>, ApiError> {
            match v {
                Some(v) if v.is_empty() || v.len() > 256 => Err(ApiError::invalid(
                    name,
                    format!("header `{name}` must have 1 to 256 characters"),
                )),
                v => Ok(v.map(str::to_string)),
            }
        };
        let cache_key = bounded("cf-aig-cache-key", text("cf-aig-cache-key")?)?;
        let session_id = bounded("x-session-id", text("x-session-id")?)?;
        let idempotency_key = bounded("idempotency-key", text("idempotency-key")?)?;
        let custom_cost = text("cf-aig-custom-cost")?
            .map(Price::from_custom_cost)
            .transpose()?;
        let metadata = match text("cf-aig-metadata")? {
            None => None,
            Some(v) => match serde_json::from_str::<Value>(v) {
                Ok(m @ Value::Object(_)) if v.len() <= 4096 => Some(canonical_json(&m)),
                _ => {
                    return Err(ApiError::invalid(
                        "cf-aig-metadata",
                        "header `cf-aig-metadata` must be a JSON object of at most 4096 bytes",
                    ))
                }
            },
        };
        let request_timeout = match text("cf-aig-request-timeout")? {
            None => defaults.request_timeout,
            Some(v) => match v.parse::<u64>() {
                Ok(0) => None,
                Ok(ms) if ms <= MAX_REQUEST_TIMEOUT_MS => Some(Duration::from_millis(ms)),
                _ => return Err(ApiError::invalid(
                    "cf-aig-request-timeout",
                    format!("header `cf-aig-request-timeout` must be whole milliseconds from 0 (none) to {MAX_REQUEST_TIMEOUT_MS}"),
                )),
            },
        };
        let background = match text("x-edgeinfer-priority")? {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("low") => true,
            Some(v) if v.eq_ignore_ascii_case("normal") => false,
            Some(_) => {
                return Err(ApiError::invalid(
                    "x-edgeinfer-priority",
                    "header `x-edgeinfer-priority` must be low or normal",
                ))
            }
        };
        Ok(Self {
            background,
            cache_ttl,
            request_timeout,
            skip_cache,
            cache_key,
            custom_cost,
            session_id,
            idempotency_key,
            metadata,
        })
    }
}

/// Everything the gateway needs of one generation request.
pub struct Gate {
    /// The model (or adapter) the request runs on.
    pub served: super::handlers::Served,
    pub principal: Principal,
    pub directives: Directives,
    pub route: &'static str,
    /// The parsed body, for the cache key.
    pub body: Value,
    /// When the whole body had arrived: the request timeout counts from here.
    pub arrived: std::time::Instant,
    /// The batch line this request is an attempt at, if a batch's.
    pub attempt: Option<String>,
}

impl Gate {
    /// Whose request this is, for fair admission in the engine: the key's, else nobody's
    /// (0), with the key's weight. Never the body's `user`, which any client may vary to
    /// jump the queue.
    pub fn tenant(&self) -> Tenant {
        use std::hash::{Hash, Hasher};
        let background = self.directives.background;
        let Principal::Key(k) = &self.principal else {
            return Tenant {
                background,
                ..Tenant::from(0)
            };
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.id.hash(&mut h);
        Tenant {
            id: h.finish().max(1),
            weight: k.weight.unwrap_or(1).clamp(1, 100) as u32,
            background,
        }
    }

    /// The response-cache key, when this request may use the cache: asked for (a TTL, no
    /// skip) and deterministic (temperature 0 or a seed).
    pub fn cache_key(
        &self,
        deterministic: bool,
        model_hash: &str,
        template_hash: &str,
    ) -> Option<[u8; 32]> {
        let d = &self.directives;
        if d.cache_ttl.is_none() || d.skip_cache || !deterministic {
            return None;
        }
        self.key_of(None, model_hash, template_hash)
    }

    /// The key an `Idempotency-Key` request's reply is kept under: the key's own, the
    /// caller's, the model's and the body's (so a retry must send the same body).
    pub fn idempotency_key(&self, model_hash: &str, template_hash: &str) -> Option<[u8; 32]> {
        let idem = self.directives.idempotency_key.as_deref()?;
        self.key_of(Some(idem), model_hash, template_hash)
    }

    fn key_of(
        &self,
        idempotency: Option<&str>,
        model_hash: &str,
        template_hash: &str,
    ) -> Option<[u8; 32]> {
        let d = &self.directives;
        let mut scope = match &self.principal {
            Principal::Key(k) => format!("key:{}", k.id),
            Principal::Master => "master".into(),
            Principal::Anonymous => "anonymous".into(),
        };
        // A custom key is the caller's own: another key naming it neither reads nor
        // replaces this one's reply.
        if let Some(custom) = d.cache_key.as_ref().filter(|_| idempotency.is_none()) {
            return Some(crate::gateway::cache::cache_key(&[
                self.route,
                &scope,
                "custom",
                custom,
                &self.served.name,
                model_hash,
                template_hash,
            ]));
        }
        if let Some(idem) = idempotency {
            scope = format!("{scope}\nidempotency:{idem}");
        }
        Some(crate::gateway::cache::cache_key(&[
            self.route,
            &scope,
            model_hash,
            template_hash,
            &reply_body(&self.body),
        ]))
    }
}

/// A request body as reply keys read it: canonical JSON without the fields that change how
/// a reply is delivered or attributed, not what it says.
pub(super) fn reply_body(body: &Value) -> String {
    let mut body = body.clone();
    if let Some(m) = body.as_object_mut() {
        for f in ["stream", "stream_options", "user"] {
            m.remove(f);
        }
    }
    canonical_json(&body)
}

/// A refusal as OpenAI's 429, with honest retry hints.
pub fn refusal_error(r: Refusal, prompt: usize, max_tokens: usize, rate: RateInfo) -> ApiError {
    let scope = |s: Scope| match s {
        Scope::Key => "this key",
        Scope::Global => "this server",
    };
    let mut e = match r {
        Refusal::Tokens { limit, scope: s, retry_after } => {
            let need = format!("{} tokens ({prompt} in the prompt, up to {max_tokens} in the completion)", prompt + max_tokens);
            match retry_after {
                Some(d) => ApiError::rate_limited(
                    "rate_limit_exceeded",
                    format!("Rate limit reached for tokens per minute (TPM) on {}: limit {limit}, this request reserves {need}. Please try again in {}.", scope(s), fmt_duration(d)),
                    Some(d),
                ),
                None => ApiError::rate_limited(
                    "rate_limit_exceeded",
                    format!("Request too large for the tokens per minute (TPM) limit of {limit} on {}: it reserves {need}. Lower max_tokens or the prompt.", scope(s)),
                    None,
                ),
            }
        }
        Refusal::Requests { limit, scope: s, retry_after } => ApiError::rate_limited(
            "rate_limit_exceeded",
            format!("Rate limit reached for requests per minute (RPM) on {}: limit {limit}. Please try again in {}.", scope(s), fmt_duration(retry_after)),
            Some(retry_after),
        ),
        Refusal::Parallel { limit } => ApiError::rate_limited(
            "rate_limit_exceeded",
            format!("This key already has its maximum of {limit} requests running. Retry when one finishes."),
            Some(Duration::from_secs(1)),
        ),
        Refusal::BudgetHeld { budget_micros } => ApiError::rate_limited(
            "rate_limit_exceeded",
            format!(
                "This key's budget of ${:.6} is held by its requests running (the most each could cost). Retry when one finishes, or set max_tokens to reserve less.",
                budget_micros as f64 / 1e6
            ),
            Some(Duration::from_secs(1)),
        ),
        Refusal::Budget { budget_micros, retry_after } => {
            let mut e = ApiError::rate_limited(
                "insufficient_quota",
                format!(
                    "You exceeded this key's budget of ${:.6}{}.",
                    budget_micros as f64 / 1e6,
                    retry_after.map_or(String::new(), |d| format!("; it resets in {}", fmt_duration(d)))
                ),
                retry_after,
            );
            if retry_after.is_some() {
                e.headers.push(("x-should-retry", "false".into()));
            }
            e
        }
    };
    e.headers.extend(rate_headers(rate));
    e
}

/// OpenAI's `x-ratelimit-*` headers for the windows that apply.
pub fn rate_headers(r: RateInfo) -> Vec<(&'static str, String)> {
    let mut h = Vec::new();
    if let Some((limit, remaining, reset)) = r.requests {
        h.push(("x-ratelimit-limit-requests", limit.to_string()));
        h.push(("x-ratelimit-remaining-requests", remaining.to_string()));
        h.push(("x-ratelimit-reset-requests", fmt_duration(reset)));
    }
    if let Some((limit, remaining, reset)) = r.tokens {
        h.push(("x-ratelimit-limit-tokens", limit.to_string()));
        h.push(("x-ratelimit-remaining-tokens", remaining.to_string()));
        h.push(("x-ratelimit-reset-tokens", fmt_duration(reset)));
    }
    h
}

pub fn add_headers(resp: &mut Response, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
}

/// OpenAI's duration form: `20ms`, `7.2s`, `6m0s`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let s = format!("{:.3}", d.as_secs_f64());
        format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// What a reply's renderer (whole or SSE) does with each engine event before showing it:
/// hold `Finished` back until the ledger row is committed, and record the reply when leading
/// a response-cache key. Dropped with the renderer (the client left): the leader goes too,
/// and its waiters look again.
#[derive(Default)]
pub struct Tail {
    committed: Option<oneshot::Receiver<bool>>,
    leader: Option<Leader<Recorded>>,
    recorded: Recorded,
}

impl Tail {
    pub fn new(
        committed: Option<oneshot::Receiver<bool>>,
        leader: Option<Leader<Recorded>>,
    ) -> Self {
        Self {
            committed,
            leader,
            recorded: Vec::new(),
        }
    }

    pub async fn observe(&mut self, ev: &Event) {
        if self.leader.is_some() {
            self.recorded.push(ev.clone());
        }
        if !matches!(ev, Event::Finished { .. }) {
            return;
        }
        if let Some(c) = self.committed.take() {
            if !matches!(c.await, Ok(true)) {
                tracing::error!("the ledger row of a finished request was not committed");
            }
        }
        if let Some(l) = self.leader.take() {
            let recorded = std::mem::take(&mut self.recorded);
            let bytes = recorded_bytes(&recorded);
            l.fill(recorded, bytes);
        }
    }
}

/// Runs an `Idempotency-Key` request's events into the cache through a relay of its own: the
/// reply is recorded and stored even when its client goes away (the engine keeps going; a
/// retry waits for it and replays), and passed on to the client while it is there.
///
/// The reply is kept once its ledger row is committed (`committed`), so that a retry woken
/// by it finds the first attempt settled; the returned receiver resolves then, for the
/// client's [`Tail`] to send its last chunk after the row as always.
pub fn detach(
    mut from: EventReceiver,
    leader: Leader<Recorded>,
    committed: oneshot::Receiver<bool>,
) -> (EventReceiver, oneshot::Receiver<bool>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (done_tx, done) = oneshot::channel();
    tokio::spawn(async move {
        let mut recorded = Vec::new();
        while let Some(ev) = from.recv().await {
            let finished = matches!(ev, Event::Finished { .. });
            if matches!(ev, Event::Failed(_)) {
                // Its end (a stalled engine may never close the channel).
                let _ = tx.send(ev);
                break;
            }
            recorded.push(ev.clone());
            let _ = tx.send(ev);
            if finished {
                let ok = matches!(committed.await, Ok(true));
                let bytes = recorded_bytes(&recorded);
                leader.fill(recorded, bytes);
                let _ = done_tx.send(ok);
                return;
            }
        }
        // Failed or dropped: the leader goes, and a retry generates afresh.
    });
    (rx, done)
}

/// A recorded reply as a fresh event stream.
pub fn replay(events: &Recorded) -> EventReceiver {
    let (tx, rx) = mpsc::unbounded_channel();
    for ev in events {
        let _ = tx.send(ev.clone());
    }
    rx
}

/// About how much memory a recorded reply holds.
pub(super) fn recorded_bytes(events: &Recorded) -> usize {
    events
        .iter()
        .map(|e| match e {
            Event::Token { text, logprob, .. } => {
                64 + text.len() + logprob.as_ref().map_or(0, logprob_bytes)
            }
            Event::Prompt { first, logprobs } => {
                64 + first.len() + logprobs.iter().map(logprob_bytes).sum::<usize>()
            }
            Event::Embedding(v) => 64 + 4 * v.len(),
            _ => 64,
        })
        .sum()
}

fn logprob_bytes(l: &crate::engine::request::LogprobInfo) -> usize {
    let token = |t: &crate::engine::request::TokenLogprob| 48 + t.token.len() * 2;
    64 + token(&l.chosen) + l.top_logprobs.iter().map(token).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openai() {
        assert_eq!(fmt_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(fmt_duration(Duration::from_millis(7200)), "7.2s");
        assert_eq!(fmt_duration(Duration::from_secs(1)), "1s");
        assert_eq!(fmt_duration(Duration::from_secs(360)), "6m0s");
    }

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(presented_key(&h).as_deref(), Some("k2"));
        h.insert("authorization", HeaderValue::from_static("Bearer k1"));
        assert_eq!(presented_key(&h).as_deref(), Some("k1"));
    }

    #[test]
    fn bad_gateway_headers_name_themselves() {
        for (name, value) in [
            ("cf-aig-cache-ttl", "soon"),
            ("cf-aig-skip-cache", "maybe"),
            ("cf-aig-metadata", "[1]"),
            ("cf-aig-custom-cost", "{\"per_token_in\": -1}"),
            ("cf-aig-request-timeout", "5s"),
            ("cf-aig-request-timeout", "3600001"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_str(value).unwrap());
            let e = Directives::from_headers(&h, DirectiveDefaults::default()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(name), "{e:?}");
            assert_eq!(e.status.as_u16(), 400);
        }
        let mut h = HeaderMap::new();
        h.insert(
            "cf-aig-metadata",
            HeaderValue::from_static("{\"b\": 1, \"a\": \"x\"}"),
        );
        h.insert("cf-aig-cache-ttl", HeaderValue::from_static("60"));
        let d = Directives::from_headers(&h, DirectiveDefaults::default()).unwrap();
        assert_eq!(d.metadata.as_deref(), Some("{\"a\":\"x\",\"b\":1}"));
        assert_eq!(d.cache_ttl, Some(Duration::from_secs(60)));
        assert_eq!(d.request_timeout, None);
        // The header overrides the server's default, 0 turning it off.
        let defaults = DirectiveDefaults {
            cache_ttl: None,
            request_timeout: Some(Duration::from_secs(9)),
        };
        let d = Directives::from_headers(&h, defaults).unwrap();
        assert_eq!(d.request_timeout, Some(Duration::from_secs(9)));
        h.insert("cf-aig-request-timeout", HeaderValue::from_static("250"));
        let d = Directives::from_headers(&h, defaults).unwrap();
        assert_eq!(d.request_timeout, Some(Duration::from_millis(250)));
        h.insert("cf-aig-request-timeout", HeaderValue::from_static("0"));
        let d = Directives::from_headers(&h, defaults).unwrap();
        assert_eq!(d.request_timeout, None);
    }
}
