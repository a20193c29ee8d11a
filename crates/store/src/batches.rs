//! The Batch API's store: files, batches, and which job answers which line of a batch.
//!
//! Owns the [`BatchStore`] trait and its records. Every batch line becomes one stored line,
//! written in the same transaction as the jobs that run them (or with its validation error),
//! so each `custom_id` has exactly one answer however often the coordinator restarts, a
//! request is evicted, resumed or retried: the output is built from these lines and the jobs'
//! stored outcomes, once, in the transaction that ends the batch.
//!
//! A batch is stored as the coordinator's JSON object (opaque here) beside the two things the
//! store itself looks at: its id and its [`BatchStatus`]. Uses the job records of
//! [`crate::jobs`] and the crate's [`StoreError`].

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{JobRecord, JobState, StoreError};

/// Where a batch is in its life: `validating → in_progress → finalizing → completed`, or
/// `failed` (nothing in the input could run), `expired` (the completion window ran out),
/// `cancelling → cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    /// A status from its [`BatchStatus::as_str`] name.
    pub fn parse(s: &str) -> Option<BatchStatus> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    pub const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::Failed,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    /// Statuses the batch runner still works on.
    pub const ACTIVE: [BatchStatus; 4] = [
        BatchStatus::Validating,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Cancelling,
    ];

    pub fn is_active(self) -> bool {
        Self::ACTIVE.contains(&self)
    }

    /// The statuses a batch may be in for a write to move it to `self` (or keep it there).
    /// Every backend checks it on the row it updates, so that of two writers racing on one
    /// batch (two coordinators' runners, or a runner and a client's cancel) the one that read
    /// an old status loses ([`crate::StoreError::Stale`]): a cancelled batch is never put back
    /// in progress, and a batch ends, and writes its output files, once.
    pub fn may_follow(self) -> &'static [BatchStatus] {
        use BatchStatus::*;
        match self {
            Validating => &[Validating],
            InProgress => &[Validating, InProgress],
            Finalizing => &[InProgress, Finalizing],
            Cancelling => &[Validating, InProgress, Cancelling],
            Completed => &[Finalizing],
            Expired => &[InProgress],
            Cancelled => &[Cancelling],
            Failed => &[Validating, InProgress, Finalizing, Cancelling],
        }
    }
}

/// A stored file's description (its content is read separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub id: String,
    pub bytes: u64,
    /// Unix seconds.
    pub created_s: u64,
    pub filename: String,
    pub purpose: String,
}

/// A file to store.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub file: FileRecord,
    pub tenant: String,
    pub content: Vec<u8>,
}

/// A stored batch: what the store looks at, and the coordinator's object as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    pub id: String,
    pub status: BatchStatus,
    /// The whole batch object, serialized by the coordinator (opaque to the store).
    pub json: String,
}

/// One line of a batch after validation: a job to run (its request; the stores take it
/// serialized, `R = Vec<u8>`, opaque to them), or the error that stopped it.
#[derive(Debug, Clone)]
pub struct BatchLine<R = Vec<u8>> {
    pub line: u32,
    pub custom_id: String,
    pub outcome: Result<R, serde_json::Value>,
}

/// A batch line with what answered it, for the output and error files (the job's request as
/// in [`JobRecord`]).
#[derive(Debug)]
pub struct LineResult<R = Vec<u8>> {
    pub custom_id: String,
    /// The job that ran the line (None: the line did not pass validation).
    pub job: Option<JobRecord<R>>,
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

/// The job that runs a valid batch line, as a backend's `start_batch` stores it: queued,
/// under a fresh public id, with no idempotency key.
pub(crate) fn batch_job(id: u64, tenant: &str, request: Vec<u8>, created_ms: u64) -> JobRecord {
    JobRecord {
        id,
        public_id: format!("batch_req_{}", hex::encode(rand::random::<[u8; 12]>())),
        tenant: tenant.to_string(),
        idempotency_key: None,
        request,
        state: JobState::Queued,
        created_ms,
        finish_reason: None,
        text_tail: String::new(),
        prompt_tokens: 0,
        error: None,
        tokens: Vec::new(),
    }
}

/// Up to `limit` rows of a list page fetched with `LIMIT limit + 1`, and whether more follow.
pub(crate) fn page<T>(mut rows: Vec<T>, limit: usize) -> (Vec<T>, bool) {
    let more = rows.len() > limit;
    rows.truncate(limit);
    (rows, more)
}

/// A tenant's limit that a new file or batch would pass (nothing was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// Uploaded files the tenant holds already (count, bytes).
    Files { count: u64, bytes: u64 },
    /// Batches of the tenant not yet ended.
    ActiveBatches(u64),
}

