//! [`JobStore`] on PostgreSQL: the `jobs` and `job_outputs` tables. Every call is a step of
//! the queue ([`super::commit`]); a token batch is one multi-row insert. Requests, tails and
//! tokens are sealed at rest. Uses the crate's job records, [`crate::sealing`] and
//! tokio-postgres.

use std::collections::HashMap;

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio_postgres::Row;

use super::{Conn, PostgresStore};
use crate::sealing::{place, Sealer};
use crate::{Durable, JobRecord, JobState, JobStore, Outcome, StoreError, StoredToken};

/// An empty tail is stored as NULL; anything else sealed.
fn seal_tail(sealer: &Sealer, job: u64, tail: &str) -> Option<Vec<u8>> {
    (!tail.is_empty()).then(|| sealer.seal(&place::text_tail(job), tail.as_bytes()))
}

pub(super) struct NewRow<'a> {
    pub id: u64,
    pub public_id: &'a str,
    pub tenant: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub request: &'a [u8],
    pub created_ms: u64,
}

/// Inserts a job; with an idempotency key the tenant used already, returns that job's id
/// (`Err(existing)`) instead. Racing coordinators cannot both insert one key: the loser's
/// insert does nothing and reads the winner's id.
pub(super) async fn insert(
    conn: &Conn,
    sealer: &Sealer,
    row: NewRow<'_>,
) -> Result<Result<u64, u64>, StoreError> {
    let request = sealer.seal(&place::request(row.id), row.request);
    let Some(key) = row.idempotency_key else {
        let stmt = conn
            .prepare_cached(
                "INSERT INTO jobs (id, public_id, tenant, request, state, created_ms)
                 VALUES ($1, $2, $3, $4, 'queued', $5)",
            )
            .await?;
        conn.execute(
            &stmt,
            &[
                &(row.id as i64),
                &row.public_id,
                &row.tenant,
                &request,
                &(row.created_ms as i64),
            ],
        )
        .await?;
        return Ok(Ok(row.id));
    };
    let stmt = conn
        .prepare_cached(
            "INSERT INTO jobs (id, public_id, tenant, idempotency_key, request, state, created_ms)
             VALUES ($1, $2, $3, $4, $5, 'queued', $6)
             ON CONFLICT (tenant, idempotency_key) DO NOTHING",
        )
        .await?;
    let inserted = conn
        .execute(
            &stmt,
            &[
                &(row.id as i64),
                &row.public_id,
                &row.tenant,
                &key,
                &request,
                &(row.created_ms as i64),
            ],
        )
        .await?;
    if inserted > 0 {
        return Ok(Ok(row.id));
    }
    let stmt = conn
        .prepare_cached("SELECT id FROM jobs WHERE tenant = $1 AND idempotency_key = $2")
        .await?;
    let existing: i64 = conn.query_one(&stmt, &[&row.tenant, &key]).await?.get(0);
    Ok(Err(existing as u64))
}

/// Appends `tokens` at `start..` in one insert; indices already stored are kept.
async fn append(
    conn: &Conn,
    sealer: &Sealer,
    job: u64,
    start: u32,
    tokens: &[StoredToken],
) -> Result<(), StoreError> {
    let mut idx = Vec::with_capacity(tokens.len());
    let mut sealed = Vec::with_capacity(tokens.len());
    for (i, token) in (start..).zip(tokens) {
        idx.push(i64::from(i));
        sealed.push(sealer.seal(&place::token(job, i), &serde_json::to_vec(token)?));
    }
    let stmt = conn
        .prepare_cached(
            "INSERT INTO job_outputs (job_id, idx, sealed)
             SELECT $1, t.idx, t.sealed FROM unnest($2::bigint[], $3::bytea[]) AS t (idx, sealed)
             ON CONFLICT (job_id, idx) DO NOTHING",
        )
        .await?;
    conn.execute(&stmt, &[&(job as i64), &idx, &sealed]).await?;
    Ok(())
}

async fn finish(
    conn: &Conn,
    sealer: &Sealer,
    job: u64,
    outcome: &Outcome,
) -> Result<(), StoreError> {
    let stmt = conn
        .prepare_cached(
            "UPDATE jobs SET state = $2, finished_ms = $3, finish_reason = $4, text_tail = $5,
             prompt_tokens = $6, error = $7 WHERE id = $1",
        )
        .await?;
    conn.execute(
        &stmt,
        &[
            &(job as i64),
            &outcome.state.as_str(),
            &(outcome.finished_ms as i64),
            &outcome.finish_reason,
            &seal_tail(sealer, job, &outcome.text_tail),
            &i64::from(outcome.prompt_tokens),
            &outcome.error,
        ],
    )
    .await?;
    Ok(())
}

