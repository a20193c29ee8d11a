//! The Batch API's part of the job store: files, batches, and which job answers which line.
//!
//! Every batch line becomes one row of `batch_requests`, written in the same transaction as the
//! jobs that run them (or with its validation error), so each `custom_id` has exactly one
//! answer however often the coordinator restarts, a request is evicted, resumed or retried:
//! the output is built from these rows and the jobs' stored outcomes, once, in the transaction
//! that ends the batch.

use rusqlite::{params, Connection, OptionalExtension};

use crate::batch_types::{Batch, BatchStatus, FileObject, RequestCounts};
use crate::sealing::Sealer;
use crate::store::{insert, load_one, NewRow, Store, StoreError, StoredJob};
use crate::validation::ValidRequest;

/// Migration 3: files, batches, batch lines. File contents (batch inputs hold prompts, outputs
/// hold answers) are sealed like the jobs' prompts and outputs.
pub(crate) const MIGRATION: &str = "
    CREATE TABLE files (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_s INTEGER NOT NULL,
        content BLOB NOT NULL
    );
    CREATE INDEX files_tenant ON files(tenant, seq);
    CREATE TABLE batches (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        status TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX batches_tenant ON batches(tenant, seq);
    CREATE INDEX batches_status ON batches(status);
    CREATE TABLE batch_requests (
        batch_id TEXT NOT NULL REFERENCES batches(id),
        line INTEGER NOT NULL,
        custom_id TEXT NOT NULL,
        job_id INTEGER REFERENCES jobs(id),
        error TEXT,
        PRIMARY KEY (batch_id, line)
    ) WITHOUT ROWID;
    CREATE INDEX batch_requests_job ON batch_requests(job_id);";

/// A file to store.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub object: FileObject,
    pub tenant: String,
    pub content: Vec<u8>,
}

/// One line of a batch after validation: a job to run, or the error that stopped it.
#[derive(Debug, Clone)]
pub struct BatchLine {
    pub line: u32,
    pub custom_id: String,
    pub outcome: Result<ValidRequest, serde_json::Value>,
}

/// A batch line with what answered it, for the output and error files.
#[derive(Debug)]
pub struct LineResult {
    pub custom_id: String,
    /// The job that ran the line (None: the line did not pass validation).
    pub job: Option<StoredJob>,
    /// The validation error (`{"code", "message"}`).
    pub error: Option<serde_json::Value>,
}

/// Jobs of a batch by state (lines that failed validation count as failed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    pub unfinished: u64,
}

impl Progress {
    pub fn counts(&self) -> RequestCounts {
        RequestCounts {
            total: self.total,
            completed: self.done,
            failed: self.failed,
        }
    }
}

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileObject> {
    Ok(FileObject::new(
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        &r.get::<_, String>(4)?,
    ))
}

fn file_aad(id: &str) -> Vec<u8> {
    format!("files.content:{id}").into_bytes()
}

fn put_file(conn: &Connection, sealer: &Sealer, f: &NewFile) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO files (id, tenant, purpose, filename, bytes, created_s, content)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            f.object.id,
            f.tenant,
            f.object.purpose,
            f.object.filename,
            f.object.bytes as i64,
            f.object.created_at as i64,
            sealer.seal(&file_aad(&f.object.id), &f.content)
        ],
    )?;
    Ok(())
}

fn put_batch(conn: &Connection, batch: &Batch) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE batches SET status = ?2, record = ?3 WHERE id = ?1",
        params![
            batch.id,
            batch.status.as_str(),
            serde_json::to_string(batch)?
        ],
    )?;
    Ok(())
}

fn parse_batch(record: String) -> Result<Batch, StoreError> {
    Ok(serde_json::from_str(&record)?)
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

/// A tenant's limit that a new file or batch would pass (nothing was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// Uploaded files the tenant holds already (count, bytes).
    Files { count: u64, bytes: u64 },
    /// Batches of the tenant not yet ended.
    ActiveBatches(u64),
}

