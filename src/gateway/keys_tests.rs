//! The key store's tests: hashing, lookups across connections, fields, durations, and
//! writes that wait for another writer.

use super::*;

fn store() -> (tempfile::TempDir, KeyStore) {
    let dir = tempfile::tempdir().unwrap();
    let conn = super::super::db::open(&dir.path().join("t.db")).unwrap();
    (dir, KeyStore::new(conn).unwrap())
}

fn fields(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn keys_are_stored_hashed_found_and_revoked() {
    let (dir, s) = store();
    let (key, rec) = s
        .generate(&fields(
            json!({"key_alias": "a", "tpm_limit": 1000, "max_budget": 1.5}),
        ))
        .unwrap();
    assert!(key.starts_with("sk-ei-") && key.len() == 54);
    assert_eq!(rec.id, hash_key(&key));
    assert_eq!(rec.max_budget_micros, Some(1_500_000));
    assert_eq!(s.lookup(&key).unwrap().unwrap().tpm_limit, Some(1000));
    assert!(s.lookup("sk-ei-wrong").unwrap().is_none());
    // The raw key is nowhere in the file.
    let raw = std::fs::read(dir.path().join("t.db")).unwrap();
    let wal = std::fs::read(dir.path().join("t.db-wal")).unwrap_or_default();
    for bytes in [raw, wal] {
        assert!(!bytes.windows(key.len()).any(|w| w == key.as_bytes()));
    }
    assert_eq!(s.resolve("a").unwrap().unwrap().id, rec.id);
    assert_eq!(s.revoke(&["a".into()]).unwrap(), 1);
    assert!(s.lookup(&key).unwrap().is_none());
    // Revoked, it is still named by its token (in either case) or by the key itself.
    assert_eq!(id_of_unknown(&key), rec.id);
    assert_eq!(id_of_unknown(&rec.id.to_ascii_uppercase()), rec.id);
}

#[test]
fn a_change_by_another_connection_is_seen_on_the_next_lookup() {
    let (dir, s) = store();
    let (key, _) = s.generate(&Map::new()).unwrap();
    let other = KeyStore::new(super::super::db::open(&dir.path().join("t.db")).unwrap()).unwrap();
    other.revoke(std::slice::from_ref(&key)).unwrap();
    assert!(s.lookup(&key).unwrap().is_none());
}

#[test]
fn bad_fields_are_named() {
    let (_dir, s) = store();
    for (body, field) in [
        (json!({"tpm_limit": -1}), "tpm_limit"),
        (json!({"tpm_limit": 1u64 << 63}), "tpm_limit"),
        (json!({"duration": "9223372036854775807s"}), "duration"),
        (json!({"max_budget": "x"}), "max_budget"),
        (json!({"budget_duration": "3w"}), "budget_duration"),
        (json!({"models": [1]}), "models"),
        (json!({"nonsense": 1}), "nonsense"),
    ] {
        match s.generate(&fields(body)) {
            Err(GatewayError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected an error naming {field}, got {other:?}"),
        }
    }
    s.generate(&fields(json!({"key_alias": "x"}))).unwrap();
    assert!(s.generate(&fields(json!({"key_alias": "x"}))).is_err());
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("30d"), Some(30 * 86_400));
    assert_eq!(parse_duration("45s"), Some(45));
    assert_eq!(parse_duration("1h"), Some(3600));
    assert_eq!(parse_duration("0s"), None);
    assert_eq!(parse_duration("d"), None);
    assert_eq!(parse_duration("36600d"), Some(36_600 * 86_400));
    assert_eq!(parse_duration("36601d"), None);
    assert_eq!(parse_duration("9223372036854775807s"), None);
    assert!(secrets_equal("abc", "abc") && !secrets_equal("abc", "abd"));
}

#[test]
fn a_write_waits_for_another_connections_write_lock() {
    // A key with an alias reads before it writes: a deferred transaction could not wait for
    // the lock then (SQLite answers "database is locked" at once), so ledger commits made
    // key updates fail under load.
    let (dir, s) = store();
    s.generate(&fields(json!({"key_alias": "a"}))).unwrap();
    let other = super::super::db::open(&dir.path().join("t.db")).unwrap();
    other
        .execute_batch("BEGIN IMMEDIATE; UPDATE meta SET v = v WHERE k = 'keys_version';")
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        other.execute_batch("COMMIT").unwrap();
    });
    tx.send(()).unwrap();
    let rec = s.update("a", &fields(json!({"tpm_limit": 5}))).unwrap();
    holder.join().unwrap();
    assert_eq!(rec.tpm_limit, Some(5));
    assert_eq!(s.resolve("a").unwrap().unwrap().tpm_limit, Some(5));
}

#[test]
fn an_update_keeps_a_change_another_process_made_meanwhile() {
    // This store reads the key, then waits for the lock another process holds while it
    // changes another field: the update is applied to the key as it then stands.
    let (dir, s) = store();
    s.generate(&fields(json!({"key_alias": "a"}))).unwrap();
    let other = super::super::db::open(&dir.path().join("t.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let s = std::sync::Arc::new(s);
    let updater = {
        let s = s.clone();
        std::thread::spawn(move || s.update("a", &fields(json!({"tpm_limit": 5}))))
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    other
        .execute_batch(
            "UPDATE keys SET rpm_limit = 7 WHERE alias = 'a';
             UPDATE meta SET v = v + 1 WHERE k = 'keys_version'; COMMIT;",
        )
        .unwrap();
    let rec = updater.join().unwrap().unwrap();
    assert_eq!((rec.tpm_limit, rec.rpm_limit), (Some(5), Some(7)));
    let now = s.resolve("a").unwrap().unwrap();
    assert_eq!((now.tpm_limit, now.rpm_limit), (Some(5), Some(7)));
}
