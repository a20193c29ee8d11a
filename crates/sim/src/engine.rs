//! The discrete-event core: virtual time, a calendar event queue, vehicles (stays, energy, governor,
//! links) and the measurement window. Job execution lives in [`crate::jobs`].

use std::collections::{BTreeSet, VecDeque};

use tokenfleet_scheduler::forecast::LEVELS;
use tokenfleet_scheduler::hint::prefetch;
use tokenfleet_scheduler::{DepartureForecast, DwellHistory, Millis, PolicyKind};
use tokenfleet_vehicle::Governor;

use crate::driver::Driver;
use crate::jobs::Job;
use crate::metrics::{Metrics, SeriesPoint};
use crate::partition::Part;
use crate::queue::EventQueue;
use crate::rng::Rng;
use crate::scenario::Scenario;
use crate::vehicle_model::{self, Clock, Place, Signals, Stay, DAY, HOUR, MIN};
use crate::workload::{InteractiveGen, TraceRequest};
use crate::RunOptions;

/// 2024-01-01 00:00 UTC, a Monday.
pub const EPOCH_MONDAY: Millis = 1_704_067_200_000;
const SAMPLE_MS: u64 = 15 * MIN;
/// Vehicles looked at per calibration sample.
const CALIB_PER_SAMPLE: usize = 1000;
pub(crate) const SWEEP_MS: u64 = 60_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ev {
    Begin,
    Arrive(u32),
    Depart(u32),
    /// The vehicle's governor looks again (dwell over, SoC at the reserve or at start).
    Check(u32, u32),
    OutageStart(u32, u32),
    OutageEnd(u32),
    JobDone(u32, u32),
    Interactive,
    Dump(u32, u32),
    TraceNext,
    Dispatch,
    Sweep,
    Sample,
    End,
}

pub struct Vehicle {
    pub arch: u8,
    pub class: u8,
    pub region: u16,
    pub stay: Stay,
    pub parked: bool,
    pub link_up: bool,
    pub eligible: bool,
    /// The governor allows computing (Eligible, Computing or Throttled).
    pub gov_allowed: bool,
    /// When the governor's current dwell ends (0: not dwelling).
    pub gov_wake: Millis,
    pub soc: f32,
    pub last_t: Millis,
    pub busy: u32,
    pub epoch: u32,
    pub stay_no: u32,
    pub slot_h: f32,
    pub rtt_ms: f32,
    /// Jobs running on the vehicle, in start order, each with whether it is a batch job (the
    /// node view lists those without touching the job records).
    pub running: Vec<(u32, bool)>,
    pub forecast: DepartureForecast,
    /// `stay_no` the forecast was made for (`u32::MAX`: none yet).
    pub forecast_stay: u32,
}

