//! The SQLite backend's tests: the store suite on a file database, and what only SQLite has
//! (migrating a version 1 file, the store thread's queue order around a connection call held
//! on purpose so that the writes around it share one group).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use rusqlite::{params, Connection};

use super::migrations::{Migration, MIGRATIONS};
use super::SqliteStore;
use crate::suite::{new_job, store_suite, test_sealer, token, Harness};
use crate::{JobStore, Sealer, Stores};

/// A database file in a temporary directory of its own.
struct SqliteHarness {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

#[async_trait]
impl Harness for SqliteHarness {
    async fn fresh() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        Some(Self { _dir: dir, path })
    }

    async fn open(&self, sealer: Sealer) -> Stores {
        SqliteStore::open(&self.path, sealer).unwrap().into_stores()
    }

    async fn on_disk(&self, marker: &str) -> bool {
        on_disk(&self.path, marker)
    }

    async fn rows(&self, table: &str) -> u64 {
        Connection::open(&self.path)
            .unwrap()
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }
}

store_suite!(SqliteHarness);

/// Whether `marker` occurs in the database file or its WAL.
fn on_disk(path: &Path, marker: &str) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    [path.to_path_buf(), PathBuf::from(wal)]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .any(|bytes| bytes.windows(marker.len()).any(|w| w == marker.as_bytes()))
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
        let req = r#"{"prompt":"OLD-PROMPT-MARKER","max_tokens":8}"#;
        conn.execute(
            "INSERT INTO jobs (id, public_id, tenant, request, state, created_ms, text_tail)
             VALUES (1, 'a', 't', ?1, 'queued', 1, 'OLD-TAIL-MARKER')",
            params![req],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO job_tokens (job_id, idx, token_id, text, logprob, top)
             VALUES (1, 0, 42, 'OLD-OUTPUT-MARKER', -0.5, NULL)",
            [],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path, test_sealer()).unwrap();
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

/// Issue 13, hole 14: a connection call queued between two writes runs between them. The
/// store thread is held busy so that all three land in one group; before the fix the group's
/// writes ran first and the discard then deleted the re-run's fresh token too.
#[tokio::test]
async fn a_queued_discard_runs_between_the_writes_around_it() {
    let store = SqliteStore::open_in_memory(Sealer::ephemeral()).unwrap();
    let id = new_job(&store.clone().into_stores()).await;
    let (release, held) = std::sync::mpsc::channel::<()>();
    store
        .queue_exec(move |_| {
            // Bounded: the test releases it at once below; 10 s is only a safety net.
            let _ = held.recv_timeout(std::time::Duration::from_secs(10));
            Ok(())
        })
        .await;
    store.queue_tokens(id, 0, vec![token(1)]).await;
    store.queue_discard_tokens(id).await;
    store.queue_tokens(id, 0, vec![token(2)]).await;
    release.send(()).unwrap();
    let job = store.load_job(id).await.unwrap().unwrap();
    assert_eq!(
        job.tokens,
        vec![token(2)],
        "the re-run's token, queued after the discard, survives it"
    );
}
