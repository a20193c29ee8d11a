//! The simulator's scheduler driver: the only place the simulator talks to the scheduler. It can
//! record every input and output as a [`SchedulerTrace`] (through the scheduler's own recorder,
//! the one the live coordinator's decision log uses), and replay a trace, recorded here or by the
//! live coordinator, through the same path.
//!
//! Owns: `Driver` (the scheduler and its trace recorder). May import: no simulator module.

use std::sync::{Arc, Mutex, PoisonError};

use tokenfleet_scheduler::{
    Decisions, Divergence, Millis, NodeId, NodeView, PolicyKind, QueuedJob, Scheduler,
    SchedulerConfig, SchedulerTrace, TraceStep,
};

pub struct Driver {
    sched: Scheduler,
    steps: Option<Arc<Mutex<Vec<TraceStep>>>>,
}

impl Driver {
    pub fn new(policy: PolicyKind, seed: u64, config: SchedulerConfig, record: bool) -> Self {
        let mut sched = Scheduler::with_config(policy, seed, config);
        let steps = record.then(|| {
            let steps = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&steps);
            sched.record_to(Box::new(move |s: &TraceStep| {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(s.clone())
            }));
            steps
        });
        Self { sched, steps }
    }

    pub fn upsert(&mut self, view: NodeView) {
        self.sched.upsert_node(view);
    }

    /// Change a node's dynamic fields in place (see `Scheduler::update_node`).
    pub fn update(&mut self, id: NodeId, f: impl FnOnce(&mut NodeView)) {
        self.sched.update_node(id, f);
    }

    /// Start loading node `id`'s scheduler entry (a hint; see `Scheduler::prefetch_node`).
    pub fn prefetch(&self, id: NodeId) {
        self.sched.prefetch_node(id);
    }

    /// Start loading node `id`'s candidate-set entries (a hint; see
    /// `Scheduler::prefetch_node_sets`).
    pub fn prefetch_sets(&self, id: NodeId) {
        self.sched.prefetch_node_sets(id);
    }

    pub fn remove(&mut self, id: NodeId) {
        self.sched.remove_node(id);
    }

    pub fn decide(&mut self, now: Millis, queue: &[QueuedJob]) -> Decisions {
        self.sched.decide(now, queue)
    }

    pub fn into_trace(self) -> Option<SchedulerTrace> {
        let steps = self.steps?;
        let mut trace = SchedulerTrace::from_header(self.sched.header());
        trace.steps = std::mem::take(&mut *steps.lock().unwrap_or_else(PoisonError::into_inner));
        Some(trace)
    }

    /// Replay a recorded trace through a fresh driver; `Err` at the first divergence.
    pub fn replay(trace: &SchedulerTrace) -> Result<(), Divergence> {
        let mut d = Driver::new(trace.policy, trace.seed, trace.config.clone(), false);
        for (step, s) in trace.steps.iter().enumerate() {
            s.apply_nodes(&mut d.sched);
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
