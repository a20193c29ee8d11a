//! The job store's tests: sealing at rest, reopening, idempotency keys, grouped commits, the
//! order of queued writes and discards, re-opening jobs, ids, retention.

use super::{done_at, ended, new_job, request, test_sealer, token, Harness};
use crate::{
    BatchLine, BatchRecord, BatchStatus, EnrollmentToken, FileRecord, IssuedCertificate, JobState,
    NewFile, Outcome, SealError, Sealer, StoreError, Verification,
};

/// Prompts, outputs and file contents reach the backend's files only sealed; what the store
/// keeps in the clear (a job's public id) is found there, so the search does look at the data.
pub(crate) async fn prompts_and_outputs_are_sealed_on_disk(h: &dyn Harness) {
    let req = br#"{"prompt":"PROMPT-MARKER-7f3a","max_tokens":8}"#.to_vec();
    let store = h.open(test_sealer()).await;
    let id = store
        .jobs
        .insert_job(
            "PUBLIC-MARKER-3b7e".into(),
            "t".into(),
            None,
            req.clone(),
            1,
        )
        .await
        .unwrap()
        .unwrap();
    let mut tok = token(9);
    tok.text = "OUTPUT-MARKER-c41d".into();
    tok.top = vec![("TOP-MARKER-9e2b".into(), -1.0)];
    store
        .jobs
        .append_tokens(id, 0, vec![tok.clone()])
        .await
        .unwrap();
    let outcome = Outcome {
        state: JobState::Done,
        finished_ms: 5,
        finish_reason: Some("stop".into()),
        text_tail: "TAIL-MARKER-05aa".into(),
        prompt_tokens: 3,
        error: None,
    };
    store.jobs.finish_job(id, outcome).await.unwrap();
    let file = NewFile {
        file: FileRecord {
            id: "file-1".into(),
            bytes: 20,
            created_s: 1,
            filename: "in.jsonl".into(),
            purpose: "batch".into(),
        },
        tenant: "t".into(),
        content: b"FILE-MARKER-5d1f line".to_vec(),
    };
    store
        .batches
        .insert_file_within(file, 10, 1000)
        .await
        .unwrap()
        .unwrap();
    let job = store.jobs.load_job(id).await.unwrap().unwrap();
    assert_eq!(job.request, req);
    assert_eq!(job.tokens, vec![tok]);
    assert_eq!(job.text_tail, "TAIL-MARKER-05aa");
    assert_eq!(
        store.batches.file_content("t", "file-1").await.unwrap(),
        Some(b"FILE-MARKER-5d1f line".to_vec())
    );
    drop(store);
    assert!(
        h.on_disk("PUBLIC-MARKER-3b7e").await,
        "the search for markers does not see the stored data"
    );
    for marker in [
        "PROMPT-MARKER",
        "OUTPUT-MARKER",
        "TOP-MARKER",
        "TAIL-MARKER",
        "FILE-MARKER",
    ] {
        assert!(!h.on_disk(marker).await, "{marker} is on disk in plaintext");
    }
    // Another key cannot read the store back.
    let other = h.open(Sealer::ephemeral()).await;
    assert!(matches!(
        other.jobs.load_job(id).await,
        Err(StoreError::Seal(SealError::UnknownKey(_)))
    ));
}

pub(crate) async fn purge_removes_only_jobs_finished_before_the_cutoff(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let mut ids = Vec::new();
    for (n, finished) in [(1, Some(100)), (2, Some(300)), (3, None)] {
        let id = store
            .jobs
            .insert_job(format!("j{n}"), "t".into(), None, request(), 1)
            .await
            .unwrap()
            .unwrap();
        store
            .jobs
            .append_tokens(id, 0, vec![token(n)])
            .await
            .unwrap();
        if let Some(finished_ms) = finished {
            store
                .jobs
                .finish_job(id, done_at(finished_ms))
                .await
                .unwrap();
        }
        ids.push(id);
    }
    assert_eq!(store.jobs.purge_finished_before(200).await.unwrap(), 1);
    assert!(store.jobs.load_job(ids[0]).await.unwrap().is_none());
    assert!(store.jobs.load_job(ids[1]).await.unwrap().is_some());
    assert_eq!(store.jobs.load_unfinished().await.unwrap().len(), 1);
    assert_eq!(
        store
            .jobs
            .purge_finished_before(u64::MAX / 2)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.jobs.load_unfinished().await.unwrap().len(),
        1,
        "unfinished jobs stay"
    );
}

