//! The batch store's tests: files within limits and listed per tenant, batches limited and
//! listed, a batch from start to finish (lines, progress, cancellation, results, output
//! files), atomic starts and finishes, and the retention purge around running batches.

use serde_json::json;

use super::{done_at, new_job, request, token, Harness};
use crate::{
    BatchLine, BatchRecord, BatchStatus, FileRecord, JobState, NewFile, OverLimit, Progress,
    Sealer, Stores,
};

fn file(id: &str, tenant: &str, purpose: &str, bytes: u64) -> NewFile {
    NewFile {
        file: FileRecord {
            id: id.into(),
            bytes,
            created_s: 1,
            filename: format!("{id}.jsonl"),
            purpose: purpose.into(),
        },
        tenant: tenant.into(),
        content: format!("content of {id}").into_bytes(),
    }
}

fn batch(id: &str, status: BatchStatus) -> BatchRecord {
    BatchRecord {
        id: id.into(),
        status,
        json: json!({"id": id, "status": status.as_str()}).to_string(),
    }
}

/// Line `line`: a job to run, or (`valid` false) a validation error.
fn line(line: u32, valid: bool) -> BatchLine {
    BatchLine {
        line,
        custom_id: format!("request-{line}"),
        outcome: if valid {
            Ok(request())
        } else {
            Err(json!({"code": "invalid_request", "message": "bad line"}))
        },
    }
}

async fn progress(store: &Stores, batch: &str) -> Progress {
    store.batches.batch_progress(batch).await.unwrap()
}

fn ids(files: &[FileRecord]) -> Vec<&str> {
    files.iter().map(|f| f.id.as_str()).collect()
}

pub(crate) async fn files_are_per_tenant_and_within_limits(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let put = |f: NewFile, max_files, max_bytes| {
        store.batches.insert_file_within(f, max_files, max_bytes)
    };
    assert_eq!(
        put(file("f1", "t", "batch", 10), 2, 25).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        put(file("f2", "t", "batch", 10), 2, 25).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        put(file("f3", "t", "batch", 1), 2, 25).await.unwrap(),
        Err(OverLimit::Files {
            count: 2,
            bytes: 20
        })
    );
    // Limits are per purpose and per tenant.
    assert_eq!(
        put(file("f3", "t", "batch_output", 10), 2, 25)
            .await
            .unwrap(),
        Ok(())
    );
    assert_eq!(
        put(file("f4", "t", "batch_output", 20), 2, 25)
            .await
            .unwrap(),
        Err(OverLimit::Files {
            count: 1,
            bytes: 10
        })
    );
    assert_eq!(
        put(file("f5", "u", "batch", 10), 1, 25).await.unwrap(),
        Ok(())
    );
    assert_eq!(h.rows("files").await, 4);

    let f1 = store.batches.file("t", "f1").await.unwrap().unwrap();
    assert_eq!(f1, file("f1", "t", "batch", 10).file);
    assert_eq!(
        store.batches.file_content("t", "f1").await.unwrap(),
        Some(b"content of f1".to_vec())
    );
    assert_eq!(store.batches.file("u", "f1").await.unwrap(), None);
    assert_eq!(store.batches.file_content("u", "f1").await.unwrap(), None);
    assert_eq!(store.batches.file("t", "nope").await.unwrap(), None);

    assert!(!store.batches.delete_file("u", "f1").await.unwrap());
    assert!(store.batches.delete_file("t", "f1").await.unwrap());
    assert!(!store.batches.delete_file("t", "f1").await.unwrap());
    assert_eq!(store.batches.file("t", "f1").await.unwrap(), None);
    // The deleted file no longer counts.
    assert_eq!(
        put(file("f6", "t", "batch", 10), 2, 25).await.unwrap(),
        Ok(())
    );
}

