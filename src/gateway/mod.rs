//! The gateway: virtual keys, rate limits and budgets by reservation, the request ledger,
//! prices, and the response cache's bookkeeping. Knows keys, tokens, money and time; never
//! axum or tensors.
//!
//! ```text
//! authenticate(key) -> Principal
//! admit(Principal, Ask) -> Meter (holds a Grant: tokens, requests, money, a parallel slot)
//!     engine runs the request; at its end (finished, failed, cancelled) the engine's
//!     UsageSink calls Meter::finish(usage): cost computed, what was not used given back,
//!     one ledger row committed (the acknowledgement comes back on a oneshot)
//! ```
//!
//! Invariant: every admitted request is settled exactly once (by `finish`, or by dropping its
//! `Meter` when it never ran), so no window leaks a reservation.

pub mod batches;
pub mod cache;
pub mod conversations;
pub mod db;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod price;
pub mod retention;
pub mod usage;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::engine::request::FinishReason;
use crate::engine::request::{EndReport, Ending, Usage};
use keys::{KeyRecord, KeyStore};
use ledger::{Ledger, Row};
use limits::{Ask, Grant, LimitSpec, Limits, RateInfo, Refusal};
use price::{Price, PriceTable, Tokens};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("the key and ledger store {path}: {reason}")]
    Store { path: PathBuf, reason: String },
    #[error("the key and ledger store: {0}")]
    Db(String),
    #[error("price file {path}: {reason}")]
    Prices { path: PathBuf, reason: String },
    #[error("`{field}` {reason}")]
    Invalid { field: String, reason: String },
    #[error("no such key")]
    UnknownKey,
}

impl GatewayError {
    fn db(e: rusqlite::Error) -> Self {
        Self::Db(e.to_string())
    }
}

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Principal {
    /// Auth is off (loopback without keys) and no known key was sent.
    Anonymous,
    /// The master key: admin routes, no limits.
    Master,
    Key(Arc<KeyRecord>),
}

impl Principal {
    /// What it stores (the Batch API's files and batches) is kept under: its kind (`key`,
    /// `master`, `anonymous`) and its owner (the key id, `(master)`, or `''`).
    pub fn owner(&self) -> (&'static str, &str) {
        match self {
            Principal::Anonymous => ("anonymous", ""),
            Principal::Master => ("master", "(master)"),
            Principal::Key(k) => ("key", &k.id),
        }
    }

    pub fn key_id(&self) -> Option<&str> {
        match self {
            Principal::Key(k) => Some(&k.id),
            _ => None,
        }
    }

    fn limits(&self) -> Option<LimitSpec> {
        match self {
            Principal::Key(k) => Some(k.limit_spec()),
            _ => None,
        }
    }
}

/// Why a presented credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Invalid,
    Expired,
    /// The key store could not be read: try again (never taken as a revoked key).
    Unavailable,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub db_path: PathBuf,
    pub master_key: Option<String>,
    pub prices: PriceTable,
    pub global_tpm: Option<u64>,
    pub global_rpm: Option<u64>,
    /// How long stored responses are kept (`None`: until deleted).
    pub responses_retention: Option<std::time::Duration>,
    /// Whole days of ledger rows kept (`None`: every row); older rows are folded into daily
    /// totals (see [`retention`]).
    pub ledger_retention_days: Option<u32>,
}

pub struct Gateway {
    pub keys: KeyStore,
    /// Stored responses of the Responses API.
    pub conversations: conversations::Conversations,
    /// The Batch API's files and batches.
    pub batches: batches::Batches,
    pub ledger: Ledger,
    pub prices: PriceTable,
    limits: Mutex<Limits>,
    master_key: Option<String>,
    /// Whether every request must carry a key: a master key is set or keys were seen.
    auth_required: AtomicBool,
}

/// Labels of one request for its ledger row (never text).
#[derive(Debug, Clone, Default)]
pub struct Labels {
    pub request_id: String,
    pub model: String,
    pub route: String,
    pub session_id: Option<String>,
    pub metadata: Option<String>,
    /// The batch line this request is an attempt at (see [`Row::attempt`]).
    pub attempt: Option<String>,
}

impl Gateway {
    pub fn open(config: GatewayConfig) -> Result<Self, GatewayError> {
        let keys = KeyStore::new(db::open(&config.db_path)?)?;
        let ledger = Ledger::start(&config.db_path)?;
        if let Some(days) = config.ledger_retention_days {
            retention::keep(&config.db_path, days)?;
        }
        let auth_required = AtomicBool::new(config.master_key.is_some() || keys.count()? > 0);
        Ok(Self {
            keys,
            conversations: conversations::Conversations::new(
                db::open(&config.db_path)?,
                config.responses_retention,
            )?,
            batches: batches::Batches::new(db::open(&config.db_path)?)?,
            ledger,
            prices: config.prices,
            limits: Mutex::new(Limits::new(config.global_tpm, config.global_rpm)),
            master_key: config.master_key,
            auth_required,
        })
    }

