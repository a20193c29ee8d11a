//! "One code path": a recorded log of scheduler inputs and outputs, and `replay`, which feeds the
//! inputs through a fresh `Scheduler` and checks that the decisions are identical. The simulator
//! records such traces; the live coordinator records the same structure.

use serde::{Deserialize, Serialize};

use crate::policy::{PolicyKind, SchedulerConfig};
use crate::scheduler::Scheduler;
use crate::types::{Decisions, Millis, NodeId, NodeView, QueuedJob};

/// One `decide` call with the node changes that preceded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceStep {
    pub now: Millis,
    pub nodes_upserted: Vec<NodeView>,
    pub nodes_removed: Vec<NodeId>,
    pub queue: Vec<QueuedJob>,
    pub decisions: Decisions,
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
        for n in &step.nodes_upserted {
            s.upsert_node(n.clone());
        }
        for id in &step.nodes_removed {
            s.remove_node(*id);
        }
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
