//! Rate limits and budgets by reservation. At admission a request reserves its prompt tokens
//! plus its completion budget against every window that applies (the key's tokens and
//! requests per minute, its parallel requests and money budget, the global windows), all or
//! nothing under one lock; at its end what it did not use is given back.
//!
//! Pure: knows tokens, money and time (passed in); never HTTP or the store. Invariant: the
//! tokens admitted in any window never exceed its limit, however many requests race, because
//! a reservation is the most a request can use (its `max_tokens` is clamped to what it got).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::price::Price;

/// A token bucket: holds up to `limit`, refills `limit` per minute, continuously.
#[derive(Debug, Clone)]
struct Bucket {
    limit: u64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(limit: u64, now: Instant) -> Self {
        Self {
            limit,
            level: limit as f64,
            at: now,
        }
    }

    fn rate(&self) -> f64 {
        self.limit as f64 / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.rate()).min(self.limit as f64);
        self.at = now;
    }

    fn available(&self) -> u64 {
        self.level.max(0.0).floor() as u64
    }

    /// How long until `n` fit; `None` when `n` is more than the bucket ever holds.
    fn wait_for(&self, n: u64) -> Option<Duration> {
        if n > self.limit {
            return None;
        }
        let short = n as f64 - self.level;
        Some(if short <= 0.0 || self.limit == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(short / self.rate())
        })
    }

    fn until_full(&self) -> Duration {
        self.wait_for(self.limit).unwrap_or_default()
    }

    fn take(&mut self, n: u64) {
        self.level -= n as f64;
    }

    fn give(&mut self, n: u64) {
        self.level = (self.level + n as f64).min(self.limit as f64);
    }

    /// Follows a changed limit, keeping what is already used.
    fn set_limit(&mut self, limit: u64) {
        if limit != self.limit {
            let used = self.limit as f64 - self.level;
            self.limit = limit;
            self.level = limit as f64 - used;
        }
    }
}

/// The windows of one key (or the global ones, with no budget or parallel cap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitSpec {
    pub tpm: Option<u64>,
    pub rpm: Option<u64>,
    pub max_parallel: Option<u64>,
    pub max_budget_micros: Option<u64>,
    /// Budget period; `None`: the budget is for the key's whole life.
    pub budget_duration_secs: Option<u64>,
    /// Unix seconds the budget periods count from (the key's creation).
    pub created: i64,
}

#[derive(Debug, Default)]
struct Windows {
    tokens: Option<Bucket>,
    requests: Option<Bucket>,
    parallel: u64,
    /// Spend in the current budget period, and what running requests may still add.
    spend: u64,
    reserved_cost: u64,
    period_start: i64,
    loaded: bool,
}

impl Windows {
    fn follow(&mut self, spec: &LimitSpec, now: Instant) {
        let sync = |b: &mut Option<Bucket>, limit: Option<u64>| match (b.as_mut(), limit) {
            (Some(b), Some(l)) => b.set_limit(l),
            (None, Some(l)) => *b = Some(Bucket::new(l, now)),
            (_, None) => *b = None,
        };
        sync(&mut self.tokens, spec.tpm);
        sync(&mut self.requests, spec.rpm);
        for b in [&mut self.tokens, &mut self.requests].into_iter().flatten() {
            b.refill(now);
        }
    }

    /// Reads the key's spend from the ledger once per budget period. A new period's is read
    /// too: a request admitted in the last one that ended in this one is billed here (and a
    /// changed `budget_duration` moves the period). A spend that could not be read is read
    /// again at the next admission; until then it is what this process counted in the period
    /// (nothing, in a new one), and a later read never counts less than that (a row may be
    /// still on its way to the ledger).
    fn load_spend(&mut self, spec: &LimitSpec, unix: i64, spent: impl FnOnce(i64) -> Option<u64>) {
        let start = period_start(spec, unix);
        if !self.loaded || self.period_start != start {
            let read = spent(start);
            let counted = if self.period_start == start {
                self.spend
            } else {
                0
            };
            self.spend = read.map_or(counted, |r| r.max(counted));
            self.period_start = start;
            self.loaded = read.is_some();
        }
    }

