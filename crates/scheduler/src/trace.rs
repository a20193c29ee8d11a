//! "One code path": a recorded log of scheduler inputs and outputs, and `replay`, which feeds the
//! inputs through a fresh `Scheduler` and checks that the decisions are identical. The simulator
//! records such traces; the live coordinator records the same structure.

use serde::{Deserialize, Serialize};

use crate::policy::{PolicyKind, SchedulerConfig};
use crate::scheduler::Scheduler;
use crate::types::{Decisions, Millis, NodeId, NodeView, QueuedJob};

/// A change to the scheduler's fleet view, in the order it was made (the order matters: it
/// decides slot reuse and candidate-set order, hence which nodes a seeded sample sees).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeChange {
    /// `upsert_node` (and `update_node`, recorded as the resulting full view).
    Upsert(NodeView),
    Remove(NodeId),
}

/// One `decide` call with the node changes that preceded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceStep {
    pub now: Millis,
    pub nodes: Vec<NodeChange>,
    pub queue: Vec<QueuedJob>,
    pub decisions: Decisions,
}

impl TraceStep {
    /// Apply this step's node changes to `s` (before its `decide`).
    pub fn apply_nodes(&self, s: &mut Scheduler) {
        for c in &self.nodes {
            match c {
                NodeChange::Upsert(v) => s.upsert_node(v.clone()),
                NodeChange::Remove(id) => s.remove_node(*id),
            }
        }
    }
}

/// What a replay needs besides the steps: the first line of a JSON-lines decision log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceHeader {
    pub policy: PolicyKind,
    pub seed: u64,
    #[serde(default)]
    pub config: SchedulerConfig,
}

/// Receives every recorded step right after the `decide` call it describes (see
/// [`Scheduler::record_to`]). The caller decides where steps go (a file, memory).
pub type StepSink = Box<dyn FnMut(&TraceStep) + Send>;

/// The node changes since the last `decide`, and where finished steps go.
pub(crate) struct Recorder {
    pub sink: StepSink,
    pub nodes: Vec<NodeChange>,
}

impl Recorder {
    pub fn step(&mut self, now: Millis, queue: &[QueuedJob], decisions: &Decisions) {
        let step = TraceStep {
            now,
            nodes: std::mem::take(&mut self.nodes),
            queue: queue.to_vec(),
            decisions: decisions.clone(),
        };
        (self.sink)(&step);
    }
}

/// A recorded scheduler session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerTrace {
    pub policy: PolicyKind,
    pub seed: u64,
    #[serde(default)]
    pub config: SchedulerConfig,
    pub steps: Vec<TraceStep>,
}

impl SchedulerTrace {
    pub fn new(policy: PolicyKind, seed: u64, config: SchedulerConfig) -> Self {
        Self {
            policy,
            seed,
            config,
            steps: Vec::new(),
        }
    }

    pub fn from_header(header: TraceHeader) -> Self {
        Self::new(header.policy, header.seed, header.config)
    }
}

/// The first step at which a replay decided differently.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("replay diverged at step {step} (now = {now}): expected {expected:?}, got {actual:?}")]
pub struct Divergence {
    pub step: usize,
    pub now: Millis,
    pub expected: Box<Decisions>,
    pub actual: Box<Decisions>,
}

/// Replay `trace` through a fresh scheduler; `Err` at the first differing decision.
pub fn replay(trace: &SchedulerTrace) -> Result<(), Divergence> {
    let mut s = Scheduler::with_config(trace.policy, trace.seed, trace.config.clone());
    for (i, step) in trace.steps.iter().enumerate() {
        step.apply_nodes(&mut s);
        let got = s.decide(step.now, &step.queue);
        if got != step.decisions {
            return Err(Divergence {
                step: i,
                now: step.now,
                expected: Box::new(step.decisions.clone()),
                actual: Box::new(got),
            });
        }
    }
    Ok(())
}