pub struct Sim<'a> {
    pub sc: &'a Scenario,
    pub policy: PolicyKind,
    pub clock: Clock,
    pub t_start: Millis,
    pub t_end: Millis,
    pub now: Millis,
    pub live: bool,
    events: EventQueue<Ev>,
    pub rng: Rng,
    pub vehicles: Vec<Vehicle>,
    /// Each vehicle's dwell history, apart from [`Vehicle`]: it is read only at arrival and
    /// departure and when a forecast is refreshed, while the vehicle's hot fields are touched on
    /// every job start and finish (a million vehicles do not fit in cache; small records do
    /// better).
    pub histories: Vec<DwellHistory>,
    /// Each vehicle's governor (`tokenfleet-vehicle`), under its archetype's shared policy.
    pub governors: Vec<Governor>,
    pub jobs: Vec<Job>,
    /// Finished job slots for reuse (a million-vehicle day has ~10^8 requests).
    pub free_jobs: Vec<u32>,
    /// Run ids: every start of a job gets a fresh one, so a stale completion never matches.
    pub next_run: u32,
    /// Vehicles the scheduler knows (later changes go through the cheap `update` path).
    pub registered: Vec<bool>,
    pub scratch: Vec<tokenfleet_scheduler::JobId>,
    /// Reused between dispatches (no per-job allocation on the hot path).
    pub queue_buf: Vec<tokenfleet_scheduler::QueuedJob>,
    pub ids_buf: Vec<u32>,
    pub touched_buf: Vec<u32>,
    calib_cursor: usize,
    pub pending_int: VecDeque<u32>,
    pub pending_batch: BTreeSet<(Millis, Millis, u32)>,
    /// The batch jobs of `pending_batch` that were evicted with acknowledged output (same keys).
    /// Every dispatch offers them besides the head of the queue: the coordinator hands the
    /// scheduler its whole queue, and the window is only the simulator's shortcut for it.
    pub pending_resumed: BTreeSet<(Millis, Millis, u32)>,
    pub driver: Driver,
    pub m: Metrics,
    pub dispatch_at: Option<Millis>,
    pub sweep_at: Option<Millis>,
    pub freed: usize,
    pub last_sweep: Millis,
    inter: InteractiveGen,
    trace: Vec<TraceRequest>,
    trace_pos: usize,
    from_trace: bool,
    pub model_ids: Vec<String>,
    pub parked: u32,
    pub eligible_count: u32,
    pub slots_busy: u64,
    /// Where this partition reports its progress (shared with the other partitions).
    progress: Option<&'a crate::partition::SharedProgress>,
    part_index: usize,
    /// The model this partition serves (`None`: all).
    part_model: Option<String>,
}

/// The run's clock and measurement window.
pub(crate) struct Window {
    pub clock: Clock,
    pub t_start: Millis,
    pub t_end: Millis,
}

impl Window {
    pub fn of(sc: &Scenario, opts: &RunOptions) -> Self {
        let days = opts.days.unwrap_or(sc.days);
        let t0 = (EPOCH_MONDAY as i64 - sc.utc_offset_min as i64 * 60_000) as Millis;
        let t_start = t0
            + sc.warmup_days as u64 * DAY
            + (sc.start_hour.clamp(0.0, 24.0) * HOUR as f64) as u64;
        let t_end = t_start + (days * DAY as f64) as u64;
        Window {
            clock: Clock { t0 },
            t_start,
            t_end,
        }
    }
}

impl<'a> Sim<'a> {
    pub(crate) fn new(
        sc: &'a Scenario,
        policy: PolicyKind,
        opts: &'a RunOptions,
        part: Part,
        progress: Option<&'a crate::partition::SharedProgress>,
    ) -> Self {
        let Window {
            clock,
            t_start,
            t_end,
        } = Window::of(sc, opts);
        let seed = part.seed;
        let vehicles = part.vehicles;
        let histories = part.histories;
        let governors = part.governors;
        let vehicles_n = vehicles.len();
        let mut model_ids: Vec<String> = sc.classes.iter().map(|c| c.model.clone()).collect();
        model_ids.dedup();
        let mut sim = Sim {
            sc,
            policy,
            clock,
            t_start,
            t_end,
            now: t_start,
            live: false,
            events: EventQueue::new(t_start),
            rng: Rng::derive(seed, 2),
            vehicles,
            histories,
            governors,
            jobs: Vec::new(),
            free_jobs: Vec::new(),
            next_run: 0,
            registered: vec![false; vehicles_n],
            scratch: Vec::new(),
            queue_buf: Vec::new(),
            ids_buf: Vec::new(),
            touched_buf: Vec::new(),
            calib_cursor: 0,
            pending_int: VecDeque::new(),
            pending_batch: BTreeSet::new(),
            pending_resumed: BTreeSet::new(),
            driver: Driver::new(
                policy,
                seed,
                opts.scheduler
                    .clone()
                    .unwrap_or_else(|| sc.scheduler.clone()),
                opts.record_trace,
            ),
            m: Metrics::default(),
            dispatch_at: None,
            sweep_at: None,
            freed: 0,
            last_sweep: 0,
            inter: InteractiveGen::new(sc, seed, part.interactive_peak_rps, part.model.as_deref()),
            trace: part.trace,
            from_trace: part.from_trace,
            trace_pos: 0,
            model_ids,
            parked: 0,
            eligible_count: 0,
            slots_busy: 0,
            progress,
            part_index: part.index,
            part_model: part.model,
        };
        for v in 0..sim.vehicles.len() {
            let s = sim.vehicles[v].stay;
            if s.arrive <= t_start {
                sim.arrive(v as u32);
            } else {
                sim.push(s.arrive, Ev::Arrive(v as u32));
            }
        }
        sim.push(t_start, Ev::Begin);
        sim.push(t_end, Ev::End);
        sim
    }

