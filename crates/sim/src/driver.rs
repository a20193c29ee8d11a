//! The simulator's scheduler driver: the only place the simulator talks to the scheduler. It can
//! record every input and output as a [`SchedulerTrace`], and replay a trace (recorded here or
//! by the live coordinator) through the same path.

use tokenfleet_scheduler::{
    Decisions, Divergence, Millis, NodeId, NodeView, PolicyKind, QueuedJob, Scheduler,
    SchedulerConfig, SchedulerTrace, TraceStep,
};

pub struct Driver {
    sched: Scheduler,
    trace: Option<SchedulerTrace>,
    upserted: Vec<NodeView>,
    removed: Vec<NodeId>,
}

impl Driver {
    pub fn new(policy: PolicyKind, seed: u64, config: SchedulerConfig, record: bool) -> Self {
        Self {
            trace: record.then(|| SchedulerTrace::new(policy, seed, config.clone())),
            sched: Scheduler::with_config(policy, seed, config),
            upserted: Vec::new(),
            removed: Vec::new(),
        }
    }

    pub fn upsert(&mut self, view: NodeView) {
        if self.trace.is_some() {
            self.upserted.push(view.clone());
        }
        self.sched.upsert_node(view);
    }

    /// Change a node's dynamic fields in place (see `Scheduler::update_node`). When recording,
    /// the trace gets the resulting full view, so a replay upserts exactly the same state.
    pub fn update(&mut self, id: NodeId, f: impl FnOnce(&mut NodeView)) {
        if self.sched.update_node(id, f) && self.trace.is_some() {
            if let Some(v) = self.sched.node(id) {
                self.upserted.push(v.clone());
            }
        }
    }

    pub fn remove(&mut self, id: NodeId) {
        if self.trace.is_some() {
            self.removed.push(id);
        }
        self.sched.remove_node(id);
    }

    pub fn decide(&mut self, now: Millis, queue: &[QueuedJob]) -> Decisions {
        let d = self.sched.decide(now, queue);
        if let Some(t) = &mut self.trace {
            t.steps.push(TraceStep {
                now,
                nodes_upserted: std::mem::take(&mut self.upserted),
                nodes_removed: std::mem::take(&mut self.removed),
                queue: queue.to_vec(),
                decisions: d.clone(),
            });
        }
        d
    }

    pub fn into_trace(self) -> Option<SchedulerTrace> {
        self.trace
    }

    /// Replay a recorded trace through a fresh driver; `Err` at the first divergence.
    pub fn replay(trace: &SchedulerTrace) -> Result<(), Divergence> {
        let mut d = Driver::new(trace.policy, trace.seed, trace.config.clone(), false);
        for (step, s) in trace.steps.iter().enumerate() {
            for n in &s.nodes_upserted {
                d.upsert(n.clone());
            }
            for id in &s.nodes_removed {
                d.remove(*id);
            }
            let got = d.decide(s.now, &s.queue);
            if got != s.decisions {
                return Err(Divergence {
                    step,
                    now: s.now,
                    expected: Box::new(s.decisions.clone()),
                    actual: Box::new(got),
                });
            }
        }
        Ok(())
    }
}
