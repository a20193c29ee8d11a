//! The durable job store: SQLite in WAL mode, versioned migrations.
//!
//! Everything a client was promised lives here before the client hears back: the job (its
//! validated request, seed included) is committed before any byte is returned (it may already
//! be running on a vehicle while that commit syncs), generated tokens are appended in small
//! batches, and the outcome is written when the job ends. One thread owns the connection and
//! commits in groups (see [`Store`]). After a crash
//! the coordinator reloads unfinished jobs with their tokens and resumes them from the last
//! persisted token. The SQL is plain (no SQLite-only features beyond `WITHOUT ROWID` and
//! `INSERT OR IGNORE`) so a PostgreSQL backend can implement the same [`Store`] methods.
//!
//! Prompts (the stored request), output tokens and output text are sealed with the
//! [`Sealer`] before they are written (see [`crate::sealing`]): the file holds no plaintext
//! prompt or output. `secure_delete` zeroes what is deleted, and finished jobs are purged
//! after the retention period ([`Store::purge_finished_before`]).
//! Files and batches (the Batch API) live in the same database; their queries are in
//! [`crate::batch_store`].

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::sealing::{SealError, Sealer};
use crate::validation::ValidRequest;

mod commit;
mod migrations;

pub use commit::MAX_BATCH;
use commit::{serve, Op, Reply, QUEUE};
use migrations::{Migration, MIGRATIONS};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored request is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the job store has stopped")]
    Closed,
    #[error("the job store could not start its thread: {0}")]
    Thread(std::io::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("sealed data: {0}")]
    Seal(#[from] SealError),
}

fn request_aad(job: u64) -> Vec<u8> {
    format!("jobs.request:{job}").into_bytes()
}

fn tail_aad(job: u64) -> Vec<u8> {
    format!("jobs.text_tail:{job}").into_bytes()
}

fn token_aad(job: u64, idx: u32) -> Vec<u8> {
    format!("job_outputs:{job}:{idx}").into_bytes()
}

/// An empty tail is stored as NULL; anything else sealed.
fn seal_tail(sealer: &Sealer, job: u64, tail: &str) -> Option<Vec<u8>> {
    (!tail.is_empty()).then(|| sealer.seal(&tail_aad(job), tail.as_bytes()))
}

fn insert_token(
    conn: &Connection,
    sealer: &Sealer,
    job: u64,
    idx: u32,
    token: &StoredToken,
) -> Result<(), StoreError> {
    let plain = serde_json::to_vec(token)?;
    conn.prepare_cached(
        "INSERT OR IGNORE INTO job_outputs (job_id, idx, sealed) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![
        job as i64,
        idx,
        sealer.seal(&token_aad(job, idx), &plain)
    ])?;
    Ok(())
}

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

/// Handle to the store; cheap to clone.
///
/// One thread owns the SQLite connection and commits in groups: it takes every operation
/// waiting in its queue (up to [`MAX_BATCH`]), applies them in queue order inside one
/// transaction (each in its own savepoint, so one failing operation does not undo the others),
/// commits once (one WAL sync with `synchronous=FULL`), and only then answers. Concurrent
/// requests thus share a sync instead of queueing for one each, and nothing is acknowledged
/// before it is durable. A read or connection call ([`Store::with_conn`], [`Store::queue_exec`])
/// runs in its place in the queue: the writes queued before it are committed first, those
/// queued after it wait for it.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    /// Seals and opens prompts and outputs (shared with the store thread).
    sealer: Arc<Sealer>,
    /// Job ids are handed out here, not by SQLite, so a job can be queued (and dispatched)
    /// before the commit that makes it durable; an id is never reused within a run, even when
    /// its insert fails.
    next_id: Arc<AtomicU64>,
}

/// Resolves when a job queued with [`Store::queue_job`] is durable (or could not be stored).
pub struct Durable(oneshot::Receiver<Result<Result<u64, u64>, StoreError>>);

