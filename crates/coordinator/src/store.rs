//! The durable job store: SQLite in WAL mode, versioned migrations.
//!
//! Everything a client was promised lives here before the client hears back: the job (its
//! validated request, seed included) is inserted before any byte is returned, generated tokens
//! are appended in small batches, and the outcome is written when the job ends. After a crash
//! the coordinator reloads unfinished jobs with their tokens and resumes them from the last
//! persisted token. The SQL is plain (no SQLite-only features beyond `WITHOUT ROWID` and
//! `INSERT OR IGNORE`) so a PostgreSQL backend can implement the same [`Store`] methods.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::validation::ValidRequest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored request is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the store thread panicked")]
    Panicked,
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: jobs and their generated tokens.
    "CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        public_id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        idempotency_key TEXT,
        request TEXT NOT NULL,
        state TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        finish_reason TEXT,
        text_tail TEXT,
        prompt_tokens INTEGER,
        error TEXT,
        UNIQUE (tenant, idempotency_key)
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE TABLE job_tokens (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        idx INTEGER NOT NULL,
        token_id INTEGER NOT NULL,
        text TEXT NOT NULL,
        logprob REAL NOT NULL,
        top TEXT,
        PRIMARY KEY (job_id, idx)
    ) WITHOUT ROWID;",
];

/// One generated token as stored and served.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredToken {
    pub id: i32,
    pub text: String,
    pub logprob: f32,
    /// (token text, logprob) alternatives when the client asked for top_logprobs.
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> JobState {
        match s {
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Queued,
        }
    }
}

/// A job row with its tokens.
#[derive(Debug, Clone)]
pub struct StoredJob {
    pub id: u64,
    pub public_id: String,
    pub tenant: String,
    pub idempotency_key: Option<String>,
    pub request: ValidRequest,
    pub state: JobState,
    pub created_ms: u64,
    pub finish_reason: Option<String>,
    pub text_tail: String,
    pub prompt_tokens: u32,
    pub error: Option<String>,
    pub tokens: Vec<StoredToken>,
}

/// The outcome written when a job ends.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub state: JobState,
    pub finished_ms: u64,
    pub finish_reason: Option<String>,
    pub text_tail: String,
    pub prompt_tokens: u32,
    pub error: Option<String>,
}

