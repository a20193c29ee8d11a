//! What a job is while the coordinator runs it, and what a client holds to follow one.

use std::time::Instant;

use tokio::sync::watch;

use crate::error::ApiError;
use crate::store::StoredToken;
use crate::validation::ValidRequest;

/// How a job ended.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    Done {
        finish_reason: String,
        text_tail: String,
        prompt_tokens: u32,
    },
    Failed(ApiError),
    Cancelled,
}

/// The part of a job clients read: its tokens so far (each index once, in order) and, at the
/// end, its outcome. Published through a `watch` channel, so a slow reader never holds up the
/// coordinator and never misses a token: it reads from its own index onwards.
#[derive(Debug, Clone, Default)]
pub struct JobView {
    pub tokens: Vec<StoredToken>,
    pub prompt_tokens: u32,
    pub outcome: Option<JobOutcome>,
    /// Times the job's tokens were discarded and it started again from scratch (its node
    /// failed result verification); a reader whose count differs starts over from index 0.
    pub restarts: u32,
}

/// A client's handle on a job.
#[derive(Debug, Clone)]
pub struct JobHandle {
    pub id: u64,
    pub public_id: String,
    pub created_s: u64,
    pub request: ValidRequest,
    pub view: watch::Receiver<JobView>,
}

/// Where a job is in its life inside the manager.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Placement {
    Queued {
        since: Instant,
    },
    Running {
        node: tokenfleet_scheduler::NodeId,
    },
    /// Preempted: the node was told to hand the job back with its tokens (its slot already
    /// counts as free); chunks and the eviction from that node are still taken.
    HandingBack {
        node: tokenfleet_scheduler::NodeId,
        since: Instant,
    },
    Ended,
}

/// The manager's record of a job.
pub struct Job {
    pub id: u64,
    pub public_id: String,
    pub tenant: String,
    pub request: ValidRequest,
    pub created_ms: u64,
    pub accepted: Instant,
    pub view: watch::Sender<JobView>,
    pub placement: Placement,
    /// Tokens already written to the store.
    pub persisted: usize,
    pub first_token_seen: bool,
    /// Times the job was placed on a vehicle.
    pub attempts: u32,
    /// Which node produced the tokens from which index on, in order (for result
    /// verification; tokens recovered after a restart have no producer).
    pub producers: Vec<(tokenfleet_scheduler::NodeId, usize)>,
    /// Admitted through the HTTP API with a client waiting on it (whatever its class): counts
    /// against `max_queued_jobs`. A Batch API line is not (it waits for its window).
    pub followed: bool,
}

impl Job {
    /// Whether `node` was told to hand this job back and has not yet done so.
    pub fn is_handing_back_from(&self, node: tokenfleet_scheduler::NodeId) -> bool {
        matches!(self.placement, Placement::HandingBack { node: n, .. } if n == node)
    }

    pub fn generated(&self) -> usize {
        self.view.borrow().tokens.len()
    }

    pub fn handle(&self) -> JobHandle {
        JobHandle {
            id: self.id,
            public_id: self.public_id.clone(),
            created_s: self.created_ms / 1000,
            request: self.request.clone(),
            view: self.view.subscribe(),
        }
    }
}
