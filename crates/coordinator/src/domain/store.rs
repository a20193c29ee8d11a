//! The durable stores as the coordinator uses them: [`Store`] holds the `tokenfleet-store`
//! traits ([`Stores`]) of the backend the coordinator opened, and turns the coordinator's
//! types into the stores' records and back (a job's request is stored as the JSON of its
//! [`ValidRequest`]). No SQL here: what is stored where, and the ordering and durability
//! guarantees, are the store crate's (see its crate doc).
//!
//! Uses `tokenfleet-store` and [`crate::openai::validation`]. The Batch API's conversions are in
//! [`crate::batch::store`].

use std::path::Path;

use tokenfleet_store::postgres::PostgresStore;
use tokenfleet_store::sqlite::SqliteStore;
use tokenfleet_store::{
    BatchStore, ClaimStore, JobRecord, JobStore, RegistryStore, ReputationStore, Sealer, Stores,
};

pub use tokenfleet_store::{
    Claim, Durable, JobState, Outcome, Ownership, Renewal, StoreError, StoredToken,
};

use crate::domain::request::ValidRequest;

/// A job with its tokens, its request parsed back.
pub type StoredJob = JobRecord<ValidRequest>;

/// A request as the stores keep it.
pub(crate) fn request_bytes(request: &ValidRequest) -> Result<Vec<u8>, StoreError> {
    Ok(serde_json::to_vec(request)?)
}

/// A stored job with its request parsed.
pub(crate) fn parse_job(record: JobRecord) -> Result<StoredJob, StoreError> {
    record.try_map_request(|request| Ok(serde_json::from_slice(&request)?))
}

/// [`Claim`] with the request parsed.
#[derive(Debug)]
pub enum ClaimedJob {
    Claimed(Box<StoredJob>),
    Held {
        owner: String,
        lease_left: std::time::Duration,
    },
    Ended,
    Missing,
}

/// Handle to the stores; cheap to clone.
#[derive(Clone)]
pub struct Store {
    stores: Stores,
}

impl Store {
    /// The PostgreSQL store at `url` (migrated on connect). Call inside the runtime that will
    /// run the store's task.
    pub async fn connect_postgres(url: &str, sealer: Sealer) -> Result<Self, StoreError> {
        Ok(Self::new(
            PostgresStore::connect(url, sealer).await?.into_stores(),
        ))
    }

    /// The PostgreSQL store at `url` for one of several coordinators on it: its jobs are
    /// claimed, leased and fenced for `ownership` (see `tokenfleet_store::claims`).
    pub async fn connect_postgres_owned(
        url: &str,
        sealer: Sealer,
        ownership: Ownership,
    ) -> Result<Self, StoreError> {
        Ok(Self::new(
            PostgresStore::connect_owned(url, sealer, ownership)
                .await?
                .into_stores(),
        ))
    }

    /// The SQLite store in the file at `path`.
    pub fn open(path: &Path, sealer: Sealer) -> Result<Self, StoreError> {
        Ok(Self::new(SqliteStore::open(path, sealer)?.into_stores()))
    }

    /// A SQLite store in memory (tests).
    pub fn open_in_memory(sealer: Sealer) -> Result<Self, StoreError> {
        Ok(Self::new(
            SqliteStore::open_in_memory(sealer)?.into_stores(),
        ))
    }

    pub fn new(stores: Stores) -> Self {
        Self { stores }
    }

    pub fn jobs(&self) -> &dyn JobStore {
        &*self.stores.jobs
    }

    pub fn claims(&self) -> &dyn ClaimStore {
        &*self.stores.claims
    }

    /// Claims a queued job; see [`ClaimStore::claim_job`].
    pub async fn claim_job(&self, job: u64, steal: bool) -> Result<ClaimedJob, StoreError> {
        Ok(match self.claims().claim_job(job, steal).await? {
            Claim::Claimed(record) => ClaimedJob::Claimed(Box::new(parse_job(record)?)),
            Claim::Held { owner, lease_left } => ClaimedJob::Held { owner, lease_left },
            Claim::Ended => ClaimedJob::Ended,
            Claim::Missing => ClaimedJob::Missing,
        })
    }

    /// Claims orphaned jobs; see [`ClaimStore::claim_orphans`].
    pub async fn claim_orphans(&self, limit: usize) -> Result<Vec<StoredJob>, StoreError> {
        let records = self.claims().claim_orphans(limit).await?;
        records.into_iter().map(parse_job).collect()
    }

    pub fn batches(&self) -> &dyn BatchStore {
        &*self.stores.batches
    }

    pub fn registry(&self) -> &dyn RegistryStore {
        &*self.stores.registry
    }

    pub fn reputation(&self) -> &dyn ReputationStore {
        &*self.stores.reputation
    }

    /// Inserts a new job; see [`JobStore::insert_job`].
    pub async fn insert_job(
        &self,
        public_id: String,
        tenant: String,
        idempotency_key: Option<String>,
        request: &ValidRequest,
        created_ms: u64,
    ) -> Result<Result<u64, u64>, StoreError> {
        let request = request_bytes(request)?;
        self.jobs()
            .insert_job(public_id, tenant, idempotency_key, request, created_ms)
            .await
    }

    /// Queues the insert of a new job; see [`JobStore::queue_job`].
    pub async fn queue_job(
        &self,
        public_id: String,
        tenant: String,
        request: &ValidRequest,
        created_ms: u64,
    ) -> Result<(u64, Durable), StoreError> {
        let request = request_bytes(request)?;
        self.jobs()
            .queue_job(public_id, tenant, request, created_ms)
            .await
    }

    /// Writes a job's outcome; returns once it is durable.
    pub async fn finish_job(&self, job: u64, outcome: Outcome) -> Result<(), StoreError> {
        self.jobs().finish_job(job, outcome).await
    }

    /// Returns once every operation queued before it is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.jobs().flush().await
    }

    pub async fn load_job(&self, job: u64) -> Result<Option<StoredJob>, StoreError> {
        self.jobs().load_job(job).await?.map(parse_job).transpose()
    }

    /// Every job not yet ended, with its tokens (for recovery after a restart).
    pub async fn load_unfinished(&self) -> Result<Vec<StoredJob>, StoreError> {
        let records = self.jobs().load_unfinished().await?;
        records.into_iter().map(parse_job).collect()
    }

    /// Puts a cancelled job back in the `queued` state; see [`JobStore::reopen_cancelled`].
    pub async fn reopen_cancelled(&self, job: u64) -> Result<Option<StoredJob>, StoreError> {
        self.jobs()
            .reopen_cancelled(job)
            .await?
            .map(parse_job)
            .transpose()
    }
}
