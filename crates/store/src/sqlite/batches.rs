//! [`BatchStore`] on SQLite: the `files`, `batches` and `batch_requests` tables (a batch line
//! is a `batch_requests` row). Every call runs in its place in the store thread's queue; the
//! calls that write several rows do so in one transaction. File contents are sealed at rest.
//! Uses the job SQL of [`super::jobs`], the crate's records, sealing and rusqlite.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension};

use super::jobs::{insert, load_one, NewRow};
use super::SqliteStore;
use crate::batches::{batch_job, page};
use crate::sealing::{place, Sealer};
use crate::{
    BatchLine, BatchRecord, BatchStatus, BatchStore, FileRecord, JobRecord, LineResult, NewFile,
    OverLimit, Progress, StoreError,
};

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: r.get(0)?,
        bytes: r.get(1)?,
        created_s: r.get(2)?,
        filename: r.get(3)?,
        purpose: r.get(4)?,
    })
}

fn batch_row(id: usize) -> impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<BatchRecord> {
    move |r| {
        Ok(BatchRecord {
            id: r.get(id)?,
            status: BatchStatus::parse(&r.get::<_, String>(id + 1)?).ok_or_else(|| {
                rusqlite::Error::InvalidColumnType(id + 1, "status".into(), Type::Text)
            })?,
            json: r.get(id + 2)?,
        })
    }
}

fn put_file(conn: &Connection, sealer: &Sealer, f: &NewFile) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO files (id, tenant, purpose, filename, bytes, created_s, content)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            f.file.id,
            f.tenant,
            f.file.purpose,
            f.file.filename,
            f.file.bytes as i64,
            f.file.created_s as i64,
            sealer.seal(&place::file(&f.file.id), &f.content)
        ],
    )?;
    Ok(())
}

/// Writes a batch's record, if the batch is still in a status it may move from
/// ([`BatchStatus::may_follow`]); [`StoreError::Stale`] if not. (One coordinator per SQLite
/// file, but its runner and a client's cancel still race.)
fn put_batch(conn: &Connection, batch: &BatchRecord) -> Result<(), StoreError> {
    put_batch_from(conn, batch, batch.status.may_follow())
}

/// [`put_batch`] from one of the statuses `from` only.
fn put_batch_from(
    conn: &Connection,
    batch: &BatchRecord,
    from: &[BatchStatus],
) -> Result<(), StoreError> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let from = serde_json::to_string(&from)?;
    let written = conn.execute(
        "UPDATE batches SET status = ?2, record = ?3
         WHERE id = ?1 AND status IN (SELECT value FROM json_each(?4))",
        params![batch.id, batch.status.as_str(), batch.json, from],
    )?;
    if written == 0 {
        return Err(StoreError::Stale {
            batch: batch.id.clone(),
            to: batch.status.as_str(),
        });
    }
    Ok(())
}

/// `seq` of the row with `id` of this tenant (the list cursor), if any.
fn cursor(
    conn: &Connection,
    table: &str,
    tenant: &str,
    after: Option<&str>,
) -> Result<i64, StoreError> {
    let Some(after) = after else {
        return Ok(i64::MAX);
    };
    Ok(conn
        .query_row(
            &format!("SELECT seq FROM {table} WHERE id = ?1 AND tenant = ?2"),
            params![after, tenant],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(i64::MAX))
}

fn cancel_jobs(conn: &Connection, batch: &str, now_ms: u64) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE jobs SET state = 'cancelled', finished_ms = ?2
         WHERE state = 'queued' AND id IN (SELECT job_id FROM batch_requests WHERE batch_id = ?1)",
        params![batch, now_ms as i64],
    )
}