    pub fn push(&mut self, t: Millis, ev: Ev) {
        self.events.push(t, ev);
    }

    pub fn run(&mut self) {
        let span = (self.t_end - self.t_start).max(1) as f64;
        let mut next_progress = self.t_start;
        while let Some((t, ev)) = self.events.pop() {
            self.now = t;
            self.m.events += 1;
            self.prefetch_ahead();
            if self.live && t >= next_progress {
                if let Some(p) = self.progress {
                    p.report(
                        self.part_index,
                        self.policy,
                        ((t - self.t_start) as f64 / span).min(1.0),
                    );
                }
                next_progress = t + HOUR;
            }
            match ev {
                Ev::Begin => self.begin(),
                Ev::End => {
                    self.finish();
                    break;
                }
                Ev::Arrive(v) => self.arrive(v),
                Ev::Depart(v) => self.depart(v),
                Ev::Check(v, e) => {
                    if self.vehicles[v as usize].epoch == e {
                        self.settle(v);
                        self.reevaluate(v, true);
                    }
                }
                Ev::OutageStart(v, e) => {
                    let veh = &mut self.vehicles[v as usize];
                    if veh.parked && veh.stay_no == e {
                        veh.link_up = false;
                        let mins = self.rng.exp(self.sc.link.outage_minutes).max(0.5);
                        self.push(t + (mins * MIN as f64) as u64, Ev::OutageEnd(v));
                        self.settle(v);
                        self.reevaluate(v, false);
                    }
                }
                Ev::OutageEnd(v) => {
                    self.vehicles[v as usize].link_up = true;
                    self.settle(v);
                    self.reevaluate(v, true);
                }
                Ev::JobDone(j, attempt) => self.job_done(j, attempt),
                Ev::Interactive => self.interactive_arrival(),
                Ev::Dump(d, day) => self.batch_dump(d as usize, day),
                Ev::TraceNext => self.trace_arrival(),
                Ev::Dispatch => self.dispatch(false),
                Ev::Sweep => self.dispatch(true),
                Ev::Sample => self.sample(),
            }
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
            if let Some(job) = self.jobs.get(j as usize) {
                prefetch(job);
            }
        }
        if let Some(&Ev::JobDone(j, _)) = self.events.ahead(VEHICLE_AHEAD) {
            if let Some(v) = self.jobs.get(j as usize).and_then(|job| job.node) {
                if let Some(veh) = self.vehicles.get(v as usize) {
                    prefetch(veh);
                }
                self.driver.prefetch(tokenfleet_scheduler::NodeId(v as u64));
            }
        }
        if let Some(&Ev::JobDone(j, _)) = self.events.ahead(SETS_AHEAD) {
            if let Some(v) = self.jobs.get(j as usize).and_then(|job| job.node) {
                if let Some(veh) = self.vehicles.get(v as usize) {
                    if let Some(first) = veh.running.first() {
                        prefetch(first);
                    }
                }
                self.driver
                    .prefetch_sets(tokenfleet_scheduler::NodeId(v as u64));
            }
        }
    }