    /// Whether every request needs a key: with a master key, or once the store holds keys
    /// (also keys made offline with `edgeinfer keys` while the server runs). Once on, it
    /// stays on until a restart; while the store cannot be read, it is on for that request.
    pub fn auth_required(&self) -> bool {
        if self.auth_required.load(Ordering::Relaxed) {
            return true;
        }
        match self.keys.count() {
            Ok(0) => false,
            Ok(_) => {
                self.auth_required.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the key store failed; a key is required");
                true
            }
        }
    }

    fn limits(&self) -> std::sync::MutexGuard<'_, Limits> {
        self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The principal of a presented key. With auth off, an unknown or missing key is
    /// anonymous (clients send placeholder keys); a known one is still metered as itself.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<Principal, AuthError> {
        let Some(key) = presented.filter(|k| !k.is_empty()) else {
            return if self.auth_required() {
                Err(AuthError::Missing)
            } else {
                Ok(Principal::Anonymous)
            };
        };
        if let Some(master) = &self.master_key {
            if keys::secrets_equal(key, master) {
                return Ok(Principal::Master);
            }
        }
        let found = self.keys.lookup(key).map_err(|e| {
            tracing::error!(error = %e, "key lookup failed");
            AuthError::Unavailable
        })?;
        match found {
            Some(k) if k.expired(db::unix_now()) => Err(AuthError::Expired),
            Some(k) => Ok(Principal::Key(k)),
            None if self.auth_required() => Err(AuthError::Invalid),
            None => Ok(Principal::Anonymous),
        }
    }

    /// Whom a stored batch's requests run as now, from [`Principal::owner`]: the key while it
    /// is live (revoked: `Invalid`), the master while one is set, nobody only while auth is off.
    pub fn principal_of(&self, kind: &str, owner: &str) -> Result<Principal, AuthError> {
        match kind {
            "master" if self.master_key.is_some() => Ok(Principal::Master),
            "anonymous" if !self.auth_required() => Ok(Principal::Anonymous),
            "key" => match self.keys.resolve(owner) {
                Ok(Some(k)) if k.id == owner && k.expired(db::unix_now()) => {
                    Err(AuthError::Expired)
                }
                Ok(Some(k)) if k.id == owner => Ok(Principal::Key(k)),
                Ok(_) => Err(AuthError::Invalid),
                Err(e) => {
                    tracing::error!(error = %e, "key lookup failed");
                    Err(AuthError::Unavailable)
                }
            },
            _ => Err(AuthError::Missing),
        }
    }

    /// Whether `presented` is the master key.
    pub fn is_master(&self, presented: Option<&str>) -> bool {
        match (&self.master_key, presented) {
            (Some(m), Some(p)) => keys::secrets_equal(p, m),
            _ => false,
        }
    }

    /// The price of a request: the custom one if given, else that of the first of `models`
    /// the table names (a LoRA adapter, then its base model), else the default.
    pub fn price(&self, models: &[&str], custom: Option<Price>) -> Price {
        custom.unwrap_or_else(|| self.prices.price_first(models))
    }

    /// Reserves a request's tokens, request slot and money, or says why not (and writes a
    /// `rate_limited` ledger row).
    pub fn admit(
        self: &Arc<Self>,
        who: &Principal,
        ask: Ask,
        labels: Labels,
    ) -> Result<Meter, (Refusal, RateInfo)> {
        let spec = who.limits();
        let key = who.key_id().zip(spec.as_ref());
        let now = Instant::now();
        let unix = db::unix_now();
        let spent = self.spend_read_first(key, unix);
        let mut limits = self.limits();
        match limits.admit(key, ask, now, unix, spent) {
            Ok(grant) => {
                let rate = limits.rate_info(who.key_id(), now);
                drop(limits);
                Ok(Meter {
                    gateway: self.clone(),
                    grant: Some(grant),
                    price: ask.price,
                    key_id: who.key_id().map(str::to_string),
                    labels,
                    received: now,
                    rate,
                })
            }
            Err(refusal) => {
                let rate = limits.rate_info(who.key_id(), now);
                drop(limits);
                let row = Row {
                    status: "rate_limited",
                    ..self.row(who.key_id(), &labels, now)
                };
                self.ledger.record_then(row, None);
                Err((refusal, rate))
            }
        }
    }

    /// The windows a response reports for this principal.
    pub fn rate_info(&self, who: &Principal) -> RateInfo {
        self.limits().rate_info(who.key_id(), Instant::now())
    }

    /// How many of a key's parallel slots are free now (`None`: no cap).
    pub fn free_slots(&self, who: &Principal) -> Option<u64> {
        let Principal::Key(k) = who else { return None };
        let max = k.limit_spec().max_parallel?;
        Some(max.saturating_sub(self.limits().running(&k.id)))
    }

    /// A key's spend in the budget period from `period_start`, if known in memory.
    pub fn spend(&self, key_id: &str, period_start: i64) -> Option<u64> {
        self.limits().spend(key_id, period_start)
    }

    /// Admits and meters a reply replayed from the response cache: no tokens reserved or
    /// computed, its own price, one `cached` row; refused (and ledgered as such) when the key's
    /// budget is spent or cannot pay for it. Returns the commit acknowledgement.
    pub fn admit_cache_hit(
        &self,
        who: &Principal,
        usage: Usage,
        price: Price,
        replayed: bool,
        labels: &Labels,
        received: Instant,
    ) -> Result<oneshot::Receiver<bool>, (Refusal, RateInfo)> {
        let tokens = tokens_of(usage);
        if replayed {
            // An `Idempotency-Key` retry: the first attempt was admitted and paid; its
            // reply is handed over whatever the limits say now, at no cost.
            return Ok(self.ledger.record(Row {
                status: "replayed",
                finish_reason: None,
                prompt_tokens: tokens.prompt,
                cached_tokens: tokens.cached,
                completion_tokens: tokens.completion,
                cost_micros: 0,
                ..self.row(who.key_id(), labels, received)
            }));
        }
        let cost = price.cached_cost(tokens);
        let spec = who.limits();
        let key = who.key_id().zip(spec.as_ref());
        let unix = db::unix_now();
        let spent = self.spend_read_first(key, unix);
        // (The period this admission holds the key's spend for, loaded by it or before.)
        let period = spec.as_ref().map(|s| limits::period_start(s, unix));
        let refund = self.attempt_refund(who.key_id(), labels, period);
        let mut limits = self.limits();
        let admitted = limits.admit_cached(key, cost, unix, spent);
        if let Err(refusal) = admitted {
            let rate = limits.rate_info(who.key_id(), Instant::now());
            drop(limits);
            let row = Row {
                status: "rate_limited",
                ..self.row(who.key_id(), labels, received)
            };
            self.ledger.record_then(row, None);
            return Err((refusal, rate));
        }
        if let Some((key, period, cost)) = refund {
            limits.refund(key, period, cost);
        }
        drop(limits);
        Ok(self.ledger.record(Row {
            status: "cached",
            finish_reason: None,
            prompt_tokens: tokens.prompt,
            cached_tokens: tokens.cached,
            completion_tokens: tokens.completion,
            cost_micros: cost,
            ..self.row(who.key_id(), labels, received)
        }))
    }

    /// Ledgers a request the engine had no room for (a full queue, or shutting down): nothing
    /// computed or charged, status `rejected`.
    pub fn record_rejected(&self, key_id: Option<&str>, labels: &Labels, received: Instant) {
        let row = Row {
            status: "rejected",
            ..self.row(key_id, labels, received)
        };
        self.ledger.record_then(row, None);
    }

    /// A request that ran out of time before it was admitted (waiting for an identical one,
    /// or in templating): a `cancelled` row, nothing computed or charged.
    pub fn record_timed_out(&self, key_id: Option<&str>, labels: &Labels, received: Instant) {
        let row = Row {
            status: "cancelled",
            ..self.row(key_id, labels, received)
        };
        self.ledger.record_then(row, None);
    }

    /// Before the row of a batch line's attempt that ran is written: its earlier attempts'
    /// cost, which that row supersedes, is to leave the key's spend held in memory (the
    /// ledger's sums leave it out once the row is written). Read from the ledger before the
    /// limits' lock is taken: the key, the period it was read for, and the cost.
    fn attempt_refund<'k>(
        &self,
        key_id: Option<&'k str>,
        labels: &Labels,
        period: Option<i64>,
    ) -> Option<(&'k str, i64, u64)> {
        let (Some(key), Some(attempt)) = (key_id, labels.attempt.as_deref()) else {
            return None;
        };
        let period = period.or_else(|| self.limits().loaded_period(key))?;
        let cost = self
            .ledger
            .attempt_cost(attempt, period)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading a batch line's earlier cost failed");
                0
            });
        Some((key, period, cost))
    }

    /// The ledger read an admission at `unix` needs, done before the lock over every key's
    /// windows is taken (a sum over a large ledger must not hold every other admission, nor
    /// the engine thread settling a reply): `spent(period_start)` for the admission.
    fn spend_read_first(
        &self,
        key: Option<(&str, &LimitSpec)>,
        unix: i64,
    ) -> impl FnOnce(i64) -> Option<u64> {
        let read = key.and_then(|(id, spec)| {
            let start = self.limits().spend_to_read(id, spec, unix)?;
            Some((start, self.spent(id, start)))
        });
        move |since| match read {
            Some((start, spent)) if start == since => spent,
            // Read by another admission meanwhile; a miss is read again at the next.
            _ => None,
        }
    }

    /// A key's spend since `since` in the ledger (`None`, logged, if it cannot be read).
    fn spent(&self, key_id: &str, since: i64) -> Option<u64> {
        self.ledger
            .spent(key_id, since)
            .map_err(|e| tracing::error!(error = %e, "reading a key's spend failed; counting what this process saw until it is read"))
            .ok()
    }

    fn row(&self, key_id: Option<&str>, labels: &Labels, received: Instant) -> Row {
        Row {
            ts_ms: db::unix_ms(),
            request_id: labels.request_id.clone(),
            key_id: key_id.map(str::to_string),
            model: labels.model.clone(),
            route: labels.route.clone(),
            session_id: labels.session_id.clone(),
            metadata: labels.metadata.clone(),
            attempt: labels.attempt.clone(),
            duration_ms: received.elapsed().as_millis() as i64,
            ..Row::default()
        }
    }
}