pub(crate) async fn files_list_newest_first_in_pages(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    for (id, tenant, purpose) in [
        ("f1", "t", "batch"),
        ("f2", "t", "batch_output"),
        ("f3", "u", "batch"),
        ("f4", "t", "batch"),
    ] {
        store
            .batches
            .insert_file_within(file(id, tenant, purpose, 1), 100, 1_000)
            .await
            .unwrap()
            .unwrap();
    }
    let (page, more) = store.batches.list_files("t", None, None, 2).await.unwrap();
    assert_eq!((ids(&page), more), (vec!["f4", "f2"], true));
    let (page, more) = store
        .batches
        .list_files("t", None, Some("f2".into()), 2)
        .await
        .unwrap();
    assert_eq!((ids(&page), more), (vec!["f1"], false));
    let (page, more) = store
        .batches
        .list_files("t", Some("batch".into()), None, 10)
        .await
        .unwrap();
    assert_eq!((ids(&page), more), (vec!["f4", "f1"], false));
    // Another tenant's file is no cursor: the list starts from the newest.
    let (page, _) = store
        .batches
        .list_files("t", None, Some("f3".into()), 10)
        .await
        .unwrap();
    assert_eq!(ids(&page), vec!["f4", "f2", "f1"]);
    let (page, more) = store.batches.list_files("v", None, None, 10).await.unwrap();
    assert!(page.is_empty() && !more);
}

pub(crate) async fn batches_are_per_tenant_limited_and_listed(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let insert = |tenant: &'static str, id: &str, status| {
        store.batches.insert_batch(tenant, batch(id, status), 2)
    };
    assert_eq!(
        insert("t", "b1", BatchStatus::Validating).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        insert("t", "b2", BatchStatus::InProgress).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        insert("t", "b3", BatchStatus::Validating).await.unwrap(),
        Err(OverLimit::ActiveBatches(2))
    );
    assert_eq!(
        insert("u", "u1", BatchStatus::Validating).await.unwrap(),
        Ok(()),
        "limits are per tenant"
    );
    assert_eq!(
        store.batches.batch("t", "b1").await.unwrap(),
        Some(batch("b1", BatchStatus::Validating))
    );
    assert_eq!(store.batches.batch("u", "b1").await.unwrap(), None);
    // An ended batch no longer counts.
    let b1_done = batch("b1", BatchStatus::Failed);
    store.batches.update_batch(b1_done.clone()).await.unwrap();
    assert_eq!(store.batches.batch("t", "b1").await.unwrap(), Some(b1_done));
    assert_eq!(
        insert("t", "b3", BatchStatus::Validating).await.unwrap(),
        Ok(())
    );

    let names = |list: Vec<BatchRecord>| list.into_iter().map(|b| b.id).collect::<Vec<_>>();
    let (page, more) = store.batches.list_batches("t", None, 2).await.unwrap();
    assert_eq!((names(page), more), (vec!["b3".into(), "b2".into()], true));
    let (page, more) = store
        .batches
        .list_batches("t", Some("b2".into()), 2)
        .await
        .unwrap();
    assert_eq!((names(page), more), (vec!["b1".to_string()], false));

    let active: Vec<(String, String)> = store
        .batches
        .active_batches()
        .await
        .unwrap()
        .into_iter()
        .map(|(tenant, b)| (tenant, b.id))
        .collect();
    let expected = [("t", "b2"), ("u", "u1"), ("t", "b3")];
    assert_eq!(
        active,
        expected.map(|(t, b)| (t.to_string(), b.to_string()))
    );
}

