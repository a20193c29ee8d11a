//! The stores' behaviour, as tests any backend runs through the traits: sealing at rest,
//! retention, reopening, idempotency keys, grouped commits, re-opening jobs.
//!
//! A backend's tests implement [`Harness`] (one fresh database per test) and expand
//! [`store_suite!`] once, which makes one `#[tokio::test]` per function here. Uses only the
//! crate's public API.

use async_trait::async_trait;

use crate::SealError;
use crate::{JobState, Outcome, Sealer, StoreError, StoredToken, Stores};

/// A fresh database of one backend, for one test.
#[async_trait]
pub(crate) trait Harness: Send + Sync {
    /// The stores of this harness's database, opened (again) with `sealer`.
    async fn open(&self, sealer: Sealer) -> Stores;
    /// Whether `marker` occurs anywhere the backend has put this database's data (its files).
    fn on_disk(&self, marker: &str) -> bool;
    /// Rows in `table`, counted beside the stores.
    fn rows(&self, table: &str) -> u64;
}

/// One `#[tokio::test]` per suite function, each on a fresh `$harness`.
macro_rules! store_suite {
    ($harness:expr) => {
        $crate::suite::store_suite!(@tests $harness;
            prompts_and_outputs_are_sealed_on_disk,
            purge_removes_only_jobs_finished_before_the_cutoff,
            jobs_survive_reopening_with_their_tokens,
            an_idempotency_key_maps_to_the_first_job,
            a_failing_write_does_not_undo_its_group,
            only_a_cancelled_job_is_reopened,
            finished_jobs_are_not_reloaded,
            purge_deletes_a_job_whose_producers_were_recorded,
        );
    };
    (@tests $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                $crate::suite::$name(&$harness).await;
            }
        )*
    };
}
pub(crate) use store_suite;

pub(crate) fn request() -> Vec<u8> {
    br#"{"prompt":"hi","max_tokens":8,"seed":1}"#.to_vec()
}

/// The same key every time, so a test can reopen its store.
pub(crate) fn test_sealer() -> Sealer {
    Sealer::from_spec("test:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap()
}

pub(crate) fn token(id: i32) -> StoredToken {
    StoredToken {
        id,
        text: format!("t{id}"),
        logprob: -0.1,
        top: vec![],
    }
}

/// A job without idempotency key, durable.
pub(crate) async fn new_job(store: &Stores) -> u64 {
    store
        .jobs
        .insert_job("a".into(), "t".into(), None, request(), 1)
        .await
        .unwrap()
        .unwrap()
}

/// A `done` outcome at `finished_ms`.
fn done_at(finished_ms: u64) -> Outcome {
    Outcome {
        state: JobState::Done,
        finished_ms,
        finish_reason: Some("stop".into()),
        text_tail: String::new(),
        prompt_tokens: 1,
        error: None,
    }
}

pub(crate) async fn prompts_and_outputs_are_sealed_on_disk(h: &dyn Harness) {
    let req = br#"{"prompt":"PROMPT-MARKER-7f3a","max_tokens":8}"#.to_vec();
    let store = h.open(test_sealer()).await;
    let id = store
        .jobs
        .insert_job("a".into(), "t".into(), None, req.clone(), 1)
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
    let job = store.jobs.load_job(id).await.unwrap().unwrap();
    assert_eq!(job.request, req);
    assert_eq!(job.tokens, vec![tok]);
    assert_eq!(job.text_tail, "TAIL-MARKER-05aa");
    drop(store);
    for marker in [
        "PROMPT-MARKER",
        "OUTPUT-MARKER",
        "TOP-MARKER",
        "TAIL-MARKER",
    ] {
        assert!(!h.on_disk(marker), "{marker} is on disk in plaintext");
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
    let producers = h.rows("job_producers");
    assert_eq!(producers, 0, "the producer rows went with the job");
}
