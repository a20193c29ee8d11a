//! The PostgreSQL backend: versioned migrations applied at connect, one task that owns the
//! ordered queue and commits in groups, job ids in blocks from a sequence. Implements every
//! store trait on one [`PostgresStore`], for several coordinators sharing one database later.
//!
//! # Why tokio-postgres (with deadpool-postgres)
//! The backend is one task that runs every call in queue order on one connection, inside a
//! group transaction it opens, savepoints and commits itself. `tokio-postgres` is exactly that
//! client: plain SQL on a connection we own, asynchronous on the coordinator's runtime, with
//! no compile-time query checking that needs a database (or checked-in query metadata) to
//! build, and a small dependency tree. `deadpool-postgres` (a maintained pool) adds what one
//! bare connection lacks: a fresh connection after the server restarted or the link broke
//! (the queue keeps going; only the group that was running fails), a per-connection cache of
//! prepared statements (`prepare_cached`), and a second connection for job-id blocks so that
//! `queue_job` never waits behind the queue. sqlx would have served too, at the price of its
//! macros' build-time database or offline files and a larger tree; its runtime API gives
//! nothing this backend uses beyond what tokio-postgres has.
//!
//! # The ordering contract here
//! - One queue per [`PostgresStore`] (every clone and all four stores share it), served by one
//!   task (`commit`): it takes the calls waiting together (up to [`MAX_BATCH`]), runs them
//!   in queue order inside one transaction, each in its own savepoint (a failing call is
//!   rolled back to its savepoint, alone), commits once with `synchronous_commit = on` (one WAL
//!   flush), and only then answers every call of the group, reads included. So a read sees
//!   every call queued before it, and nothing is acknowledged before it is durable.
//! - A call that writes several rows (starting or ending a batch, re-opening a job for a
//!   re-run, the purge) runs inside its one savepoint: all of it or none.
//! - Job ids (`ids`) come from the `job_ids` sequence, whose increment is a block: each
//!   `nextval` hands this store a block of ids no other store gets; within the store ids are
//!   increasing and never reused (a sequence never goes back, not even when the insert fails
//!   or the transaction rolls back), and a store opened later draws a block above every id
//!   handed out before, so ids continue after the highest stored one. Several coordinators
//!   on one database draw disjoint blocks: ids are unique across them, increasing per store.
//!
//! # Several coordinators on one database
//! What one call checks and writes stays right when another coordinator's queue writes the
//! same rows: conditional updates (`redeem_token`, `reopen_*`, `cancel_batch_jobs`) re-check
//! their condition on the row they lock, idempotency keys insert with `ON CONFLICT DO
//! NOTHING` and read the winner, and the per-tenant limits (`insert_file_within`,
//! `insert_batch`) take a transaction advisory lock on the tenant before they count. Locks
//! are held until the group commits; a deadlock between two coordinators' groups is broken
//! by PostgreSQL, failing one call (its savepoint is rolled back, the rest of its group
//! commits).
//!
//! Who runs a job is a claim on its row ([`crate::claims`], `owner`): a store opened with
//! [`PostgresStore::connect_owned`] inserts jobs as its coordinator's, claims others' only
//! when their lease ran out (or, stealing, when a vehicle brought the job over), sweeps
//! orphans with `FOR UPDATE SKIP LOCKED` so that sweeping coordinators never wait on each
//! other, renews its leases, and writes tokens, outcomes and discards only while the row still
//! names it at the epoch of its claim (checked in the same statement, `FOR SHARE`, so a claim
//! waits for the group that writes). Batches need no owner: every batch write moves the batch
//! only forward ([`crate::BatchStatus::may_follow`]), so of two runners the second is refused.
//!
//! Prompts, outputs and file contents are sealed with the crate's [`Sealer`] before they are
//! written, as in every backend.
//!
//! Modules: `commit` (the queue task and its group commit), `ids` (job-id blocks),
//! `migrations` (the schema), `jobs`, `batches`, `registry`, `reputation` (each trait's SQL),
//! `owner` (claims, leases and the fence), `sole` (the lock that keeps a second coordinator off a
//! database when it is not one of a cluster).
//! They use tokio-postgres, deadpool-postgres, the crate's records and traits and
//! [`crate::sealing`]; nothing of either client crate leaves this module.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, Pool, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;

use crate::claims::Ownership;
use crate::sealing::Sealer;
use crate::{StoreError, Stores};

mod batches;
mod commit;
mod ids;
mod jobs;
mod migrations;
mod owner;
mod registry;
mod reputation;
mod sole;

