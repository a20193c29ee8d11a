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
}