async fn discard_tokens(conn: &Conn, job: u64) -> Result<(), StoreError> {
    let stmt = conn
        .prepare_cached("DELETE FROM job_outputs WHERE job_id = $1")
        .await?;
    conn.execute(&stmt, &[&(job as i64)]).await?;
    Ok(())
}

/// Puts job `job` in state `from` back to `queued` (its outcome cleared); whether it was in
/// that state. The condition is checked on the locked row, so of two coordinators re-opening
/// one job only one sees it.
async fn requeue(conn: &Conn, job: u64, from: JobState) -> Result<bool, StoreError> {
    let stmt = conn
        .prepare_cached(
            "UPDATE jobs SET state = 'queued', finished_ms = NULL, finish_reason = NULL,
             text_tail = NULL, error = NULL WHERE id = $1 AND state = $2",
        )
        .await?;
    Ok(conn
        .execute(&stmt, &[&(job as i64), &from.as_str()])
        .await?
        > 0)
}

const JOB_COLUMNS: &str = "id, public_id, tenant, idempotency_key, request, state, created_ms,
    finish_reason, text_tail, prompt_tokens, error";

/// A `jobs` row (selected as [`JOB_COLUMNS`]), opened, without its tokens.
fn job_row(r: &Row, sealer: &Sealer) -> Result<JobRecord, StoreError> {
    let id = r.get::<_, i64>(0) as u64;
    let request: Vec<u8> = r.get(4);
    let tail: Option<Vec<u8>> = r.get(8);
    Ok(JobRecord {
        id,
        public_id: r.get(1),
        tenant: r.get(2),
        idempotency_key: r.get(3),
        request: sealer.open(&place::request(id), &request)?,
        state: JobState::parse(r.get(5)),
        created_ms: r.get::<_, i64>(6) as u64,
        finish_reason: r.get(7),
        text_tail: match tail {
            Some(t) => sealer.open_string(&place::text_tail(id), &t)?,
            None => String::new(),
        },
        prompt_tokens: r.get::<_, Option<i64>>(9).unwrap_or(0) as u32,
        error: r.get(10),
        tokens: Vec::new(),
    })
}

/// The jobs with these ids that exist, with their tokens, in the order of `ids`.
pub(super) async fn load_many(
    conn: &Conn,
    sealer: &Sealer,
    ids: &[u64],
) -> Result<Vec<JobRecord>, StoreError> {
    let keys: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
    let stmt = conn
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ANY($1)"
        ))
        .await?;
    let mut jobs: HashMap<u64, JobRecord> = HashMap::with_capacity(ids.len());
    for row in conn.query(&stmt, &[&keys]).await? {
        let job = job_row(&row, sealer)?;
        jobs.insert(job.id, job);
    }
    let stmt = conn
        .prepare_cached(
            "SELECT job_id, idx, sealed FROM job_outputs WHERE job_id = ANY($1)
             ORDER BY job_id, idx",
        )
        .await?;
    for row in conn.query(&stmt, &[&keys]).await? {
        let id = row.get::<_, i64>(0) as u64;
        let idx = row.get::<_, i64>(1) as u32;
        let sealed: &[u8] = row.get(2);
        if let Some(job) = jobs.get_mut(&id) {
            let plain = sealer.open(&place::token(id, idx), sealed)?;
            job.tokens.push(serde_json::from_slice(&plain)?);
        }
    }
    Ok(ids.iter().filter_map(|id| jobs.remove(id)).collect())
}

pub(super) async fn load_one(
    conn: &Conn,
    sealer: &Sealer,
    job: u64,
) -> Result<Option<JobRecord>, StoreError> {
    Ok(load_many(conn, sealer, &[job]).await?.pop())
}

impl PostgresStore {
    /// Queues a new job's insert under a fresh id; the receiver answers once the insert is
    /// committed (or failed).
    async fn queue_insert(
        &self,
        public_id: String,
        tenant: String,
        idempotency_key: Option<String>,
        request: Vec<u8>,
        created_ms: u64,
    ) -> Result<(u64, oneshot::Receiver<Result<Result<u64, u64>, StoreError>>), StoreError> {
        let id = self.ids.next().await?;
        let (reply, committed) = oneshot::channel();
        self.enqueue(
            move |conn, sealer| {
                Box::pin(async move {
                    let row = NewRow {
                        id,
                        public_id: &public_id,
                        tenant: &tenant,
                        idempotency_key: idempotency_key.as_deref(),
                        request: &request,
                        created_ms,
                    };
                    insert(conn, sealer, row).await
                })
            },
            Some(reply),
        )
        .await?;
        Ok((id, committed))
    }
}

#[async_trait]
impl JobStore for PostgresStore {
    async fn insert_job(
        &self,
        public_id: String,
        tenant: String,
        idempotency_key: Option<String>,
        request: Vec<u8>,
        created_ms: u64,
    ) -> Result<Result<u64, u64>, StoreError> {
        let (_, committed) = self
            .queue_insert(public_id, tenant, idempotency_key, request, created_ms)
            .await?;
        committed.await.map_err(|_| StoreError::Closed)?
    }