    /// The money budget's refusal, retried when the period resets (if it does).
    fn budget_refusal(&self, budget: u64, spec: &LimitSpec, unix: i64) -> Refusal {
        let retry_after = spec
            .budget_duration_secs
            .map(|d| Duration::from_secs((self.period_start + d as i64 - unix).max(1) as u64));
        Refusal::Budget {
            budget_micros: budget,
            retry_after,
        }
    }
}

/// Start of the budget period that contains `unix`.
pub fn period_start(spec: &LimitSpec, unix: i64) -> i64 {
    match spec.budget_duration_secs {
        Some(d) if d > 0 && unix >= spec.created => {
            spec.created + (unix - spec.created) / d as i64 * d as i64
        }
        _ => spec.created,
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub prompt: u64,
    /// The completion budget: the client's `max_tokens`, or the rest of the context.
    pub max_tokens: u64,
    /// Whether the client set `max_tokens` (then it is never clamped: it fits or is refused).
    pub explicit: bool,
    pub price: Price,
    /// The engine sequences it runs (its choices: prompts times `n` or `best_of`); each
    /// holds one of the key's parallel slots.
    pub sequences: u64,
}

impl Ask {
    /// The completion (at most `fits` tokens) whose most possible cost fits `left`: `fits`
    /// itself with an explicit `max_tokens`, else the largest that fits; `None` if none does.
    fn completion_within(&self, fits: u64, left: u64) -> Option<u64> {
        let mut n = fits;
        if self.price.bound(self.prompt, n) > left && !self.explicit && self.price.output > 0 {
            // The largest completion whose bound fits (bound is monotone in n).
            let (mut lo, mut hi) = (0, n);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if self.price.bound(self.prompt, mid) <= left {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            n = lo;
        }
        let none = (n == 0 && self.max_tokens > 0) || self.price.bound(self.prompt, n) > left;
        (!none).then_some(n)
    }
}

/// An admitted request's hold on its windows; give it back with [`Limits::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The completion budget granted: `Ask::max_tokens`, or less when a window or budget
    /// only fits less (the stream then ends with `length`).
    pub max_tokens: u64,
    key: Option<String>,
    tokens: u64,
    cost: u64,
    sequences: u64,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A tokens-per-minute window; `retry_after` is `None` when the request is larger than the
    /// window itself.
    Tokens {
        limit: u64,
        scope: Scope,
        retry_after: Option<Duration>,
    },
    Requests {
        limit: u64,
        scope: Scope,
        retry_after: Duration,
    },
    Parallel {
        limit: u64,
    },
    /// The key's money budget; `retry_after` is the time until the period resets, if it does.
    Budget {
        budget_micros: u64,
        retry_after: Option<Duration>,
    },
    /// The key's money budget is not spent but held by its running requests (the most each
    /// could cost): one of them ending gives back what it did not use.
    BudgetHeld {
        budget_micros: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    Global,
}

/// The window a response reports in OpenAI's `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateInfo {
    pub requests: Option<(u64, u64, Duration)>,
    pub tokens: Option<(u64, u64, Duration)>,
}

#[derive(Debug, Default)]
pub struct Limits {
    global_spec: LimitSpec,
    global: Windows,
    keys: HashMap<String, Windows>,
}

impl Limits {
    pub fn new(global_tpm: Option<u64>, global_rpm: Option<u64>) -> Self {
        Self {
            global_spec: LimitSpec {
                tpm: global_tpm,
                rpm: global_rpm,
                ..LimitSpec::default()
            },
            ..Self::default()
        }
    }

    /// Admits or refuses a request, atomically over every window. `key`: the key's id and
    /// windows; `spent(period_start)`: the key's spend since then in the ledger (read once
    /// per key and period).
    pub fn admit(
        &mut self,
        key: Option<(&str, &LimitSpec)>,
        ask: Ask,
        now: Instant,
        unix: i64,
        spent: impl FnOnce(i64) -> Option<u64>,
    ) -> Result<Grant, Refusal> {
        let Limits {
            global_spec,
            global,
            keys,
        } = self;
        global.follow(global_spec, now);
        let mut windows: Vec<(&mut Windows, Scope, &LimitSpec)> = Vec::new();
        if let Some((id, spec)) = key {
            let w = keys.entry(id.to_string()).or_default();
            w.follow(spec, now);
            w.load_spend(spec, unix, spent);
            if let Some(max) = spec.max_parallel {
                if w.parallel + ask.sequences > max {
                    return Err(Refusal::Parallel { limit: max });
                }
            }
            windows.push((w, Scope::Key, spec));
        }
        windows.push((global, Scope::Global, global_spec));

        // Requests per minute.
        for (w, scope, _) in &windows {
            if let Some(b) = &w.requests {
                if b.available() < 1 {
                    return Err(Refusal::Requests {
                        limit: b.limit,
                        scope: *scope,
                        retry_after: b.wait_for(1).unwrap_or(Duration::from_secs(60)),
                    });
                }
            }
        }
        // Tokens: what completion budget fits every window.
        let mut fits = ask.max_tokens;
        for (w, scope, _) in &windows {
            if let Some(b) = &w.tokens {
                let room = b.available().saturating_sub(ask.prompt);
                let need = ask.prompt + if ask.explicit { ask.max_tokens } else { 1 };
                // A prompt-only request (embeddings, scoring) needs room for its prompt only.
                let short = if ask.explicit && ask.max_tokens == 0 {
                    b.available() < ask.prompt
                } else {
                    room < fits.max(1) && (ask.explicit || room == 0)
                };
                if short {
                    return Err(Refusal::Tokens {
                        limit: b.limit,
                        scope: *scope,
                        retry_after: b.wait_for(need),
                    });
                }
                fits = fits.min(room);
            }
        }
        // Money: the most this request could cost must fit the rest of the budget.
        for (w, _, spec) in &windows {
            if let Some(budget) = spec.max_budget_micros {
                let left = budget.saturating_sub(w.spend.saturating_add(w.reserved_cost));
                match ask.completion_within(fits, left) {
                    Some(n) => fits = n,
                    // What the key's running requests hold comes back as they end: a
                    // request that fits what is not spent is asked to retry, not told the
                    // budget is spent.
                    None if w.reserved_cost > 0
                        && ask
                            .completion_within(fits, budget.saturating_sub(w.spend))
                            .is_some() =>
                    {
                        return Err(Refusal::BudgetHeld {
                            budget_micros: budget,
                        })
                    }
                    None => return Err(w.budget_refusal(budget, spec, unix)),
                }
            }
        }
        let tokens = ask.prompt + fits;
        let cost = ask.price.bound(ask.prompt, fits);
        for (w, _, _) in windows.iter_mut() {
            if let Some(b) = &mut w.requests {
                b.take(1);
            }
            if let Some(b) = &mut w.tokens {
                b.take(tokens);
            }
            w.parallel += ask.sequences;
            w.reserved_cost = w.reserved_cost.saturating_add(cost);
        }
        Ok(Grant {
            max_tokens: fits,
            key: key.map(|(id, _)| id.to_string()),
            tokens,
            cost,
            sequences: ask.sequences,
        })
    }

    /// Ends a reservation: `used` is what the request consumed (tokens, cost); `None` when it
    /// never ran (refused downstream), which gives back its request slot too.
    pub fn settle(&mut self, grant: &Grant, used: Option<(u64, u64)>, now: Instant) {
        let settle_one = |w: &mut Windows| {
            for b in [&mut w.tokens, &mut w.requests].into_iter().flatten() {
                b.refill(now);
            }
            w.parallel = w.parallel.saturating_sub(grant.sequences);
            w.reserved_cost = w.reserved_cost.saturating_sub(grant.cost);
            match used {
                Some((tokens, cost)) => {
                    if let Some(b) = &mut w.tokens {
                        b.give(grant.tokens.saturating_sub(tokens));
                    }
                    w.spend = w.spend.saturating_add(cost);
                }
                None => {
                    if let Some(b) = &mut w.tokens {
                        b.give(grant.tokens);
                    }
                    if let Some(b) = &mut w.requests {
                        b.give(1);
                    }
                }
            }
        };
        settle_one(&mut self.global);
        if let Some(w) = grant.key.as_ref().and_then(|k| self.keys.get_mut(k)) {
            settle_one(w);
        }
    }

    /// Takes back from a key's spend in the period from `period` (if it is still the one
    /// held) `cost`, counted there for work billed no more (a batch line's superseded
    /// attempts).
    pub fn refund(&mut self, key: &str, period: i64, cost: u64) {
        if let Some(w) = self
            .keys
            .get_mut(key)
            .filter(|w| w.loaded && w.period_start == period)
        {
            w.spend = w.spend.saturating_sub(cost);
        }
    }

    /// The period whose spend a key holds in memory (`None`: not read yet).
    pub fn loaded_period(&self, key: &str) -> Option<i64> {
        self.keys
            .get(key)
            .filter(|w| w.loaded)
            .map(|w| w.period_start)
    }

    /// The period whose spend an admission at `unix` would read from the ledger (`None`:
    /// held already), so that it is read before the lock over every key's windows is taken.
    pub fn spend_to_read(&self, key: &str, spec: &LimitSpec, unix: i64) -> Option<i64> {
        let start = period_start(spec, unix);
        match self.loaded_period(key) {
            Some(p) if p == start => None,
            _ => Some(start),
        }
    }

    /// Admits a reply from the response cache, which reserves no tokens: only the key's money
    /// budget can refuse it, once spent (or reserved by running requests) or unable to pay
    /// `cost`; else `cost` is added to the spend.
    pub fn admit_cached(
        &mut self,
        key: Option<(&str, &LimitSpec)>,
        cost: u64,
        unix: i64,
        spent: impl FnOnce(i64) -> Option<u64>,
    ) -> Result<(), Refusal> {
        let Some((id, spec)) = key else {
            return Ok(());
        };
        let w = self.keys.entry(id.to_string()).or_default();
        w.load_spend(spec, unix, spent);
        if let Some(budget) = spec.max_budget_micros {
            let left = budget.saturating_sub(w.spend.saturating_add(w.reserved_cost));
            if left == 0 || cost > left {
                return Err(w.budget_refusal(budget, spec, unix));
            }
        }
        w.spend = w.spend.saturating_add(cost);
        Ok(())
    }

    /// The windows to report: the key's where it has them, else the global ones.
    pub fn rate_info(&mut self, key: Option<&str>, now: Instant) -> RateInfo {
        let report = |b: &mut Option<Bucket>| {
            b.as_mut().map(|b| {
                b.refill(now);
                (b.limit, b.available(), b.until_full())
            })
        };
        let mut info = RateInfo::default();
        if let Some(w) = key.and_then(|k| self.keys.get_mut(k)) {
            info.requests = report(&mut w.requests);
            info.tokens = report(&mut w.tokens);
        }
        if info.requests.is_none() {
            info.requests = report(&mut self.global.requests);
        }
        if info.tokens.is_none() {
            info.tokens = report(&mut self.global.tokens);
        }
        info
    }

    /// The key's spend in the budget period from `period_start`, if that is the one loaded.
    pub fn spend(&self, key: &str, period_start: i64) -> Option<u64> {
        let w = self.keys.get(key)?;
        (w.loaded && w.period_start == period_start).then_some(w.spend)
    }

    /// Engine sequences the key runs now (its parallel slots taken).
    pub fn running(&self, key: &str) -> u64 {
        self.keys.get(key).map_or(0, |w| w.parallel)
    }
}

#[cfg(test)]
#[path = "limits_tests.rs"]
mod tests;
