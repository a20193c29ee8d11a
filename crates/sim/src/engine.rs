//! The discrete-event core: one partition's simulation. [`Sim`] pops events in virtual time and
//! carries each out over its parts: the fleet (vehicles), the job table (jobs and queues), the
//! arrivals (workload) and the scheduler driver, with the dispatch timers and the measurement.
//!
//! Owns: [`Sim`] (the partition's clock, event queue, parts and metrics, the dispatch and sweep
//! timers) and [`Outcome`].
//! May import: `fleet`, `jobs`, `arrivals`, `partition` (the [`Part`] it is built from),
//! `event`, `window`, `progress`, `driver`, `metrics`, `scenario`, `vehicle_model`, `workload`,
//! `options`. Nothing imports it but `parallel`.

use tokenfleet_scheduler::{Millis, NodeId, PolicyKind, SchedulerTrace};

use crate::arrivals::Arrivals;
use crate::driver::Driver;
use crate::event::{Ev, Events};
use crate::fleet::Fleet;
use crate::jobs::JobTable;
use crate::metrics::{Metrics, SeriesPoint};
use crate::options::RunOptions;
use crate::partition::Part;
use crate::progress::SharedProgress;
use crate::scenario::Scenario;
use crate::vehicle_model::{HOUR, MIN};
use crate::window::Window;
use crate::workload::TraceRequest;

const SAMPLE_MS: u64 = 15 * MIN;
const SWEEP_MS: u64 = 60_000;

pub(crate) struct Sim<'a> {
    sc: &'a Scenario,
    policy: PolicyKind,
    w: Window,
    now: Millis,
    /// Measurement has begun (before it, vehicles only arrive).
    live: bool,
    events: Events,
    fleet: Fleet,
    jobs: JobTable,
    arrivals: Arrivals,
    driver: Driver,
    m: Metrics,
    /// When the next dispatch and the next sweep are due (one pending event each at most).
    dispatch_at: Option<Millis>,
    sweep_at: Option<Millis>,
    last_sweep: Millis,
    /// Vehicles touched by a dispatch (reused).
    touched_buf: Vec<u32>,
    /// Where this partition reports its progress (shared with the other partitions).
    progress: Option<&'a SharedProgress>,
    part_index: usize,
}

/// What a finished partition hands back.
pub(crate) struct Outcome {
    pub metrics: Metrics,
    pub vehicles: u32,
    pub trace: Option<SchedulerTrace>,
}

impl<'a> Sim<'a> {
    pub fn new(
        sc: &'a Scenario,
        policy: PolicyKind,
        opts: &'a RunOptions,
        part: Part,
        progress: Option<&'a SharedProgress>,
    ) -> Self {
        let w = Window::of(sc, opts);
        let config = opts
            .scheduler
            .clone()
            .unwrap_or_else(|| sc.scheduler.clone());
        let mut sim = Sim {
            sc,
            policy,
            w,
            now: w.t_start,
            live: false,
            events: Events::new(w.t_start),
            fleet: part.fleet,
            jobs: JobTable::new(sc),
            arrivals: part.arrivals,
            driver: Driver::new(policy, part.seed, config, opts.record_trace),
            m: Metrics::default(),
            dispatch_at: None,
            sweep_at: None,
            last_sweep: 0,
            touched_buf: Vec::new(),
            progress,
            part_index: part.index,
        };
        for v in 0..sim.fleet.len() as u32 {
            let at = sim.fleet.arrival(v);
            if at <= w.t_start {
                sim.arrive(v);
            } else {
                sim.events.push(at, Ev::Arrive(v));
            }
        }
        sim.events.push(w.t_start, Ev::Begin);
        sim.events.push(w.t_end, Ev::End);
        sim
    }

    /// Simulate to the end of the window; hand back the metrics and the scheduler trace.
    pub fn run(mut self) -> Outcome {
        let span = (self.w.t_end - self.w.t_start).max(1) as f64;
        let mut next_progress = self.w.t_start;
        while let Some((t, ev)) = self.events.pop() {
            self.now = t;
            self.m.events += 1;
            self.prefetch_ahead();
            if self.live && t >= next_progress {
                if let Some(p) = self.progress {
                    let fraction = ((t - self.w.t_start) as f64 / span).min(1.0);
                    p.report(self.part_index, self.policy, fraction);
                }
                next_progress = t + HOUR;
            }
            if ev == Ev::End {
                self.finish();
                break;
            }
            self.handle(ev);
        }
        Outcome {
            vehicles: self.fleet.len() as u32,
            metrics: self.m,
            trace: self.driver.into_trace(),
        }
    }

