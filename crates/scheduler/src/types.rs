//! Plain data exchanged with the scheduler: ids, the node view, queued jobs and decisions.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::forecast::DepartureForecast;

/// Milliseconds: virtual time in the simulator, unix time in the coordinator.
pub type Millis = u64;

/// A node (vehicle) id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u64);

/// A job id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}", self.0)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job-{}", self.0)
    }
}

/// Service class of a job. Interactive jobs are always considered before batch jobs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobClass {
    Interactive,
    Batch,
}

/// What the scheduler knows about one node. The caller (coordinator or simulator) builds it from
/// the node's session, its governor state and the departure predictor, and re-upserts it when it
/// changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    /// Model names or sha256 digests the node holds.
    pub models: Vec<String>,
    pub slots_total: u32,
    pub slots_busy: u32,
    /// Decode speed of one stream alone, tokens/s.
    pub decode_tps_single: f32,
    /// Aggregate decode speed with all `slots_total` streams busy, tokens/s.
    pub decode_tps_batched: f32,
    /// Prompt processing speed, tokens/s (used to estimate re-prefill after a resume).
    pub prefill_tps: f32,
    /// The governor allows computing (parked, not overheating, inside policy).
    pub eligible: bool,
    pub soc_pct: Option<f32>,
    pub soc_reserve_pct: f32,
    pub plugged_in: bool,
    /// Regions the node's attested location lies in (computed by the caller).
    pub regions: Vec<String>,
    /// Energy tariff where the node is, currency per kWh (0 when unknown).
    pub tariff_per_kwh: f32,
    /// Electrical power while computing, W (whole vehicle awake).
    pub power_w: f32,
    pub link_rtt_ms: f32,
    /// 0..1; 1 = never caught misbehaving.
    pub reputation: f32,
    pub attested: bool,
    /// Predicted remaining parked time.
    pub departure: DepartureForecast,
    /// Batch jobs currently running on the node, oldest first: the preemption candidates.
    #[serde(default)]
    pub running_batch: Vec<JobId>,
    /// True departure time. Only the simulator fills it (for the `oracle` policy); the live
    /// coordinator always leaves it `None`.
    #[serde(default)]
    pub oracle_departure: Option<Millis>,
}

impl NodeView {
    /// Per-stream decode speed the scheduler plans with: the batched aggregate shared by all slots
    /// (conservative: a lone stream is faster).
    pub fn stream_tps(&self) -> f32 {
        if self.slots_total == 0 {
            return 0.0;
        }
        (self.decode_tps_batched / self.slots_total as f32).max(f32::MIN_POSITIVE)
    }

    /// The SoC reserve rule: plugged in, or SoC known and above the reserve.
    pub fn soc_ok(&self) -> bool {
        self.plugged_in || self.soc_pct.is_some_and(|s| s > self.soc_reserve_pct)
    }

    pub fn has_free_slot(&self) -> bool {
        self.slots_busy < self.slots_total
    }
}

/// A job waiting for (or holding) a placement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueuedJob {
    pub id: JobId,
    pub class: JobClass,
    pub model: String,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// Tokens already generated (acknowledged) before a resume.
    pub generated_tokens: u32,
    pub deadline: Option<Millis>,
    /// Allowed regions; `None` = anywhere.
    pub residency: Option<Vec<String>>,
    pub tenant: String,
    /// Never placed on an unattested node.
    pub sensitive: bool,
    pub enqueued_at: Millis,
    /// `Some(n)`: the job is running on `n`; `decide` leaves it alone.
    pub running_on: Option<NodeId>,
}

impl QueuedJob {
    pub fn remaining_tokens(&self) -> u32 {
        self.max_tokens.saturating_sub(self.generated_tokens)
    }
}

/// Start `job` on `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub job: JobId,
    pub node: NodeId,
}

/// Why running work is taken off a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PreemptReason {
    /// An interactive job needed the slot.
    InteractivePriority,
}

/// Stop `job` on `node` and requeue it (its acknowledged tokens are kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preemption {
    pub job: JobId,
    pub node: NodeId,
    pub reason: PreemptReason,
}

/// Why a job is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "kebab-case")]
pub enum RejectReason {
    #[error("no registered node holds the model inside the allowed regions")]
    NoMatchingNode,
    #[error("the deadline has passed")]
    DeadlinePassed,
    #[error("no node is fast enough to finish before the deadline")]
    DeadlineUnreachable,
    #[error("interactive job waited longer than the queue timeout")]
    QueueTimeout,
    #[error("the job has nothing left to generate or an empty model name")]
    InvalidJob,
}

/// Refuse `job`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub job: JobId,
    pub reason: RejectReason,
}

/// Output of one `decide` call. Jobs mentioned nowhere stay queued.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decisions {
    pub assignments: Vec<Assignment>,
    pub preemptions: Vec<Preemption>,
    pub rejections: Vec<Rejection>,
}

impl Decisions {
    pub fn is_empty(&self) -> bool {
        self.assignments.is_empty() && self.preemptions.is_empty() && self.rejections.is_empty()
    }
}