    fn begin(&mut self) {
        // Vehicles parked before measurement have had their governors running: step each once
        // at its arrival (at most an hour back), so that dwells already served are not served
        // again at the start.
        for v in 0..self.vehicles.len() {
            let veh = &self.vehicles[v];
            if veh.parked {
                let at = veh.stay.arrive.max(self.t_start.saturating_sub(HOUR));
                let signals = Signals {
                    parked: true,
                    plugged: veh.stay.plugged,
                    soc_pct: veh.soc,
                };
                vehicle_model::step_governor(&mut self.governors[v], signals, at, false);
            }
        }
        self.live = true;
        for v in 0..self.vehicles.len() as u32 {
            self.settle(v);
            self.reevaluate(v, true);
            self.upsert(v);
        }
        if !self.from_trace {
            self.interactive_arrival_schedule();
            let days = ((self.t_end - self.t_start) as f64 / DAY as f64).ceil() as u32 + 1;
            for (i, d) in self.sc.workload.batch.iter().enumerate() {
                for day in 0..days {
                    let t = self.clock.at(self.t_start, day as u64, d.at_hour);
                    if (self.t_start..self.t_end).contains(&t) {
                        self.push(t, Ev::Dump(i as u32, day));
                    }
                }
            }
        } else if let Some(r) = self.trace.first() {
            let t = self.t_start + r.t_ms;
            self.push(t, Ev::TraceNext);
        }
        self.push(self.t_start + SAMPLE_MS, Ev::Sample);
    }

    fn interactive_arrival_schedule(&mut self) {
        let clock_t0 = self.clock.t0;
        let next = self
            .inter
            .next(self.sc, self.now.max(self.t_start), self.t_end, |t| {
                ((t.saturating_sub(clock_t0) % DAY) / HOUR) as usize
            });
        if let Some(r) = next {
            self.push(r.t_ms, Ev::Interactive);
            self.trace.clear();
            self.trace.push(r);
        }
    }

    fn interactive_arrival(&mut self) {
        if let Some(r) = self.trace.pop() {
            self.enqueue(r);
        }
        self.interactive_arrival_schedule();
    }

    fn trace_arrival(&mut self) {
        while self.trace_pos < self.trace.len()
            && self.t_start + self.trace[self.trace_pos].t_ms <= self.now
        {
            let mut r = self.trace[self.trace_pos].clone();
            r.t_ms += self.t_start;
            r.deadline_ms = r.deadline_ms.map(|d| d + self.t_start);
            self.trace_pos += 1;
            self.enqueue(r);
        }
        if let Some(r) = self.trace.get(self.trace_pos) {
            let t = self.t_start + r.t_ms;
            self.push(t, Ev::TraceNext);
        }
    }

    fn batch_dump(&mut self, d: usize, _day: u32) {
        let dump = &self.sc.workload.batch[d];
        if self.part_model.as_ref().is_some_and(|m| *m != dump.model) {
            return;
        }
        if dump.weekdays_only && self.clock.weekday(self.now) >= 5 {
            return;
        }
        let shard = dump.shard.max(1) as u64;
        let n_jobs = dump.requests.div_ceil(shard);
        let model: std::sync::Arc<str> = dump.model.as_str().into();
        let residency: Option<std::sync::Arc<[String]>> = dump.residency.as_deref().map(Into::into);
        for i in 0..n_jobs {
            let reqs = shard.min(dump.requests - i * shard) as u32;
            self.enqueue(TraceRequest {
                t_ms: self.now,
                class: tokenfleet_scheduler::JobClass::Batch,
                model: std::sync::Arc::clone(&model),
                prompt_tokens: dump.prompt_tokens,
                max_tokens: dump.max_tokens,
                deadline_ms: dump
                    .deadline_hours
                    .map(|h| self.now + (h * HOUR as f64) as u64),
                residency: residency.clone(),
                sensitive: false,
                shard: reqs,
            });
        }
    }

    fn sample(&mut self) {
        self.sample_calibration();
        self.m.series.push(SeriesPoint {
            t_h: (self.now - self.t_start) as f64 / HOUR as f64,
            vehicles_parked: self.parked,
            vehicles_eligible: self.eligible_count,
            slots_busy: self.slots_busy,
            tokens: std::mem::take(&mut self.m.tokens_in_bucket),
        });
        if self.now + SAMPLE_MS <= self.t_end {
            self.push(self.now + SAMPLE_MS, Ev::Sample);
        }
    }