    fn handle(&mut self, ev: Ev) {
        let (sc, now) = (self.sc, self.now);
        match ev {
            Ev::Begin => self.begin(),
            Ev::End => {}
            Ev::Arrive(v) => self.arrive(v),
            Ev::Depart(v) => self.depart(v),
            Ev::Check(v, e) => {
                if self.fleet.epoch(v) == e {
                    self.settle(v);
                    self.reevaluate(v, true);
                }
            }
            Ev::OutageStart(v, e) => {
                if self.fleet.outage_start(sc, now, v, e, &mut self.events) {
                    self.settle(v);
                    self.reevaluate(v, false);
                }
            }
            Ev::OutageEnd(v) => {
                self.fleet.link_restored(v);
                self.settle(v);
                self.reevaluate(v, true);
            }
            Ev::JobDone(j, run) => self.job_done(j, run),
            Ev::Interactive => {
                if let Some(r) = self.arrivals.take_interactive() {
                    self.enqueue(r);
                }
                self.arrivals
                    .schedule_interactive(sc, &self.w, now, &mut self.events);
            }
            Ev::Dump(d, _day) => {
                for r in self.arrivals.dump(sc, d as usize, &self.w, now) {
                    self.enqueue(r);
                }
            }
            Ev::TraceNext => {
                while let Some(r) = self.arrivals.next_from_trace(&self.w, now) {
                    self.enqueue(r);
                }
                self.arrivals.schedule_trace(&self.w, &mut self.events);
            }
            Ev::Dispatch => self.dispatch(false),
            Ev::Sweep => self.dispatch(true),
            Ev::Sample => self.sample(),
        }
    }

    /// Start loading what upcoming job completions will touch: their job record a few events
    /// ahead, then their vehicle and its scheduler entry (the vehicle id is in the job record
    /// loaded earlier), then the vehicle's running list and its candidate-set entries. A million
    /// vehicles do not fit in cache; without this every completion waits for these misses in
    /// turn. A hint only: no effect on results.
    fn prefetch_ahead(&self) {
        const JOB_AHEAD: usize = 16;
        const VEHICLE_AHEAD: usize = 8;
        const SETS_AHEAD: usize = 3;
        if let Some(&Ev::JobDone(j, _)) = self.events.ahead(JOB_AHEAD) {
            self.jobs.prefetch(j as usize);
        }
        if let Some(&Ev::JobDone(j, _)) = self.events.ahead(VEHICLE_AHEAD) {
            if let Some(v) = self.jobs.node_of(j) {
                self.fleet.prefetch(v as usize);
                self.driver.prefetch(NodeId(v as u64));
            }
        }
        if let Some(&Ev::JobDone(j, _)) = self.events.ahead(SETS_AHEAD) {
            if let Some(v) = self.jobs.node_of(j) {
                self.fleet.prefetch_running(v as usize);
                self.driver.prefetch_sets(NodeId(v as u64));
            }
        }
    }

    fn begin(&mut self) {
        // Vehicles parked before measurement have had their governors running.
        self.fleet.warm_up_governors(self.w.t_start);
        self.live = true;
        for v in 0..self.fleet.len() as u32 {
            self.settle(v);
            self.reevaluate(v, true);
            self.upsert(v);
        }
        self.arrivals
            .begin(self.sc, &self.w, self.now, &mut self.events);
        self.events.push(self.w.t_start + SAMPLE_MS, Ev::Sample);
    }

    fn sample(&mut self) {
        self.fleet
            .sample_calibration(self.sc, self.now, &mut self.m);
        self.m.series.push(SeriesPoint {
            t_h: (self.now - self.w.t_start) as f64 / HOUR as f64,
            vehicles_parked: self.fleet.parked(),
            vehicles_eligible: self.fleet.eligible_count(),
            slots_busy: self.fleet.slots_busy(),
            tokens: std::mem::take(&mut self.m.tokens_in_bucket),
        });
        if self.now + SAMPLE_MS <= self.w.t_end {
            self.events.push(self.now + SAMPLE_MS, Ev::Sample);
        }
    }

    // ---- vehicles ----

    fn arrive(&mut self, v: u32) {
        self.fleet.arrive(self.sc, self.now, v, &mut self.events);
        if self.live {
            self.reevaluate(v, true);
        }
    }

    fn depart(&mut self, v: u32) {
        self.settle(v);
        // The driver is back: the gear leaves Park and the governor drains (work handed back).
        let graceful = self.fleet.leave(self.sc, v);
        self.reevaluate(v, graceful);
        self.fleet
            .drive_on(self.sc, &self.w, self.now, v, &mut self.events);
        if self.live {
            self.upsert(v);
        }
    }

    fn settle(&mut self, v: u32) {
        self.fleet.settle(self.sc, self.now, v, &mut self.m);
    }

