//! `tokenfleet-store`: the coordinator's durable stores, as traits with a backend seam.
//!
//! Everything a client was promised lives here before the client hears back: the job (its
//! request, seed included) is committed before any byte is returned (it may already be running
//! on a vehicle while that commit syncs), generated tokens are appended in small batches, and
//! the outcome is written when the job ends. After a crash the coordinator reloads unfinished
//! jobs with their tokens and resumes them from the last persisted token. Files and batches
//! (the Batch API), the fleet registry and node reputation live in the same database.
//!
//! The stores know no coordinator type: a job's request and a batch's object are opaque bytes
//! and JSON that the coordinator serializes and parses. Prompts, outputs and file contents are
//! sealed ([`sealing`]) before a backend writes them.
//!
//! # Layout
//! - [`jobs`]: [`JobStore`], jobs, their tokens ([`StoredToken`]) and outcomes ([`Outcome`]).
//! - [`batches`]: [`BatchStore`], files, batches ([`BatchStatus`]) and batch lines.
//! - [`claims`]: [`ClaimStore`], which coordinator owns a job when several share a database
//!   (owner, lease, epoch; fenced writes).
//! - [`registry`]: [`RegistryStore`], enrollment tokens, certificates, attestation keys,
//!   revocations.
//! - [`reputation`]: [`ReputationStore`], node records, producers of jobs, operators'
//!   decisions.
//! - [`error`]: [`StoreError`], the one error of every store.
//! - [`sealing`]: at-rest encryption of prompts and outputs; key files and rotation.
//! - [`sqlite`]: the SQLite backend ([`sqlite::SqliteStore`], every trait; the schema's
//!   migrations; the group-commit thread). The embedded default: one coordinator, one file.
//! - [`postgres`]: the PostgreSQL backend ([`postgres::PostgresStore`], every trait; its
//!   migrations under an advisory lock; the group-commit task; job ids in blocks from a
//!   sequence), for several coordinators on one database.
//! - `suite` (tests only): the behaviour every backend is tested for, run by each backend's
//!   `tests` module.
//!
//! # Ordering contract (every backend)
//! A backend is one ordered queue shared by its four stores: every call applies after every
//! call submitted before it on the same backend, through any of its stores, and before every
//! call submitted after it.
//! - **Durable on return.** A call that returns a `Result` returns only once what it wrote is
//!   durable (survives a crash and a power loss) — except [`JobStore::queue_job`], which
//!   returns once the insert is queued, with a [`Durable`] that resolves when it is durable.
//!   Nothing is acknowledged before it is durable. A read sees every write submitted before
//!   it.
//! - **Queued writes.** The `queue_*` calls return once the write is in the queue (they wait
//!   only for room in it: backpressure, never an ever-growing buffer) and apply in submission
//!   order with everything else; so a job's insert, token batches, discards and outcome land
//!   in the order they were submitted. Their failure is logged, not returned: the job stays
//!   recoverable (unpersisted tokens are regenerated after a restart, an unpersisted outcome
//!   means the job is re-run from its tokens). [`JobStore::flush`] waits for all of them.
//! - **Group commit.** Writes that wait in the queue together may share one commit (one
//!   sync). Each is applied on its own: a failing write is undone alone and answered with its
//!   error, the others in its group commit. A call that writes several rows (starting or
//!   ending a batch, re-opening a job for a re-run, the retention purge) is atomic.
//! - **Ids.** Job ids are handed out by the store when a job is submitted, increasing, never
//!   reused within a run (not even after a failed insert), and continue after the highest
//!   stored id when a store is opened. (Per backend instance: several PostgreSQL stores on
//!   one database hand out disjoint ids, each its own increasing.)
//!
//! # Why `async_trait`
//! The coordinator holds its stores as trait objects ([`Stores`]: `Arc<dyn JobStore>`, ...),
//! so the backend is chosen when the coordinator starts, not by a type parameter threaded
//! through every task and handler. `async fn` in traits (and return-position `impl Future`) is
//! not object-safe; `async_trait` boxes each call's future instead: one allocation per call,
//! next to a channel round trip and usually a disk sync.

pub mod batches;
pub mod claims;
pub mod error;
pub mod jobs;
pub mod postgres;
pub mod registry;
pub mod reputation;
pub mod sealing;
pub mod sqlite;

#[cfg(test)]
mod suite;

use std::sync::Arc;

pub use batches::{
    BatchLine, BatchRecord, BatchStatus, BatchStore, FileRecord, LineResult, NewFile, OverLimit,
    Progress,
};
pub use claims::{Claim, ClaimStore, Ownership, Renewal};
pub use error::StoreError;
pub use jobs::{Durable, JobRecord, JobState, JobStore, Outcome, StoredToken};
pub use registry::{EnrollmentToken, IssuedCertificate, RegistryStore};
pub use reputation::{Decision, NodeReputation, OperatorState, ReputationStore, Verification};
pub use sealing::{SealError, Sealer};

/// One backend's stores as trait objects; cheap to clone. All five share the backend's queue
/// (see the ordering contract above).
#[derive(Clone)]
pub struct Stores {
    pub jobs: Arc<dyn JobStore>,
    pub claims: Arc<dyn ClaimStore>,
    pub batches: Arc<dyn BatchStore>,
    pub registry: Arc<dyn RegistryStore>,
    pub reputation: Arc<dyn ReputationStore>,
}

impl Stores {
    /// Every store of `backend`.
    pub fn new<B>(backend: B) -> Self
    where
        B: JobStore + ClaimStore + BatchStore + RegistryStore + ReputationStore + 'static,
    {
        let backend = Arc::new(backend);
        Self {
            jobs: backend.clone(),
            claims: backend.clone(),
            batches: backend.clone(),
            registry: backend.clone(),
            reputation: backend,
        }
    }
}