impl Store {
    /// Stores an uploaded file unless its tenant would then hold more than `max_files` files
    /// of its purpose or more than `max_bytes` in them. Checked and written in one store
    /// operation, so concurrent uploads cannot both slip under the limit.
    pub async fn insert_file_within(
        &self,
        file: NewFile,
        max_files: u64,
        max_bytes: u64,
    ) -> Result<Result<(), OverLimit>, StoreError> {
        self.with_conn(move |conn, sealer| {
            let (count, bytes): (i64, i64) = conn.query_row(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM files WHERE tenant = ?1 AND purpose = ?2",
                params![file.tenant, file.object.purpose],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let (count, bytes) = (count as u64, bytes as u64);
            if count >= max_files || bytes.saturating_add(file.object.bytes) > max_bytes {
                return Ok(Err(OverLimit::Files { count, bytes }));
            }
            put_file(conn, sealer, &file)?;
            Ok(Ok(()))
        })
        .await
    }

    /// A tenant's file (None for another tenant's).
    pub async fn file(&self, tenant: &str, id: &str) -> Result<Option<FileObject>, StoreError> {
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

    pub async fn file_content(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
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
                .map(|c| sealer.open(&file_aad(&id), &c))
                .transpose()?)
        })
        .await
    }

    /// A tenant's files, newest first, after the file `after`; and whether more follow.
    pub async fn list_files(
        &self,
        tenant: &str,
        purpose: Option<String>,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<FileObject>, bool), StoreError> {
        let tenant = tenant.to_string();
        self.with_conn(move |conn, _| {
            let before = cursor(conn, "files", &tenant, after.as_deref())?;
            let mut rows: Vec<FileObject> = conn
                .prepare(
                    "SELECT id, bytes, created_s, filename, purpose FROM files
                     WHERE tenant = ?1 AND seq < ?2 AND (?3 IS NULL OR purpose = ?3)
                     ORDER BY seq DESC LIMIT ?4",
                )?
                .query_map(params![tenant, before, purpose, limit as i64 + 1], file_row)?
                .collect::<Result<_, _>>()?;
            let more = rows.len() > limit;
            rows.truncate(limit);
            Ok((rows, more))
        })
        .await
    }

    /// Deletes a tenant's file; false when there is none.
    pub async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.with_conn(move |conn, _| {
            Ok(conn.execute(
                "DELETE FROM files WHERE id = ?1 AND tenant = ?2",
                params![id, tenant],
            )? > 0)
        })
        .await
    }

    /// Stores a new batch unless its tenant already has `max_active` batches not yet ended
    /// (checked and written in one store operation).
    pub async fn insert_batch(
        &self,
        tenant: &str,
        batch: Batch,
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
                params![
                    batch.id,
                    tenant,
                    batch.status.as_str(),
                    serde_json::to_string(&batch)?
                ],
            )?;
            Ok(Ok(()))
        })
        .await
    }

    /// A tenant's batch (None for another tenant's).
    pub async fn batch(&self, tenant: &str, id: &str) -> Result<Option<Batch>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.with_conn(move |conn, _| {
            conn.query_row(
                "SELECT record FROM batches WHERE id = ?1 AND tenant = ?2",
                params![id, tenant],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .map(parse_batch)
            .transpose()
        })
        .await
    }

    /// A tenant's batches, newest first, after the batch `after`; and whether more follow.
    pub async fn list_batches(
        &self,
        tenant: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Batch>, bool), StoreError> {
        let tenant = tenant.to_string();
        self.with_conn(move |conn, _| {
            let before = cursor(conn, "batches", &tenant, after.as_deref())?;
            let records: Vec<String> = conn
                .prepare(
                    "SELECT record FROM batches WHERE tenant = ?1 AND seq < ?2
                     ORDER BY seq DESC LIMIT ?3",
                )?
                .query_map(params![tenant, before, limit as i64 + 1], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut rows = records
                .into_iter()
                .map(parse_batch)
                .collect::<Result<Vec<_>, _>>()?;
            let more = rows.len() > limit;
            rows.truncate(limit);
            Ok((rows, more))
        })
        .await
    }

    /// Writes a batch's record (status, timestamps, counts).
    pub async fn update_batch(&self, batch: Batch) -> Result<(), StoreError> {
        self.with_conn(move |conn, _| put_batch(conn, &batch)).await
    }

    /// Batches the runner still works on, with their tenants, oldest first.
    pub async fn active_batches(&self) -> Result<Vec<(String, Batch)>, StoreError> {
        self.with_conn(|conn, _| {
            let rows: Vec<(String, String)> = conn
                .prepare(
                    "SELECT tenant, record FROM batches
                     WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
                     ORDER BY seq",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(t, r)| Ok((t, parse_batch(r)?)))
                .collect()
        })
        .await
    }

    /// Starts a validated batch in one transaction: a job per valid line (queued), a
    /// `batch_requests` row per line, and the batch record (now `in_progress`). Returns the
    /// new jobs. Nothing is written if any part fails.
    pub async fn start_batch(
        &self,
        tenant: &str,
        batch: Batch,
        lines: Vec<BatchLine>,
    ) -> Result<Vec<StoredJob>, StoreError> {
        let tenant = tenant.to_string();
        let valid = lines.iter().filter(|l| l.outcome.is_ok()).count() as u64;
        let first_id = self.reserve_job_ids(valid);
        self.with_conn(move |conn, sealer| {
            let tx = conn.transaction()?;
            let created_ms = batch.in_progress_at.unwrap_or(batch.created_at) * 1000;
            let mut jobs = Vec::with_capacity(valid as usize);
            let mut next = first_id;
            for l in lines {
                let (job_id, error) = match l.outcome {
                    Ok(request) => {
                        let id = next;
                        next += 1;
                        let public_id =
                            format!("batch_req_{}", hex::encode(rand::random::<[u8; 12]>()));
                        let json = serde_json::to_string(&request)?;
                        insert(
                            &tx,
                            sealer,
                            NewRow {
                                id,
                                public_id: &public_id,
                                tenant: &tenant,
                                idempotency_key: None,
                                request: &json,
                                created_ms,
                            },
                        )?
                        .map_err(|_| StoreError::Commit("batch job id collision".into()))?;
                        jobs.push(StoredJob {
                            id,
                            public_id,
                            tenant: tenant.clone(),
                            idempotency_key: None,
                            request,
                            state: crate::store::JobState::Queued,
                            created_ms,
                            finish_reason: None,
                            text_tail: String::new(),
                            prompt_tokens: 0,
                            error: None,
                            tokens: Vec::new(),
                        });
                        (Some(id as i64), None)
                    }
                    Err(e) => (None, Some(e.to_string())),
                };
                tx.execute(
                    "INSERT INTO batch_requests (batch_id, line, custom_id, job_id, error)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![batch.id, l.line, l.custom_id, job_id, error],
                )?;
            }
            put_batch(&tx, &batch)?;
            tx.commit()?;
            Ok(jobs)
        })
        .await
    }

    /// How far a batch's lines got.
    pub async fn batch_progress(&self, batch: &str) -> Result<Progress, StoreError> {
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

    /// Jobs of a batch not yet ended in the store.
    pub async fn unfinished_batch_jobs(&self, batch: &str) -> Result<Vec<u64>, StoreError> {
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

    /// Marks every job of `batch` still queued in the store as cancelled (durable on return).
    pub async fn cancel_batch_jobs(&self, batch: &str, now_ms: u64) -> Result<usize, StoreError> {
        let batch = batch.to_string();
        self.with_conn(move |conn, _| Ok(cancel_jobs(conn, &batch, now_ms)?))
            .await
    }

    /// At startup, before unfinished jobs are loaded: the jobs of batches being cancelled or
    /// past their window are marked cancelled, so none of them starts again.
    pub async fn settle_ending_batches(&self, now_s: u64) -> Result<usize, StoreError> {
        self.with_conn(move |conn, _| {
            let records: Vec<String> = conn
                .prepare(
                    "SELECT record FROM batches WHERE status IN ('in_progress', 'cancelling')",
                )?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut n = 0;
            for r in records {
                let b = parse_batch(r)?;
                if b.status == BatchStatus::Cancelling || b.expires_at <= now_s {
                    n += cancel_jobs(conn, &b.id, now_s * 1000)?;
                }
            }
            Ok(n)
        })
        .await
    }

    /// Every line of a batch in input order, with the job that answered it.
    pub async fn batch_results(&self, batch: &str) -> Result<Vec<LineResult>, StoreError> {
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

    /// Ends a batch in one transaction: its output and error files and its final record.
    pub async fn finish_batch(&self, batch: Batch, files: Vec<NewFile>) -> Result<(), StoreError> {
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

fn cancel_jobs(conn: &Connection, batch: &str, now_ms: u64) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE jobs SET state = 'cancelled', finished_ms = ?2
         WHERE state = 'queued' AND id IN (SELECT job_id FROM batch_requests WHERE batch_id = ?1)",
        params![batch, now_ms as i64],
    )
}
