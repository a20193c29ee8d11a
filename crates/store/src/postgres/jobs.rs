//! [`JobStore`] on PostgreSQL: the `jobs` and `job_outputs` tables. Every call is a step of
//! the queue ([`super::commit`]); a token batch is one multi-row insert. Requests, tails and
//! tokens are sealed at rest. Uses the crate's job records, [`crate::sealing`] and
//! tokio-postgres.

use std::collections::HashMap;

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio_postgres::Row;

use super::owner::{Owner, NOW_MS};
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

/// Inserts a job (its store's coordinator's from the start, at epoch 1, when the store has an
/// owner); with an idempotency key the tenant used already, returns that job's id
/// (`Err(existing)`) instead. Racing coordinators cannot both insert one key: the loser's
/// insert does nothing and reads the winner's id.
pub(super) async fn insert(
    conn: &Conn,
    sealer: &Sealer,
    owner: Option<&Owner>,
    row: NewRow<'_>,
) -> Result<Result<u64, u64>, StoreError> {
    let request = sealer.seal(&place::request(row.id), row.request);
    let (owner_id, lease_ms) = Owner::columns(owner);
    let stmt = conn
        .prepare_cached(&format!(
            "INSERT INTO jobs (id, public_id, tenant, idempotency_key, request, state, created_ms,
                               owner, epoch, lease_until_ms)
             VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, 1,
                     CASE WHEN $7::text IS NULL THEN NULL ELSE {NOW_MS} + $8 END)
             ON CONFLICT (tenant, idempotency_key) DO NOTHING"
        ))
        .await?;
    let inserted = conn
        .execute(
            &stmt,
            &[
                &(row.id as i64),
                &row.public_id,
                &row.tenant,
                &row.idempotency_key,
                &request,
                &(row.created_ms as i64),
                &owner_id,
                &lease_ms,
            ],
        )
        .await?;
    if inserted > 0 {
        if let Some(o) = owner {
            o.claimed(row.id, 1);
        }
        return Ok(Ok(row.id));
    }
    let Some(key) = row.idempotency_key else {
        return Err(StoreError::Commit(format!(
            "job {} was not inserted",
            row.id
        )));
    };
    let stmt = conn
        .prepare_cached("SELECT id FROM jobs WHERE tenant = $1 AND idempotency_key = $2")
        .await?;
    let existing: i64 = conn.query_one(&stmt, &[&row.tenant, &key]).await?.get(0);
    Ok(Err(existing as u64))
}

/// The fence of an owned write: `(owner, epoch)` the row must still have, or (None, 0) for
/// a store without an owner (nothing checked). [`StoreError::Fenced`] when this coordinator
/// does not hold the job.
fn fence(owner: Option<&Owner>, job: u64) -> Result<(Option<&str>, i64), StoreError> {
    match owner {
        Some(o) => Ok((Some(o.id()), o.epoch(job)?)),
        None => Ok((None, 0)),
    }
}

/// The condition of a fenced statement on `jobs` row `$1`, with the owner in `$o` and the
/// epoch in `$e`; `FOR SHARE` so that another coordinator's claim of the row waits for this
/// group's commit (and then loads what it wrote).
fn owned_row(o: usize, e: usize) -> String {
    format!(
        "SELECT 1 FROM jobs WHERE id = $1 AND (${o}::text IS NULL OR (owner = ${o} AND epoch = ${e}))
         FOR SHARE"
    )
}

/// Appends `tokens` at `start..` in one insert; indices already stored are kept. Fenced.
async fn append(
    conn: &Conn,
    sealer: &Sealer,
    owner: Option<&Owner>,
    job: u64,
    start: u32,
    tokens: &[StoredToken],
) -> Result<(), StoreError> {
    let (owner_id, epoch) = fence(owner, job)?;
    let mut idx = Vec::with_capacity(tokens.len());
    let mut sealed = Vec::with_capacity(tokens.len());
    for (i, token) in (start..).zip(tokens) {
        idx.push(i64::from(i));
        sealed.push(sealer.seal(&place::token(job, i), &serde_json::to_vec(token)?));
    }
    // One statement: the ownership check and the insert (only if it holds).
    let stmt = conn
        .prepare_cached(&format!(
            "WITH owned AS ({}),
             ins AS (
                 INSERT INTO job_outputs (job_id, idx, sealed)
                 SELECT $1, t.idx, t.sealed
                 FROM unnest($2::bigint[], $3::bytea[]) AS t (idx, sealed)
                 WHERE EXISTS (SELECT 1 FROM owned)
                 ON CONFLICT (job_id, idx) DO NOTHING)
             SELECT count(*) FROM owned",
            owned_row(4, 5)
        ))
        .await?;
    let owned: i64 = conn
        .query_one(&stmt, &[&(job as i64), &idx, &sealed, &owner_id, &epoch])
        .await?
        .get(0);
    if owned == 0 && owner.is_some() {
        return Err(StoreError::Fenced { job });
    }
    Ok(())
}