pub(crate) async fn a_batch_runs_from_start_to_finish(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    store
        .batches
        .insert_batch("t", batch("b", BatchStatus::Validating), 10)
        .await
        .unwrap()
        .unwrap();
    let running = batch("b", BatchStatus::InProgress);
    let lines = vec![line(0, true), line(1, false), line(2, true)];
    let jobs = store
        .batches
        .start_batch("t", running.clone(), lines, 7)
        .await
        .unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(jobs[0].id < jobs[1].id);
    for job in &jobs {
        assert_eq!(job.tenant, "t");
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.created_ms, 7);
        assert_eq!(job.request, request());
        let stored = store.jobs.load_job(job.id).await.unwrap().unwrap();
        assert_eq!(&stored, job);
    }
    assert_eq!(store.batches.batch("t", "b").await.unwrap(), Some(running));
    let (a, c) = (jobs[0].id, jobs[1].id);
    let expect = |done, failed, unfinished| Progress {
        total: 3,
        done,
        failed,
        unfinished,
    };
    assert_eq!(progress(&store, "b").await, expect(0, 1, 2));
    assert_eq!(
        store.batches.unfinished_batch_jobs("b").await.unwrap(),
        vec![a, c]
    );

    store
        .jobs
        .append_tokens(a, 0, vec![token(1), token(2)])
        .await
        .unwrap();
    store.jobs.finish_job(a, done_at(8)).await.unwrap();
    assert_eq!(progress(&store, "b").await, expect(1, 1, 1));
    assert_eq!(
        store.batches.unfinished_batch_jobs("b").await.unwrap(),
        vec![c]
    );
    assert_eq!(store.batches.cancel_batch_jobs("b", 9).await.unwrap(), 1);
    assert_eq!(store.batches.cancel_batch_jobs("b", 9).await.unwrap(), 0);
    assert_eq!(progress(&store, "b").await, expect(1, 2, 0));
    assert!(store
        .batches
        .unfinished_batch_jobs("b")
        .await
        .unwrap()
        .is_empty());

    let results = store.batches.batch_results("b").await.unwrap();
    let custom: Vec<&str> = results.iter().map(|r| r.custom_id.as_str()).collect();
    assert_eq!(custom, ["request-0", "request-1", "request-2"]);
    let first = results[0].job.as_ref().unwrap();
    assert_eq!((first.id, first.state), (a, JobState::Done));
    assert_eq!(first.tokens, vec![token(1), token(2)]);
    assert!(results[0].error.is_none());
    assert!(results[1].job.is_none());
    assert_eq!(
        results[1].error,
        Some(json!({"code": "invalid_request", "message": "bad line"}))
    );
    let third = results[2].job.as_ref().unwrap();
    assert_eq!((third.id, third.state), (c, JobState::Cancelled));

    store
        .batches
        .update_batch(batch("b", BatchStatus::Finalizing))
        .await
        .unwrap();
    let completed = batch("b", BatchStatus::Completed);
    let outputs = vec![
        file("b-output", "t", "batch_output", 5),
        file("b-errors", "t", "batch_output", 5),
    ];
    store
        .batches
        .finish_batch(completed.clone(), outputs)
        .await
        .unwrap();
    assert_eq!(
        store.batches.batch("t", "b").await.unwrap(),
        Some(completed)
    );
    assert_eq!(
        store.batches.file_content("t", "b-output").await.unwrap(),
        Some(b"content of b-output".to_vec())
    );
    assert!(store.batches.file("t", "b-errors").await.unwrap().is_some());
    assert!(store.batches.active_batches().await.unwrap().is_empty());
}

/// A start that fails part-way (two lines numbered alike) leaves no job, no line and the
/// batch record as it was.
pub(crate) async fn a_failing_batch_start_writes_nothing(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let validating = batch("b", BatchStatus::Validating);
    store
        .batches
        .insert_batch("t", validating.clone(), 10)
        .await
        .unwrap()
        .unwrap();
    let lines = vec![line(0, true), line(1, false), line(1, true)];
    assert!(store
        .batches
        .start_batch("t", batch("b", BatchStatus::InProgress), lines, 7)
        .await
        .is_err());
    assert_eq!(
        store.batches.batch("t", "b").await.unwrap(),
        Some(validating)
    );
    assert!(store.jobs.load_unfinished().await.unwrap().is_empty());
    assert_eq!(h.rows("jobs").await, 0);
    assert_eq!(h.rows("batch_requests").await, 0);
    // The store goes on: the same batch starts with valid lines.
    let jobs = store
        .batches
        .start_batch(
            "t",
            batch("b", BatchStatus::InProgress),
            vec![line(0, true), line(1, true)],
            7,
        )
        .await
        .unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(h.rows("batch_requests").await, 2);
}

