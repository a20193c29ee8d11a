//! [`JobStore`] on SQLite: the `jobs` and `job_outputs` tables. Inserts, token appends and
//! outcomes go through the group commit ([`super::commit`]); reads and the rare multi-row
//! writes run in their place in the queue. Requests, tails and tokens are sealed at rest.
//! Uses the crate's job records, [`crate::sealing`] and rusqlite.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::commit::Op;
use super::SqliteStore;
use crate::sealing::{place, Sealer};
use crate::{Durable, JobRecord, JobState, JobStore, Outcome, StoreError, StoredToken};

/// An empty tail is stored as NULL; anything else sealed.
pub(super) fn seal_tail(sealer: &Sealer, job: u64, tail: &str) -> Option<Vec<u8>> {
    (!tail.is_empty()).then(|| sealer.seal(&place::text_tail(job), tail.as_bytes()))
}

pub(super) fn insert_token(
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
        sealer.seal(&place::token(job, idx), &plain)
    ])?;
    Ok(())
}

pub(super) struct NewRow<'a> {
    pub id: u64,
    pub public_id: &'a str,
    pub tenant: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub request: &'a [u8],
    pub created_ms: u64,
}

pub(super) fn insert(
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
        sealer.seal(&place::request(row.id), row.request),
        row.created_ms as i64
    ])?;
    Ok(Ok(row.id))
}

pub(super) fn append(
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

pub(super) fn finish(
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

/// Puts job `job` in state `from` back to `queued` (its outcome cleared); whether it was in
/// that state.
fn requeue(conn: &Connection, job: u64, from: JobState) -> Result<bool, StoreError> {
    let changed = conn.execute(
        "UPDATE jobs SET state = 'queued', finished_ms = NULL, finish_reason = NULL,
         text_tail = NULL, error = NULL WHERE id = ?1 AND state = ?2",
        params![job as i64, from.as_str()],
    )?;
    Ok(changed > 0)
}

/// A job with its tokens, read on the store thread's connection.
pub(super) fn load_one(
    conn: &Connection,
    sealer: &Sealer,
    job: u64,
) -> Result<Option<JobRecord>, StoreError> {
    let row = conn
        .query_row(
            "SELECT id, public_id, tenant, idempotency_key, request, state, created_ms,
                    finish_reason, text_tail, prompt_tokens, error
             FROM jobs WHERE id = ?1",
            params![job as i64],
            |r| {
                Ok((
                    JobRecord::<Vec<u8>> {
                        id: r.get(0)?,
                        public_id: r.get(1)?,
                        tenant: r.get(2)?,
                        idempotency_key: r.get(3)?,
                        request: r.get(4)?,
                        state: JobState::parse(&r.get::<_, String>(5)?),
                        created_ms: r.get(6)?,
                        finish_reason: r.get(7)?,
                        text_tail: String::new(),
                        prompt_tokens: r.get::<_, Option<u32>>(9)?.unwrap_or(0),
                        error: r.get(10)?,
                        tokens: Vec::new(),
                    },
                    r.get::<_, Option<Vec<u8>>>(8)?,
                ))
            },
        )
        .optional()?;
    let Some((mut job, tail)) = row else {
        return Ok(None);
    };
    let id = job.id;
    let mut stmt =
        conn.prepare_cached("SELECT idx, sealed FROM job_outputs WHERE job_id = ?1 ORDER BY idx")?;
    job.tokens = stmt
        .query_map(params![id as i64], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(idx, sealed)| {
            let plain = sealer.open(&place::token(id, idx), &sealed)?;
            Ok(serde_json::from_slice::<StoredToken>(&plain)?)
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    job.request = sealer.open(&place::request(id), &job.request)?;
    if let Some(tail) = tail {
        job.text_tail = sealer.open_string(&place::text_tail(id), &tail)?;
    }
    Ok(Some(job))
}

impl SqliteStore {
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, committed) = oneshot::channel();
        let op = Op::Insert {
            id,
            public_id,
            tenant,
            idempotency_key,
            request,
            created_ms,
            reply,
        };
        self.tx.send(op).await.map_err(|_| StoreError::Closed)?;
        Ok((id, committed))
    }
}

#[async_trait]
impl JobStore for SqliteStore {
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
        self.request(|reply| Op::Tokens {
            job,
            start,
            tokens,
            reply: Some(reply),
        })
        .await
    }

    async fn finish_job(&self, job: u64, outcome: Outcome) -> Result<(), StoreError> {
        self.request(|reply| Op::Finish {
            job,
            outcome,
            reply: Some(reply),
        })
        .await
    }

    async fn queue_tokens(&self, job: u64, start: u32, tokens: Vec<StoredToken>) {
        let op = Op::Tokens {
            job,
            start,
            tokens,
            reply: None,
        };
        self.send(op, "tokens").await
    }

    async fn queue_finish(&self, job: u64, outcome: Outcome) {
        let op = Op::Finish {
            job,
            outcome,
            reply: None,
        };
        self.send(op, "outcome").await
    }

    async fn queue_discard_tokens(&self, job: u64) {
        self.queue_exec(move |conn| {
            conn.prepare_cached("DELETE FROM job_outputs WHERE job_id = ?1")?
                .execute(params![job as i64])?;
            Ok(())
        })
        .await;
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.with_conn(|_, _| Ok(())).await
    }

    async fn reopen_cancelled(&self, job: u64) -> Result<Option<JobRecord>, StoreError> {
        self.with_conn(move |conn, sealer| {
            if !requeue(conn, job, JobState::Cancelled)? {
                return Ok(None);
            }
            load_one(conn, sealer, job)
        })
        .await
    }

    async fn reopen_for_rerun(&self, job: u64) -> Result<Option<JobRecord>, StoreError> {
        self.with_conn(move |conn, sealer| {
            let tx = conn.transaction()?;
            if !requeue(&tx, job, JobState::Done)? {
                return Ok(None);
            }
            tx.execute(
                "DELETE FROM job_outputs WHERE job_id = ?1",
                params![job as i64],
            )?;
            tx.commit()?;
            load_one(conn, sealer, job)
        })
        .await
    }

    async fn load_job(&self, job: u64) -> Result<Option<JobRecord>, StoreError> {
        self.with_conn(move |conn, sealer| load_one(conn, sealer, job))
            .await
    }

    async fn load_unfinished(&self) -> Result<Vec<JobRecord>, StoreError> {
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

    async fn purge_finished_before(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
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
}

/// One coordinator per SQLite file: it owns every job. A claim is the job if it is queued,
/// nothing is orphaned and no lease is lost.
#[async_trait]
impl crate::ClaimStore for SqliteStore {
    fn ownership(&self) -> Option<&crate::Ownership> {
        None
    }

    async fn claim_job(&self, job: u64, _steal: bool) -> Result<crate::Claim, StoreError> {
        Ok(crate::Claim::of_sole(self.load_job(job).await?))
    }

    async fn claim_orphans(&self, _limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        Ok(Vec::new())
    }

    async fn renew_leases(&self) -> Result<crate::Renewal, StoreError> {
        Ok(crate::Renewal::default())
    }
}