/// Writes a job's outcome. Fenced; the job is no longer held once it has ended.
async fn finish(
    conn: &Conn,
    sealer: &Sealer,
    owner: Option<&Owner>,
    job: u64,
    outcome: &Outcome,
) -> Result<(), StoreError> {
    let (owner_id, epoch) = fence(owner, job)?;
    let stmt = conn
        .prepare_cached(
            "UPDATE jobs SET state = $2, finished_ms = $3, finish_reason = $4, text_tail = $5,
             prompt_tokens = $6, error = $7
             WHERE id = $1 AND ($8::text IS NULL OR (owner = $8 AND epoch = $9))",
        )
        .await?;
    let written = conn
        .execute(
            &stmt,
            &[
                &(job as i64),
                &outcome.state.as_str(),
                &(outcome.finished_ms as i64),
                &outcome.finish_reason,
                &seal_tail(sealer, job, &outcome.text_tail),
                &i64::from(outcome.prompt_tokens),
                &outcome.error,
                &owner_id,
                &epoch,
            ],
        )
        .await?;
    if let Some(o) = owner {
        o.forget(job);
        if written == 0 {
            return Err(StoreError::Fenced { job });
        }
    }
    Ok(())
}

/// Deletes a job's stored tokens. Fenced.
async fn discard_tokens(conn: &Conn, owner: Option<&Owner>, job: u64) -> Result<(), StoreError> {
    let (owner_id, epoch) = fence(owner, job)?;
    let stmt = conn
        .prepare_cached(&format!(
            "WITH owned AS ({}),
             del AS (DELETE FROM job_outputs WHERE job_id = $1 AND EXISTS (SELECT 1 FROM owned))
             SELECT count(*) FROM owned",
            owned_row(2, 3)
        ))
        .await?;
    let owned: i64 = conn
        .query_one(&stmt, &[&(job as i64), &owner_id, &epoch])
        .await?
        .get(0);
    if owned == 0 && owner.is_some() {
        return Err(StoreError::Fenced { job });
    }
    Ok(())
}

/// Puts job `job` in state `from` back to `queued` (its outcome cleared; claimed by this
/// store's coordinator at a new epoch when it has an owner); whether it was in that state.
/// The condition is checked on the locked row, so of two coordinators re-opening one job only
/// one sees it.
async fn requeue(
    conn: &Conn,
    owner: Option<&Owner>,
    job: u64,
    from: JobState,
) -> Result<bool, StoreError> {
    let (owner_id, lease_ms) = Owner::columns(owner);
    let stmt = conn
        .prepare_cached(&format!(
            "UPDATE jobs SET state = 'queued', finished_ms = NULL, finish_reason = NULL,
             text_tail = NULL, error = NULL, owner = $3, epoch = epoch + 1,
             lease_until_ms = CASE WHEN $3::text IS NULL THEN NULL ELSE {NOW_MS} + $4 END
             WHERE id = $1 AND state = $2 RETURNING epoch"
        ))
        .await?;
    let row = conn
        .query_opt(
            &stmt,
            &[&(job as i64), &from.as_str(), &owner_id, &lease_ms],
        )
        .await?;
    if let (Some(row), Some(o)) = (&row, owner) {
        o.claimed(job, row.get(0));
    }
    Ok(row.is_some())
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
        let owner = self.owner.clone();
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
                    insert(conn, sealer, owner.as_deref(), row).await
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
        let owner = self.owner.clone();
        self.call(move |conn, sealer| {
            Box::pin(
                async move { append(conn, sealer, owner.as_deref(), job, start, &tokens).await },
            )
        })
        .await
    }

    async fn finish_job(&self, job: u64, outcome: Outcome) -> Result<(), StoreError> {
        let owner = self.owner.clone();
        self.call(move |conn, sealer| {
            Box::pin(async move { finish(conn, sealer, owner.as_deref(), job, &outcome).await })
        })
        .await
    }

    async fn queue_tokens(&self, job: u64, start: u32, tokens: Vec<StoredToken>) {
        let owner = self.owner.clone();
        self.queue("tokens", move |conn, sealer| {
            Box::pin(
                async move { append(conn, sealer, owner.as_deref(), job, start, &tokens).await },
            )
        })
        .await
    }

    async fn queue_finish(&self, job: u64, outcome: Outcome) {
        let owner = self.owner.clone();
        self.queue("outcome", move |conn, sealer| {
            Box::pin(async move { finish(conn, sealer, owner.as_deref(), job, &outcome).await })
        })
        .await
    }

    async fn queue_discard_tokens(&self, job: u64) {
        let owner = self.owner.clone();
        self.queue("token discard", move |conn, _| {
            Box::pin(async move { discard_tokens(conn, owner.as_deref(), job).await })
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.call(|_, _| Box::pin(async { Ok(()) })).await
    }

    async fn reopen_cancelled(&self, job: u64) -> Result<Option<JobRecord>, StoreError> {
        let owner = self.owner.clone();
        self.call(move |conn, sealer| {
            Box::pin(async move {
                if !requeue(conn, owner.as_deref(), job, JobState::Cancelled).await? {
                    return Ok(None);
                }
                load_one(conn, sealer, job).await
            })
        })
        .await
    }

    async fn reopen_for_rerun(&self, job: u64) -> Result<Option<JobRecord>, StoreError> {
        // One step, so one savepoint: re-queued and emptied together, or neither.
        let owner = self.owner.clone();
        self.call(move |conn, sealer| {
            Box::pin(async move {
                if !requeue(conn, owner.as_deref(), job, JobState::Done).await? {
                    return Ok(None);
                }
                discard_tokens(conn, owner.as_deref(), job).await?;
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