    /// Forecast calibration over parked, eligible vehicles (not over placements, which would be
    /// biased towards vehicles whose forecast happened to be long): the probability integral
    /// transform `u = 1 - S(true remaining)` is counted against each quantile level.
    fn sample_calibration(&mut self) {
        let n = self.vehicles.len();
        if n == 0 {
            return;
        }
        let stride = (n / CALIB_PER_SAMPLE).max(1);
        self.calib_cursor = (self.calib_cursor + 1) % stride;
        for v in (self.calib_cursor..n).step_by(stride) {
            let veh = &self.vehicles[v];
            if !(veh.parked && veh.eligible) {
                continue;
            }
            let remaining = veh.stay.depart.saturating_sub(self.now);
            let f = self.forecast(v as u32);
            let u = 1.0 - f.survival(self.now, remaining);
            for (i, level) in LEVELS.iter().enumerate() {
                if u <= *level + 1e-6 {
                    self.m.calib_hits[i] += 1;
                }
            }
            self.m.calib_n += 1;
        }
    }

    // ---- vehicles ----

    fn arrive(&mut self, v: u32) {
        let sc = self.sc;
        let veh = &mut self.vehicles[v as usize];
        veh.parked = true;
        veh.link_up = true;
        veh.last_t = self.now.max(veh.stay.arrive);
        veh.epoch += 1;
        veh.stay_no += 1;
        veh.rtt_ms = match veh.stay.place {
            Place::Home => sc.link.rtt_ms_home,
            Place::Work => sc.link.rtt_ms_work,
            Place::Depot => sc.link.rtt_ms_depot,
            Place::Public => sc.link.rtt_ms_public,
        } * self.rng.lognormal(1.0, 0.3) as f32;
        let (dep, epoch) = (veh.stay.depart, veh.stay_no);
        let dur_h = (dep - veh.stay.arrive) as f64 / HOUR as f64;
        self.parked += 1;
        self.push(dep, Ev::Depart(v));
        if self
            .rng
            .chance(1.0 - (-sc.link.outages_per_hour * dur_h).exp())
        {
            let at = self.now + (self.rng.unit() * (dep - self.now) as f64) as u64;
            self.push(at, Ev::OutageStart(v, epoch));
        }
        if self.live {
            self.reevaluate(v, true);
        }
    }

    fn depart(&mut self, v: u32) {
        self.settle(v);
        let graceful = self.rng.chance(self.sc.link.graceful_handback);
        // The driver is back: the gear leaves Park and the governor drains (work handed back).
        self.vehicles[v as usize].parked = false;
        self.reevaluate(v, graceful);
        let sc = self.sc;
        let veh = &mut self.vehicles[v as usize];
        let a = &sc.archetypes[veh.arch as usize];
        self.histories[v as usize].record(veh.stay.arrive, veh.stay.depart);
        veh.epoch += 1;
        self.parked -= 1;
        let next = vehicle_model::next_stay(
            a.kind,
            &a.plug_prob,
            &mut self.rng,
            &self.clock,
            self.now,
            veh.stay.place,
            veh.slot_h as f64,
        );
        let drive_kwh = vehicle_model::trip_kwh(next.arrive - self.now);
        veh.soc = (veh.soc - 100.0 * drive_kwh / a.battery_kwh).max(5.0);
        veh.stay = next;
        self.push(next.arrive, Ev::Arrive(v));
        if self.live {
            self.upsert(v);
        }
    }

    pub fn want_dispatch(&mut self) {
        if self.dispatch_at.is_none() && self.live {
            let ms = self.sc.dispatch_ms;
            let at = (self.now / ms + 1) * ms;
            self.dispatch_at = Some(at);
            self.push(at, Ev::Dispatch);
        }
    }
}
