//! The Batch API's store: files, batches, their requests and results.
use super::*;

fn store() -> (tempfile::TempDir, Batches) {
    let dir = tempfile::tempdir().unwrap();
    let conn = super::super::db::open(&dir.path().join("b.db")).unwrap();
    (dir, Batches::new(conn).unwrap())
}

#[test]
fn files_belong_to_their_owner_and_list_newest_first() {
    let (_d, b) = store();
    let ids: Vec<String> = (0..3)
        .map(|i| {
            b.put_file("k", "batch", &format!("f{i}.jsonl"), b"{}\n")
                .unwrap()
                .id
        })
        .collect();
    b.put_file("other", "batch", "x", b"").unwrap();
    assert!(b.file(&ids[0], "other").unwrap().is_none());
    assert_eq!(b.file_content(&ids[1], "k").unwrap().unwrap(), b"{}\n");
    let page = b.files("k", None, None, 2).unwrap();
    let names: Vec<_> = page.items.iter().map(|f| f.id.clone()).collect();
    assert_eq!(names, [ids[2].clone(), ids[1].clone()]);
    assert!(page.has_more);
    let rest = b.files("k", None, Some(&ids[1]), 2).unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].id, ids[0]);
    assert!(!rest.has_more);
    assert!(b
        .files("k", Some("batch_output"), None, 9)
        .unwrap()
        .items
        .is_empty());
    assert!(b.files("other", None, Some(&ids[0]), 2).is_err());
    assert!(!b.delete_file(&ids[0], "other").unwrap());
    assert!(b.delete_file(&ids[0], "k").unwrap());
    assert!(b.file(&ids[0], "k").unwrap().is_none());
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
    b.finish_line("batch_1", 1, true, &json!({"custom_id": "c1"}))
        .unwrap();
    b.finish_line("batch_1", 2, false, &json!({"custom_id": "c2"}))
        .unwrap();
    let seen = b.batch("batch_1", "k").unwrap().unwrap();
    assert_eq!(
        seen["request_counts"],
        json!({"total": 3, "completed": 1, "failed": 1})
    );
    assert!(b.batch("batch_1", "other").unwrap().is_none());
    // A result comes once: a late repeat changes nothing.
    b.finish_line("batch_1", 2, true, &json!({})).unwrap();
    let files = |results: &Results, object: &mut Value| {
        assert!(results[0].1.is_none());
        assert!(results[1].1.as_ref().unwrap().0);
        assert_eq!(results[2].1.as_ref().unwrap().1, r#"{"custom_id":"c2"}"#);
        object["status"] = "completed".into();
        Ok((b"out\n".to_vec(), Vec::new()))
    };
    assert!(!b.conclude("k", &mut object, "cancelling", files).unwrap());
    assert_eq!(object["status"], "in_progress");
    assert!(b.conclude("k", &mut object, "in_progress", files).unwrap());
    let out = object["output_file_id"].as_str().unwrap();
    assert_eq!(b.file_content(out, "k").unwrap().unwrap(), b"out\n");
    assert!(object.get("error_file_id").is_none());
    assert!(b.active().unwrap().is_empty());
    assert!(results_of(&b.conn(), "batch_1").unwrap().is_empty());
    assert_eq!(
        b.batch("batch_1", "k").unwrap().unwrap()["status"],
        "completed"
    );
    assert_eq!(b.batches("k", None, 10).unwrap().items.len(), 1);
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
