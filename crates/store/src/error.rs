//! [`StoreError`]: every store's error, whatever the backend. A backend's own error type stays
//! inside it (its message and source are kept in [`StoreError::Backend`]). Uses [`SealError`].

use crate::sealing::SealError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed an operation.
    #[error("{backend}: {source}")]
    Backend {
        /// Which backend (`sqlite`).
        backend: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("stored request is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the job store has stopped")]
    Closed,
    #[error("the job store could not start its thread: {0}")]
    Thread(std::io::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("sealed data: {0}")]
    Seal(#[from] SealError),
    /// A write for a job this coordinator no longer owns: another coordinator claimed it
    /// (this one was presumed dead, or a vehicle moved the job there). Nothing was written.
    #[error("job {job} is owned by another coordinator now; write refused")]
    Fenced { job: u64 },
    /// A batch write that would move the batch from a status it has already left (another
    /// coordinator, or a client's cancel, moved it first). Nothing was written.
    #[error("batch {batch} is no longer in a status that may become {to}")]
    Stale { batch: String, to: &'static str },
}
