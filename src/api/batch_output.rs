//! A batch's end: its output and error files written from its results (each request's
//! line once; a line saying why for each request never run) and its object concluded.

use serde_json::{json, Value};

use super::batches::store;
use super::error::ApiError;
use super::AppState;
use crate::gateway::batches::{new_id, ActiveBatch, Results};

/// Ends a batch `completed`, `cancelled` or `expired` (if it is still as the worker saw it).
pub(super) async fn conclude(
    state: &AppState,
    batch: &ActiveBatch,
    ending: &'static str,
) -> Result<(), ApiError> {
    let (owner, mut object) = (batch.owner.clone(), batch.object.clone());
    let expect = object["status"].as_str().unwrap_or_default().to_string();
    store(state, move |b| {
        b.conclude(&owner, &mut object, &expect, |results, object| {
            Ok(build_files(
                results,
                ending,
                object,
                crate::gateway::db::unix_now(),
            ))
        })
    })
    .await?;
    Ok(())
}

/// A batch's output and error files from its results: successes (2xx) to the output, the
/// rest to the errors, with a line for each request never run (`batch_cancelled` or
/// `batch_expired`); the object gets its status, time and counts.
fn build_files(
    results: &Results,
    ending: &str,
    object: &mut Value,
    now: i64,
) -> (Vec<u8>, Vec<u8>) {
    let (mut output, mut errors) = (Vec::new(), Vec::new());
    let (mut completed, mut failed) = (0u64, 0u64);
    for (custom_id, result) in results {
        let (ok, line) = match result {
            Some((ok, line)) => (*ok, line),
            None => {
                let (code, message) = match ending {
                    "expired" => (
                        "batch_expired",
                        "This request could not be executed before the completion window expired.",
                    ),
                    _ => (
                        "batch_cancelled",
                        "This request was not executed: the batch was cancelled.",
                    ),
                };
                let line = json!({"id": new_id("batch_req_"), "custom_id": custom_id,
                    "response": null, "error": {"code": code, "message": message}});
                errors.extend_from_slice(line.to_string().as_bytes());
                errors.push(b'\n');
                continue;
            }
        };
        let into = if ok { &mut output } else { &mut errors };
        into.extend_from_slice(line.as_bytes());
        into.push(b'\n');
        if ok {
            completed += 1;
        } else {
            failed += 1;
        }
    }
    object["status"] = ending.into();
    object[format!("{ending}_at")] = now.into();
    if ending == "completed" {
        object["finalizing_at"] = now.into();
    }
    object["request_counts"] =
        json!({"total": results.len(), "completed": completed, "failed": failed});
    (output, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_hold_every_request_once_and_say_why_one_never_ran() {
        let results: Results = vec![
            (
                "a".into(),
                Some((true, json!({"custom_id": "a", "n": 1}).to_string())),
            ),
            ("b".into(), None),
            (
                "c".into(),
                Some((false, json!({"custom_id": "c"}).to_string())),
            ),
        ];
        for (ending, code) in [
            ("expired", "batch_expired"),
            ("cancelled", "batch_cancelled"),
        ] {
            let mut object = json!({"status": "in_progress"});
            let (output, errors) = build_files(&results, ending, &mut object, 7);
            let lines = |b: &[u8]| -> Vec<Value> {
                std::str::from_utf8(b)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect()
            };
            assert_eq!(lines(&output), [json!({"custom_id": "a", "n": 1})]);
            let errors = lines(&errors);
            assert_eq!(errors.len(), 2);
            assert_eq!(
                (
                    errors[0]["custom_id"].as_str(),
                    errors[0]["error"]["code"].as_str()
                ),
                (Some("b"), Some(code))
            );
            assert_eq!(errors[1]["custom_id"], "c");
            assert_eq!(object["status"], ending);
            assert_eq!(object[format!("{ending}_at")], 7);
            assert_eq!(
                object["request_counts"],
                json!({"total": 3, "completed": 1, "failed": 1})
            );
        }
    }
}
