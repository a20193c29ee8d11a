//! The Batch API's objects in OpenAI's shapes: [`FileObject`], [`Batch`] with its
//! [`BatchStatus`] lifecycle and [`RequestCounts`], and the paginated [`ListPage`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `purpose` of a file the client uploads for a batch.
pub const PURPOSE_BATCH: &str = "batch";
/// `purpose` of the output and error files a batch writes.
pub const PURPOSE_BATCH_OUTPUT: &str = "batch_output";

/// A stored file as `GET /v1/files/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    pub status_details: Option<String>,
    pub expires_at: Option<u64>,
}

impl FileObject {
    pub fn new(id: String, bytes: u64, created_at: u64, filename: String, purpose: &str) -> Self {
        Self {
            id,
            object: "file".into(),
            bytes,
            created_at,
            filename,
            purpose: purpose.into(),
            status: "processed".into(),
            status_details: None,
            expires_at: None,
        }
    }
}

/// Where a batch is in its life (the store's, which keeps it beside each batch).
pub use tokenfleet_store::BatchStatus;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// A batch as `GET /v1/batches/{id}` shows it; stored as this JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub object: String,
    pub endpoint: String,
    pub errors: Option<Value>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: u64,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// One page of a list endpoint: `{"object": "list", "data", "first_id", "last_id", "has_more"}`.
#[derive(Debug, Clone, Serialize)]
pub struct ListPage<T: Serialize> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

impl<T: Serialize> ListPage<T> {
    pub fn new(data: Vec<T>, has_more: bool, id: impl Fn(&T) -> String) -> Self {
        Self {
            object: "list",
            first_id: data.first().map(&id),
            last_id: data.last().map(&id),
            data,
            has_more,
        }
    }
}
