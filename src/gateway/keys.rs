//! Virtual keys: generated once, stored only as their sha256, looked up per request.
//! Knows keys and their limits; never HTTP. Invariant: the store's table is the truth; the
//! in-memory map is reloaded whenever `meta.keys_version` moved (a change by the admin routes
//! or by `edgeinfer keys` from another process), so a revocation holds from the next request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::db::unix_now;
use super::limits::LimitSpec;
use super::GatewayError;

/// A key's settings (never the key itself).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    /// The lowercase hex sha256 of the key: its id in the store and the ledger.
    pub id: String,
    pub alias: Option<String>,
    /// Models this key may use; empty: all.
    pub models: Vec<String>,
    pub tpm_limit: Option<u64>,
    pub rpm_limit: Option<u64>,
    pub max_budget_micros: Option<u64>,
    pub budget_duration_secs: Option<u64>,
    pub max_parallel_requests: Option<u64>,
    /// Its share of a contended batch relative to other keys' (1..=100; `None`: 1).
    pub weight: Option<u64>,
    pub metadata: Value,
    /// Unix seconds after which the key is refused.
    pub expires: Option<i64>,
    pub created: i64,
    pub revoked: bool,
}

impl KeyRecord {
    fn new(id: String) -> Self {
        Self {
            id,
            alias: None,
            models: Vec::new(),
            tpm_limit: None,
            rpm_limit: None,
            max_budget_micros: None,
            budget_duration_secs: None,
            max_parallel_requests: None,
            weight: None,
            metadata: json!({}),
            expires: None,
            created: unix_now(),
            revoked: false,
        }
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// The windows this key's settings ask for.
    pub fn limit_spec(&self) -> LimitSpec {
        LimitSpec {
            tpm: self.tpm_limit,
            rpm: self.rpm_limit,
            max_parallel: self.max_parallel_requests,
            max_budget_micros: self.max_budget_micros,
            budget_duration_secs: self.budget_duration_secs,
            created: self.created,
        }
    }

    /// Unix seconds at which the key's current budget period began.
    pub fn budget_period_start(&self, now: i64) -> i64 {
        super::limits::period_start(&self.limit_spec(), now)
    }

    pub fn expired(&self, now: i64) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }

    /// Sets the fields present in `fields` (LiteLLM's names); `null` clears one. Unknown
    /// fields and wrong types are refused, naming the field.
    pub fn apply(&mut self, fields: &Map<String, Value>) -> Result<(), GatewayError> {
        for (name, v) in fields {
            let bad = |why: &str| GatewayError::Invalid {
                field: name.clone(),
                reason: why.to_string(),
            };
            let uint = || -> Result<Option<u64>, GatewayError> {
                match v {
                    Value::Null => Ok(None),
                    // The store keeps SQLite's signed integers.
                    v => v
                        .as_u64()
                        .filter(|&n| i64::try_from(n).is_ok())
                        .map(Some)
                        .ok_or_else(|| bad("must be a non-negative integer below 2^63")),
                }
            };
            match name.as_str() {
                "key" | "keys" => {} // names the key (update), not a setting
                "key_alias" => {
                    self.alias = match v {
                        Value::Null => None,
                        Value::String(s) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
                        _ => return Err(bad("must be a non-empty string of at most 256 bytes")),
                    }
                }
                "models" => {
                    self.models = match v {
                        Value::Null => Vec::new(),
                        Value::Array(a) => a
                            .iter()
                            .map(|m| m.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| bad("must be an array of model names"))?,
                        _ => return Err(bad("must be an array of model names")),
                    }
                }
                "tpm_limit" => self.tpm_limit = uint()?,
                "rpm_limit" => self.rpm_limit = uint()?,
                "max_parallel_requests" => self.max_parallel_requests = uint()?,
                "weight" => {
                    self.weight = match v {
                        Value::Null => None,
                        v => match v.as_u64() {
                            Some(w) if (1..=100).contains(&w) => Some(w),
                            _ => return Err(bad("must be an integer from 1 to 100")),
                        },
                    }
                }
                "max_budget" => {
                    self.max_budget_micros = match v {
                        Value::Null => None,
                        v => match v.as_f64() {
                            Some(usd) if (0.0..1e12).contains(&usd) => {
                                Some((usd * 1e6).round() as u64)
                            }
                            _ => return Err(bad("must be a non-negative amount in USD")),
                        },
                    }
                }
                "budget_duration" => {
                    self.budget_duration_secs = match v {
                        Value::Null => None,
                        Value::String(s) => Some(parse_duration(s).ok_or_else(|| {
                            bad("must be a duration such as \"30s\", \"30m\", \"24h\" or \"30d\"")
                        })?),
                        _ => return Err(bad("must be a duration string such as \"30d\"")),
                    }
                }
                "metadata" => {
                    self.metadata = match v {
                        Value::Null => json!({}),
                        Value::Object(_) => v.clone(),
                        _ => return Err(bad("must be an object")),
                    }
                }
                "expires" => {
                    self.expires = match v {
                        Value::Null => None,
                        v => Some(v.as_i64().ok_or_else(|| bad("must be unix seconds"))?),
                    }
                }
                "duration" => {
                    self.expires = match v {
                        Value::Null => None,
                        Value::String(s) => {
                            let secs = parse_duration(s)
                                .ok_or_else(|| bad("must be a duration such as \"30d\""))?;
                            Some(unix_now() + secs as i64)
                        }
                        _ => return Err(bad("must be a duration string such as \"30d\"")),
                    }
                }
                _ => return Err(bad("unknown field")),
            }
        }
        Ok(())
    }