fn tokens_of(u: Usage) -> Tokens {
    Tokens {
        prompt: u.prompt_tokens as u64,
        cached: u.cached_tokens as u64,
        completion: u.completion_tokens as u64,
    }
}

/// An admitted request's reservation and ledger labels, settled once.
pub struct Meter {
    gateway: Arc<Gateway>,
    grant: Option<Grant>,
    price: Price,
    key_id: Option<String>,
    labels: Labels,
    received: Instant,
    /// The windows after admission, for the response headers.
    pub rate: RateInfo,
}

impl Meter {
    /// The completion budget granted (the stream ends with `length` there).
    pub fn max_tokens(&self) -> u64 {
        self.grant.as_ref().map_or(0, |g| g.max_tokens)
    }

    /// Settles with what the request computed and commits its ledger row; `ack` hears when
    /// the row is committed.
    pub fn finish(mut self, report: EndReport, ack: Option<oneshot::Sender<bool>>) {
        let tokens = tokens_of(report.usage);
        let cost = self.price.cost(tokens);
        if let Some(grant) = self.grant.take() {
            let used = tokens.prompt + tokens.completion;
            let key = self.key_id.as_deref();
            let refund = self.gateway.attempt_refund(key, &self.labels, None);
            let mut limits = self.gateway.limits();
            limits.settle(&grant, Some((used, cost)), Instant::now());
            if let Some((key, period, cost)) = refund {
                limits.refund(key, period, cost);
            }
        }
        let (status, finish) = match report.ending {
            Ending::Finished(FinishReason::Stop) => ("ok", Some("stop")),
            Ending::Finished(FinishReason::Length) => ("ok", Some("length")),
            Ending::Cancelled => ("cancelled", None),
            Ending::Failed => ("error", None),
        };
        let row = Row {
            status,
            finish_reason: finish,
            prompt_tokens: tokens.prompt,
            cached_tokens: tokens.cached.min(tokens.prompt),
            completion_tokens: tokens.completion,
            cost_micros: cost,
            ttft_ms: report
                .first_token_at
                .map(|t| t.saturating_duration_since(self.received).as_millis() as i64),
            ..self
                .gateway
                .row(self.key_id.as_deref(), &self.labels, self.received)
        };
        self.gateway.ledger.record_then(row, ack);
    }
}