/// Writes a batch's jobs (ids from `first_id` on) and lines, and its record; returns the jobs.
/// Runs inside the caller's transaction.
fn write_batch(
    conn: &Connection,
    sealer: &Sealer,
    tenant: &str,
    batch: &BatchRecord,
    lines: Vec<BatchLine>,
    first_id: u64,
    created_ms: u64,
) -> Result<Vec<JobRecord>, StoreError> {
    // First, and only from `validating`: a batch is started once.
    put_batch_from(conn, batch, &[BatchStatus::Validating])?;
    let mut jobs = Vec::new();
    let mut next = first_id;
    for l in lines {
        let (job_id, error) = match l.outcome {
            Ok(request) => {
                let id = next;
                next += 1;
                let job = batch_job(id, tenant, request, created_ms);
                let row = NewRow {
                    id,
                    public_id: &job.public_id,
                    tenant,
                    idempotency_key: None,
                    request: &job.request,
                    created_ms,
                };
                insert(conn, sealer, row)?
                    .map_err(|_| StoreError::Commit("batch job id collision".into()))?;
                jobs.push(job);
                (Some(id as i64), None)
            }
            Err(e) => (None, Some(e.to_string())),
        };
        conn.execute(
            "INSERT INTO batch_requests (batch_id, line, custom_id, job_id, error)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![batch.id, l.line, l.custom_id, job_id, error],
        )?;
    }

    Ok(jobs)
}

#[async_trait]
impl BatchStore for SqliteStore {
    async fn insert_file_within(
        &self,
        file: NewFile,
        max_files: u64,
        max_bytes: u64,
    ) -> Result<Result<(), OverLimit>, StoreError> {
        self.with_conn(move |conn, sealer| {
            let (count, bytes): (i64, i64) = conn.query_row(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM files WHERE tenant = ?1 AND purpose = ?2",
                params![file.tenant, file.file.purpose],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let (count, bytes) = (count as u64, bytes as u64);
            if count >= max_files || bytes.saturating_add(file.file.bytes) > max_bytes {
                return Ok(Err(OverLimit::Files { count, bytes }));
            }
            put_file(conn, sealer, &file)?;
            Ok(Ok(()))
        })
        .await
    }

    async fn file(&self, tenant: &str, id: &str) -> Result<Option<FileRecord>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.with_conn(move |conn, _| {
            Ok(conn
                .query_row(
                    "SELECT id, bytes, created_s, filename, purpose FROM files
                     WHERE id = ?1 AND tenant = ?2",
                    params![id, tenant],
                    file_row,
                )
                .optional()?)
        })
        .await
    }

