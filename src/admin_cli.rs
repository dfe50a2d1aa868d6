//! `edgeinfer keys ...` and `edgeinfer usage`: the admin routes' work, offline, on the same
//! store (a running server sees key changes on its next request).

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use edgeinfer::config::{KeyFields, KeysCommand, StoreArgs, UsageArgs};
use edgeinfer::gateway::db;
use edgeinfer::gateway::keys::{KeyRecord, KeyStore};
use edgeinfer::gateway::ledger;
use edgeinfer::gateway::usage::{self, UsageFilter};

fn store(args: &StoreArgs) -> Result<(KeyStore, rusqlite::Connection)> {
    let path = args.db_path();
    let keys = KeyStore::new(db::open(&path)?)?;
    Ok((keys, db::open(&path)?))
}

fn fields(f: &KeyFields) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    put("key_alias", f.alias.clone().map(Value::from));
    put("models", f.models.clone().map(Value::from));
    put("tpm_limit", f.tpm_limit.map(Value::from));
    put("rpm_limit", f.rpm_limit.map(Value::from));
    put("max_budget", f.max_budget.map(Value::from));
    put(
        "budget_duration",
        f.budget_duration.clone().map(Value::from),
    );
    put(
        "max_parallel_requests",
        f.max_parallel_requests.map(Value::from),
    );
    put("weight", f.weight.map(Value::from));
    put("duration", f.duration.clone().map(Value::from));
    if let Some(meta) = &f.metadata {
        let v: Value = serde_json::from_str(meta).context("--metadata must be a JSON object")?;
        m.insert("metadata".into(), v);
    }
    Ok(m)
}

fn info(conn: &rusqlite::Connection, r: &KeyRecord) -> Result<Value> {
    let spent = ledger::spent(conn, &r.id, r.budget_period_start(db::unix_now()))?;
    let mut v = r.info();
    v["spend"] = json!(spent as f64 / 1e6);
    Ok(v)
}

pub fn keys(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Generate(f) => {
            let (keys, conn) = store(&f.store)?;
            let (key, rec) = keys.generate(&fields(&f)?)?;
            let mut v = info(&conn, &rec)?;
            v["key"] = json!(key);
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        KeysCommand::List(a) => {
            let (keys, conn) = store(&a.store)?;
            for r in keys.list()? {
                println!("{}", info(&conn, &r)?);
            }
        }
        KeysCommand::Info(a) => {
            let (keys, conn) = store(&a.store)?;
            let r = keys.resolve(&a.key)?.context("no such key")?;
            println!("{}", serde_json::to_string_pretty(&info(&conn, &r)?)?);
        }
        KeysCommand::Update(u) => {
            let (keys, conn) = store(&u.fields.store)?;
            let r = keys.update(&u.key, &fields(&u.fields)?)?;
            println!("{}", serde_json::to_string_pretty(&info(&conn, &r)?)?);
        }
        KeysCommand::Delete(d) => {
            let (keys, _) = store(&d.store)?;
            let n = keys.revoke(&d.keys)?;
            println!("revoked {n} key(s)");
        }
    }
    Ok(())
}

pub fn usage(args: UsageArgs) -> Result<()> {
    let (keys, conn) = store(&args.store)?;
    let key_id = match &args.key {
        Some(k) => Some(
            keys.resolve(k)?
                .map(|r| r.id.clone())
                // A revoked key, by its token or by the key itself.
                .unwrap_or_else(|| edgeinfer::gateway::keys::id_of_unknown(k)),
        ),
        None => None,
    };
    let lines = usage::usage(
        &conn,
        &UsageFilter {
            key_id,
            start: args.start_date.clone(),
            end: args.end_date.clone(),
        },
    )?;
    if args.json {
        for l in &lines {
            println!("{}", serde_json::to_string(l)?);
        }
        return Ok(());
    }
    println!(
        "{:<10}  {:<28}  {:<16}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}",
        "day", "model", "key", "requests", "prompt", "cached", "completion", "cost (USD)"
    );
    for l in &lines {
        let key = l
            .key_alias
            .clone()
            .or_else(|| l.key_id.as_ref().map(|k| k[..12.min(k.len())].to_string()))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<10}  {:<28}  {:<16}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12.6}",
            l.day,
            l.model,
            key,
            l.requests,
            l.prompt_tokens,
            l.cached_tokens,
            l.completion_tokens,
            l.cost_micros as f64 / 1e6
        );
    }
    Ok(())
}

/// Whether `host` names only loopback addresses (`127.0.0.1`, `::1`, `localhost`).
pub fn is_loopback(host: &str) -> bool {
    use std::net::ToSocketAddrs;
    match (host, 0).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
