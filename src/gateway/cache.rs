//! The exact response cache (AI Gateway's `cf-aig-cache-*` semantics): replies of
//! deterministic requests stored under a hash of the canonical request, bounded in bytes,
//! least recently used first out, with identical concurrent misses coalesced into one
//! generation.
//!
//! Knows bytes, hashes and time; never HTTP or the engine (the stored value is generic).
//! Invariant: at most one generation runs per key; the others wait for it and replay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lru::LruCache;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

pub type CacheKey = [u8; 32];

/// A stored reply.
#[derive(Debug)]
pub struct Cached<V> {
    pub value: V,
    pub bytes: usize,
    pub stored: SystemTime,
    expires: Instant,
}

impl<V> Cached<V> {
    /// Whole seconds since it was stored (the `age` header).
    pub fn age(&self) -> u64 {
        self.stored.elapsed().map_or(0, |d| d.as_secs())
    }
}

type Slot<V> = watch::Sender<Option<Arc<Cached<V>>>>;

struct Inner<V> {
    lru: LruCache<CacheKey, Arc<Cached<V>>>,
    bytes: usize,
    inflight: HashMap<CacheKey, watch::Receiver<Option<Arc<Cached<V>>>>>,
    /// With [`ResponseCache::remembering`]: keys whose reply was made but is no longer held
    /// (evicted, or too large to keep), until their entry would have expired.
    gone: Option<LruCache<CacheKey, Instant>>,
}

pub struct ResponseCache<V> {
    inner: Arc<Mutex<Inner<V>>>,
    max_bytes: usize,
}

/// How many lost keys a remembering cache keeps (about 100 bytes each, outside the byte
/// bound); past it the oldest are forgotten, and a retry of one of them generates again.
const GONE_KEYS: usize = 100_000;

/// What a lookup found.
pub enum Lookup<V> {
    Hit(Arc<Cached<V>>),
    /// The same request is being generated: wait for it ([`wait`]), then replay or retry.
    Wait(watch::Receiver<Option<Arc<Cached<V>>>>),
    /// (A remembering cache only.) Its reply was made, and is no longer held.
    Gone,
    /// Nobody has it: generate, then [`Leader::fill`] (dropping the leader lets waiters retry).
    Lead(Leader<V>),
}

pub struct Leader<V> {
    key: CacheKey,
    ttl: Duration,
    slot: Slot<V>,
    cache: Arc<Mutex<Inner<V>>>,
    max_bytes: usize,
}

impl<V> ResponseCache<V> {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
                inflight: HashMap::new(),
                gone: None,
            })),
            max_bytes,
        }
    }

    /// A cache that remembers the keys whose replies it lost, so that a lookup can tell
    /// "made and gone" ([`Lookup::Gone`]) from "never made" (idempotency needs the difference).
    pub fn remembering(max_bytes: usize) -> Self {
        let cache = Self::new(max_bytes);
        cache.inner.lock().unwrap_or_else(|p| p.into_inner()).gone = Some(LruCache::new(
            std::num::NonZeroUsize::new(GONE_KEYS).expect("a positive bound"),
        ));
        cache
    }

    /// Looks `key` up; a miss with no generation under way makes the caller its leader.
    pub fn lookup(&self, key: CacheKey, ttl: Duration) -> Lookup<V> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = inner.lru.get(&key).cloned() {
            if hit.expires > Instant::now() {
                return Lookup::Hit(hit);
            }
            inner.bytes -= hit.bytes;
            inner.lru.pop(&key);
        }
        if let Some(gone) = &mut inner.gone {
            match gone.get(&key) {
                Some(&until) if until > Instant::now() => return Lookup::Gone,
                Some(_) => {
                    gone.pop(&key);
                }
                None => {}
            }
        }
        if let Some(rx) = inner.inflight.get(&key) {
            if rx.has_changed().is_ok() {
                return Lookup::Wait(rx.clone());
            }
        }
        let (slot, rx) = watch::channel(None);
        inner.inflight.insert(key, rx);
        Lookup::Lead(Leader {
            key,
            ttl,
            slot,
            cache: self.inner.clone(),
            max_bytes: self.max_bytes,
        })
    }

    /// Whether `key` has something a lookup would answer without a new generation: a reply,
    /// one under way, or (remembering) the news that it is gone. Registers nothing.
    pub fn holds(&self, key: CacheKey) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        inner.lru.peek(&key).is_some_and(|e| e.expires > now)
            || inner
                .inflight
                .get(&key)
                .is_some_and(|rx| rx.has_changed().is_ok())
            || inner
                .gone
                .as_ref()
                .and_then(|g| g.peek(&key))
                .is_some_and(|&until| until > now)
    }

    /// Entries and bytes held.
    pub fn stats(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.lru.len(), inner.bytes)
    }
}

/// Waits for a leader: its entry, or `None` when it gave up (the caller then looks up again).
pub async fn wait<V>(mut rx: watch::Receiver<Option<Arc<Cached<V>>>>) -> Option<Arc<Cached<V>>> {
    loop {
        if let Some(v) = rx.borrow_and_update().clone() {
            return Some(v);
        }
        if rx.changed().await.is_err() {
            return rx.borrow().clone();
        }
    }
}