/// Files, batches and batch lines. Lookups by id are per tenant: another tenant's file or
/// batch is not found.
#[async_trait]
pub trait BatchStore: Send + Sync {
    /// Stores an uploaded file unless its tenant would then hold more than `max_files` files
    /// of its purpose or more than `max_bytes` in them. Checked and written in one store
    /// operation, so concurrent uploads cannot both slip under the limit.
    async fn insert_file_within(
        &self,
        file: NewFile,
        max_files: u64,
        max_bytes: u64,
    ) -> Result<Result<(), OverLimit>, StoreError>;

    async fn file(&self, tenant: &str, id: &str) -> Result<Option<FileRecord>, StoreError>;

    async fn file_content(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// A tenant's files, newest first, after the file `after`; and whether more follow.
    async fn list_files(
        &self,
        tenant: &str,
        purpose: Option<String>,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<FileRecord>, bool), StoreError>;

    /// Deletes a tenant's file; false when there is none.
    async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError>;

    /// Stores a new batch unless its tenant already has `max_active` batches not yet ended
    /// (checked and written in one store operation).
    async fn insert_batch(
        &self,
        tenant: &str,
        batch: BatchRecord,
        max_active: u64,
    ) -> Result<Result<(), OverLimit>, StoreError>;

    async fn batch(&self, tenant: &str, id: &str) -> Result<Option<BatchRecord>, StoreError>;

    /// A tenant's batches, newest first, after the batch `after`; and whether more follow.
    async fn list_batches(
        &self,
        tenant: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<BatchRecord>, bool), StoreError>;

    /// Writes a batch's record.
    async fn update_batch(&self, batch: BatchRecord) -> Result<(), StoreError>;

    /// Batches the runner still works on ([`BatchStatus::ACTIVE`]), with their tenants,
    /// oldest first.
    async fn active_batches(&self) -> Result<Vec<(String, BatchRecord)>, StoreError>;

    /// Starts a validated batch in one transaction: a job per valid line (queued, created at
    /// `created_ms`), a stored line per line, and the batch record. Returns the new jobs.
    /// Nothing is written if any part fails.
    async fn start_batch(
        &self,
        tenant: &str,
        batch: BatchRecord,
        lines: Vec<BatchLine>,
        created_ms: u64,
    ) -> Result<Vec<JobRecord>, StoreError>;

    /// How far a batch's lines got.
    async fn batch_progress(&self, batch: &str) -> Result<Progress, StoreError>;

    /// Jobs of a batch not yet ended in the store.
    async fn unfinished_batch_jobs(&self, batch: &str) -> Result<Vec<u64>, StoreError>;

    /// Marks every job of `batch` still queued in the store as cancelled (durable on return).
    async fn cancel_batch_jobs(&self, batch: &str, now_ms: u64) -> Result<usize, StoreError>;

    /// Every line of a batch in input order, with the job that answered it.
    async fn batch_results(&self, batch: &str) -> Result<Vec<LineResult>, StoreError>;

    /// Ends a batch in one transaction: its output and error files and its final record.
    async fn finish_batch(&self, batch: BatchRecord, files: Vec<NewFile>)
        -> Result<(), StoreError>;
}