    /// Step the vehicle's governor with its current signals; hand work back when the governor
    /// drains (or the link is down); schedule the next check; upsert when live.
    fn reevaluate(&mut self, v: u32, graceful: bool) {
        let mut d = self.fleet.step_governor(v, self.now);
        let must_evict = d.must_evict;
        if must_evict {
            // In-flight work is handed back now; with nothing left the governor stops draining.
            if self.live {
                self.evict_all(v, graceful);
            }
            d = self.fleet.step_governor(v, self.now);
        }
        let e = self.fleet.apply_governor(self.sc, v, self.now, &d);
        if !self.live {
            return;
        }
        if e.was && !e.now && !must_evict {
            // The link went down: the coordinator loses the node and requeues its work.
            self.evict_all(v, graceful);
        }
        self.schedule_check(v);
        self.upsert(v);
        if !e.was && e.now {
            self.want_dispatch();
        }
    }

    fn schedule_check(&mut self, v: u32) {
        self.fleet
            .schedule_check(self.sc, self.now, v, &mut self.events);
    }

    fn upsert(&mut self, v: u32) {
        self.fleet.upsert(self.sc, self.now, v, &mut self.driver);
    }

    // ---- jobs ----

    fn enqueue(&mut self, r: TraceRequest) {
        self.jobs.enqueue(r, self.now, self.w.t_end, &mut self.m);
        self.want_dispatch();
    }

    fn want_dispatch(&mut self) {
        if self.dispatch_at.is_none() && self.live {
            let ms = self.sc.dispatch_ms;
            let at = (self.now / ms + 1) * ms;
            self.dispatch_at = Some(at);
            self.events.push(at, Ev::Dispatch);
        }
    }

    /// `sweep`: the periodic pass that offers a large batch window (declined jobs get retried).
    fn dispatch(&mut self, sweep: bool) {
        if sweep {
            self.sweep_at = None;
        } else {
            self.dispatch_at = None;
        }
        if !self.jobs.has_pending() {
            return;
        }
        let sweep = sweep || self.now >= self.last_sweep + SWEEP_MS;
        let freed = self.fleet.take_freed();
        let window = if sweep {
            self.last_sweep = self.now;
            8192
        } else {
            (freed + 64).min(65_536)
        };
        self.m.scheduler_calls += 1;
        let d = self.driver.decide(self.now, self.jobs.offer(window));
        // Start loading every placed job's record and vehicle before working through them.
        for a in &d.assignments {
            self.jobs.prefetch(a.job.0 as usize);
            self.fleet.prefetch(a.node.0 as usize);
        }
        let mut touched = std::mem::take(&mut self.touched_buf);
        touched.clear();
        for p in &d.preemptions {
            let j = p.job.0 as u32;
            if let Some(v) = self.jobs.node_of(j) {
                self.settle(v);
                self.evict(j, true);
                self.m.preemptions += 1;
                touched.push(v);
            }
        }
        for a in &d.assignments {
            let j = a.job.0 as u32;
            let v = a.node.0 as u32;
            self.jobs.unqueue(j);
            self.start(j, v);
            touched.push(v);
        }
        for r in &d.rejections {
            let j = r.job.0 as u32;
            self.jobs.unqueue(j);
            self.jobs.reject(j, r.reason, &mut self.m);
        }
        self.jobs.prune_interactive();
        touched.sort_unstable();
        touched.dedup();
        for &v in &touched {
            self.schedule_check(v);
            self.upsert(v);
        }
        self.touched_buf = touched;
        // Still waiting: look again soon (interactive) or on the next sweep (batch).
        if self.jobs.interactive_waiting() {
            self.want_dispatch();
        }
        if self.jobs.batch_waiting() && self.sweep_at.is_none() {
            let at = self.last_sweep + SWEEP_MS;
            self.sweep_at = Some(at);
            self.events.push(at, Ev::Sweep);
        }
    }

    fn start(&mut self, j: u32, v: u32) {
        self.settle(v);
        let batch = self.jobs.is_batch(j);
        let (class, rtt) = self.fleet.occupy(v, j, batch);
        let class = &self.sc.classes[class];
        let (done_at, run) = self
            .jobs
            .start(self.sc, j, v, self.now, class, rtt, &mut self.m);
        self.events.push(done_at, Ev::JobDone(j, run));
    }

    fn job_done(&mut self, j: u32, run: u32) {
        let Some(v) = self.jobs.running_on(j, run) else {
            return;
        };
        self.settle(v);
        self.jobs.complete(j, self.now, self.w.t_end, &mut self.m);
        self.fleet.release(v, j);
        self.schedule_check(v);
        self.upsert(v);
        self.want_dispatch();
    }

    /// Take job `j` off its node; keep acknowledged tokens, count the rest as wasted, requeue.
    fn evict(&mut self, j: u32, graceful: bool) {
        let Some(v) = self.jobs.evict(self.sc, j, graceful, self.now, &mut self.m) else {
            return;
        };
        self.fleet.release(v, j);
        self.jobs.requeue(j, self.now);
        self.want_dispatch();
    }