pub(crate) async fn jobs_survive_reopening_with_their_tokens(h: &dyn Harness) {
    {
        let store = h.open(test_sealer()).await;
        let id = store
            .jobs
            .insert_job("cmpl-1".into(), "t".into(), Some("k".into()), request(), 1)
            .await
            .unwrap()
            .unwrap();
        store
            .jobs
            .append_tokens(id, 0, vec![token(1), token(2)])
            .await
            .unwrap();
        // Re-sending an overlapping batch does not duplicate.
        store
            .jobs
            .append_tokens(id, 1, vec![token(2), token(3)])
            .await
            .unwrap();
    }
    let store = h.open(test_sealer()).await;
    let jobs = store.jobs.load_unfinished().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(jobs[0].request, request());
}

pub(crate) async fn an_idempotency_key_maps_to_the_first_job(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let a = store
        .jobs
        .insert_job("a".into(), "t".into(), Some("k".into()), request(), 1)
        .await
        .unwrap();
    let b = store
        .jobs
        .insert_job("b".into(), "t".into(), Some("k".into()), request(), 2)
        .await
        .unwrap();
    let c = store
        .jobs
        .insert_job("c".into(), "other".into(), Some("k".into()), request(), 3)
        .await
        .unwrap();
    assert_eq!(b, Err(a.unwrap()));
    assert!(c.is_ok(), "keys are per tenant");
}

pub(crate) async fn a_failing_write_does_not_undo_its_group(h: &dyn Harness) {
    let store = h.open(test_sealer()).await;
    // Queued back to back, so they share a transaction; the second repeats a unique
    // public id and must fail alone.
    let (a, da) = store
        .jobs
        .queue_job("same".into(), "t".into(), request(), 1)
        .await
        .unwrap();
    let (b, db) = store
        .jobs
        .queue_job("same".into(), "t".into(), request(), 2)
        .await
        .unwrap();
    let (c, dc) = store
        .jobs
        .queue_job("other".into(), "t".into(), request(), 3)
        .await
        .unwrap();
    assert!(da.wait().await.is_ok());
    assert!(db.wait().await.is_err());
    assert!(dc.wait().await.is_ok());
    drop(store);
    let store = h.open(test_sealer()).await;
    let ids: Vec<u64> = store
        .jobs
        .load_unfinished()
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, vec![a, c]);
    // Ids continue after the highest stored one; the failed insert's id is not reused
    // within a run.
    assert!(b > a && c > b);
    let (d, dd) = store
        .jobs
        .queue_job("next".into(), "t".into(), request(), 4)
        .await
        .unwrap();
    dd.wait().await.unwrap();
    assert!(d > c);
}

pub(crate) async fn only_a_cancelled_job_is_reopened(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let id = store
        .jobs
        .insert_job("a".into(), "t".into(), Some("k".into()), request(), 1)
        .await
        .unwrap()
        .unwrap();
    store
        .jobs
        .append_tokens(id, 0, vec![token(7)])
        .await
        .unwrap();
    assert!(store.jobs.reopen_cancelled(id).await.unwrap().is_none());
    let cancelled = Outcome {
        state: JobState::Cancelled,
        finished_ms: 2,
        finish_reason: None,
        text_tail: String::new(),
        prompt_tokens: 0,
        error: None,
    };
    store.jobs.finish_job(id, cancelled).await.unwrap();
    let job = store.jobs.reopen_cancelled(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.tokens, vec![token(7)]);
    assert!(store.jobs.reopen_cancelled(id).await.unwrap().is_none());
    assert_eq!(store.jobs.load_unfinished().await.unwrap().len(), 1);
}