    /// The key's settings as the admin routes show them (LiteLLM's names; budgets in USD).
    pub fn info(&self) -> Value {
        json!({
            "token": self.id,
            "key_alias": self.alias,
            "models": self.models,
            "tpm_limit": self.tpm_limit,
            "rpm_limit": self.rpm_limit,
            "max_budget": self.max_budget_micros.map(|m| m as f64 / 1e6),
            "budget_duration": self.budget_duration_secs.map(|s| format!("{s}s")),
            "max_parallel_requests": self.max_parallel_requests,
            "weight": self.weight.unwrap_or(1),
            "metadata": self.metadata,
            "expires": self.expires,
            "created_at": self.created,
            "revoked": self.revoked,
        })
    }
}

/// The longest duration taken: 100 years.
const MAX_DURATION_SECS: u64 = 100 * 366 * 86_400;

/// "30s", "30m", "24h", "30d" (LiteLLM's forms) as seconds, up to 100 years.
pub fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let unit = s.chars().last()?;
    let n: u64 = s[..s.len() - unit.len_utf8()].trim().parse().ok()?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)
        .filter(|&x| x > 0 && x <= MAX_DURATION_SECS)
}

/// The id a name that no live key answers to stands for (a revoked key's): a token (64 hex
/// digits) is the id itself, anything else is taken as the key.
pub fn id_of_unknown(name: &str) -> String {
    let is_token = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
    if is_token {
        name.to_ascii_lowercase()
    } else {
        hash_key(name)
    }
}

/// The sha256 of a key, in hex: how it is stored and looked up.
pub fn hash_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two secrets in time independent of where they differ (through their hashes, so
/// lengths leak nothing either).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    let (ha, hb) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    ha.as_slice().ct_eq(hb.as_slice()).into()
}

/// A new key: `sk-ei-` and 48 hex digits (192 random bits).
fn new_key() -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("sk-ei-{}", hex(&bytes))
}

pub struct KeyStore {
    conn: Mutex<Connection>,
    cache: Mutex<(i64, HashMap<String, Arc<KeyRecord>>)>,
}

