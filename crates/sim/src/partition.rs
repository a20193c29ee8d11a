//! A run split into independent partitions, one per model, simulated on up to
//! `RunOptions::threads` threads and merged at the end; and the fleet they are cut from (each
//! vehicle's archetype, class, region and pre-history, built from the seed).
//!
//! Every vehicle holds one model (its compute class's) and every job asks for one, so the
//! vehicles and jobs of different models never meet: each model's vehicles, jobs and scheduler
//! form a simulation of their own (the fleet-scale design shards the queues per model the same
//! way). The fleet is built once from the run's seed, in vehicle order, and each vehicle goes to
//! its model's partition; each partition then has its own random streams (vehicle events,
//! interactive arrivals, scheduler) derived from (seed, partition index), its share of the
//! interactive rate and the batch dumps of its model. Which partitions exist and what they
//! contain depend only on the scenario, never on the thread count, so a run is deterministic
//! for a seed and gives the same report on any number of threads. (A scenario with one model
//! has one partition with the run's own seed and streams: unchanged by the split.)

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokenfleet_scheduler::rng::SplitMix64;
use tokenfleet_scheduler::{PolicyKind, SchedulerTrace};
use tokenfleet_vehicle::Policy;

use tokenfleet_scheduler::{DepartureForecast, DwellHistory};
use tokenfleet_vehicle::{Governor, Millis as VMillis};

use crate::engine::{Sim, Vehicle, Window};
use crate::metrics::Metrics;
use crate::rng::Rng;
use crate::scenario::ArchetypeKind;
use crate::scenario::Scenario;
use crate::vehicle_model::{self, Place, HOUR};
use crate::workload::TraceRequest;
use crate::{Progress, ProgressFn, RunOptions};

/// One partition of a run (see [`crate::partition`]): its vehicles (with their dwell
/// histories and governors), its share of the workload and its random streams.
pub(crate) struct Part {
    /// Index among the run's partitions (fixed by the scenario, not the thread count).
    pub index: usize,
    /// The partition's own seed (the run's seed when the run has one partition).
    pub seed: u64,
    /// The model this partition serves; `None`: every model (a run with one partition).
    pub model: Option<String>,
    /// Peak interactive arrival rate of this partition's model.
    pub interactive_peak_rps: f64,
    pub vehicles: Vec<Vehicle>,
    pub histories: Vec<DwellHistory>,
    pub governors: Vec<Governor>,
    /// This partition's requests of a workload trace (relative times, sorted).
    pub trace: Vec<TraceRequest>,
    /// The run's workload is a trace (this partition's part of it may be empty).
    pub from_trace: bool,
}

/// Build the whole fleet in vehicle order from the run's seed: archetype, class, region and
/// each vehicle's pre-history up to the start of measurement. Partitioning takes vehicles
/// from this list, so the fleet is the same whatever the partitioning.
pub(crate) fn build_fleet(
    sc: &Scenario,
    opts: &RunOptions,
    policies: &[Arc<Policy>],
) -> (Vec<Vehicle>, Vec<DwellHistory>, Vec<Governor>) {
    let seed = opts.seed.unwrap_or(sc.seed);
    let vehicles_n = opts.vehicles.unwrap_or(sc.vehicles);
    let Window { clock, t_start, .. } = Window::of(sc, opts);
    let t0 = clock.t0;
    let mut rng = Rng::derive(seed, 1);
    let mut vehicles = Vec::with_capacity(vehicles_n as usize);
    let mut histories = Vec::with_capacity(vehicles_n as usize);
    let mut governors = Vec::with_capacity(vehicles_n as usize);
    for _ in 0..vehicles_n {
        let arch = rng.weighted(sc.archetypes.iter().map(|a| a.share));
        let class = rng.weighted(sc.compute.iter().map(|c| c.share));
        let region = rng.weighted(sc.regions.iter().map(|r| r.share));
        let a = &sc.archetypes[arch];
        let slot_h = rng.uniform(0.0, 1.5) as f32;
        // Start somewhere in the last stay before t0, then let warm-up settle things.
        let from = match a.kind {
            ArchetypeKind::Commuter => Place::Work,
            ArchetypeKind::DeliveryVan => Place::Depot,
            ArchetypeKind::RideHail => Place::Public,
            ArchetypeKind::CarShare => Place::Public,
        };
        // Pre-history: walk the vehicle's stays from `back` hours before t0 to the start of
        // measurement without the event loop (nothing computes before it), recording each
        // finished stay in the dwell history and tracking the state of charge.
        let back = rng.uniform(2.0, 20.0) as u64 * HOUR;
        let mut soc = rng.uniform(40.0, 90.0) as f32;
        let mut history = DwellHistory::new(sc.utc_offset_min);
        let mut stay = vehicle_model::next_stay(
            a.kind,
            &a.plug_prob,
            &mut rng,
            &clock,
            t0 - back,
            from,
            slot_h as f64,
        );
        while stay.depart <= t_start {
            if stay.arrive >= t0 {
                history.record(stay.arrive, stay.depart);
            }
            soc = vehicle_model::charge_during(a, &stay, stay.depart, soc);
            let next = vehicle_model::next_stay(
                a.kind,
                &a.plug_prob,
                &mut rng,
                &clock,
                stay.depart,
                stay.place,
                slot_h as f64,
            );
            let drive_kwh = vehicle_model::trip_kwh(next.arrive - stay.depart);
            soc = (soc - 100.0 * drive_kwh / a.battery_kwh).max(5.0);
            stay = next;
        }
        if stay.arrive < t_start {
            soc = vehicle_model::charge_during(a, &stay, t_start, soc);
        }
        vehicles.push(Vehicle {
            arch: arch as u8,
            class: class as u8,
            region: region as u16,
            stay,
            parked: false,
            link_up: true,
            eligible: false,
            gov_allowed: false,
            gov_wake: 0,
            soc,
            last_t: t_start,
            busy: 0,
            epoch: 0,
            stay_no: 0,
            slot_h,
            rtt_ms: 0.0,
            running: Vec::new(),
            forecast: DepartureForecast::unknown(t_start),
            forecast_stay: u32::MAX,
        });
        histories.push(history);
        governors.push(Governor::shared(
            Arc::clone(&policies[arch]),
            VMillis(t0 - back),
        ));
    }
    (vehicles, histories, governors)
}

