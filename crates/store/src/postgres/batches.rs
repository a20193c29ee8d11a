//! [`BatchStore`] on PostgreSQL: the `files`, `batches` and `batch_requests` tables (a batch
//! line is a `batch_requests` row). Every call is a step of the queue; the calls that write
//! several rows (starting and ending a batch) are one step each, so all of it or none. The
//! per-tenant limits are counted under a transaction advisory lock on the tenant, so two
//! coordinators cannot both slip under one. File contents are sealed at rest. Uses the job SQL
//! of [`super::jobs`], the crate's records, sealing and tokio-postgres.

use async_trait::async_trait;
use tokio_postgres::Row;

use super::jobs::load_many;
use super::owner::{Owner, NOW_MS};
use super::{Conn, PostgresStore};
use crate::batches::{batch_job, page};
use crate::sealing::{place, Sealer};
use crate::{
    BatchLine, BatchRecord, BatchStatus, BatchStore, FileRecord, JobRecord, LineResult, NewFile,
    OverLimit, Progress, StoreError,
};

/// Statuses of batches not yet ended, as SQL ([`BatchStatus::ACTIVE`]).
const ACTIVE: &str = "('validating', 'in_progress', 'finalizing', 'cancelling')";

fn file_row(r: &Row) -> FileRecord {
    FileRecord {
        id: r.get(0),
        bytes: r.get::<_, i64>(1) as u64,
        created_s: r.get::<_, i64>(2) as u64,
        filename: r.get(3),
        purpose: r.get(4),
    }
}

/// A batch from columns `at..at + 3` (id, status, record).
fn batch_row(r: &Row, at: usize) -> Result<BatchRecord, StoreError> {
    let status: &str = r.get(at + 1);
    Ok(BatchRecord {
        id: r.get(at),
        status: BatchStatus::parse(status)
            .ok_or_else(|| super::backend_error(format!("batch with unknown status {status:?}")))?,
        json: r.get(at + 2),
    })
}

/// Takes the tenant's lock for checking a limit (`what`: files or batches) until the group
/// commits: a limit checked and written by one coordinator is not passed by another meanwhile.
async fn lock_tenant(conn: &Conn, what: &str, tenant: &str) -> Result<(), StoreError> {
    let stmt = conn
        .prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .await?;
    conn.execute(&stmt, &[&format!("tokenfleet.{what}:{tenant}")])
        .await?;
    Ok(())
}

async fn put_file(conn: &Conn, sealer: &Sealer, f: &NewFile) -> Result<(), StoreError> {
    let stmt = conn
        .prepare_cached(
            "INSERT INTO files (id, tenant, purpose, filename, bytes, created_s, content)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    conn.execute(
        &stmt,
        &[
            &f.file.id,
            &f.tenant,
            &f.file.purpose,
            &f.file.filename,
            &(f.file.bytes as i64),
            &(f.file.created_s as i64),
            &sealer.seal(&place::file(&f.file.id), &f.content),
        ],
    )
    .await?;
    Ok(())
}

/// Writes a batch's record, if the batch is still in a status it may move from
/// ([`BatchStatus::may_follow`], checked on the locked row); [`StoreError::Stale`] if not.
async fn put_batch(conn: &Conn, batch: &BatchRecord) -> Result<(), StoreError> {
    put_batch_from(conn, batch, batch.status.may_follow()).await
}

/// [`put_batch`] from one of the statuses `from` only.
async fn put_batch_from(
    conn: &Conn,
    batch: &BatchRecord,
    from: &[BatchStatus],
) -> Result<(), StoreError> {
    let stmt = conn
        .prepare_cached(
            "UPDATE batches SET status = $2, record = $3 WHERE id = $1 AND status = ANY($4)",
        )
        .await?;
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let written = conn
        .execute(
            &stmt,
            &[&batch.id, &batch.status.as_str(), &batch.json, &from],
        )
        .await?;
    if written == 0 {
        return Err(StoreError::Stale {
            batch: batch.id.clone(),
            to: batch.status.as_str(),
        });
    }
    Ok(())
}

/// `seq` of the row with `id` of this tenant (the list cursor), if any.
async fn cursor(
    conn: &Conn,
    table: &str,
    tenant: &str,
    after: Option<&str>,
) -> Result<i64, StoreError> {
    let Some(after) = after else {
        return Ok(i64::MAX);
    };
    let row = conn
        .query_opt(
            &format!("SELECT seq FROM {table} WHERE id = $1 AND tenant = $2"),
            &[&after, &tenant],
        )
        .await?;
    Ok(row.map_or(i64::MAX, |r| r.get(0)))
}