    async fn queue_job(
        &self,
        public_id: String,
        tenant: String,
        request: Vec<u8>,
        created_ms: u64,
    ) -> Result<(u64, Durable), StoreError> {
        let (id, committed) = self
            .queue_insert(public_id, tenant, None, request, created_ms)
            .await?;
        let durable = async move { committed.await.map_err(|_| StoreError::Closed)?.map(|_| ()) };
        Ok((id, Durable::new(durable)))
    }

    async fn append_tokens(
        &self,
        job: u64,
        start: u32,
        tokens: Vec<StoredToken>,
    ) -> Result<(), StoreError> {
        self.call(move |conn, sealer| {
            Box::pin(async move { append(conn, sealer, job, start, &tokens).await })
        })
        .await
    }

    async fn finish_job(&self, job: u64, outcome: Outcome) -> Result<(), StoreError> {
        self.call(move |conn, sealer| {
            Box::pin(async move { finish(conn, sealer, job, &outcome).await })
        })
        .await
    }

    async fn queue_tokens(&self, job: u64, start: u32, tokens: Vec<StoredToken>) {
        self.queue("tokens", move |conn, sealer| {
            Box::pin(async move { append(conn, sealer, job, start, &tokens).await })
        })
        .await
    }

    async fn queue_finish(&self, job: u64, outcome: Outcome) {
        self.queue("outcome", move |conn, sealer| {
            Box::pin(async move { finish(conn, sealer, job, &outcome).await })
        })
        .await
    }

    async fn queue_discard_tokens(&self, job: u64) {
        self.queue("token discard", move |conn, _| {
            Box::pin(discard_tokens(conn, job))
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.call(|_, _| Box::pin(async { Ok(()) })).await
    }

    async fn reopen_cancelled(&self, job: u64) -> Result<Option<JobRecord>, StoreError> {
        self.call(move |conn, sealer| {
            Box::pin(async move {
                if !requeue(conn, job, JobState::Cancelled).await? {
                    return Ok(None);
                }
                load_one(conn, sealer, job).await
            })
        })
        .await
    }

    async fn reopen_for_rerun(&self, job: u64) -> Result<Option<JobRecord>, StoreError> {
        // One step, so one savepoint: re-queued and emptied together, or neither.
        self.call(move |conn, sealer| {
            Box::pin(async move {
                if !requeue(conn, job, JobState::Done).await? {
                    return Ok(None);
                }
                discard_tokens(conn, job).await?;
                load_one(conn, sealer, job).await
            })
        })
        .await
    }

    async fn load_job(&self, job: u64) -> Result<Option<JobRecord>, StoreError> {
        self.call(move |conn, sealer| Box::pin(load_one(conn, sealer, job)))
            .await
    }

    async fn load_unfinished(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.call(|conn, sealer| {
            Box::pin(async move {
                let ids: Vec<u64> = conn
                    .query(
                        "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id",
                        &[],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get::<_, i64>(0) as u64)
                    .collect();
                load_many(conn, sealer, &ids).await
            })
        })
        .await
    }

    async fn purge_finished_before(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        // Ended jobs, except those of a batch still running (its output is not written yet).
        const PURGEABLE: &str = "SELECT id FROM jobs WHERE state != 'queued' AND finished_ms < $1
             AND id NOT IN (SELECT r.job_id FROM batch_requests r JOIN batches b ON b.id = r.batch_id
                            WHERE r.job_id IS NOT NULL
                              AND b.status NOT IN ('completed', 'failed', 'expired', 'cancelled'))";
        // One step: every delete, or none.
        self.call(move |conn, _| {
            Box::pin(async move {
                let cutoff = cutoff_ms as i64;
                conn.execute(
                    &format!("DELETE FROM job_outputs WHERE job_id IN ({PURGEABLE})"),
                    &[&cutoff],
                )
                .await?;
                conn.execute(
                    &format!("DELETE FROM batch_requests WHERE job_id IN ({PURGEABLE})"),
                    &[&cutoff],
                )
                .await?;
                // Producer records go with their jobs (ON DELETE CASCADE).
                let n = conn
                    .execute(
                        &format!("DELETE FROM jobs WHERE id IN ({PURGEABLE})"),
                        &[&cutoff],
                    )
                    .await?;
                // Batch files (inputs hold prompts, outputs answers) age out the same way;
                // `retention` is longer than any completion window (checked in the config).
                conn.execute(
                    "DELETE FROM files WHERE created_s < $1",
                    &[&(cutoff / 1000)],
                )
                .await?;
                Ok(n as usize)
            })
        })
        .await
    }
}