pub use commit::MAX_BATCH;
use commit::{step, BoxFuture, Conn, Reply, Step, QUEUE};
use ids::JobIds;
pub use sole::SoleCoordinator;

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        backend_error(with_causes(&e))
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        backend_error(with_causes(&e))
    }
}

/// An error with its chain of causes: tokio-postgres displays a server error as "db error"
/// alone and keeps what the server said (the constraint, the failed statement's cause) in
/// its source, which is what an operator reading the log needs.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// A connection string (libpq `key=value` or a `postgresql://` URL) as tokio-postgres reads it.
fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    tokio_postgres::Config::from_str(url)
        .map_err(|e| backend_error(format!("connection string: {e}")))
}

/// A failure of this backend that is not the database's (a bad URL, a pool that cannot be
/// built, a schema newer than this build).
fn backend_error(message: String) -> StoreError {
    StoreError::Backend {
        backend: "postgres",
        source: message.into(),
    }
}

/// Connections to the database: the queue task's and the job-id blocks'.
const POOL_SIZE: usize = 2;
/// How long opening one connection may take before the call that needed it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Handle to the PostgreSQL store; cheap to clone. See the module doc for its ordering and
/// its ids.
#[derive(Clone)]
pub struct PostgresStore {
    tx: mpsc::Sender<Step>,
    ids: Arc<JobIds>,
    /// The coordinator this store writes for, when several share the database.
    owner: Option<Arc<owner::Owner>>,
}

impl PostgresStore {
    /// Connects to the database at `url` (a libpq connection string or a `postgresql://` URL,
    /// without TLS), applies the migrations it has not had yet, and starts the store's queue
    /// task on the current tokio runtime (so this must be called inside one; the store stops
    /// when its last handle is dropped or the runtime shuts down).
    pub async fn connect(url: &str, sealer: Sealer) -> Result<Self, StoreError> {
        Self::connect_config(parse_url(url)?, sealer, None).await
    }

    /// [`PostgresStore::connect`] for one of several coordinators on the database: jobs are
    /// claimed, leased and fenced (see [`crate::claims`]) for `ownership`'s coordinator.
    pub async fn connect_owned(
        url: &str,
        sealer: Sealer,
        ownership: Ownership,
    ) -> Result<Self, StoreError> {
        Self::connect_config(parse_url(url)?, sealer, Some(ownership)).await
    }

    /// [`PostgresStore::connect`] with a parsed configuration.
    pub(crate) async fn connect_config(
        mut config: tokio_postgres::Config,
        sealer: Sealer,
        ownership: Option<Ownership>,
    ) -> Result<Self, StoreError> {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let pool = Pool::builder(Manager::new(config, NoTls))
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| backend_error(format!("connection pool: {e}")))?;
        {
            let mut conn = pool.get().await?;
            migrations::migrate(&mut conn).await?;
        }
        let ids = Arc::new(JobIds::new(pool.clone()).await?);
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(commit::serve(pool, rx, Arc::new(sealer)));
        Ok(Self {
            tx,
            ids,
            owner: ownership.map(owner::Owner::new),
        })
    }

    /// This store behind the traits.
    pub fn into_stores(self) -> Stores {
        Stores::new(self)
    }

    /// Runs `f` in its place in the queue (inside its own savepoint of the group transaction)
    /// and returns its answer once the group is committed.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a Conn, &'a Sealer) -> BoxFuture<'a, Result<T, StoreError>>
            + Send
            + 'static,
    {
        let (reply, rx) = oneshot::channel();
        self.enqueue(f, Some(reply)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues `f` (see [`PostgresStore::call`]) without waiting for it; the queue task logs
    /// its failure. Waits only for room in the queue.
    async fn queue<F>(&self, what: &'static str, f: F)
    where
        F: for<'a> FnOnce(&'a Conn, &'a Sealer) -> BoxFuture<'a, Result<(), StoreError>>
            + Send
            + 'static,
    {
        if self.enqueue(f, None).await.is_err() {
            tracing::error!("job store stopped; {what} not written");
        }
    }

    /// Puts `f` in the queue; `reply` (if any) gets its answer after the group's commit.
    async fn enqueue<T, F>(&self, f: F, reply: Option<Reply<T>>) -> Result<(), StoreError>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a Conn, &'a Sealer) -> BoxFuture<'a, Result<T, StoreError>>
            + Send
            + 'static,
    {
        self.tx
            .send(step(f, reply))
            .await
            .map_err(|_| StoreError::Closed)
    }
}

#[cfg(test)]
mod claims_tests;
#[cfg(test)]
mod tests;
