//! The Batch API's store: files, batches, their requests and results.
use super::*;

fn store() -> (tempfile::TempDir, Batches) {
    let dir = tempfile::tempdir().unwrap();
    let conn = super::super::db::open(&dir.path().join("b.db")).unwrap();
    (dir, Batches::new(conn).unwrap())
}

/// A batch input file named `name`, expiring `expires_after` seconds after its creation.
fn new_file(name: &str, expires_after: Option<i64>) -> NewFile<'_> {
    NewFile {
        purpose: "batch",
        filename: name,
        expires_after,
    }
}

fn put(b: &Batches, owner: &str, name: &str, content: &[u8]) -> FileMeta {
    b.put_file(owner, new_file(name, None), content, None)
        .unwrap()
}

#[test]
fn files_belong_to_their_owner_and_list_newest_first() {
    let (_d, b) = store();
    let ids: Vec<String> = (0..3)
        .map(|i| put(&b, "k", &format!("f{i}.jsonl"), b"{}\n").id)
        .collect();
    put(&b, "other", "x", b"");
    assert!(b.file(&ids[0], "other").unwrap().is_none());
    assert_eq!(b.file_content(&ids[1], "k").unwrap().unwrap(), b"{}\n");
    let page = b.files("k", None, None, 2, false).unwrap();
    let names: Vec<_> = page.items.iter().map(|f| f.id.clone()).collect();
    assert_eq!(names, [ids[2].clone(), ids[1].clone()]);
    assert!(page.has_more);
    let rest = b.files("k", None, Some(&ids[1]), 2, false).unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].id, ids[0]);
    assert!(!rest.has_more);
    assert!(b
        .files("k", Some("batch_output"), None, 9, false)
        .unwrap()
        .items
        .is_empty());
    assert!(b.files("other", None, Some(&ids[0]), 2, false).is_err());
    // Oldest first, from the start and after a cursor.
    let page = b.files("k", None, None, 2, true).unwrap();
    let names: Vec<_> = page.items.iter().map(|f| f.id.clone()).collect();
    assert_eq!(names, [ids[0].clone(), ids[1].clone()]);
    assert!(page.has_more);
    let rest = b.files("k", None, Some(&ids[1]), 2, true).unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].id, ids[2]);
    assert!(!rest.has_more);
    assert!(!b.delete_file(&ids[0], "other").unwrap());
    assert!(b.delete_file(&ids[0], "k").unwrap());
    assert!(b.file(&ids[0], "k").unwrap().is_none());
}

#[test]
fn an_expired_file_is_gone_to_readers_at_once_and_deleted_by_the_sweep() {
    let (_d, b) = store();
    let kept = put(&b, "k", "kept", b"kept\n");
    assert_eq!(kept.expires_at, None);
    let later = b
        .put_file("k", new_file("later", Some(3600)), b"later\n", None)
        .unwrap();
    assert_eq!(later.expires_at, Some(later.created + 3600));
    // Expired a second ago (the API takes an hour at least; the store takes what it is given).
    let gone = b
        .put_file("k", new_file("gone", Some(-1)), b"gone\n", None)
        .unwrap();
    assert!(b.file(&gone.id, "k").unwrap().is_none());
    assert!(b.file_content(&gone.id, "k").unwrap().is_none());
    assert!(!b.delete_file(&gone.id, "k").unwrap());
    let listed: Vec<_> = (b.files("k", None, None, 9, false).unwrap().items)
        .into_iter()
        .map(|f| f.id)
        .collect();
    assert_eq!(listed, [later.id.clone(), kept.id.clone()]);
    assert_eq!(
        b.storage_used("k").unwrap(),
        5 + 6,
        "an expired file counts for nothing"
    );
    // A download under way reads on until the row is deleted.
    assert_eq!(b.file_chunk(&gone.id, "k", 1, 3).unwrap().unwrap(), b"one");
    assert_eq!(
        b.delete_expired(crate::gateway::db::unix_now(), 8).unwrap(),
        1
    );
    assert!(b.file_chunk(&gone.id, "k", 0, 9).unwrap().is_none());
    assert!(b.file(&later.id, "k").unwrap().is_some());
    // An hour on, the other one goes too; a sweep takes at most `limit` a time.
    let again = b
        .put_file("k", new_file("again", Some(-1)), b"x\n", None)
        .unwrap();
    assert_eq!(b.delete_expired(later.created + 3600, 1).unwrap(), 1);
    assert!(
        b.file_chunk(&again.id, "k", 0, 1).unwrap().is_none(),
        "soonest first"
    );
    assert!(b.file_chunk(&later.id, "k", 0, 1).unwrap().is_some());
    assert_eq!(b.delete_expired(later.created + 3600, 1).unwrap(), 1);
    assert_eq!(b.delete_expired(later.created + 3600, 1).unwrap(), 0);
    assert!(b.file(&later.id, "k").unwrap().is_none());
    assert!(b.file(&kept.id, "k").unwrap().is_some());
}

