//! Store tests: sealing on disk, migrations, retention, reopening, grouped commits.

use super::*;
use crate::validation::Prompt;

fn request() -> ValidRequest {
    ValidRequest::sample("hi", 8)
}

/// The same key every time, so a test can reopen its store.
fn test_sealer() -> Sealer {
    Sealer::from_spec("test:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap()
}

/// Whether `marker` occurs in the database file or its WAL.
fn on_disk(path: &Path, marker: &str) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    [path.to_path_buf(), std::path::PathBuf::from(wal)]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .any(|bytes| bytes.windows(marker.len()).any(|w| w == marker.as_bytes()))
}

#[tokio::test]
async fn prompts_and_outputs_are_sealed_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let mut req = request();
    req.prompt = Prompt::Text("PROMPT-MARKER-7f3a".into());
    let store = Store::open(&path, test_sealer()).unwrap();
    let id = store
        .insert_job("a".into(), "t".into(), None, &req, 1)
        .await
        .unwrap()
        .unwrap();
    let mut tok = token(9);
    tok.text = "OUTPUT-MARKER-c41d".into();
    tok.top = vec![("TOP-MARKER-9e2b".into(), -1.0)];
    store.append_tokens(id, 0, vec![tok.clone()]).await.unwrap();
    let outcome = Outcome {
        state: JobState::Done,
        finished_ms: 5,
        finish_reason: Some("stop".into()),
        text_tail: "TAIL-MARKER-05aa".into(),
        prompt_tokens: 3,
        error: None,
    };
    store.finish_job(id, outcome).await.unwrap();
    let job = store.load_job(id).await.unwrap().unwrap();
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
        assert!(!on_disk(&path, marker), "{marker} is on disk in plaintext");
    }
    // Another key cannot read the store back.
    let other = Store::open(&path, Sealer::ephemeral()).unwrap();
    assert!(matches!(
        other.load_job(id).await,
        Err(StoreError::Seal(SealError::UnknownKey(_)))
    ));
}

#[tokio::test]
async fn a_version_1_store_is_sealed_by_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    {
        // What version 1 wrote: plaintext request, tail and tokens.
        let conn = Connection::open(&path).unwrap();
        let Migration::Sql(v1) = &MIGRATIONS[0] else {
            panic!("migration 1 is SQL")
        };
        conn.execute_batch(v1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        let mut req = request();
        req.prompt = Prompt::Text("OLD-PROMPT-MARKER".into());
        conn.execute(
            "INSERT INTO jobs (id, public_id, tenant, request, state, created_ms, text_tail)
             VALUES (1, 'a', 't', ?1, 'queued', 1, 'OLD-TAIL-MARKER')",
            params![serde_json::to_string(&req).unwrap()],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO job_tokens (job_id, idx, token_id, text, logprob, top)
             VALUES (1, 0, 42, 'OLD-OUTPUT-MARKER', -0.5, NULL)",
            [],
        )
        .unwrap();
    }
    let store = Store::open(&path, test_sealer()).unwrap();
    let jobs = store.load_unfinished().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].tokens[0].id, 42);
    assert_eq!(jobs[0].tokens[0].text, "OLD-OUTPUT-MARKER");
    assert_eq!(jobs[0].text_tail, "OLD-TAIL-MARKER");
    drop(store);
    // Checkpoint the WAL into the main file, then look for leftovers anywhere.
    let conn = Connection::open(&path).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(conn);
    for marker in ["OLD-PROMPT-MARKER", "OLD-TAIL-MARKER", "OLD-OUTPUT-MARKER"] {
        assert!(!on_disk(&path, marker), "{marker} survived the migration");
    }
}

#[tokio::test]
async fn purge_removes_only_jobs_finished_before_the_cutoff() {
    let store = Store::open_in_memory(Sealer::ephemeral()).unwrap();
    let mut ids = Vec::new();
    for (n, finished) in [(1, Some(100)), (2, Some(300)), (3, None)] {
        let id = store
            .insert_job(format!("j{n}"), "t".into(), None, &request(), 1)
            .await
            .unwrap()
            .unwrap();
        store.append_tokens(id, 0, vec![token(n)]).await.unwrap();
        if let Some(finished_ms) = finished {
            let outcome = Outcome {
                state: JobState::Done,
                finished_ms,
                finish_reason: Some("stop".into()),
                text_tail: String::new(),
                prompt_tokens: 1,
                error: None,
            };
            store.finish_job(id, outcome).await.unwrap();
        }
        ids.push(id);
    }
    assert_eq!(store.purge_finished_before(200).await.unwrap(), 1);
    assert!(store.load_job(ids[0]).await.unwrap().is_none());
    assert!(store.load_job(ids[1]).await.unwrap().is_some());
    assert_eq!(store.load_unfinished().await.unwrap().len(), 1);
    assert_eq!(store.purge_finished_before(u64::MAX / 2).await.unwrap(), 1);
    assert_eq!(
        store.load_unfinished().await.unwrap().len(),
        1,
        "unfinished jobs stay"
    );
}

fn token(id: i32) -> StoredToken {
    StoredToken {
        id,
        text: format!("t{id}"),
        logprob: -0.1,
        top: vec![],
    }
}

#[tokio::test]
async fn jobs_survive_reopening_with_their_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    {
        let store = Store::open(&path, test_sealer()).unwrap();
        let id = store
            .insert_job("cmpl-1".into(), "t".into(), Some("k".into()), &request(), 1)
            .await
            .unwrap()
            .unwrap();
        store
            .append_tokens(id, 0, vec![token(1), token(2)])
            .await
            .unwrap();
        // Re-sending an overlapping batch does not duplicate.
        store
            .append_tokens(id, 1, vec![token(2), token(3)])
            .await
            .unwrap();
    }
    let store = Store::open(&path, test_sealer()).unwrap();
    let jobs = store.load_unfinished().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(jobs[0].request, request());
}