pub(crate) async fn finished_jobs_are_not_reloaded(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let id = new_job(&store).await;
    store
        .jobs
        .finish_job(
            id,
            Outcome {
                state: JobState::Done,
                finished_ms: 2,
                finish_reason: Some("stop".into()),
                text_tail: String::new(),
                prompt_tokens: 3,
                error: None,
            },
        )
        .await
        .unwrap();
    assert!(store.jobs.load_unfinished().await.unwrap().is_empty());
    let job = store.jobs.load_job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.prompt_tokens, 3);
}

/// Issue 13, hole 10: once verification recorded who produced a job, the purge still deletes
/// it (and its producer rows) instead of failing on the foreign key.
pub(crate) async fn purge_deletes_a_job_whose_producers_were_recorded(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let id = new_job(&store).await;
    store
        .jobs
        .append_tokens(id, 0, vec![token(1)])
        .await
        .unwrap();
    store.jobs.finish_job(id, done_at(100)).await.unwrap();
    store
        .reputation
        .queue_producers(id, vec!["vehicle-1".into(), "vehicle-2".into()], 100)
        .await;
    assert_eq!(store.jobs.purge_finished_before(200).await.unwrap(), 1);
    assert!(store.jobs.load_job(id).await.unwrap().is_none());
    let producers = h.rows("job_producers").await;
    assert_eq!(producers, 0, "the producer rows went with the job");
}

/// Calls waiting together (so sharing a commit where the backend groups them) answer each on
/// its own: one repeating a unique key fails, the others are stored.
pub(crate) async fn a_failing_call_fails_alone_among_concurrent_calls(h: &dyn Harness) {
    let store = h.open(test_sealer()).await;
    let token = |hash: &str| EnrollmentToken {
        token_sha256: hash.into(),
        node_id: "vehicle-1".into(),
        created_ms: 1,
        expires_ms: 1_000,
    };
    let certificate = IssuedCertificate {
        serial: "s1".into(),
        node_id: "vehicle-1".into(),
        issued_ms: 1,
        not_after_ms: 1_000,
    };
    let (a, b, c, d) = tokio::join!(
        store.registry.insert_token(token("h1")),
        store.registry.insert_token(token("h1")),
        store.registry.record_certificate(certificate),
        store
            .jobs
            .insert_job("j".into(), "t".into(), None, request(), 1),
    );
    assert!(a.is_ok());
    assert!(b.is_err(), "the repeated token hash is refused");
    assert!(c.is_ok());
    let job = d.unwrap().unwrap();
    drop(store);
    let store = h.open(test_sealer()).await;
    assert_eq!(
        store.registry.redeem_token("h1", 2).await.unwrap(),
        Some("vehicle-1".into())
    );
    assert_eq!(
        store
            .registry
            .certificates_issued_since("vehicle-1", 0)
            .await
            .unwrap(),
        1
    );
    assert!(store.jobs.load_job(job).await.unwrap().is_some());
}

/// Queued writes land in the order they were queued, discards included, through any store;
/// a read sees all of them, and once `flush` returns they are committed.
pub(crate) async fn queued_writes_apply_in_submission_order(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let (id, durable) = store
        .jobs
        .queue_job("q".into(), "t".into(), request(), 1)
        .await
        .unwrap();
    store
        .jobs
        .queue_tokens(id, 0, vec![token(1), token(2)])
        .await;
    store.jobs.queue_discard_tokens(id).await;
    // The re-run's tokens, queued after the discard, land on a clean slate.
    store.jobs.queue_tokens(id, 0, vec![token(3)]).await;
    store.jobs.queue_finish(id, done_at(9)).await;
    store
        .reputation
        .queue_producers(id, vec!["vehicle-1".into()], 9)
        .await;
    store
        .reputation
        .queue_verification(id, "vehicle-1", Verification::Failed)
        .await;
    let job = store.jobs.load_job(id).await.unwrap().unwrap();
    assert_eq!(job.tokens, vec![token(3)]);
    assert_eq!(job.state, JobState::Done);
    assert_eq!(
        store.reputation.suspect_jobs("vehicle-1", 0).await.unwrap(),
        vec![id]
    );
    durable.wait().await.unwrap();
    // A second round, queued only: flush waits for all of it.
    store.jobs.queue_discard_tokens(id).await;
    store
        .jobs
        .queue_tokens(id, 0, vec![token(4), token(5)])
        .await;
    store
        .jobs
        .queue_finish(id, ended(JobState::Failed, 10))
        .await;
    store.jobs.flush().await.unwrap();
    assert_eq!(h.rows("job_outputs").await, 2);
    let job = store.jobs.load_job(id).await.unwrap().unwrap();
    assert_eq!(job.tokens, vec![token(4), token(5)]);
    assert_eq!(job.state, JobState::Failed);
}

