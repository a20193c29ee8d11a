//! What a caller hands a run: [`RunOptions`] (overrides and hooks), the [`Progress`] callback
//! type, and the errors a run reports ([`SimError`]).
//!
//! Owns: `RunOptions`, `Progress`, `ProgressFn`, `SimError`, `DEFAULT_THREADS`.
//! May import: `workload` (for its trace error) and the scheduler and vehicle crates; no other
//! module of the simulator.

use std::sync::Arc;

use tokenfleet_scheduler::{PolicyKind, SchedulerConfig};

use crate::workload;

/// Progress of a run, reported about once per simulated hour.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    pub policy: PolicyKind,
    /// 0..=1 of the measurement window.
    pub fraction: f64,
}

/// Callback for progress bars.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// Per-run overrides and hooks.
#[derive(Clone, Default)]
pub struct RunOptions {
    pub seed: Option<u64>,
    pub vehicles: Option<u32>,
    pub days: Option<f64>,
    /// Scheduler tunables for this run; `None`: the scenario's `[scheduler]` table.
    pub scheduler: Option<SchedulerConfig>,
    /// Record every scheduler call (for small runs: the trace holds full node views).
    pub record_trace: bool,
    pub progress: Option<ProgressFn>,
    /// Threads to simulate the run's partitions on (one per model; see `run_checked`);
    /// `None`: [`DEFAULT_THREADS`]. The report does not depend on it.
    pub threads: Option<usize>,
}

/// Threads when `RunOptions::threads` is not set.
pub const DEFAULT_THREADS: usize = 2;

/// Errors from `run_checked`.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Trace(#[from] workload::TraceError),
    #[error("archetype {archetype}: governor policy: {source}")]
    Policy {
        archetype: usize,
        #[source]
        source: tokenfleet_vehicle::PolicyError,
    },
}