/// Writes a batch's jobs (under `ids`, one per valid line, in order; the store's
/// coordinator's, when it has an owner) and lines, and its record, each table in one
/// statement; returns the jobs.
#[allow(
    clippy::too_many_arguments,
    reason = "one row of each table the batch writes, plus the owner"
)]
async fn write_batch(
    conn: &Conn,
    sealer: &Sealer,
    owner: Option<&Owner>,
    tenant: &str,
    batch: &BatchRecord,
    lines: Vec<BatchLine>,
    ids: Vec<u64>,
    created_ms: u64,
) -> Result<Vec<JobRecord>, StoreError> {
    // First, and only from `validating`: of two coordinators starting one batch, the second
    // is refused here, before it writes a job.
    put_batch_from(conn, batch, &[BatchStatus::Validating]).await?;
    let mut ids = ids.into_iter();
    let mut jobs = Vec::new();
    let (mut job_ids, mut public_ids, mut requests) = (Vec::new(), Vec::new(), Vec::new());
    let (mut line_nos, mut custom_ids, mut line_jobs, mut errors) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for l in lines {
        let (job_id, error) = match l.outcome {
            Ok(request) => {
                let id = ids
                    .next()
                    .ok_or_else(|| StoreError::Commit("fewer job ids than batch jobs".into()))?;
                let job = batch_job(id, tenant, request, created_ms);
                job_ids.push(id as i64);
                public_ids.push(job.public_id.clone());
                requests.push(sealer.seal(&place::request(id), &job.request));
                jobs.push(job);
                (Some(id as i64), None)
            }
            Err(e) => (None, Some(e.to_string())),
        };
        line_nos.push(i64::from(l.line));
        custom_ids.push(l.custom_id);
        line_jobs.push(job_id);
        errors.push(error);
    }
    let (owner_id, lease_ms) = Owner::columns(owner);
    conn.execute(
        &format!(
            "INSERT INTO jobs (id, public_id, tenant, request, state, created_ms, owner, epoch,
                               lease_until_ms)
             SELECT t.id, t.public_id, $1, t.request, 'queued', $2, $6, 1,
                    CASE WHEN $6::text IS NULL THEN NULL ELSE {NOW_MS} + $7 END
             FROM unnest($3::bigint[], $4::text[], $5::bytea[]) AS t (id, public_id, request)"
        ),
        &[
            &tenant,
            &(created_ms as i64),
            &job_ids,
            &public_ids,
            &requests,
            &owner_id,
            &lease_ms,
        ],
    )
    .await?;
    conn.execute(
        "INSERT INTO batch_requests (batch_id, line, custom_id, job_id, error)
         SELECT $1, t.line, t.custom_id, t.job_id, t.error
         FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::text[])
             AS t (line, custom_id, job_id, error)",
        &[&batch.id, &line_nos, &custom_ids, &line_jobs, &errors],
    )
    .await?;
    if let Some(o) = owner {
        for job in &jobs {
            o.claimed(job.id, 1);
        }
    }
    Ok(jobs)
}

#[async_trait]
impl BatchStore for PostgresStore {
    async fn insert_file_within(
        &self,
        file: NewFile,
        max_files: u64,
        max_bytes: u64,
    ) -> Result<Result<(), OverLimit>, StoreError> {
        self.call(move |conn, sealer| {
            Box::pin(async move {
                lock_tenant(conn, "files", &file.tenant).await?;
                let row = conn
                    .query_one(
                        "SELECT count(*), coalesce(sum(bytes), 0)::bigint FROM files
                         WHERE tenant = $1 AND purpose = $2",
                        &[&file.tenant, &file.file.purpose],
                    )
                    .await?;
                let (count, bytes) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
                if count >= max_files || bytes.saturating_add(file.file.bytes) > max_bytes {
                    return Ok(Err(OverLimit::Files { count, bytes }));
                }
                put_file(conn, sealer, &file).await?;
                Ok(Ok(()))
            })
        })
        .await
    }