/// A finish that fails part-way (two output files with one id) writes no file and leaves the
/// batch running.
pub(crate) async fn a_failing_batch_finish_writes_nothing(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let running = batch("b", BatchStatus::InProgress);
    store
        .batches
        .insert_batch("t", running.clone(), 10)
        .await
        .unwrap()
        .unwrap();
    let outputs = vec![
        file("out", "t", "batch_output", 5),
        file("out", "t", "batch_output", 5),
    ];
    assert!(store
        .batches
        .finish_batch(batch("b", BatchStatus::Completed), outputs)
        .await
        .is_err());
    assert_eq!(store.batches.batch("t", "b").await.unwrap(), Some(running));
    assert_eq!(store.batches.file("t", "out").await.unwrap(), None);
    assert_eq!(h.rows("files").await, 0);
}

/// The purge keeps the ended jobs of a batch still running (its output is not written yet)
/// and takes them, with their lines, once the batch has ended; batch files age out by their
/// creation time.
pub(crate) async fn purge_keeps_the_jobs_of_a_running_batch(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    store
        .batches
        .insert_batch("t", batch("b", BatchStatus::Validating), 10)
        .await
        .unwrap()
        .unwrap();
    let jobs = store
        .batches
        .start_batch(
            "t",
            batch("b", BatchStatus::InProgress),
            vec![line(0, true), line(1, false)],
            1,
        )
        .await
        .unwrap();
    let job = jobs[0].id;
    store.jobs.finish_job(job, done_at(100)).await.unwrap();
    let loose = new_job(&store).await;
    store.jobs.finish_job(loose, done_at(100)).await.unwrap();
    store
        .batches
        .insert_file_within(file("input", "t", "batch", 5), 10, 1_000)
        .await
        .unwrap()
        .unwrap();

    assert_eq!(store.jobs.purge_finished_before(200).await.unwrap(), 1);
    assert!(store.jobs.load_job(loose).await.unwrap().is_none());
    assert!(store.jobs.load_job(job).await.unwrap().is_some());
    assert_eq!(h.rows("batch_requests").await, 2);
    assert!(
        store.batches.file("t", "input").await.unwrap().is_some(),
        "created at 1 s, not before the cutoff's 0 s"
    );

    for status in [BatchStatus::Finalizing, BatchStatus::Completed] {
        store
            .batches
            .update_batch(batch("b", status))
            .await
            .unwrap();
    }
    assert_eq!(store.jobs.purge_finished_before(5_000).await.unwrap(), 1);
    assert!(store.jobs.load_job(job).await.unwrap().is_none());
    assert_eq!(
        h.rows("batch_requests").await,
        1,
        "the line that never became a job stays with its batch"
    );
    assert_eq!(store.batches.file("t", "input").await.unwrap(), None);
}

/// A batch only moves forward: a write from a status the batch has left is refused and
/// changes nothing (two coordinators' runners, or a runner and a client's cancel, racing), so
/// a cancelled batch is never put back in progress and a batch ends, with its files, once.
pub(crate) async fn a_batch_only_moves_forward(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let put = |status| store.batches.update_batch(batch("b", status));
    store
        .batches
        .insert_batch("t", batch("b", BatchStatus::Validating), 5)
        .await
        .unwrap()
        .unwrap();
    put(BatchStatus::InProgress).await.unwrap();
    put(BatchStatus::InProgress).await.unwrap();
    put(BatchStatus::Cancelling).await.unwrap();
    let stale = put(BatchStatus::InProgress).await;
    assert!(
        matches!(&stale, Err(crate::StoreError::Stale { batch, to }) if batch == "b" && *to == "in_progress"),
        "{stale:?}"
    );
    assert!(put(BatchStatus::Finalizing).await.is_err());
    assert_eq!(
        store.batches.batch("t", "b").await.unwrap(),
        Some(batch("b", BatchStatus::Cancelling))
    );
    // Ending writes its files and record once: a second end is refused with its files.
    let output = file("out", "t", "batch_output", 3);
    store
        .batches
        .finish_batch(batch("b", BatchStatus::Cancelled), vec![output.clone()])
        .await
        .unwrap();
    let again = file("out-2", "t", "batch_output", 3);
    assert!(store
        .batches
        .finish_batch(batch("b", BatchStatus::Cancelled), vec![again])
        .await
        .is_err());
    assert!(store.batches.file("t", "out").await.unwrap().is_some());
    assert_eq!(store.batches.file("t", "out-2").await.unwrap(), None);
}
