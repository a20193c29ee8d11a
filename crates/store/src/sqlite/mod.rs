//! The SQLite backend: one file in WAL mode, versioned migrations, one thread that owns the
//! connection and commits in groups. Implements every store trait on one [`SqliteStore`].
//!
//! The SQL is plain (no SQLite-only features beyond `WITHOUT ROWID`, `INSERT OR IGNORE` and
//! `RETURNING`). Prompts, outputs and file contents are sealed with the crate's [`Sealer`]
//! before they are written; `secure_delete` zeroes what is deleted.
//!
//! Modules: `commit` (the store thread and its group commit), `migrations` (the schema),
//! `jobs`, `batches`, `registry`, `reputation` (each trait's SQL). They use `rusqlite`, the
//! crate's records and traits, and [`crate::sealing`]; nothing of rusqlite leaves this module.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::sealing::Sealer;
use crate::{StoreError, Stores};

mod batches;
mod commit;
mod jobs;
mod migrations;
mod registry;
mod reputation;

pub use commit::MAX_BATCH;
use commit::{serve, Op, Reply, QUEUE};

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend {
            backend: "sqlite",
            source: Box::new(e),
        }
    }
}

/// Handle to the SQLite store; cheap to clone.
///
/// One thread owns the SQLite connection and commits in groups: it takes every operation
/// waiting in its queue (up to [`MAX_BATCH`]), applies them in queue order inside one
/// transaction (each in its own savepoint, so one failing operation does not undo the others),
/// commits once (one WAL sync with `synchronous=FULL`), and only then answers. Concurrent
/// requests thus share a sync instead of queueing for one each, and nothing is acknowledged
/// before it is durable. A read or connection call (`with_conn`, `queue_exec`) runs in its
/// place in the queue: the writes queued before it are committed first, those queued after it
/// wait for it.
#[derive(Clone)]
pub struct SqliteStore {
    tx: mpsc::Sender<Op>,
    /// Seals and opens prompts and outputs (shared with the store thread).
    sealer: Arc<Sealer>,
    /// Job ids are handed out here, not by SQLite, so a job can be queued (and dispatched)
    /// before the commit that makes it durable; an id is never reused within a run, even when
    /// its insert fails.
    next_id: Arc<AtomicU64>,
}

impl SqliteStore {
    pub fn open(path: &Path, sealer: Sealer) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn, sealer)
    }

    pub fn open_in_memory(sealer: Sealer) -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?, sealer)
    }

    /// This store behind the traits.
    pub fn into_stores(self) -> Stores {
        Stores::new(self)
    }

    fn init(mut conn: Connection, sealer: Sealer) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Deleted rows (purged jobs, rows rewritten by migrations) are overwritten, not left
        // in free pages.
        conn.pragma_update(None, "secure_delete", "ON")?;
        // FULL: a job acknowledged to a client survives power loss, not just a process kill.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations::migrate(&mut conn, &sealer)?;
        let last: u64 =
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM jobs", [], |r| r.get(0))?;
        let next_id = Arc::new(AtomicU64::new(last + 1));
        let (tx, rx) = mpsc::channel(QUEUE);
        let sealer = Arc::new(sealer);
        let thread_sealer = Arc::clone(&sealer);
        std::thread::Builder::new()
            .name("job-store".into())
            .spawn(move || serve(conn, rx, &thread_sealer))
            .map_err(StoreError::Thread)?;
        Ok(Self {
            tx,
            sealer,
            next_id,
        })
    }

    async fn request<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues `op` without waiting for its answer (a write whose failure the store thread
    /// logs); `what` names it in the log when the store has stopped.
    async fn send(&self, op: Op, what: &str) {
        if self.tx.send(op).await.is_err() {
            tracing::error!("job store stopped; {what} not written");
        }
    }

    /// Runs `f` with the connection on the store thread, after every operation queued before it
    /// is committed: reads, and writes that commit on their own outside the group commit.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Sealer) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let sealer = Arc::clone(&self.sealer);
        self.request(|reply| {
            Op::WithConn(Box::new(move |conn| {
                let _ = reply.send(f(conn, &sealer));
            }))
        })
        .await
    }

    /// Queues `f` to run on the store thread after every operation queued before it (and
    /// before every one queued after it), without waiting for it; a failure is logged.
    async fn queue_exec(
        &self,
        f: impl FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static,
    ) {
        let op = Op::WithConn(Box::new(move |conn| {
            if let Err(e) = f(conn) {
                tracing::error!(cause = %e, "job store write failed");
            }
        }));
        if self.tx.send(op).await.is_err() {
            tracing::error!("job store stopped; write not applied");
        }
    }
}

#[cfg(test)]
mod tests;