#[test]
fn files_are_read_in_chunks_and_a_key_stores_no_more_than_its_quota() {
    let (_d, b) = store();
    let f = put(&b, "k", "f", b"0123456789");
    let chunks: Vec<_> = [(0, 4), (4, 4), (8, 4), (10, 4), (12, 4)]
        .iter()
        .map(|&(at, len)| b.file_chunk(&f.id, "k", at, len).unwrap().unwrap())
        .collect();
    assert_eq!(chunks, [&b"0123"[..], b"4567", b"89", b"", b""]);
    assert!(b.file_chunk(&f.id, "other", 0, 4).unwrap().is_none());
    // 10 bytes stored of 16: 6 more fit, 7 do not; another key has its own 16.
    let quota = Some(16);
    let refused = |r: Result<FileMeta, GatewayError>| matches!(r, Err(GatewayError::Invalid { field, .. }) if field == "file");
    assert!(refused(b.put_file(
        "k",
        new_file("g", None),
        b"1234567",
        quota
    )));
    assert!(b
        .put_file("other", new_file("g", None), b"1234567", quota)
        .is_ok());
    b.put_file("k", new_file("g", None), b"123456", quota)
        .unwrap();
    assert!(refused(b.put_file("k", new_file("h", None), b"1", quota)));
    assert_eq!(b.storage_used("k").unwrap(), 16);
    assert!(b.delete_file(&f.id, "k").unwrap());
    b.put_file("k", new_file("h", None), b"1", quota).unwrap();
}