impl Drop for Meter {
    /// A request that never ran (refused by the engine's full queue, or by a server shutting
    /// down) gives everything back and is ledgered as `rejected`.
    fn drop(&mut self) {
        if let Some(grant) = self.grant.take() {
            self.gateway.limits().settle(&grant, None, Instant::now());
            self.gateway
                .record_rejected(self.key_id.as_deref(), &self.labels, self.received);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_store_that_cannot_be_read_is_unavailable_not_a_revoked_key() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("g.db");
        let g = Gateway::open(GatewayConfig {
            db_path: db_path.clone(),
            master_key: Some("sk-master".into()),
            prices: PriceTable::default(),
            global_tpm: None,
            global_rpm: None,
            responses_retention: None,
            ledger_retention_days: None,
        })
        .unwrap();
        assert!(matches!(
            g.authenticate(Some("sk-unknown")),
            Err(AuthError::Invalid)
        ));
        // The store breaks (a disk error, a schema another binary changed).
        let conn = rusqlite::Connection::open(&db_path).unwrap();
        conn.execute_batch("DROP TABLE meta").unwrap();
        assert!(matches!(
            g.authenticate(Some("sk-unknown")),
            Err(AuthError::Unavailable)
        ));
        assert!(matches!(
            g.principal_of("key", "some-key-id"),
            Err(AuthError::Unavailable)
        ));
        // The master key needs no store.
        assert!(matches!(
            g.authenticate(Some("sk-master")),
            Ok(Principal::Master)
        ));
    }
}
