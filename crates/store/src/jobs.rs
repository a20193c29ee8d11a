//! The job store: every accepted job, its generated tokens and its outcome.
//!
//! Owns the [`JobStore`] trait and its records ([`JobRecord`], [`StoredToken`], [`JobState`],
//! [`Outcome`], [`Durable`]). A job's request is opaque here: the serialized bytes the
//! coordinator gives, sealed at rest by the backend and handed back unchanged. Uses only the
//! crate's [`StoreError`].

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;

use crate::StoreError;

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
    /// The state's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// A stored name back (anything unknown is `Queued`, as it was).
    pub fn parse(s: &str) -> JobState {
        match s {
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Queued,
        }
    }
}

/// A stored job with its tokens. The stores hand out the request as the bytes they were given
/// (`R = Vec<u8>`); the coordinator parses them into its own type with
/// [`JobRecord::try_map_request`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord<R = Vec<u8>> {
    pub id: u64,
    pub public_id: String,
    pub tenant: String,
    pub idempotency_key: Option<String>,
    /// The request as the coordinator serialized it (opaque to the store).
    pub request: R,
    pub state: JobState,
    pub created_ms: u64,
    pub finish_reason: Option<String>,
    pub text_tail: String,
    pub prompt_tokens: u32,
    pub error: Option<String>,
    pub tokens: Vec<StoredToken>,
}

impl<R> JobRecord<R> {
    /// The same job with its request converted by `convert`.
    pub fn try_map_request<S, E>(
        self,
        convert: impl FnOnce(R) -> Result<S, E>,
    ) -> Result<JobRecord<S>, E> {
        Ok(JobRecord {
            request: convert(self.request)?,
            id: self.id,
            public_id: self.public_id,
            tenant: self.tenant,
            idempotency_key: self.idempotency_key,
            state: self.state,
            created_ms: self.created_ms,
            finish_reason: self.finish_reason,
            text_tail: self.text_tail,
            prompt_tokens: self.prompt_tokens,
            error: self.error,
            tokens: self.tokens,
        })
    }
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

/// Resolves when a job queued with [`JobStore::queue_job`] is durable (or could not be stored).
pub struct Durable(Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>);

impl Durable {
    /// What a backend resolves once the job's insert is committed.
    pub fn new(commit: impl Future<Output = Result<(), StoreError>> + Send + 'static) -> Self {
        Self(Box::pin(commit))
    }

    pub async fn wait(self) -> Result<(), StoreError> {
        self.0.await
    }
}

/// Gives a call's result to its caller, or, for a queued write (no caller waits), logs its
/// failure: the job stays recoverable (unpersisted tokens are regenerated after a restart, an
/// unpersisted outcome means the job is re-run from its tokens). Every backend's commit uses it.
pub(crate) fn answer<T>(
    reply: Option<tokio::sync::oneshot::Sender<Result<T, StoreError>>>,
    result: Result<T, StoreError>,
) {
    match reply {
        Some(reply) => {
            let _ = reply.send(result);
        }
        None => {
            if let Err(e) = result {
                tracing::error!(cause = %e, "job store write failed");
            }
        }
    }
}

/// Jobs, their tokens and outcomes. See the crate doc for what is durable when a call returns
/// and in which order queued writes apply.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Inserts a new job and returns its id once it is durable; with an idempotency key
    /// already used by the tenant, returns the existing job's id instead (`Err(existing)` in
    /// the inner result).
    async fn insert_job(
        &self,
        public_id: String,
        tenant: String,
        idempotency_key: Option<String>,
        request: Vec<u8>,
        created_ms: u64,
    ) -> Result<Result<u64, u64>, StoreError>;

    /// Queues the insert of a new job (without idempotency key) and returns its id as soon as
    /// the insert is in the store's queue, with a [`Durable`] to await its commit. Writes
    /// queued later (the job's tokens and outcome) land after it. Lets the caller dispatch the
    /// job while the commit runs; the caller must not answer its client before
    /// [`Durable::wait`] returns Ok.
    async fn queue_job(
        &self,
        public_id: String,
        tenant: String,
        request: Vec<u8>,
        created_ms: u64,
    ) -> Result<(u64, Durable), StoreError>;

    /// Appends tokens `tokens[i]` at indices `start + i` (already-stored indices are kept);
    /// returns once they are durable.
    async fn append_tokens(
        &self,
        job: u64,
        start: u32,
        tokens: Vec<StoredToken>,
    ) -> Result<(), StoreError>;

    /// Writes a job's outcome; returns once it is durable.
    async fn finish_job(&self, job: u64, outcome: Outcome) -> Result<(), StoreError>;

    /// Queues a token append without waiting for it (it lands after every write queued before
    /// it; a failure is logged). Waits only while the store's queue is full.
    async fn queue_tokens(&self, job: u64, start: u32, tokens: Vec<StoredToken>);

    /// Queues an outcome without waiting for it (see [`JobStore::queue_tokens`]).
    async fn queue_finish(&self, job: u64, outcome: Outcome);

    /// Queues the removal of a job's stored tokens so it runs again from scratch: after every
    /// write queued before it (tokens queued earlier go too), before every one queued after it
    /// (the re-run's tokens land on a clean slate). A failure is logged.
    async fn queue_discard_tokens(&self, job: u64);

    /// Returns once every operation queued before it, through any store of this backend, is
    /// committed.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Puts a job that was cancelled (its client went away) back in the `queued` state and
    /// returns it with its tokens; None when it is not a cancelled job. Durable on return.
    async fn reopen_cancelled(&self, job: u64) -> Result<Option<JobRecord>, StoreError>;

    /// Re-opens a finished `done` job for a re-run from scratch (back to `queued`, its tokens
    /// deleted, in one transaction) and returns it; None if it is not a `done` job. Durable on
    /// return.
    async fn reopen_for_rerun(&self, job: u64) -> Result<Option<JobRecord>, StoreError>;

    async fn load_job(&self, job: u64) -> Result<Option<JobRecord>, StoreError>;

    /// Every job not yet ended, with its tokens, by id (for recovery after a restart).
    async fn load_unfinished(&self) -> Result<Vec<JobRecord>, StoreError>;

    /// Deletes jobs that ended before `cutoff_ms` (epoch ms) with their outputs, producer
    /// records and batch lines, except jobs of a batch still running; and batch files created
    /// before the cutoff. Returns how many jobs. Unfinished jobs are never purged.
    async fn purge_finished_before(&self, cutoff_ms: u64) -> Result<usize, StoreError>;
}