impl<V> Leader<V> {
    /// Stores the reply (evicting the least recently used beyond the byte bound) and hands it
    /// to every waiter.
    pub fn fill(self, value: V, bytes: usize) -> Arc<Cached<V>> {
        let entry = Arc::new(Cached {
            value,
            bytes,
            stored: SystemTime::now(),
            expires: Instant::now() + self.ttl,
        });
        {
            let mut inner = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let inner = &mut *inner;
            if bytes <= self.max_bytes {
                if let Some(old) = inner.lru.put(self.key, entry.clone()) {
                    inner.bytes -= old.bytes;
                }
                inner.bytes += bytes;
                while inner.bytes > self.max_bytes {
                    match inner.lru.pop_lru() {
                        Some((key, old)) => {
                            inner.bytes -= old.bytes;
                            if let Some(gone) = &mut inner.gone {
                                gone.put(key, old.expires);
                            }
                        }
                        None => break,
                    }
                }
            } else if let Some(gone) = &mut inner.gone {
                gone.put(self.key, entry.expires);
            }
        }
        let _ = self.slot.send(Some(entry.clone()));
        entry
    }
}

impl<V> Drop for Leader<V> {
    fn drop(&mut self) {
        // Filled or given up: either way no generation is under way for this key any more.
        let mut inner = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if inner
            .inflight
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.slot.subscribe()))
        {
            inner.inflight.remove(&self.key);
        }
    }
}

/// JSON with object keys sorted at every depth and no whitespace: two requests that differ
/// only in key order or layout give the same text.
pub fn canonical_json(v: &Value) -> String {
    fn walk(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    walk(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    walk(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    walk(v, &mut out);
    out
}

/// The cache key: a hash over every part that can change a reply, each length-prefixed.
pub fn cache_key(parts: &[&str]) -> CacheKey {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_ignores_key_order_and_layout() {
        let a: Value =
            serde_json::from_str(r#"{"b": 1, "a": {"y": [1, {"q": 2, "p": 3}], "x": null}}"#)
                .unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a":{"x":null,"y":[1,{"p":3,"q":2}]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_ne!(canonical_json(&a), canonical_json(&json!({"b": 2, "a": 1})));
        assert_ne!(cache_key(&["ab", "c"]), cache_key(&["a", "bc"]));
    }

    #[tokio::test]
    async fn misses_coalesce_and_the_byte_bound_evicts_lru() {
        let c: ResponseCache<u32> = ResponseCache::new(100);
        let ttl = Duration::from_secs(60);
        let Lookup::Lead(leader) = c.lookup([1; 32], ttl) else {
            panic!("first is a miss")
        };
        let Lookup::Wait(rx) = c.lookup([1; 32], ttl) else {
            panic!("second waits")
        };
        let waiter = tokio::spawn(wait(rx));
        leader.fill(7, 60);
        assert_eq!(waiter.await.unwrap().map(|e| e.value), Some(7));
        assert!(matches!(c.lookup([1; 32], ttl), Lookup::Hit(e) if e.value == 7));
        // A second entry of 60 bytes pushes the first out (100-byte bound).
        let Lookup::Lead(l2) = c.lookup([2; 32], ttl) else {
            panic!()
        };
        l2.fill(8, 60);
        assert_eq!(c.stats(), (1, 60));
        assert!(matches!(c.lookup([1; 32], ttl), Lookup::Lead(_)));
    }

    #[test]
    fn a_remembering_cache_tells_lost_replies_from_unmade_ones() {
        let c: ResponseCache<u32> = ResponseCache::remembering(100);
        let ttl = Duration::from_secs(60);
        let lead = |k: u8| match c.lookup([k; 32], ttl) {
            Lookup::Lead(l) => l,
            _ => panic!("{k} is not a miss"),
        };
        lead(1).fill(1, 60);
        lead(2).fill(2, 60); // evicts 1
        assert!(matches!(c.lookup([1; 32], ttl), Lookup::Gone));
        assert!(matches!(c.lookup([2; 32], ttl), Lookup::Hit(e) if e.value == 2));
        lead(3).fill(3, 500); // too large to keep
        assert!(matches!(c.lookup([3; 32], ttl), Lookup::Gone));
        // A reply never made is a miss; one whose time is up is a miss again.
        assert!(matches!(c.lookup([4; 32], ttl), Lookup::Lead(_)));
        let short = match c.lookup([5; 32], Duration::ZERO) {
            Lookup::Lead(l) => l,
            _ => panic!(),
        };
        short.fill(5, 500);
        assert!(matches!(c.lookup([5; 32], ttl), Lookup::Lead(_)));
        // The plain response cache forgets: a lost reply is a miss.
        let plain: ResponseCache<u32> = ResponseCache::new(100);
        match plain.lookup([1; 32], ttl) {
            Lookup::Lead(l) => l.fill(1, 500),
            _ => panic!(),
        };
        assert!(matches!(plain.lookup([1; 32], ttl), Lookup::Lead(_)));
    }

    #[tokio::test]
    async fn a_leader_that_gives_up_releases_its_waiters() {
        let c: ResponseCache<u32> = ResponseCache::new(100);
        let ttl = Duration::from_secs(60);
        let Lookup::Lead(leader) = c.lookup([3; 32], ttl) else {
            panic!()
        };
        let Lookup::Wait(rx) = c.lookup([3; 32], ttl) else {
            panic!()
        };
        drop(leader);
        assert!(wait(rx).await.is_none());
        assert!(matches!(c.lookup([3; 32], ttl), Lookup::Lead(_)));
        // Expired entries miss.
        let Lookup::Lead(l) = c.lookup([4; 32], Duration::ZERO) else {
            panic!()
        };
        l.fill(1, 1);
        assert!(matches!(c.lookup([4; 32], ttl), Lookup::Lead(_)));
    }
}
