//! tokenfleet fleet simulator: discrete-event, virtual time, deterministic from a seed, running
//! the real `tokenfleet-scheduler` through the same driver API the coordinator uses.
//!
//! Layout:
//! - [`scenario`]: scenario TOML files (`scenarios/`), `Scenario::from_file` / `from_name`.
//! - [`compute`]: compute classes as data files (`data/`), with their sources.
//! - [`vehicle_model`]: archetypes and dwell, charging, battery wear, and each vehicle's
//!   `tokenfleet-vehicle` governor (its policy and the signals it is stepped with).
//! - [`workload`]: diurnal Poisson interactive requests, batch dumps, JSON-lines traces.
//! - [`driver`]: the scheduler driver; records and replays [`SchedulerTrace`]s.
//! - `queue`: the calendar event queue.
//! - `engine` / `jobs`: the event loop, vehicles, job execution, evictions with continuation.
//! - [`metrics`]: [`RunReport`], [`CompareReport`].
//! - [`report`]: the readable text report; [`plot`]: PNG/SVG plots with plotters.
//! - `rng`: seeded distributions.

pub mod compute;
pub mod driver;
mod engine;
mod fleet;
mod jobs;
pub mod metrics;
mod partition;
pub mod plot;
mod queue;
pub mod report;
mod rng;
pub mod scenario;
pub mod vehicle_model;
pub mod workload;

use std::sync::Arc;

pub use metrics::{CompareReport, RunReport};
pub use scenario::{Scenario, ScenarioError};
pub use tokenfleet_scheduler::{PolicyKind, SchedulerConfig, SchedulerTrace};

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

pub use partition::DEFAULT_THREADS;

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

/// Run one policy on a scenario. A workload trace that cannot be read is reported by
/// [`run_checked`]; `run` then falls back to the generated workload.
pub fn run(scenario: &Scenario, policy: PolicyKind, opts: &RunOptions) -> RunReport {
    match run_checked(scenario, policy, opts) {
        Ok((r, _)) => r,
        Err(_) => {
            let mut sc = scenario.clone();
            sc.workload.trace = None;
            run_checked(&sc, policy, opts)
                .map(|(r, _)| r)
                .unwrap_or_default()
        }
    }
}

/// Run one policy; also returns the scheduler traces when `opts.record_trace` (else none).
///
/// The run is split into one independent simulation per model (every vehicle holds one model
/// and every job asks for one), each with its vehicles, its own scheduler and random streams
/// derived from the seed, simulated on up to `opts.threads` threads; the report merges them
/// (sums; TTFT percentiles exact over all partitions' answers). Deterministic for a seed and
/// independent of the thread count. So there is one scheduler, and one trace, per partition:
/// the traces come in partition order (the compute classes' models, then other models the
/// workload asks for, each at its first occurrence); node and job ids are per partition. A
/// scenario with one model runs as one simulation, as before the split.
pub fn run_checked(
    scenario: &Scenario,
    policy: PolicyKind,
    opts: &RunOptions,
) -> Result<(RunReport, Vec<SchedulerTrace>), SimError> {
    let trace = match &scenario.workload.trace {
        Some(path) => workload::load_trace(path)?,
        None => Vec::new(),
    };
    let policies = scenario
        .archetypes
        .iter()
        .enumerate()
        .map(|(i, a)| {
            vehicle_model::governor_policy(a, scenario.utc_offset_min)
                .map(Arc::new)
                .map_err(|source| SimError::Policy {
                    archetype: i,
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let parts = partition::split(scenario, opts, &policies, trace);
    let mut m = metrics::Metrics::default();
    let mut vehicles = 0;
    let mut traces = Vec::new();
    for r in partition::run_parts(scenario, policy, opts, parts) {
        m.merge(r.metrics);
        vehicles += r.vehicles;
        traces.extend(r.trace);
    }
    let w = engine::Window::of(scenario, opts);
    let days = (w.t_end - w.t_start) as f64 / vehicle_model::DAY as f64;
    let seed = opts.seed.unwrap_or(scenario.seed);
    Ok((
        report::build(scenario, policy, seed, days, vehicles, m),
        traces,
    ))
}

/// Run every policy on the same scenario and seed.
pub fn compare(scenario: &Scenario, opts: &RunOptions) -> CompareReport {
    let mut out = CompareReport {
        scenario: scenario.name.clone(),
        seed: opts.seed.unwrap_or(scenario.seed),
        policies: Default::default(),
    };
    for p in PolicyKind::ALL {
        out.policies.insert(p.to_string(), run(scenario, p, opts));
    }
    out
}