#[test]
fn a_batch_runs_its_lines_then_keeps_only_its_files() {
    let (_d, b) = store();
    let mut object = json!({"id": "batch_1", "status": "in_progress", "created_at": 5,
        "request_counts": {"total": 3, "completed": 0, "failed": 0}});
    let lines: Vec<Line> = (0..3)
        .map(|i| Line {
            line: i,
            custom_id: format!("c{i}"),
            url: "/v1/chat/completions".into(),
            body: json!({"n": i}).to_string(),
        })
        .collect();
    b.create("key", "k", &object, lines.clone()).unwrap();
    assert_eq!(b.active().unwrap().len(), 1);
    let todo = b.pending("batch_1", &[0], 9).unwrap();
    assert_eq!(todo.iter().map(|l| l.line).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(todo[0].body, r#"{"n":1}"#);
    // A chat completion's usage and a response's (the Responses API's names).
    let chat = json!({"custom_id": "c1", "response": {"body": {"usage": {"prompt_tokens": 7,
        "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 1}}}}});
    b.finish_line("batch_1", 1, true, &chat).unwrap();
    let failed = json!({"custom_id": "c2", "response": {"body": {"usage": {"input_tokens": 5,
        "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}}}}});
    b.finish_line("batch_1", 2, false, &failed).unwrap();
    let seen = b.batch("batch_1", "k").unwrap().unwrap();
    assert_eq!(
        seen["request_counts"],
        json!({"total": 3, "completed": 1, "failed": 1})
    );
    let usage = json!({"input_tokens": 12, "input_tokens_details": {"cached_tokens": 5},
        "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 1},
        "total_tokens": 17});
    assert_eq!(seen["usage"], usage);
    assert!(b.batch("batch_1", "other").unwrap().is_none());
    // A result comes once: a late repeat changes nothing (nor is its usage counted).
    b.finish_line("batch_1", 2, true, &chat).unwrap();
    assert_eq!(b.batch("batch_1", "k").unwrap().unwrap()["usage"], usage);
    let files = |results: &Results, object: &mut Value| {
        assert!(results[0].1.is_none());
        assert!(results[1].1.as_ref().unwrap().0);
        assert_eq!(results[2].1.as_ref().unwrap().1, failed.to_string());
        object["status"] = "completed".into();
        Ok((b"out\n".to_vec(), Vec::new()))
    };
    assert!(!b.conclude("k", &mut object, "cancelling", files).unwrap());
    assert_eq!(object["status"], "in_progress");
    assert!(b.conclude("k", &mut object, "in_progress", files).unwrap());
    assert_eq!(object["usage"], usage, "an ended batch keeps its usage");
    let out = object["output_file_id"].as_str().unwrap();
    assert_eq!(b.file_content(out, "k").unwrap().unwrap(), b"out\n");
    assert!(object.get("error_file_id").is_none());
    assert!(b.active().unwrap().is_empty());
    assert!(results_of(&b.conn(), "batch_1").unwrap().is_empty());
    assert_eq!(
        b.batch("batch_1", "k").unwrap().unwrap()["status"],
        "completed"
    );
    let all = BatchQuery {
        limit: 10,
        ..BatchQuery::default()
    };
    assert_eq!(b.batches("k", &all).unwrap().items.len(), 1);
    // Failing: only a batch with work left, its rows gone, its counts kept.
    assert!(!b.fail("batch_1", "late").unwrap());
    let object = json!({"id": "batch_2", "status": "in_progress", "created_at": 6});
    b.create("key", "k", &object, lines.clone()).unwrap();
    b.finish_line("batch_2", 0, true, &json!({})).unwrap();
    assert!(b.fail("batch_2", "the key is gone").unwrap());
    let failed = b.batch("batch_2", "k").unwrap().unwrap();
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["errors"]["data"][0]["message"], "the key is gone");
    assert_eq!(failed["request_counts"]["completed"], 1);
    assert!(results_of(&b.conn(), "batch_2").unwrap().is_empty());
    assert!(b.active().unwrap().is_empty());
}

#[test]
fn batches_page_from_either_side_of_a_cursor_by_endpoint_and_delete_once_ended() {
    let (_d, b) = store();
    let line = Line {
        line: 0,
        custom_id: "a".into(),
        url: "/v1/messages".into(),
        body: "{}".into(),
    };
    // b0..b4, oldest first; b1 and b3 of another endpoint.
    for i in 0..5 {
        let endpoint = if i % 2 == 1 {
            "/v1/embeddings"
        } else {
            "/v1/messages"
        };
        let object = json!({"id": format!("b{i}"), "status": "in_progress", "created_at": i,
                            "endpoint": endpoint});
        b.create("key", "k", &object, [line.clone()]).unwrap();
    }
    let ids = |q: BatchQuery| -> (Vec<String>, bool) {
        let page = b.batches("k", &q).unwrap();
        let ids = page
            .items
            .iter()
            .map(|o| o["id"].as_str().unwrap().to_string());
        (ids.collect(), page.has_more)
    };
    let messages = BatchQuery {
        endpoint: Some("/v1/messages"),
        limit: 2,
        ..BatchQuery::default()
    };
    assert_eq!(ids(messages), (vec!["b4".into(), "b2".into()], true));
    let after = BatchQuery {
        after: Some("b2"),
        ..messages
    };
    assert_eq!(ids(after), (vec!["b0".into()], false));
    // The page before a cursor: the newer ones next to it, still newest first.
    let before = BatchQuery {
        before: Some("b0"),
        limit: 1,
        ..messages
    };
    assert_eq!(ids(before), (vec!["b2".into()], true));
    let before = BatchQuery {
        before: Some("b1"),
        endpoint: None,
        limit: 10,
        ..messages
    };
    assert_eq!(
        ids(before),
        (vec!["b4".into(), "b3".into(), "b2".into()], false)
    );
    // Deleting: only an owner's batch that has ended, with its files.
    assert_eq!(b.delete_batch("b4", "k").unwrap(), Deleted::Running);
    assert_eq!(b.delete_batch("b4", "other").unwrap(), Deleted::NoSuchBatch);
    let mut object = b.batch("b4", "k").unwrap().unwrap();
    let done = |_: &Results, o: &mut Value| {
        o["status"] = "cancelled".into();
        Ok((b"out\n".to_vec(), b"err\n".to_vec()))
    };
    assert!(b.conclude("k", &mut object, "in_progress", done).unwrap());
    let files = [&object["output_file_id"], &object["error_file_id"]]
        .map(|f| f.as_str().unwrap().to_string());
    assert_eq!(b.delete_batch("b4", "k").unwrap(), Deleted::Yes);
    assert!(b.batch("b4", "k").unwrap().is_none());
    for f in files {
        assert!(b.file(&f, "k").unwrap().is_none());
    }
    assert_eq!(b.delete_batch("b4", "k").unwrap(), Deleted::NoSuchBatch);
}

#[test]
fn a_batchs_held_answers_and_requests_are_bounded_and_counted() {
    let (_d, b) = store();
    let object = json!({"id": "batch_1", "status": "in_progress", "created_at": 5,
        "input_file_id": "file-x"});
    let lines: Vec<Line> = (0..3)
        .map(|i| Line {
            line: i,
            custom_id: format!("c{i}"),
            url: "/v1/embeddings".into(),
            body: "x".repeat(100),
        })
        .collect();
    // A batch made from a file holds a copy of its requests: past the file itself (one
    // file may start many batches), they count against the quota.
    let quota = |limit| {
        Some(Quota {
            limit,
            bytes: 300,
            field: "input_file_id",
        })
    };
    let full = b.create_held("key", "k", &object, lines.clone(), quota(250));
    assert!(
        matches!(&full, Err(GatewayError::Invalid { field, .. }) if field == "input_file_id"),
        "{full:?}"
    );
    // Its file gone (deleted or expired): the copy is all there is.
    b.create_held("key", "k", &object, lines.clone(), quota(300))
        .unwrap();
    assert_eq!(b.storage_used("k").unwrap(), 300);
    // With its file stored, two batches from it count the file and their copies past the
    // file's own size (a file is its requests and a little more).
    let file = put(&b, "k", "in.jsonl", &[b'z'; 400]);
    for id in ["batch_2", "batch_3"] {
        let o = json!({"id": id, "status": "in_progress", "created_at": 5,
            "input_file_id": file.id});
        b.create_held("key", "k", &o, lines.clone(), None).unwrap();
    }
    assert_eq!(b.storage_used("k").unwrap(), 300 + 400 + (600 - 400));
    // A batch from a stored file fits a quota that holds the file and its copy past it: the
    // file is not counted twice (it was refused with the quota the store then holds).
    let (_d2, b2) = store();
    let file = put(&b2, "k", "in.jsonl", &[b'z'; 400]);
    let o = json!({"id": "batch_4", "status": "in_progress", "created_at": 5,
        "input_file_id": file.id});
    b2.create_held("key", "k", &o, lines.clone(), quota(450))
        .unwrap();
    assert_eq!(b2.storage_used("k").unwrap(), 400);
    let o = json!({"id": "batch_5", "status": "in_progress", "created_at": 5,
        "input_file_id": file.id});
    let full = b2.create_held("key", "k", &o, lines.clone(), quota(450));
    assert!(
        matches!(&full, Err(GatewayError::Invalid { .. })),
        "{full:?}"
    );
    assert_eq!(
        b2.storage_used("k").unwrap(),
        400,
        "a refused batch holds nothing"
    );
    // Answers past what an output file may hold (4096 bytes under test) are not kept.
    let answer = |i: i64| {
        json!({"id": format!("r{i}"), "custom_id": format!("c{i}"),
        "response": {"status_code": 200, "body": {"data": "y".repeat(3000)}}})
    };
    b.finish_line("batch_1", 0, true, &answer(0)).unwrap();
    b.finish_line("batch_1", 1, true, &answer(1)).unwrap();
    let results = results_of(&b.conn(), "batch_1").unwrap();
    assert!(matches!(&results[0].1, Some((true, r)) if r.len() > 3000));
    let Some((false, kept)) = &results[1].1 else {
        panic!("{:?}", results[1]);
    };
    let kept: Value = serde_json::from_str(kept).unwrap();
    assert_eq!(kept["custom_id"], "c1");
    assert_eq!(kept["error"]["code"], "batch_output_too_large");
    // The answers count too while the batch runs.
    assert!(b.storage_used("k").unwrap() > 900 + 3000);
}

#[test]
fn attempts_the_process_did_not_outlive_are_counted() {
    let (_d, b) = store();
    let object = json!({"id": "batch_1", "status": "in_progress", "created_at": 5});
    let line = Line {
        line: 0,
        custom_id: "c0".into(),
        url: "/v1/chat/completions".into(),
        body: "{}".into(),
    };
    b.create("key", "k", &object, [line]).unwrap();
    // Started and never ended (the process stopped each time): counted up.
    let started: Vec<i64> = (0..3)
        .map(|_| b.begin_attempt("batch_1", 0).unwrap())
        .collect();
    assert_eq!(started, [1, 2, 3]);
    // One refused before it ran is taken back; the earlier ones still count.
    b.end_attempt("batch_1", 0, false).unwrap();
    assert_eq!(b.begin_attempt("batch_1", 0).unwrap(), 3);
    // An attempt answered clears the count.
    b.end_attempt("batch_1", 0, true).unwrap();
    assert_eq!(b.begin_attempt("batch_1", 0).unwrap(), 1);
    // No such line: nothing started.
    assert_eq!(b.begin_attempt("batch_1", 9).unwrap(), 0);
}