    fn evict_all(&mut self, v: u32, graceful: bool) {
        if !self.live {
            return;
        }
        for j in self.fleet.running(v) {
            self.evict(j, graceful);
        }
    }

    /// End of the measurement window: settle energy, credit acknowledged progress of running
    /// jobs (they would continue), close the books.
    fn finish(&mut self) {
        for v in 0..self.fleet.len() as u32 {
            self.settle(v);
        }
        for j in self.fleet.all_running() {
            self.jobs.credit_at_end(self.sc, j, self.now, &mut self.m);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokenfleet_scheduler::{JobClass, JobId, PolicyKind, QueuedJob};
    use tokenfleet_vehicle::{GovernorState, Policy};

    use super::Sim;
    use crate::vehicle_model::{self, HYSTERESIS_PCT, MIN};
    use crate::{RunOptions, Scenario};

    fn interactive(model: &str, now: u64) -> QueuedJob {
        QueuedJob {
            id: JobId(1),
            class: JobClass::Interactive,
            model: model.to_string(),
            prompt_tokens: 100,
            max_tokens: 50,
            generated_tokens: 0,
            deadline: None,
            residency: None,
            tenant: "t".into(),
            sensitive: false,
            enqueued_at: now,
            running_on: None,
        }
    }

    /// The simulator's vehicles are governed by `tokenfleet-vehicle`'s governor: a vehicle
    /// below its SoC reserve and unplugged gets no work; plugged in below the start SoC it
    /// still gets none (the governor's start threshold, which the old stand-in did not have);
    /// above it, only after the governor's eligibility dwell.
    #[test]
    fn vehicles_are_governed_by_the_vehicle_crates_governor() {
        let mut sc = Scenario::from_name("city-mixed").expect("shipped");
        sc.warmup_days = 1;
        for a in &mut sc.archetypes {
            a.compute_on_battery = true;
        }
        let opts = RunOptions {
            vehicles: Some(1),
            days: Some(1.0),
            ..RunOptions::default()
        };
        let policies: Vec<Arc<Policy>> = sc
            .archetypes
            .iter()
            .map(|a| Arc::new(vehicle_model::governor_policy(a, sc.utc_offset_min).unwrap()))
            .collect();
        let part = crate::partition::split(&sc, &opts, &policies, Vec::new())
            .into_iter()
            .find(|p| p.fleet.len() > 0)
            .expect("the vehicle's partition");
        let mut sim = Sim::new(&sc, PolicyKind::Tokenfleet, &opts, part, None);
        sim.live = true;
        let now = sim.w.t_start;
        sim.now = now;
        let (arch, class) = sim.fleet.kind_of(0);
        let reserve = sc.archetypes[arch].soc_reserve_pct;
        let model = sc.classes[class].model.clone();
        sim.fleet
            .park_for_test(0, now, now - 2 * 60 * MIN, now + 10 * 60 * MIN);
        sim.fleet.set_plugged_for_test(0, false);
        sim.fleet.set_soc_for_test(0, reserve - 1.0);
        let offer = |sim: &mut Sim<'_>, at: u64| {
            sim.now = at;
            sim.reevaluate(0, true);
            sim.driver.decide(at, &[interactive(&model, at)])
        };
        // Below the reserve, unplugged: never given work, however long it waits.
        for k in 0..5 {
            let d = offer(&mut sim, now + k * 10 * MIN);
            assert!(d.assignments.is_empty(), "{d:?}");
            assert!(!sim.fleet.is_eligible(0));
            assert_eq!(sim.fleet.governor(0).state(), GovernorState::Unavailable);
        }
        // Plugged in, still below the start SoC: the governor keeps it unavailable.
        sim.fleet.set_plugged_for_test(0, true);
        let t = now + 60 * MIN;
        assert!(offer(&mut sim, t).assignments.is_empty());
        // Above the start SoC: eligible once the governor's dwell has passed.
        sim.fleet
            .set_soc_for_test(0, reserve + HYSTERESIS_PCT + 1.0);
        assert!(offer(&mut sim, t + 1).assignments.is_empty());
        assert_eq!(sim.fleet.governor(0).state(), GovernorState::Unavailable);
        let dwell = sim
            .fleet
            .governor(0)
            .policy()
            .timing
            .eligible_dwell
            .as_millis() as u64;
        let d = offer(&mut sim, t + 1 + dwell);
        assert_eq!(d.assignments.len(), 1, "{d:?}");
        assert!(sim.fleet.is_eligible(0));
        assert_eq!(sim.fleet.governor(0).state(), GovernorState::Eligible);
    }
}