/// Threads when `RunOptions::threads` is not set.
pub const DEFAULT_THREADS: usize = 2;

/// The progress callback shared by the partitions: each reports its own fraction, the
/// callback sees their mean.
pub(crate) struct SharedProgress {
    fractions: Vec<AtomicU64>,
    callback: ProgressFn,
}

impl SharedProgress {
    pub fn report(&self, part: usize, policy: PolicyKind, fraction: f64) {
        if let Some(f) = self.fractions.get(part) {
            f.store(fraction.to_bits(), Ordering::Relaxed);
        }
        let sum: f64 = self
            .fractions
            .iter()
            .map(|f| f64::from_bits(f.load(Ordering::Relaxed)))
            .sum();
        (self.callback)(Progress {
            policy,
            fraction: sum / self.fractions.len().max(1) as f64,
        });
    }
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
    let (vehicles, histories, governors) = build_fleet(sc, opts, policies);
    let from_trace = !trace.is_empty();
    if n == 1 {
        return vec![Part {
            index: 0,
            seed,
            model: None,
            interactive_peak_rps: sc.workload.interactive_peak_rps,
            vehicles,
            histories,
            governors,
            trace,
            from_trace,
        }];
    }
    let mut parts: Vec<Part> = models
        .iter()
        .enumerate()
        .map(|(index, m)| Part {
            index,
            seed: part_seed(seed, index, n),
            model: Some(m.clone()),
            interactive_peak_rps: sc.workload.interactive_peak_rps * interactive_share(sc, m),
            vehicles: Vec::new(),
            histories: Vec::new(),
            governors: Vec::new(),
            trace: Vec::new(),
            from_trace,
        })
        .collect();
    let class_part: Vec<usize> = sc
        .classes
        .iter()
        .map(|c| models.iter().position(|m| *m == c.model).unwrap_or(0))
        .collect();
    for ((veh, h), g) in vehicles.into_iter().zip(histories).zip(governors) {
        let p = &mut parts[class_part[veh.class as usize]];
        p.vehicles.push(veh);
        p.histories.push(h);
        p.governors.push(g);
    }
    for r in trace {
        let i = models.iter().position(|m| **m == *r.model).unwrap_or(0);
        parts[i].trace.push(r);
    }
    parts
}

/// What a finished partition hands back.
pub(crate) struct PartResult {
    pub metrics: Metrics,
    pub vehicles: u32,
    pub trace: Option<SchedulerTrace>,
}

/// Rough cost of a partition (jobs and vehicle events a day), to start the biggest first. It
/// only decides which thread runs which partition, never a result.
fn weight(sc: &Scenario, p: &Part) -> f64 {
    let batch: f64 = sc
        .workload
        .batch
        .iter()
        .filter(|b| p.model.as_ref().is_none_or(|m| *m == b.model))
        .map(|b| (b.requests / b.shard.max(1) as u64) as f64)
        .sum();
    p.interactive_peak_rps * 43_200.0
        + batch
        + 10.0 * p.vehicles.len() as f64
        + p.trace.len() as f64
}

/// Simulate the partitions on up to `opts.threads` threads (the calling thread is one of
/// them); results in partition order.
pub(crate) fn run_parts(
    sc: &Scenario,
    policy: PolicyKind,
    opts: &RunOptions,
    parts: Vec<Part>,
) -> Vec<PartResult> {
    let n = parts.len();
    let threads = opts.threads.unwrap_or(DEFAULT_THREADS).clamp(1, n.max(1));
    let progress = opts.progress.as_ref().map(|cb| SharedProgress {
        fractions: (0..n).map(|_| AtomicU64::new(0)).collect(),
        callback: Arc::clone(cb),
    });
    let mut order: Vec<usize> = (0..n).collect();
    let weights: Vec<f64> = parts.iter().map(|p| weight(sc, p)).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let slots: Vec<Mutex<Option<Part>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let results: Vec<Mutex<Option<PartResult>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        let Some(&i) = order.get(k) else { break };
        let Some(part) = slots[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            continue;
        };
        let mut sim = Sim::new(sc, policy, opts, part, progress.as_ref());
        sim.run();
        let r = PartResult {
            vehicles: sim.vehicles.len() as u32,
            metrics: std::mem::take(&mut sim.m),
            trace: sim.driver.into_trace(),
        };
        *results[i].lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
    };
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(work);
            }
            work();
        });
    }
    results
        .into_iter()
        .filter_map(|r| r.into_inner().unwrap_or_else(PoisonError::into_inner))
        .collect()
}