impl KeyStore {
    pub fn new(conn: Connection) -> Result<Self, GatewayError> {
        let store = Self {
            conn: Mutex::new(conn),
            cache: Mutex::new((-1, HashMap::new())),
        };
        store.refresh()?;
        Ok(store)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reloads the keys if another writer changed them since the last look.
    fn refresh(&self) -> Result<(), GatewayError> {
        let conn = self.conn();
        let version: i64 = conn
            .query_row("SELECT v FROM meta WHERE k = 'keys_version'", [], |r| {
                r.get(0)
            })
            .map_err(GatewayError::db)?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 == version {
            return Ok(());
        }
        let mut stmt = conn
            .prepare("SELECT * FROM keys WHERE revoked = 0")
            .map_err(GatewayError::db)?;
        let rows = stmt
            .query_map([], row_to_record)
            .map_err(GatewayError::db)?;
        let mut map = HashMap::new();
        for r in rows {
            let r = r.map_err(GatewayError::db)?;
            map.insert(r.id.clone(), Arc::new(r));
        }
        *cache = (version, map);
        Ok(())
    }

    /// The live (not revoked) key record for a presented key.
    pub fn lookup(&self, presented: &str) -> Result<Option<Arc<KeyRecord>>, GatewayError> {
        self.refresh()?;
        let id = hash_key(presented);
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        Ok(cache
            .1
            .get(&id)
            .filter(|r| bool::from(r.id.as_bytes().ct_eq(id.as_bytes())))
            .cloned())
    }

    /// How many live keys exist.
    pub fn count(&self) -> Result<usize, GatewayError> {
        self.refresh()?;
        Ok(self.cache.lock().unwrap_or_else(|p| p.into_inner()).1.len())
    }

    /// Every live key, oldest first.
    pub fn list(&self) -> Result<Vec<Arc<KeyRecord>>, GatewayError> {
        self.refresh()?;
        let mut v: Vec<_> = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(v)
    }

    /// The id of a live key named by the key itself, its id (token) or its alias.
    pub fn resolve(&self, name: &str) -> Result<Option<Arc<KeyRecord>>, GatewayError> {
        self.refresh()?;
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let by_id = cache.1.get(name).or_else(|| cache.1.get(&hash_key(name)));
        Ok(by_id
            .or_else(|| cache.1.values().find(|r| r.alias.as_deref() == Some(name)))
            .cloned())
    }

    /// Creates a key with these settings; returns the key (shown once) and its record.
    pub fn generate(
        &self,
        fields: &Map<String, Value>,
    ) -> Result<(String, KeyRecord), GatewayError> {
        let key = match fields.get("key") {
            // LiteLLM lets an admin choose the key; it must still be long enough to be secret.
            Some(Value::String(k)) if k.len() >= 16 => k.clone(),
            Some(_) => {
                return Err(GatewayError::Invalid {
                    field: "key".into(),
                    reason: "a chosen key must be a string of at least 16 characters".into(),
                })
            }
            None => new_key(),
        };
        let mut rec = KeyRecord::new(hash_key(&key));
        rec.apply(fields)?;
        let rec = self.write(true, |_| Ok(rec))?;
        Ok((key, rec))
    }

    /// Changes the settings present in `fields` of the key `name`.
    pub fn update(
        &self,
        name: &str,
        fields: &Map<String, Value>,
    ) -> Result<KeyRecord, GatewayError> {
        let id = self
            .resolve(name)?
            .ok_or(GatewayError::UnknownKey)?
            .id
            .clone();
        // The record as it stands in the write's own transaction: a change another process
        // made since this one last looked is kept, not written over.
        self.write(false, |tx| {
            let mut rec = tx
                .query_row(
                    "SELECT * FROM keys WHERE id = ?1 AND revoked = 0",
                    [&id],
                    row_to_record,
                )
                .optional()
                .map_err(GatewayError::db)?
                .ok_or(GatewayError::UnknownKey)?;
            rec.apply(fields)?;
            Ok(rec)
        })
    }

    /// Revokes keys (kept in the store so the ledger still names them); returns how many.
    pub fn revoke(&self, names: &[String]) -> Result<usize, GatewayError> {
        let mut ids = Vec::new();
        for n in names {
            ids.push(self.resolve(n)?.ok_or(GatewayError::UnknownKey)?.id.clone());
        }
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(GatewayError::db)?;
        for id in &ids {
            tx.execute("UPDATE keys SET revoked = 1 WHERE id = ?1", [id])
                .map_err(GatewayError::db)?;
        }
        bump_version(&tx)?;
        tx.commit().map_err(GatewayError::db)?;
        Ok(ids.len())
    }

    /// Writes the record `make` gives (reading, if it needs, in the write's transaction).
    fn write(
        &self,
        insert: bool,
        make: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<KeyRecord, GatewayError>,
    ) -> Result<KeyRecord, GatewayError> {
        let mut conn = self.conn();
        // Immediate: it reads before it writes, and a read transaction that must become a
        // writer cannot wait for another's lock (SQLite answers "database is locked" at
        // once); taking the lock first waits out the busy timeout.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(GatewayError::db)?;
        let rec = make(&tx)?;
        let r = &rec;
        if let Some(alias) = &r.alias {
            let taken: Option<String> = tx
                .query_row(
                    "SELECT id FROM keys WHERE alias = ?1 AND revoked = 0 AND id != ?2",
                    params![alias, r.id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(GatewayError::db)?;
            if taken.is_some() {
                return Err(GatewayError::Invalid {
                    field: "key_alias".into(),
                    reason: format!("another key is already called `{alias}`"),
                });
            }
        }
        let sql = if insert {
            "INSERT INTO keys (id, alias, models, tpm_limit, rpm_limit, max_budget_micros, budget_duration_secs, max_parallel_requests, metadata, expires, created, weight, revoked) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 0)"
        } else {
            "UPDATE keys SET alias = ?2, models = ?3, tpm_limit = ?4, rpm_limit = ?5, max_budget_micros = ?6, budget_duration_secs = ?7, max_parallel_requests = ?8, metadata = ?9, expires = ?10, created = ?11, weight = ?12 WHERE id = ?1"
        };
        let n = tx
            .execute(
                sql,
                params![
                    r.id,
                    r.alias,
                    Value::from(r.models.clone()).to_string(),
                    r.tpm_limit.map(|x| x as i64),
                    r.rpm_limit.map(|x| x as i64),
                    r.max_budget_micros.map(|x| x as i64),
                    r.budget_duration_secs.map(|x| x as i64),
                    r.max_parallel_requests.map(|x| x as i64),
                    r.metadata.to_string(),
                    r.expires,
                    r.created,
                    r.weight.map(|x| x as i64),
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    GatewayError::Invalid {
                        field: "key".into(),
                        reason: "that key already exists".into(),
                    }
                }
                e => GatewayError::db(e),
            })?;
        if n != 1 {
            return Err(GatewayError::UnknownKey);
        }
        bump_version(&tx)?;
        tx.commit().map_err(GatewayError::db)?;
        Ok(rec)
    }
}

fn bump_version(tx: &rusqlite::Transaction<'_>) -> Result<(), GatewayError> {
    tx.execute("UPDATE meta SET v = v + 1 WHERE k = 'keys_version'", [])
        .map_err(GatewayError::db)?;
    Ok(())
}

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let opt_u = |name: &str| -> rusqlite::Result<Option<u64>> {
        Ok(row.get::<_, Option<i64>>(name)?.map(|x| x.max(0) as u64))
    };
    let models: String = row.get("models")?;
    let metadata: String = row.get("metadata")?;
    Ok(KeyRecord {
        id: row.get("id")?,
        alias: row.get("alias")?,
        models: serde_json::from_str(&models).unwrap_or_default(),
        tpm_limit: opt_u("tpm_limit")?,
        rpm_limit: opt_u("rpm_limit")?,
        max_budget_micros: opt_u("max_budget_micros")?,
        budget_duration_secs: opt_u("budget_duration_secs")?,
        max_parallel_requests: opt_u("max_parallel_requests")?,
        weight: opt_u("weight")?,
        metadata: serde_json::from_str(&metadata).unwrap_or_else(|_| json!({})),
        expires: row.get("expires")?,
        created: row.get("created")?,
        revoked: row.get::<_, i64>("revoked")? != 0,
    })
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
