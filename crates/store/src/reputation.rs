//! The reputation store: what result verification learned of each node, operators' decisions,
//! and which nodes produced each finished job.
//!
//! Owns the [`ReputationStore`] trait and its records. Records are keyed by the node's name
//! (its enrolled identity), so a quarantine survives coordinator restarts and reconnects. A
//! job's producer records go with the job when it is purged. The policy (spot-check rates,
//! when to quarantine) is the coordinator's; this is storage. Uses only the crate's
//! [`StoreError`].

use async_trait::async_trait;

use crate::StoreError;

/// What the store keeps of one node's verified work.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeReputation {
    /// Spot checks passed.
    pub passed: u64,
    /// Spot checks that could not decide.
    pub inconclusive: u64,
    /// Lifetime sums of the sampled-output test: informative tokens, Σ excess, Σ variance.
    pub sampled_tokens: u64,
    pub sampled_excess: f64,
    pub sampled_variance: f64,
    /// (unix ms, reason) once quarantined.
    pub quarantined: Option<(u64, String)>,
    /// (unix ms, reason) when a failure was held by the circuit breaker for an operator.
    pub held: Option<(u64, String)>,
}

/// A node's quarantine state as the store has it (an operator may have changed it).
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorState {
    pub node: String,
    pub quarantined: Option<(u64, String)>,
    pub held: Option<(u64, String)>,
}

/// Where a producer's work stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    Unverified,
    Passed,
    Failed,
    Inconclusive,
}

impl Verification {
    /// The name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Verification::Unverified => "unverified",
            Verification::Passed => "passed",
            Verification::Failed => "failed",
            Verification::Inconclusive => "inconclusive",
        }
    }
}

/// What an operator decides about a quarantined or held node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Release,
    Confirm,
}

/// Node records, producers of finished jobs, operators' decisions.
#[async_trait]
pub trait ReputationStore: Send + Sync {
    /// Every node's record.
    async fn load_reputations(&self) -> Result<Vec<(String, NodeReputation)>, StoreError>;

    /// Queues writing a node's record (see the crate doc on queued writes): its counts
    /// always; its quarantine and hold only with `with_status`, so a pass counted here never
    /// overwrites an operator's decision made in the store meanwhile.
    async fn queue_reputation(
        &self,
        node: &str,
        record: NodeReputation,
        with_status: bool,
        now_ms: u64,
    );

    /// Queues recording that `nodes` produced finished job `job` (unverified).
    async fn queue_producers(&self, job: u64, nodes: Vec<String>, finished_ms: u64);

    /// Queues the verification state of one producer of a job.
    async fn queue_verification(&self, job: u64, node: &str, verification: Verification);

    /// Jobs `node` helped produce that finished at or after `since_ms` and were not verified
    /// good (unverified, inconclusive or failed), oldest first.
    async fn suspect_jobs(&self, node: &str, since_ms: u64) -> Result<Vec<u64>, StoreError>;

    /// Every node's quarantine and hold, by node name.
    async fn operator_states(&self) -> Result<Vec<OperatorState>, StoreError>;

    /// Writes an operator's decision at `now_ms`: `Release` clears quarantine and hold and
    /// starts its record of passes over; `Confirm` quarantines (with the held reason, if any).
    /// Returns false when the node has no record.
    async fn decide(&self, node: &str, decision: Decision, now_ms: u64)
        -> Result<bool, StoreError>;
}