    async fn file_content(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.with_conn(move |conn, sealer| {
            let sealed: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT content FROM files WHERE id = ?1 AND tenant = ?2",
                    params![id, tenant],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(sealed
                .map(|c| sealer.open(&place::file(&id), &c))
                .transpose()?)
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
        self.with_conn(move |conn, _| {
            let before = cursor(conn, "files", &tenant, after.as_deref())?;
            let rows: Vec<FileRecord> = conn
                .prepare(
                    "SELECT id, bytes, created_s, filename, purpose FROM files
                     WHERE tenant = ?1 AND seq < ?2 AND (?3 IS NULL OR purpose = ?3)
                     ORDER BY seq DESC LIMIT ?4",
                )?
                .query_map(params![tenant, before, purpose, limit as i64 + 1], file_row)?
                .collect::<Result<_, _>>()?;
            Ok(page(rows, limit))
        })
        .await
    }

    async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.with_conn(move |conn, _| {
            Ok(conn.execute(
                "DELETE FROM files WHERE id = ?1 AND tenant = ?2",
                params![id, tenant],
            )? > 0)
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
        self.with_conn(move |conn, _| {
            let active: i64 = conn.query_row(
                "SELECT count(*) FROM batches WHERE tenant = ?1
                 AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling')",
                params![tenant],
                |r| r.get(0),
            )?;
            if active as u64 >= max_active {
                return Ok(Err(OverLimit::ActiveBatches(active as u64)));
            }
            conn.execute(
                "INSERT INTO batches (id, tenant, status, record) VALUES (?1, ?2, ?3, ?4)",
                params![batch.id, tenant, batch.status.as_str(), batch.json],
            )?;
            Ok(Ok(()))
        })
        .await
    }

    async fn batch(&self, tenant: &str, id: &str) -> Result<Option<BatchRecord>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.with_conn(move |conn, _| {
            Ok(conn
                .query_row(
                    "SELECT id, status, record FROM batches WHERE id = ?1 AND tenant = ?2",
                    params![id, tenant],
                    batch_row(0),
                )
                .optional()?)
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
        self.with_conn(move |conn, _| {
            let before = cursor(conn, "batches", &tenant, after.as_deref())?;
            let rows: Vec<BatchRecord> = conn
                .prepare(
                    "SELECT id, status, record FROM batches WHERE tenant = ?1 AND seq < ?2
                     ORDER BY seq DESC LIMIT ?3",
                )?
                .query_map(params![tenant, before, limit as i64 + 1], batch_row(0))?
                .collect::<Result<_, _>>()?;
            Ok(page(rows, limit))
        })
        .await
    }

    async fn update_batch(&self, batch: BatchRecord) -> Result<(), StoreError> {
        self.with_conn(move |conn, _| put_batch(conn, &batch)).await
    }

    async fn active_batches(&self) -> Result<Vec<(String, BatchRecord)>, StoreError> {
        self.with_conn(|conn, _| {
            let batch = batch_row(1);
            Ok(conn
                .prepare(
                    "SELECT tenant, id, status, record FROM batches
                     WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
                     ORDER BY seq",
                )?
                .query_map([], |r| Ok((r.get(0)?, batch(r)?)))?
                .collect::<Result<_, _>>()?)
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
        let first_id = self.next_id.fetch_add(valid, Ordering::Relaxed);
        self.with_conn(move |conn, sealer| {
            let tx = conn.transaction()?;
            let jobs = write_batch(&tx, sealer, &tenant, &batch, lines, first_id, created_ms)?;
            tx.commit()?;
            Ok(jobs)
        })
        .await
    }

    async fn batch_progress(&self, batch: &str) -> Result<Progress, StoreError> {
        let batch = batch.to_string();
        self.with_conn(move |conn, _| {
            let mut p = Progress::default();
            let mut stmt = conn.prepare_cached(
                "SELECT j.state, count(*) FROM batch_requests b LEFT JOIN jobs j ON j.id = b.job_id
                 WHERE b.batch_id = ?1 GROUP BY j.state",
            )?;
            let rows = stmt.query_map(params![batch], |r| {
                Ok((r.get::<_, Option<String>>(0)?, r.get::<_, u64>(1)?))
            })?;
            for row in rows {
                let (state, n) = row?;
                p.total += n;
                match state.as_deref() {
                    Some("done") => p.done += n,
                    Some("queued") => p.unfinished += n,
                    // Failed or cancelled jobs, and lines that never became jobs.
                    _ => p.failed += n,
                }
            }
            Ok(p)
        })
        .await
    }

    async fn unfinished_batch_jobs(&self, batch: &str) -> Result<Vec<u64>, StoreError> {
        let batch = batch.to_string();
        self.with_conn(move |conn, _| {
            Ok(conn
                .prepare(
                    "SELECT j.id FROM batch_requests b JOIN jobs j ON j.id = b.job_id
                     WHERE b.batch_id = ?1 AND j.state = 'queued'",
                )?
                .query_map(params![batch], |r| r.get(0))?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn cancel_batch_jobs(&self, batch: &str, now_ms: u64) -> Result<usize, StoreError> {
        let batch = batch.to_string();
        self.with_conn(move |conn, _| Ok(cancel_jobs(conn, &batch, now_ms)?))
            .await
    }

    async fn batch_results(&self, batch: &str) -> Result<Vec<LineResult>, StoreError> {
        let batch = batch.to_string();
        self.with_conn(move |conn, sealer| {
            let rows: Vec<(String, Option<u64>, Option<String>)> = conn
                .prepare(
                    "SELECT custom_id, job_id, error FROM batch_requests
                     WHERE batch_id = ?1 ORDER BY line",
                )?
                .query_map(params![batch], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(custom_id, job, error)| {
                    Ok(LineResult {
                        custom_id,
                        job: match job {
                            Some(id) => load_one(conn, sealer, id)?,
                            None => None,
                        },
                        error: error.map(|e| serde_json::from_str(&e)).transpose()?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn finish_batch(
        &self,
        batch: BatchRecord,
        files: Vec<NewFile>,
    ) -> Result<(), StoreError> {
        self.with_conn(move |conn, sealer| {
            let tx = conn.transaction()?;
            for f in &files {
                put_file(&tx, sealer, f)?;
            }
            put_batch(&tx, &batch)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}