/// A `done` job re-opens for a re-run from scratch (queued, no tokens, no outcome) in one
/// step; any other job does not.
pub(crate) async fn only_a_done_job_is_reopened_for_a_rerun_without_its_tokens(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let id = new_job(&store).await;
    store
        .jobs
        .append_tokens(id, 0, vec![token(1), token(2)])
        .await
        .unwrap();
    assert!(store.jobs.reopen_for_rerun(id).await.unwrap().is_none());
    let mut outcome = done_at(5);
    outcome.text_tail = "tail".into();
    store.jobs.finish_job(id, outcome).await.unwrap();
    let job = store.jobs.reopen_for_rerun(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert!(job.tokens.is_empty());
    assert_eq!(job.text_tail, "");
    assert_eq!(job.finish_reason, None);
    assert_eq!(job.request, request());
    assert_eq!(h.rows("job_outputs").await, 0);
    assert!(store.jobs.reopen_for_rerun(id).await.unwrap().is_none());
    assert!(store
        .jobs
        .reopen_for_rerun(id + 1_000)
        .await
        .unwrap()
        .is_none());
    let cancelled = new_job(&store).await;
    store
        .jobs
        .finish_job(cancelled, ended(JobState::Cancelled, 6))
        .await
        .unwrap();
    assert!(store
        .jobs
        .reopen_for_rerun(cancelled)
        .await
        .unwrap()
        .is_none());
    let unfinished: Vec<u64> = store
        .jobs
        .load_unfinished()
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(unfinished, vec![id]);
}

/// Ids increase in the order they are handed out, whichever call hands them out (a batch's
/// jobs too, a failed batch's ids are not reused), and continue above every stored id after
/// reopening.
pub(crate) async fn ids_increase_across_jobs_and_batches_and_reopening(h: &dyn Harness) {
    let store = h.open(test_sealer()).await;
    let (a, durable) = store
        .jobs
        .queue_job("a".into(), "t".into(), request(), 1)
        .await
        .unwrap();
    durable.wait().await.unwrap();
    let b = new_job(&store).await;
    let batch = |status: BatchStatus| BatchRecord {
        id: "batch-ids".into(),
        status,
        json: "{}".into(),
    };
    let line = |line: u32| BatchLine {
        line,
        custom_id: format!("c{line}"),
        outcome: Ok(request()),
    };
    store
        .batches
        .insert_batch("t", batch(BatchStatus::Validating), 10)
        .await
        .unwrap()
        .unwrap();
    // Two lines numbered alike: the start fails, and its ids are gone.
    assert!(store
        .batches
        .start_batch(
            "t",
            batch(BatchStatus::InProgress),
            vec![line(0), line(0)],
            2
        )
        .await
        .is_err());
    let jobs = store
        .batches
        .start_batch(
            "t",
            batch(BatchStatus::InProgress),
            vec![line(0), line(1)],
            2,
        )
        .await
        .unwrap();
    let (c, d) = (jobs[0].id, jobs[1].id);
    let (e, durable) = store
        .jobs
        .queue_job("e".into(), "t".into(), request(), 3)
        .await
        .unwrap();
    durable.wait().await.unwrap();
    assert!(a < b && b < c && c < d && d < e, "{a} {b} {c} {d} {e}");
    assert!(c > b + 2, "the failed start's ids are not reused");
    drop(store);
    let store = h.open(test_sealer()).await;
    let f = new_job(&store).await;
    assert!(f > e, "ids continue after the highest stored one");
}
