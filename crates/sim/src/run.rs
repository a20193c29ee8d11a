//! Running a scenario: one policy ([`run`], [`run_checked`]) or all of them ([`compare`]).
//!
//! Owns: nothing but the sequence of a run (load the trace, make the governor policies, split,
//! simulate, merge, report).
//! May import: `parallel`, `partition`, `window`, `metrics`, `report`, `options`, `scenario`,
//! `vehicle_model`, `workload`.

use std::sync::Arc;

use tokenfleet_scheduler::{PolicyKind, SchedulerTrace};

use crate::metrics::{self, CompareReport, RunReport};
use crate::options::{RunOptions, SimError};
use crate::scenario::Scenario;
use crate::window::Window;
use crate::{parallel, partition, report, vehicle_model, workload};

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
    for r in parallel::run_parts(scenario, policy, opts, parts) {
        m.merge(r.metrics);
        vehicles += r.vehicles;
        traces.extend(r.trace);
    }
    let days = Window::of(scenario, opts).days();
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