#[tokio::test]
async fn an_idempotency_key_maps_to_the_first_job() {
    let store = Store::open_in_memory(Sealer::ephemeral()).unwrap();
    let a = store
        .insert_job("a".into(), "t".into(), Some("k".into()), &request(), 1)
        .await
        .unwrap();
    let b = store
        .insert_job("b".into(), "t".into(), Some("k".into()), &request(), 2)
        .await
        .unwrap();
    let c = store
        .insert_job("c".into(), "other".into(), Some("k".into()), &request(), 3)
        .await
        .unwrap();
    assert_eq!(b, Err(a.unwrap()));
    assert!(c.is_ok(), "keys are per tenant");
}

#[tokio::test]
async fn a_failing_write_does_not_undo_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    let store = Store::open(&path, test_sealer()).unwrap();
    // Queued back to back, so they share a transaction; the second repeats a unique
    // public id and must fail alone.
    let (a, da) = store
        .queue_job("same".into(), "t".into(), &request(), 1)
        .await
        .unwrap();
    let (b, db) = store
        .queue_job("same".into(), "t".into(), &request(), 2)
        .await
        .unwrap();
    let (c, dc) = store
        .queue_job("other".into(), "t".into(), &request(), 3)
        .await
        .unwrap();
    assert!(da.wait().await.is_ok());
    assert!(db.wait().await.is_err());
    assert!(dc.wait().await.is_ok());
    drop(store);
    let store = Store::open(&path, test_sealer()).unwrap();
    let ids: Vec<u64> = store
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
        .queue_job("next".into(), "t".into(), &request(), 4)
        .await
        .unwrap();
    dd.wait().await.unwrap();
    assert!(d > c);
}

#[tokio::test]
async fn only_a_cancelled_job_is_reopened() {
    let store = Store::open_in_memory(Sealer::ephemeral()).unwrap();
    let id = store
        .insert_job("a".into(), "t".into(), Some("k".into()), &request(), 1)
        .await
        .unwrap()
        .unwrap();
    store.append_tokens(id, 0, vec![token(7)]).await.unwrap();
    assert!(store.reopen_cancelled(id).await.unwrap().is_none());
    let cancelled = Outcome {
        state: JobState::Cancelled,
        finished_ms: 2,
        finish_reason: None,
        text_tail: String::new(),
        prompt_tokens: 0,
        error: None,
    };
    store.finish_job(id, cancelled).await.unwrap();
    let job = store.reopen_cancelled(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.tokens, vec![token(7)]);
    assert!(store.reopen_cancelled(id).await.unwrap().is_none());
    assert_eq!(store.load_unfinished().await.unwrap().len(), 1);
}

#[tokio::test]
async fn finished_jobs_are_not_reloaded() {
    let store = Store::open_in_memory(Sealer::ephemeral()).unwrap();
    let id = store
        .insert_job("a".into(), "t".into(), None, &request(), 1)
        .await
        .unwrap()
        .unwrap();
    store
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
    assert!(store.load_unfinished().await.unwrap().is_empty());
    let job = store.load_job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.prompt_tokens, 3);
}

/// A job without idempotency key, durable.
async fn new_job(store: &Store) -> u64 {
    store
        .insert_job("a".into(), "t".into(), None, &request(), 1)
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

/// Issue 13, hole 14: a connection call queued between two writes runs between them. The
/// store thread is held busy so that all three land in one group; before the fix the group's
/// writes ran first and the discard then deleted the re-run's fresh token too.
#[tokio::test]
async fn a_queued_discard_runs_between_the_writes_around_it() {
    let store = Store::open_in_memory(Sealer::ephemeral()).unwrap();
    let id = new_job(&store).await;
    let (release, held) = std::sync::mpsc::channel::<()>();
    store
        .queue_exec(move |_| {
            // Bounded: the test releases it at once below; 10 s is only a safety net.
            let _ = held.recv_timeout(std::time::Duration::from_secs(10));
            Ok(())
        })
        .await;
    store.queue_tokens(id, 0, vec![token(1)]).await;
    crate::reputation::queue_discard_tokens(&store, id).await;
    store.queue_tokens(id, 0, vec![token(2)]).await;
    release.send(()).unwrap();
    let job = store.load_job(id).await.unwrap().unwrap();
    assert_eq!(
        job.tokens,
        vec![token(2)],
        "the re-run's token, queued after the discard, survives it"
    );
}

/// Issue 13, hole 10: once verification recorded who produced a job, the purge still deletes
/// it (and its producer rows) instead of failing on the foreign key.
#[tokio::test]
async fn purge_deletes_a_job_whose_producers_were_recorded() {
    let store = Store::open_in_memory(Sealer::ephemeral()).unwrap();
    let id = new_job(&store).await;
    store.append_tokens(id, 0, vec![token(1)]).await.unwrap();
    store.finish_job(id, done_at(100)).await.unwrap();
    let reputation = crate::reputation::Reputation::load(store.clone())
        .await
        .unwrap();
    reputation
        .record_producers(id, vec!["vehicle-1".into(), "vehicle-2".into()], 100)
        .await;
    assert_eq!(store.purge_finished_before(200).await.unwrap(), 1);
    assert!(store.load_job(id).await.unwrap().is_none());
    let producers: u64 = store
        .with_conn(|conn, _| {
            Ok(conn.query_row("SELECT COUNT(*) FROM job_producers", [], |r| r.get(0))?)
        })
        .await
        .unwrap();
    assert_eq!(producers, 0, "the producer rows went with the job");
}