/// Handle to the store; cheap to clone. Calls run on the blocking pool.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a job acknowledged to a client survives power loss, not just a process kill.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "job store migrated");
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StoreError::Panicked)?;
            f(&mut guard)
        })
        .await
        .map_err(|_| StoreError::Panicked)?
    }

    /// Inserts a new job and returns its id; with an idempotency key already used by the
    /// tenant, returns the existing job's id instead (`Err(existing)` in the inner result).
    pub async fn insert_job(
        &self,
        public_id: String,
        tenant: String,
        idempotency_key: Option<String>,
        request: &ValidRequest,
        created_ms: u64,
    ) -> Result<Result<u64, u64>, StoreError> {
        let request = serde_json::to_string(request)?;
        self.call(move |conn| {
            let tx = conn.transaction()?;
            if let Some(key) = &idempotency_key {
                let existing: Option<u64> = tx
                    .query_row(
                        "SELECT id FROM jobs WHERE tenant = ?1 AND idempotency_key = ?2",
                        params![tenant, key],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(id) = existing {
                    return Ok(Err(id));
                }
            }
            tx.execute(
                "INSERT INTO jobs (public_id, tenant, idempotency_key, request, state, created_ms)
                 VALUES (?1, ?2, ?3, ?4, 'queued', ?5)",
                params![
                    public_id,
                    tenant,
                    idempotency_key,
                    request,
                    created_ms as i64
                ],
            )?;
            let id = tx.last_insert_rowid() as u64;
            tx.commit()?;
            Ok(Ok(id))
        })
        .await
    }

    /// Appends tokens `tokens[i]` at indices `start + i` (already-stored indices are kept).
    pub async fn append_tokens(
        &self,
        job: u64,
        start: u32,
        tokens: Vec<StoredToken>,
    ) -> Result<(), StoreError> {
        self.call(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT OR IGNORE INTO job_tokens (job_id, idx, token_id, text, logprob, top)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for (i, t) in tokens.iter().enumerate() {
                    let top = if t.top.is_empty() {
                        None
                    } else {
                        Some(serde_json::to_string(&t.top)?)
                    };
                    stmt.execute(params![
                        job as i64,
                        start + i as u32,
                        t.id,
                        t.text,
                        t.logprob,
                        top
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub async fn finish_job(&self, job: u64, outcome: Outcome) -> Result<(), StoreError> {
        self.call(move |conn| {
            conn.execute(
                "UPDATE jobs SET state = ?2, finished_ms = ?3, finish_reason = ?4, text_tail = ?5,
                 prompt_tokens = ?6, error = ?7 WHERE id = ?1",
                params![
                    job as i64,
                    outcome.state.as_str(),
                    outcome.finished_ms as i64,
                    outcome.finish_reason,
                    outcome.text_tail,
                    outcome.prompt_tokens,
                    outcome.error
                ],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn load_job(&self, job: u64) -> Result<Option<StoredJob>, StoreError> {
        self.call(move |conn| load_one(conn, job)).await
    }

    /// Every job not yet ended, with its tokens (for recovery after a restart).
    pub async fn load_unfinished(&self) -> Result<Vec<StoredJob>, StoreError> {
        self.call(|conn| {
            let ids: Vec<u64> = conn
                .prepare("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut jobs = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(j) = load_one(conn, id)? {
                    jobs.push(j);
                }
            }
            Ok(jobs)
        })
        .await
    }
}

fn load_one(conn: &Connection, job: u64) -> Result<Option<StoredJob>, StoreError> {
    let row = conn
        .query_row(
            "SELECT id, public_id, tenant, idempotency_key, request, state, created_ms,
                    finish_reason, text_tail, prompt_tokens, error
             FROM jobs WHERE id = ?1",
            params![job as i64],
            |r| {
                Ok((
                    r.get::<_, u64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, u64>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, Option<u32>>(9)?,
                    r.get::<_, Option<String>>(10)?,
                ))
            },
        )
        .optional()?;
    let Some((
        id,
        public_id,
        tenant,
        key,
        request,
        state,
        created_ms,
        finish_reason,
        tail,
        prompt_tokens,
        error,
    )) = row
    else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT token_id, text, logprob, top FROM job_tokens WHERE job_id = ?1 ORDER BY idx",
    )?;
    let tokens = stmt
        .query_map(params![id as i64], |r| {
            Ok((
                r.get::<_, i32>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, f32>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(tid, text, logprob, top)| {
            Ok(StoredToken {
                id: tid,
                text,
                logprob,
                top: match top {
                    Some(t) => serde_json::from_str(&t)?,
                    None => Vec::new(),
                },
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some(StoredJob {
        id,
        public_id,
        tenant,
        idempotency_key: key,
        request: serde_json::from_str(&request)?,
        state: JobState::parse(&state),
        created_ms,
        finish_reason,
        text_tail: tail.unwrap_or_default(),
        prompt_tokens: prompt_tokens.unwrap_or(0),
        error,
        tokens,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::{Endpoint, Prompt, Sampling};
    use tokenfleet_scheduler::JobClass;

    fn request() -> ValidRequest {
        ValidRequest {
            endpoint: Endpoint::Completions,
            model: "m".into(),
            prompt: Prompt::Text("hi".into()),
            max_tokens: 8,
            sampling: Sampling {
                temperature: 0.0,
                top_p: 1.0,
                seed: 5,
            },
            stop: vec![],
            logprobs: false,
            top_logprobs: 0,
            stream: false,
            include_usage: false,
            class: JobClass::Interactive,
            residency: None,
            deadline_ms: None,
            sensitive: false,
        }
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
            let store = Store::open(&path).unwrap();
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
        let store = Store::open(&path).unwrap();
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
        let store = Store::open_in_memory().unwrap();
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
    async fn finished_jobs_are_not_reloaded() {
        let store = Store::open_in_memory().unwrap();
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
}