impl Durable {
    pub async fn wait(self) -> Result<(), StoreError> {
        self.0.await.map_err(|_| StoreError::Closed)?.map(|_| ())
    }
}

impl Store {
    pub fn open(path: &Path, sealer: Sealer) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn, sealer)
    }

    pub fn open_in_memory(sealer: Sealer) -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?, sealer)
    }

    fn init(mut conn: Connection, sealer: Sealer) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Deleted rows (purged jobs, rows rewritten by migrations) are overwritten, not left
        // in free pages.
        conn.pragma_update(None, "secure_delete", "ON")?;
        // FULL: a job acknowledged to a client survives power loss, not just a process kill.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            match migration {
                Migration::Sql(sql) => tx.execute_batch(sql)?,
                Migration::Sealed(step) => step(&tx, &sealer)?,
            }
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "job store migrated");
        }
        let last: u64 =
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM jobs", [], |r| r.get(0))?;
        let next_id = Arc::new(AtomicU64::new(last + 1));
        let (tx, rx) = mpsc::channel(QUEUE);
        let sealer = Arc::new(sealer);
        let thread_sealer = Arc::clone(&sealer);
        std::thread::Builder::new()
            .name("job-store".into())
            .spawn(move || serve(conn, rx, &thread_sealer))
            .map_err(StoreError::Thread)?;
        Ok(Self {
            tx,
            sealer,
            next_id,
        })
    }

    async fn request<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` with the connection on the store thread, after every operation queued before it
    /// is committed: reads, and writes that commit on their own outside the group commit.
    pub(crate) async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Sealer) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let sealer = Arc::clone(&self.sealer);
        self.request(|reply| {
            Op::WithConn(Box::new(move |conn| {
                let _ = reply.send(f(conn, &sealer));
            }))
        })
        .await
    }

    /// Deletes jobs that ended before `cutoff_ms` (epoch ms) with their outputs; returns how
    /// many. Unfinished jobs are never purged.
    pub async fn purge_finished_before(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        // Ended jobs, except those of a batch still running (its output is not written yet).
        const PURGEABLE: &str = "SELECT id FROM jobs WHERE state != 'queued' AND finished_ms < ?1
             AND id NOT IN (SELECT r.job_id FROM batch_requests r JOIN batches b ON b.id = r.batch_id
                            WHERE r.job_id IS NOT NULL
                              AND b.status NOT IN ('completed', 'failed', 'expired', 'cancelled'))";
        self.with_conn(move |conn, _| {
            let tx = conn.transaction()?;
            let cutoff = cutoff_ms as i64;
            tx.execute(
                &format!("DELETE FROM job_outputs WHERE job_id IN ({PURGEABLE})"),
                params![cutoff],
            )?;
            tx.execute(
                &format!("DELETE FROM batch_requests WHERE job_id IN ({PURGEABLE})"),
                params![cutoff],
            )?;
            let n = tx.execute(
                &format!("DELETE FROM jobs WHERE id IN ({PURGEABLE})"),
                params![cutoff],
            )?;
            // Batch files (inputs hold prompts, outputs answers) age out the same way;
            // `retention` is longer than any completion window (checked in the config).
            tx.execute(
                "DELETE FROM files WHERE created_s < ?1",
                params![cutoff / 1000],
            )?;
            tx.commit()?;
            Ok(n)
        })
        .await
    }

    /// Reserves `n` consecutive job ids and returns the first.
    pub(crate) fn reserve_job_ids(&self, n: u64) -> u64 {
        self.next_id.fetch_add(n, Ordering::Relaxed)
    }

    /// Inserts a new job and returns its id once it is durable; with an idempotency key
    /// already used by the tenant, returns the existing job's id instead (`Err(existing)` in
    /// the inner result).
    pub async fn insert_job(
        &self,
        public_id: String,
        tenant: String,
        idempotency_key: Option<String>,
        request: &ValidRequest,
        created_ms: u64,
    ) -> Result<Result<u64, u64>, StoreError> {
        let request = serde_json::to_string(request)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.request(|reply| Op::Insert {
            id,
            public_id,
            tenant,
            idempotency_key,
            request,
            created_ms,
            reply,
        })
        .await
    }

    /// Queues the insert of a new job (without idempotency key) and returns its id as soon as
    /// the insert is in the store's queue, with a [`Durable`] to await its commit. Writes
    /// queued later (the job's tokens and outcome) land after it. Lets the caller dispatch the
    /// job while the commit runs; the caller must not answer its client before
    /// [`Durable::wait`] returns Ok.
    pub async fn queue_job(
        &self,
        public_id: String,
        tenant: String,
        request: &ValidRequest,
        created_ms: u64,
    ) -> Result<(u64, Durable), StoreError> {
        let request = serde_json::to_string(request)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let op = Op::Insert {
            id,
            public_id,
            tenant,
            idempotency_key: None,
            request,
            created_ms,
            reply,
        };
        self.tx.send(op).await.map_err(|_| StoreError::Closed)?;
        Ok((id, Durable(rx)))
    }

    /// Appends tokens `tokens[i]` at indices `start + i` (already-stored indices are kept);
    /// returns once they are durable.
    pub async fn append_tokens(
        &self,
        job: u64,
        start: u32,
        tokens: Vec<StoredToken>,
    ) -> Result<(), StoreError> {
        self.request(|reply| Op::Tokens {
            job,
            start,
            tokens,
            reply: Some(reply),
        })
        .await
    }

    /// Writes a job's outcome; returns once it is durable.
    pub async fn finish_job(&self, job: u64, outcome: Outcome) -> Result<(), StoreError> {
        self.request(|reply| Op::Finish {
            job,
            outcome,
            reply: Some(reply),
        })
        .await
    }

    /// Queues a token append without waiting for it (it lands after every write queued before
    /// it; a failure is logged). Waits only while the store's queue is full.
    pub async fn queue_tokens(&self, job: u64, start: u32, tokens: Vec<StoredToken>) {
        let op = Op::Tokens {
            job,
            start,
            tokens,
            reply: None,
        };
        if self.tx.send(op).await.is_err() {
            tracing::error!("job store stopped; tokens not written");
        }
    }

    /// Queues an outcome without waiting for it (see [`Store::queue_tokens`]).
    pub async fn queue_finish(&self, job: u64, outcome: Outcome) {
        let op = Op::Finish {
            job,
            outcome,
            reply: None,
        };
        if self.tx.send(op).await.is_err() {
            tracing::error!("job store stopped; outcome not written");
        }
    }

    /// Queues `f` to run on the store thread after every operation queued before it (and
    /// before every one queued after it), without waiting for it; a failure is logged.
    pub(crate) async fn queue_exec(
        &self,
        f: impl FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static,
    ) {
        let op = Op::WithConn(Box::new(move |conn| {
            if let Err(e) = f(conn) {
                tracing::error!(cause = %e, "job store write failed");
            }
        }));
        if self.tx.send(op).await.is_err() {
            tracing::error!("job store stopped; write not applied");
        }
    }

    /// Returns once every operation queued before it is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.with_conn(|_, _| Ok(())).await
    }

    /// Puts a job that was cancelled (its client went away) back in the `queued` state and
    /// returns it with its tokens; None when it is not a cancelled job. Durable on return.
    pub async fn reopen_cancelled(&self, job: u64) -> Result<Option<StoredJob>, StoreError> {
        self.with_conn(move |conn, sealer| {
            let changed = conn.execute(
                "UPDATE jobs SET state = 'queued', finished_ms = NULL, finish_reason = NULL,
                 text_tail = NULL, error = NULL WHERE id = ?1 AND state = 'cancelled'",
                params![job as i64],
            )?;
            if changed == 0 {
                return Ok(None);
            }
            load_one(conn, sealer, job)
        })
        .await
    }

    pub async fn load_job(&self, job: u64) -> Result<Option<StoredJob>, StoreError> {
        self.with_conn(move |conn, sealer| load_one(conn, sealer, job))
            .await
    }

    /// Every job not yet ended, with its tokens (for recovery after a restart).
    pub async fn load_unfinished(&self) -> Result<Vec<StoredJob>, StoreError> {
        self.with_conn(|conn, sealer| {
            let ids: Vec<u64> = conn
                .prepare("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut jobs = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(j) = load_one(conn, sealer, id)? {
                    jobs.push(j);
                }
            }
            Ok(jobs)
        })
        .await
    }
}

pub(crate) struct NewRow<'a> {
    pub id: u64,
    pub public_id: &'a str,
    pub tenant: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub request: &'a str,
    pub created_ms: u64,
}

pub(crate) fn insert(
    conn: &Connection,
    sealer: &Sealer,
    row: NewRow<'_>,
) -> Result<Result<u64, u64>, StoreError> {
    if let Some(key) = row.idempotency_key {
        let existing: Option<u64> = conn
            .prepare_cached("SELECT id FROM jobs WHERE tenant = ?1 AND idempotency_key = ?2")?
            .query_row(params![row.tenant, key], |r| r.get(0))
            .optional()?;
        if let Some(id) = existing {
            return Ok(Err(id));
        }
    }
    conn.prepare_cached(
        "INSERT INTO jobs (id, public_id, tenant, idempotency_key, request, state, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6)",
    )?
    .execute(params![
        row.id as i64,
        row.public_id,
        row.tenant,
        row.idempotency_key,
        sealer.seal(&request_aad(row.id), row.request.as_bytes()),
        row.created_ms as i64
    ])?;
    Ok(Ok(row.id))
}

fn append(
    conn: &Connection,
    sealer: &Sealer,
    job: u64,
    start: u32,
    tokens: &[StoredToken],
) -> Result<(), StoreError> {
    for (i, t) in tokens.iter().enumerate() {
        insert_token(conn, sealer, job, start + i as u32, t)?;
    }
    Ok(())
}

fn finish(
    conn: &Connection,
    sealer: &Sealer,
    job: u64,
    outcome: &Outcome,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE jobs SET state = ?2, finished_ms = ?3, finish_reason = ?4, text_tail = ?5,
         prompt_tokens = ?6, error = ?7 WHERE id = ?1",
    )?
    .execute(params![
        job as i64,
        outcome.state.as_str(),
        outcome.finished_ms as i64,
        outcome.finish_reason,
        seal_tail(sealer, job, &outcome.text_tail),
        outcome.prompt_tokens,
        outcome.error
    ])?;
    Ok(())
}

/// A job with its tokens, read on the store thread's connection.
pub(crate) fn load_one(
    conn: &Connection,
    sealer: &Sealer,
    job: u64,
) -> Result<Option<StoredJob>, StoreError> {
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
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, u64>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<Vec<u8>>>(8)?,
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
    let mut stmt =
        conn.prepare_cached("SELECT idx, sealed FROM job_outputs WHERE job_id = ?1 ORDER BY idx")?;
    let tokens = stmt
        .query_map(params![id as i64], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(idx, sealed)| {
            let plain = sealer.open(&token_aad(id, idx), &sealed)?;
            Ok(serde_json::from_slice::<StoredToken>(&plain)?)
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let request = sealer.open(&request_aad(id), &request)?;
    let tail = tail
        .map(|t| sealer.open_string(&tail_aad(id), &t))
        .transpose()?;
    Ok(Some(StoredJob {
        id,
        public_id,
        tenant,
        idempotency_key: key,
        request: serde_json::from_slice(&request)?,
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
mod tests;
