//! The Batch API's view of the batch store: OpenAI-shaped [`FileObject`]s and [`Batch`]es in
//! and out of the store's records, and the restart rule for batches that were ending.
//!
//! No SQL here: files, batches and batch lines are stored by [`tokenfleet_store::BatchStore`]
//! (one transaction per batch start and end, so each `custom_id` is answered exactly once).
//! Uses the store crate, [`crate::domain::store`] (jobs' requests) and [`crate::batch::types`].

use tokenfleet_store::{BatchRecord, FileRecord, Progress};

pub use tokenfleet_store::{NewFile, OverLimit};

use crate::batch::types::{Batch, BatchStatus, FileObject, RequestCounts};
use crate::domain::request::ValidRequest;
use crate::domain::store::{parse_job, request_bytes, Store, StoreError, StoredJob};

impl From<&FileObject> for FileRecord {
    fn from(f: &FileObject) -> Self {
        FileRecord {
            id: f.id.clone(),
            bytes: f.bytes,
            created_s: f.created_at,
            filename: f.filename.clone(),
            purpose: f.purpose.clone(),
        }
    }
}

impl From<FileRecord> for FileObject {
    fn from(r: FileRecord) -> Self {
        FileObject::new(r.id, r.bytes, r.created_s, r.filename, &r.purpose)
    }
}

/// One line of a batch after validation: a job to run, or the error that stopped it.
pub type BatchLine = tokenfleet_store::BatchLine<ValidRequest>;

/// A batch line with what answered it, for the output and error files.
pub type LineResult = tokenfleet_store::LineResult<ValidRequest>;

impl From<Progress> for RequestCounts {
    fn from(p: Progress) -> Self {
        RequestCounts {
            total: p.total,
            completed: p.done,
            failed: p.failed,
        }
    }
}

fn record(batch: &Batch) -> Result<BatchRecord, StoreError> {
    Ok(BatchRecord {
        id: batch.id.clone(),
        status: batch.status,
        json: serde_json::to_string(batch)?,
    })
}

fn parse_batch(record: BatchRecord) -> Result<Batch, StoreError> {
    Ok(serde_json::from_str(&record.json)?)
}

impl Store {
    /// Stores an uploaded file within its tenant's limits; see
    /// [`tokenfleet_store::BatchStore::insert_file_within`].
    pub async fn insert_file_within(
        &self,
        file: NewFile,
        max_files: u64,
        max_bytes: u64,
    ) -> Result<Result<(), OverLimit>, StoreError> {
        self.batches()
            .insert_file_within(file, max_files, max_bytes)
            .await
    }

    /// A tenant's file (None for another tenant's).
    pub async fn file(&self, tenant: &str, id: &str) -> Result<Option<FileObject>, StoreError> {
        Ok(self.batches().file(tenant, id).await?.map(FileObject::from))
    }

    /// A tenant's files, newest first, after the file `after`; and whether more follow.
    pub async fn list_files(
        &self,
        tenant: &str,
        purpose: Option<String>,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<FileObject>, bool), StoreError> {
        let (files, more) = self
            .batches()
            .list_files(tenant, purpose, after, limit)
            .await?;
        Ok((files.into_iter().map(FileObject::from).collect(), more))
    }

    /// Stores a new batch unless its tenant already has `max_active` batches not yet ended.
    pub async fn insert_batch(
        &self,
        tenant: &str,
        batch: Batch,
        max_active: u64,
    ) -> Result<Result<(), OverLimit>, StoreError> {
        self.batches()
            .insert_batch(tenant, record(&batch)?, max_active)
            .await
    }

    /// A tenant's batch (None for another tenant's).
    pub async fn batch(&self, tenant: &str, id: &str) -> Result<Option<Batch>, StoreError> {
        self.batches()
            .batch(tenant, id)
            .await?
            .map(parse_batch)
            .transpose()
    }

    /// A tenant's batches, newest first, after the batch `after`; and whether more follow.
    pub async fn list_batches(
        &self,
        tenant: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Batch>, bool), StoreError> {
        let (records, more) = self.batches().list_batches(tenant, after, limit).await?;
        let batches = records
            .into_iter()
            .map(parse_batch)
            .collect::<Result<_, _>>()?;
        Ok((batches, more))
    }

    /// Writes a batch's record (status, timestamps, counts).
    pub async fn update_batch(&self, batch: Batch) -> Result<(), StoreError> {
        self.batches().update_batch(record(&batch)?).await
    }

    /// Batches the runner still works on, with their tenants, oldest first.
    pub async fn active_batches(&self) -> Result<Vec<(String, Batch)>, StoreError> {
        let active = self.batches().active_batches().await?;
        active
            .into_iter()
            .map(|(tenant, r)| Ok((tenant, parse_batch(r)?)))
            .collect()
    }

    /// Starts a validated batch in one transaction: a job per valid line (queued), a line
    /// per line, and the batch record (now `in_progress`). Returns the new jobs. Nothing is
    /// written if any part fails.
    pub async fn start_batch(
        &self,
        tenant: &str,
        batch: Batch,
        lines: Vec<BatchLine>,
    ) -> Result<Vec<StoredJob>, StoreError> {
        let created_ms = batch.in_progress_at.unwrap_or(batch.created_at) * 1000;
        let lines = lines
            .into_iter()
            .map(|l| {
                Ok(tokenfleet_store::BatchLine {
                    line: l.line,
                    custom_id: l.custom_id,
                    outcome: match l.outcome {
                        Ok(request) => Ok(request_bytes(&request)?),
                        Err(e) => Err(e),
                    },
                })
            })
            .collect::<Result<_, StoreError>>()?;
        let jobs = self
            .batches()
            .start_batch(tenant, record(&batch)?, lines, created_ms)
            .await?;
        jobs.into_iter().map(parse_job).collect()
    }

    /// At startup, before unfinished jobs are loaded: the jobs of batches being cancelled or
    /// past their window are marked cancelled, so none of them starts again.
    pub async fn settle_ending_batches(&self, now_s: u64) -> Result<usize, StoreError> {
        let mut n = 0;
        for (_, b) in self.active_batches().await? {
            let ending = b.status == BatchStatus::Cancelling
                || b.status == BatchStatus::InProgress && b.expires_at <= now_s;
            if ending {
                n += self
                    .batches()
                    .cancel_batch_jobs(&b.id, now_s * 1000)
                    .await?;
            }
        }
        Ok(n)
    }

    /// Every line of a batch in input order, with the job that answered it.
    pub async fn batch_results(&self, batch: &str) -> Result<Vec<LineResult>, StoreError> {
        let results = self.batches().batch_results(batch).await?;
        results
            .into_iter()
            .map(|r| {
                Ok(LineResult {
                    custom_id: r.custom_id,
                    job: r.job.map(parse_job).transpose()?,
                    error: r.error,
                })
            })
            .collect()
    }

    /// Ends a batch in one transaction: its output and error files and its final record.
    pub async fn finish_batch(&self, batch: Batch, files: Vec<NewFile>) -> Result<(), StoreError> {
        self.batches().finish_batch(record(&batch)?, files).await
    }
}