    async fn file(&self, tenant: &str, id: &str) -> Result<Option<FileRecord>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.call(move |conn, _| {
            Box::pin(async move {
                let row = conn
                    .query_opt(
                        "SELECT id, bytes, created_s, filename, purpose FROM files
                         WHERE id = $1 AND tenant = $2",
                        &[&id, &tenant],
                    )
                    .await?;
                Ok(row.as_ref().map(file_row))
            })
        })
        .await
    }

    async fn file_content(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.call(move |conn, sealer| {
            Box::pin(async move {
                let row = conn
                    .query_opt(
                        "SELECT content FROM files WHERE id = $1 AND tenant = $2",
                        &[&id, &tenant],
                    )
                    .await?;
                Ok(row
                    .map(|r| sealer.open(&place::file(&id), r.get::<_, &[u8]>(0)))
                    .transpose()?)
            })
        })
        .await
    }

    async fn list_files(
        &self,
        tenant: &str,
        purpose: Option<String>,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<FileRecord>, bool), StoreError> {
        let tenant = tenant.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                let before = cursor(conn, "files", &tenant, after.as_deref()).await?;
                let rows = conn
                    .query(
                        "SELECT id, bytes, created_s, filename, purpose FROM files
                         WHERE tenant = $1 AND seq < $2 AND ($3::text IS NULL OR purpose = $3)
                         ORDER BY seq DESC LIMIT $4",
                        &[&tenant, &before, &purpose, &(limit as i64 + 1)],
                    )
                    .await?;
                Ok(page(rows.iter().map(file_row).collect(), limit))
            })
        })
        .await
    }

    async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.call(move |conn, _| {
            Box::pin(async move {
                let n = conn
                    .execute(
                        "DELETE FROM files WHERE id = $1 AND tenant = $2",
                        &[&id, &tenant],
                    )
                    .await?;
                Ok(n > 0)
            })
        })
        .await
    }

    async fn insert_batch(
        &self,
        tenant: &str,
        batch: BatchRecord,
        max_active: u64,
    ) -> Result<Result<(), OverLimit>, StoreError> {
        let tenant = tenant.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                lock_tenant(conn, "batches", &tenant).await?;
                let active: i64 = conn
                    .query_one(
                        &format!(
                            "SELECT count(*) FROM batches WHERE tenant = $1 AND status IN {ACTIVE}"
                        ),
                        &[&tenant],
                    )
                    .await?
                    .get(0);
                if active as u64 >= max_active {
                    return Ok(Err(OverLimit::ActiveBatches(active as u64)));
                }
                conn.execute(
                    "INSERT INTO batches (id, tenant, status, record) VALUES ($1, $2, $3, $4)",
                    &[&batch.id, &tenant, &batch.status.as_str(), &batch.json],
                )
                .await?;
                Ok(Ok(()))
            })
        })
        .await
    }

    async fn batch(&self, tenant: &str, id: &str) -> Result<Option<BatchRecord>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.call(move |conn, _| {
            Box::pin(async move {
                conn.query_opt(
                    "SELECT id, status, record FROM batches WHERE id = $1 AND tenant = $2",
                    &[&id, &tenant],
                )
                .await?
                .map(|r| batch_row(&r, 0))
                .transpose()
            })
        })
        .await
    }

    async fn list_batches(
        &self,
        tenant: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<BatchRecord>, bool), StoreError> {
        let tenant = tenant.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                let before = cursor(conn, "batches", &tenant, after.as_deref()).await?;
                let rows = conn
                    .query(
                        "SELECT id, status, record FROM batches WHERE tenant = $1 AND seq < $2
                         ORDER BY seq DESC LIMIT $3",
                        &[&tenant, &before, &(limit as i64 + 1)],
                    )
                    .await?;
                let rows = rows
                    .iter()
                    .map(|r| batch_row(r, 0))
                    .collect::<Result<_, _>>()?;
                Ok(page(rows, limit))
            })
        })
        .await
    }

    async fn update_batch(&self, batch: BatchRecord) -> Result<(), StoreError> {
        self.call(move |conn, _| Box::pin(async move { put_batch(conn, &batch).await }))
            .await
    }

    async fn active_batches(&self) -> Result<Vec<(String, BatchRecord)>, StoreError> {
        self.call(|conn, _| {
            Box::pin(async move {
                conn.query(
                    &format!(
                        "SELECT tenant, id, status, record FROM batches WHERE status IN {ACTIVE}
                         ORDER BY seq"
                    ),
                    &[],
                )
                .await?
                .iter()
                .map(|r| Ok((r.get(0), batch_row(r, 1)?)))
                .collect()
            })
        })
        .await
    }

    async fn start_batch(
        &self,
        tenant: &str,
        batch: BatchRecord,
        lines: Vec<BatchLine>,
        created_ms: u64,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let tenant = tenant.to_string();
        let valid = lines.iter().filter(|l| l.outcome.is_ok()).count() as u64;
        let ids = self.ids.take(valid).await?;
        // One step: the jobs, the lines and the record, or nothing.
        let owner = self.owner.clone();
        self.call(move |conn, sealer| {
            Box::pin(async move {
                write_batch(
                    conn,
                    sealer,
                    owner.as_deref(),
                    &tenant,
                    &batch,
                    lines,
                    ids,
                    created_ms,
                )
                .await
            })
        })
        .await
    }

    async fn batch_progress(&self, batch: &str) -> Result<Progress, StoreError> {
        let batch = batch.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                let rows = conn
                    .query(
                        "SELECT j.state, count(*) FROM batch_requests b
                         LEFT JOIN jobs j ON j.id = b.job_id
                         WHERE b.batch_id = $1 GROUP BY j.state",
                        &[&batch],
                    )
                    .await?;
                let mut p = Progress::default();
                for r in rows {
                    let n = r.get::<_, i64>(1) as u64;
                    p.total += n;
                    match r.get::<_, Option<&str>>(0) {
                        Some("done") => p.done += n,
                        Some("queued") => p.unfinished += n,
                        // Failed or cancelled jobs, and lines that never became jobs.
                        _ => p.failed += n,
                    }
                }
                Ok(p)
            })
        })
        .await
    }

    async fn unfinished_batch_jobs(&self, batch: &str) -> Result<Vec<u64>, StoreError> {
        let batch = batch.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                Ok(conn
                    .query(
                        "SELECT j.id FROM batch_requests b JOIN jobs j ON j.id = b.job_id
                         WHERE b.batch_id = $1 AND j.state = 'queued' ORDER BY j.id",
                        &[&batch],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get::<_, i64>(0) as u64)
                    .collect())
            })
        })
        .await
    }

    async fn cancel_batch_jobs(&self, batch: &str, now_ms: u64) -> Result<usize, StoreError> {
        let batch = batch.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                let n = conn
                    .execute(
                        "UPDATE jobs SET state = 'cancelled', finished_ms = $2
                         WHERE state = 'queued'
                           AND id IN (SELECT job_id FROM batch_requests WHERE batch_id = $1)",
                        &[&batch, &(now_ms as i64)],
                    )
                    .await?;
                Ok(n as usize)
            })
        })
        .await
    }

    async fn batch_results(&self, batch: &str) -> Result<Vec<LineResult>, StoreError> {
        let batch = batch.to_string();
        self.call(move |conn, sealer| {
            Box::pin(async move {
                let rows = conn
                    .query(
                        "SELECT custom_id, job_id, error FROM batch_requests
                         WHERE batch_id = $1 ORDER BY line",
                        &[&batch],
                    )
                    .await?;
                let ids: Vec<u64> = rows
                    .iter()
                    .filter_map(|r| r.get::<_, Option<i64>>(1))
                    .map(|id| id as u64)
                    .collect();
                let mut jobs: std::collections::HashMap<u64, JobRecord> =
                    load_many(conn, sealer, &ids)
                        .await?
                        .into_iter()
                        .map(|j| (j.id, j))
                        .collect();
                rows.iter()
                    .map(|r| {
                        let job = r.get::<_, Option<i64>>(1).map(|id| id as u64);
                        let error: Option<&str> = r.get(2);
                        Ok(LineResult {
                            custom_id: r.get(0),
                            job: job.and_then(|id| jobs.remove(&id)),
                            error: error.map(serde_json::from_str).transpose()?,
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    async fn finish_batch(
        &self,
        batch: BatchRecord,
        files: Vec<NewFile>,
    ) -> Result<(), StoreError> {
        // One step: the files and the final record, or nothing.
        self.call(move |conn, sealer| {
            Box::pin(async move {
                for f in &files {
                    put_file(conn, sealer, f).await?;
                }
                put_batch(conn, &batch).await
            })
        })
        .await
    }
}
