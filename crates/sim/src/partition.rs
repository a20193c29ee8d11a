//! A run split into independent partitions, one per model.
//!
//! Every vehicle holds one model (its compute class's) and every job asks for one, so the
//! vehicles and jobs of different models never meet: each model's vehicles, jobs and scheduler
//! form a simulation of their own (the fleet-scale design shards the queues per model the same
//! way). The fleet is built once from the run's seed, in vehicle order ([`Roster::build`]), and
//! each vehicle goes to its model's partition; each partition then has its own random streams
//! (vehicle events, interactive arrivals, scheduler) derived from (seed, partition index), its
//! share of the interactive rate and the batch dumps of its model. Which partitions exist and
//! what they contain depend only on the scenario, never on the thread count, so a run is
//! deterministic for a seed and gives the same report on any number of threads. (A scenario
//! with one model has one partition with the run's own seed and streams: unchanged by the
//! split.)
//!
//! Owns: [`Part`] (a partition's fleet, arrivals, seed and cost estimate) and how a run is cut
//! into them.
//! May import: `fleet`, `arrivals`, `options`, `scenario`, `workload`; not the engine that
//! simulates a part, nor the threads that run them.

use std::sync::Arc;

use tokenfleet_scheduler::rng::SplitMix64;
use tokenfleet_vehicle::Policy;

use crate::arrivals::Arrivals;
use crate::fleet::{Fleet, Roster};
use crate::options::RunOptions;
use crate::scenario::Scenario;
use crate::workload::TraceRequest;

/// One partition of a run: its vehicles and its share of the workload, each with the
/// partition's own random streams. A hand-over record: the engine takes it apart.
pub(crate) struct Part {
    /// Index among the run's partitions (fixed by the scenario, not the thread count).
    pub index: usize,
    /// The partition's own seed (the run's seed when the run has one partition).
    pub seed: u64,
    pub fleet: Fleet,
    pub arrivals: Arrivals,
    /// Rough cost (see [`weight`]); only orders the partitions on threads.
    pub weight: f64,
}

/// A partition before its fleet and arrivals are set in motion.
struct Plan {
    seed: u64,
    model: Option<String>,
    /// Peak interactive arrival rate of this partition's model.
    interactive_peak_rps: f64,
    roster: Roster,
    trace: Vec<TraceRequest>,
}

/// Build the fleet and split it, the workload and the random streams into partitions.
pub(crate) fn split(
    sc: &Scenario,
    opts: &RunOptions,
    policies: &[Arc<Policy>],
    trace: Vec<TraceRequest>,
) -> Vec<Part> {
    let seed = opts.seed.unwrap_or(sc.seed);
    let models = models(sc, &trace);
    let n = models.len();
    let roster = Roster::build(sc, opts, policies);
    let from_trace = !trace.is_empty();
    let plans = if n == 1 {
        vec![Plan {
            seed,
            model: None,
            interactive_peak_rps: sc.workload.interactive_peak_rps,
            roster,
            trace,
        }]
    } else {
        let class_part: Vec<usize> = sc
            .classes
            .iter()
            .map(|c| models.iter().position(|m| *m == c.model).unwrap_or(0))
            .collect();
        let mut traces: Vec<Vec<TraceRequest>> = (0..n).map(|_| Vec::new()).collect();
        for r in trace {
            let i = models.iter().position(|m| **m == *r.model).unwrap_or(0);
            traces[i].push(r);
        }
        models
            .iter()
            .zip(roster.split(&class_part, n))
            .zip(traces)
            .enumerate()
            .map(|(index, ((m, roster), trace))| Plan {
                seed: part_seed(seed, index, n),
                model: Some(m.clone()),
                interactive_peak_rps: sc.workload.interactive_peak_rps * interactive_share(sc, m),
                roster,
                trace,
            })
            .collect()
    };
    plans
        .into_iter()
        .enumerate()
        .map(|(index, p)| {
            let weight = weight(sc, &p);
            Part {
                index,
                seed: p.seed,
                fleet: Fleet::new(p.roster, p.seed),
                arrivals: Arrivals::new(
                    sc,
                    p.seed,
                    p.interactive_peak_rps,
                    p.model,
                    p.trace,
                    from_trace,
                ),
                weight,
            }
        })
        .collect()
}

/// The models a run is split by, in a fixed order: the compute classes' models, then any other
/// model the workload asks for (interactive shares, batch dumps, trace), each at its first
/// occurrence. A model no vehicle holds still gets a partition (its jobs are refused there).
pub(crate) fn models(sc: &Scenario, trace: &[TraceRequest]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let names = sc
        .classes
        .iter()
        .map(|c| c.model.as_str())
        .chain(sc.workload.models.iter().map(|m| m.name.as_str()))
        .chain(sc.workload.batch.iter().map(|b| b.model.as_str()))
        .chain(trace.iter().map(|r| &*r.model));
    for m in names {
        if !out.iter().any(|o| o == m) {
            out.push(m.to_string());
        }
    }
    if out.is_empty() {
        out.push(String::new());
    }
    out
}

/// Partition `index` of `n`'s seed: the run's seed when there is one partition.
pub(crate) fn part_seed(seed: u64, index: usize, n: usize) -> u64 {
    if n == 1 {
        return seed;
    }
    let mut r = SplitMix64::new(seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.next_u64()
}

/// The fraction of interactive requests that ask for `model` (as `workload::pick_model` draws
/// them).
fn interactive_share(sc: &Scenario, model: &str) -> f64 {
    let ms = &sc.workload.models;
    if ms.is_empty() {
        return match sc.classes.first() {
            Some(c) if c.model == model => 1.0,
            _ => 0.0,
        };
    }
    let total: f64 = ms.iter().map(|m| m.share).sum();
    if total <= 0.0 {
        return 0.0;
    }
    ms.iter()
        .filter(|m| m.name == model)
        .map(|m| m.share)
        .sum::<f64>()
        / total
}

/// Rough cost of a partition (jobs and vehicle events a day), to start the biggest first. It
/// only decides which thread runs which partition, never a result.
fn weight(sc: &Scenario, p: &Plan) -> f64 {
    let batch: f64 = sc
        .workload
        .batch
        .iter()
        .filter(|b| p.model.as_ref().is_none_or(|m| *m == b.model))
        .map(|b| (b.requests / b.shard.max(1) as u64) as f64)
        .sum();
    p.interactive_peak_rps * 43_200.0 + batch + 10.0 * p.roster.len() as f64 + p.trace.len() as f64
}
