//! The vehicles inside a simulation: who they are ([`Roster`], built once per run from the seed
//! with each vehicle's pre-history), and their state while the simulation runs ([`Fleet`]):
//! stays, arrivals and departures, link outages, energy and SoC, each vehicle's governor, the
//! slots its jobs hold, its departure forecast and the `NodeView` the scheduler sees.
//!
//! Submodules: `roster` (building the vehicles), `view` (the scheduler's view of them).
//!
//! Owns: `Roster`, `Fleet` and its `Vehicle`s (with their dwell histories and governors), the
//! vehicle events' random stream, and the fleet's counters (parked, eligible, busy slots, slots
//! freed since the last dispatch).
//! May import: `event`, `window`, `driver`, `metrics`, `rng`, `scenario`, `vehicle_model`,
//! `options`. Jobs are only ids here: this module knows nothing of the job table.

use tokenfleet_scheduler::hint::prefetch;
use tokenfleet_scheduler::{DepartureForecast, DwellHistory, JobId, Millis};
use tokenfleet_vehicle::{Governor, GovernorDecision};

use crate::event::{Ev, Events};
use crate::metrics::Metrics;
use crate::rng::Rng;
use crate::scenario::Scenario;
use crate::vehicle_model::{
    self, Place, Signals, Stay, CHARGE_LIMIT_PCT, HOUR, HYSTERESIS_PCT, MIN,
};
use crate::window::Window;

mod roster;
mod view;

use view::tariff;

pub(crate) use roster::Roster;

/// How long a departure forecast is reused before it is recomputed.
pub const FORECAST_REFRESH_MS: u64 = 30 * 60_000;

struct Vehicle {
    arch: u8,
    class: u8,
    region: u16,
    stay: Stay,
    parked: bool,
    link_up: bool,
    eligible: bool,
    /// The governor allows computing (Eligible, Computing or Throttled).
    gov_allowed: bool,
    /// When the governor's current dwell ends (0: not dwelling).
    gov_wake: Millis,
    soc: f32,
    last_t: Millis,
    busy: u32,
    epoch: u32,
    stay_no: u32,
    slot_h: f32,
    rtt_ms: f32,
    /// Jobs running on the vehicle, in start order, each with whether it is a batch job (the
    /// node view lists those without touching the job records).
    running: Vec<(u32, bool)>,
    forecast: DepartureForecast,
    /// `stay_no` the forecast was made for (`u32::MAX`: none yet).
    forecast_stay: u32,
}

/// A partition's vehicles while it is simulated. Vehicle `v` is node `NodeId(v)`.
pub(crate) struct Fleet {
    vehicles: Vec<Vehicle>,
    histories: Vec<DwellHistory>,
    governors: Vec<Governor>,
    /// Vehicles the scheduler knows (later changes go through the cheap `update` path).
    registered: Vec<bool>,
    /// Reused for a node view's running batch jobs.
    scratch: Vec<JobId>,
    /// The vehicle events' stream (RTTs, outages, hand-backs, next stays).
    rng: Rng,
    parked: u32,
    eligible: u32,
    slots_busy: u64,
    /// Slots that became free on eligible vehicles since the last [`Fleet::take_freed`].
    freed: usize,
    calib_cursor: usize,
}

/// How the eligibility of a vehicle changed in [`Fleet::apply_governor`].
pub(crate) struct Eligibility {
    pub was: bool,
    pub now: bool,
}

impl Fleet {
    /// The roster's vehicles, with the partition's seed for their events.
    pub fn new(roster: Roster, seed: u64) -> Fleet {
        let n = roster.vehicles.len();
        Fleet {
            vehicles: roster.vehicles,
            histories: roster.histories,
            governors: roster.governors,
            registered: vec![false; n],
            scratch: Vec::new(),
            rng: Rng::derive(seed, 2),
            parked: 0,
            eligible: 0,
            slots_busy: 0,
            freed: 0,
            calib_cursor: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.vehicles.len()
    }

    pub fn parked(&self) -> u32 {
        self.parked
    }

    pub fn eligible_count(&self) -> u32 {
        self.eligible
    }

    pub fn slots_busy(&self) -> u64 {
        self.slots_busy
    }

    /// Slots freed on eligible vehicles since the last call (a hint for the dispatch window).
    pub fn take_freed(&mut self) -> usize {
        std::mem::take(&mut self.freed)
    }

    /// When the vehicle's current (or next) stay begins.
    pub fn arrival(&self, v: u32) -> Millis {
        self.vehicles[v as usize].stay.arrive
    }

    /// The vehicle's epoch: a `Check` event made in another epoch is stale.
    pub fn epoch(&self, v: u32) -> u32 {
        self.vehicles[v as usize].epoch
    }

    /// The jobs running on the vehicle, in start order.
    pub fn running(&self, v: u32) -> Vec<u32> {
        self.vehicles[v as usize]
            .running
            .iter()
            .map(|&(j, _)| j)
            .collect()
    }

    /// The jobs running on every vehicle, vehicle by vehicle.
    pub fn all_running(&self) -> Vec<u32> {
        self.vehicles
            .iter()
            .flat_map(|veh| veh.running.iter().map(|&(j, _)| j))
            .collect()
    }

    /// Start loading vehicle `v`'s record (a hint).
    pub fn prefetch(&self, v: usize) {
        if let Some(veh) = self.vehicles.get(v) {
            prefetch(veh);
        }
    }

    /// Start loading vehicle `v`'s running list (a hint).
    pub fn prefetch_running(&self, v: usize) {
        if let Some(first) = self.vehicles.get(v).and_then(|veh| veh.running.first()) {
            prefetch(first);
        }
    }

    /// The vehicle arrives for its current stay: link up, a round trip for the place, its
    /// departure and maybe a link outage scheduled.
    pub fn arrive(&mut self, sc: &Scenario, now: Millis, v: u32, events: &mut Events) {
        let veh = &mut self.vehicles[v as usize];
        veh.parked = true;
        veh.link_up = true;
        veh.last_t = now.max(veh.stay.arrive);
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
        events.push(dep, Ev::Depart(v));
        if self
            .rng
            .chance(1.0 - (-sc.link.outages_per_hour * dur_h).exp())
        {
            let at = now + (self.rng.unit() * (dep - now) as f64) as u64;
            events.push(at, Ev::OutageStart(v, epoch));
        }
    }

    /// The driver is back: the gear leaves Park. Returns whether the vehicle hands its work
    /// back gracefully.
    pub fn leave(&mut self, sc: &Scenario, v: u32) -> bool {
        let graceful = self.rng.chance(sc.link.graceful_handback);
        self.vehicles[v as usize].parked = false;
        graceful
    }

    /// After [`Fleet::leave`]: record the stay, drive to the next one and schedule its arrival.
    pub fn drive_on(
        &mut self,
        sc: &Scenario,
        w: &Window,
        now: Millis,
        v: u32,
        events: &mut Events,
    ) {
        let veh = &mut self.vehicles[v as usize];
        let a = &sc.archetypes[veh.arch as usize];
        self.histories[v as usize].record(veh.stay.arrive, veh.stay.depart);
        veh.epoch += 1;
        self.parked -= 1;
        let next = vehicle_model::next_stay(
            a.kind,
            &a.plug_prob,
            &mut self.rng,
            &w.clock,
            now,
            veh.stay.place,
            veh.slot_h as f64,
        );
        let drive_kwh = vehicle_model::trip_kwh(next.arrive - now);
        veh.soc = (veh.soc - 100.0 * drive_kwh / a.battery_kwh).max(5.0);
        veh.stay = next;
        events.push(next.arrive, Ev::Arrive(v));
    }

    /// A link outage starts if the vehicle is still in stay `stay_no`; schedules its end.
    pub fn outage_start(
        &mut self,
        sc: &Scenario,
        now: Millis,
        v: u32,
        stay_no: u32,
        events: &mut Events,
    ) -> bool {
        let veh = &mut self.vehicles[v as usize];
        if !(veh.parked && veh.stay_no == stay_no) {
            return false;
        }
        veh.link_up = false;
        let mins = self.rng.exp(sc.link.outage_minutes).max(0.5);
        events.push(now + (mins * MIN as f64) as u64, Ev::OutageEnd(v));
        true
    }

    pub fn link_restored(&mut self, v: u32) {
        self.vehicles[v as usize].link_up = true;
    }

    /// Step the governor of every vehicle parked before measurement once, at its arrival (at
    /// most an hour back): dwells already served are then not served again at the start.
    pub fn warm_up_governors(&mut self, t_start: Millis) {
        for (veh, gov) in self.vehicles.iter().zip(&mut self.governors) {
            if veh.parked {
                let at = veh.stay.arrive.max(t_start.saturating_sub(HOUR));
                let signals = Signals {
                    parked: true,
                    plugged: veh.stay.plugged,
                    soc_pct: veh.soc,
                };
                vehicle_model::step_governor(gov, signals, at, false);
            }
        }
    }

    /// Integrate energy and SoC from the vehicle's last update to now.
    pub fn settle(&mut self, sc: &Scenario, now: Millis, v: u32, m: &mut Metrics) {
        let veh = &mut self.vehicles[v as usize];
        if !veh.parked || now <= veh.last_t {
            veh.last_t = veh.last_t.max(now);
            return;
        }
        let a = &sc.archetypes[veh.arch as usize];
        let class = &sc.classes[veh.class as usize];
        let dt_h = (now - veh.last_t) as f64 / HOUR as f64;
        let compute_kw = if veh.busy > 0 {
            (sc.economics.awake_w
                + class.power_idle_w
                + (class.power_max_w - class.power_idle_w) * veh.busy as f32 / class.slots as f32)
                as f64
                / 1000.0
        } else {
            0.0
        };
        let kwh = compute_kw * dt_h;
        if veh.stay.plugged {
            let tariff = tariff(sc, veh.stay.place) as f64;
            m.grid_kwh += kwh;
            m.energy_cost += kwh * tariff;
            let charge_kw = vehicle_model::charger_kw(a.kind, veh.stay.place) as f64;
            let gain = 100.0 * charge_kw * dt_h / a.battery_kwh as f64;
            if veh.soc < CHARGE_LIMIT_PCT {
                veh.soc = (veh.soc + gain as f32).min(CHARGE_LIMIT_PCT);
            }
        } else {
            m.battery_kwh += kwh;
            m.energy_cost +=
                kwh * (sc.economics.tariff_home / sc.economics.charge_efficiency) as f64;
            veh.soc = (veh.soc - (100.0 * kwh / a.battery_kwh as f64) as f32).max(0.0);
        }
        veh.last_t = now;
    }

    /// Step the vehicle's governor with its current signals (`must_evict`: hand work back).
    pub fn step_governor(&mut self, v: u32, now: Millis) -> GovernorDecision {
        let veh = &self.vehicles[v as usize];
        let signals = Signals {
            parked: veh.parked,
            plugged: veh.stay.plugged,
            soc_pct: veh.soc,
        };
        vehicle_model::step_governor(&mut self.governors[v as usize], signals, now, veh.busy > 0)
    }

    /// Take the governor's decision: whether it allows computing, when its dwell ends, and so
    /// whether the vehicle is eligible (the free slots of a newly eligible one count as freed).
    pub fn apply_governor(
        &mut self,
        sc: &Scenario,
        v: u32,
        now: Millis,
        d: &GovernorDecision,
    ) -> Eligibility {
        let allowed = vehicle_model::allows_compute(d.state);
        let wake = vehicle_model::dwell_remaining_ms(d).map_or(0, |ms| now + ms);
        let veh = &mut self.vehicles[v as usize];
        veh.gov_allowed = allowed;
        veh.gov_wake = wake;
        let eligible = allowed && veh.parked && veh.link_up;
        let was = veh.eligible;
        veh.eligible = eligible;
        if was && !eligible {
            self.eligible -= 1;
        } else if !was && eligible {
            self.eligible += 1;
            let free = sc.classes[veh.class as usize]
                .slots
                .saturating_sub(veh.busy);
            self.freed += free as usize;
        }
        Eligibility { was, now: eligible }
    }

    /// Schedule the next time the vehicle's governor must look again by itself: the end of a
    /// dwell, the SoC reaching the reserve while computing on battery, or charging reaching the
    /// start SoC. Earlier checks are superseded (`epoch`).
    pub fn schedule_check(&mut self, sc: &Scenario, now: Millis, v: u32, events: &mut Events) {
        let veh = &mut self.vehicles[v as usize];
        veh.epoch += 1;
        if !veh.parked {
            return;
        }
        let a = &sc.archetypes[veh.arch as usize];
        let mut at = if veh.gov_wake > now {
            veh.gov_wake
        } else {
            Millis::MAX
        };
        if veh.busy > 0 && !veh.stay.plugged && veh.eligible {
            let class = &sc.classes[veh.class as usize];
            let kw = (sc.economics.awake_w
                + class.power_idle_w
                + (class.power_max_w - class.power_idle_w) * veh.busy as f32 / class.slots as f32)
                / 1000.0;
            let pct_per_h = 100.0 * kw / a.battery_kwh;
            let h = ((veh.soc - a.soc_reserve_pct).max(0.0) / pct_per_h) as f64;
            at = at.min(now + (h * HOUR as f64) as u64 + 1);
        }
        let start = a.soc_reserve_pct + HYSTERESIS_PCT;
        if !veh.gov_allowed && veh.stay.plugged && veh.soc < start && start <= CHARGE_LIMIT_PCT {
            let kw = vehicle_model::charger_kw(a.kind, veh.stay.place);
            let h = ((start - veh.soc) / (100.0 * kw / a.battery_kwh)) as f64;
            at = at.min(now + (h * HOUR as f64) as u64 + 1);
        }
        let e = veh.epoch;
        if at < veh.stay.depart {
            events.push(at, Ev::Check(v, e));
        }
    }

    /// Job `j` starts on a slot of vehicle `v`: returns the vehicle's compute class (index into
    /// the scenario's classes) and its round trip, ms.
    pub fn occupy(&mut self, v: u32, j: u32, batch: bool) -> (usize, f32) {
        let veh = &mut self.vehicles[v as usize];
        veh.busy += 1;
        veh.running.push((j, batch));
        self.slots_busy += 1;
        (veh.class as usize, veh.rtt_ms)
    }

    /// Job `j` leaves its slot on vehicle `v`.
    pub fn release(&mut self, v: u32, j: u32) {
        let veh = &mut self.vehicles[v as usize];
        veh.busy = veh.busy.saturating_sub(1);
        if let Some(pos) = veh.running.iter().position(|&(x, _)| x == j) {
            veh.running.swap_remove(pos);
        }
        self.slots_busy -= 1;
        if veh.eligible {
            self.freed += 1;
        }
    }
}

/// For tests elsewhere in the crate: set up a vehicle's state and read it back.
#[cfg(test)]
impl Fleet {
    /// Vehicle `v` parked with its link up since `arrive`, leaving at `depart`.
    pub fn park_for_test(&mut self, v: u32, now: Millis, arrive: Millis, depart: Millis) {
        let veh = &mut self.vehicles[v as usize];
        veh.parked = true;
        veh.link_up = true;
        veh.last_t = now;
        veh.stay.arrive = arrive;
        veh.stay.depart = depart;
    }

    pub fn set_plugged_for_test(&mut self, v: u32, plugged: bool) {
        self.vehicles[v as usize].stay.plugged = plugged;
    }

    pub fn set_soc_for_test(&mut self, v: u32, soc: f32) {
        self.vehicles[v as usize].soc = soc;
    }

    /// (archetype, compute class) indices.
    pub fn kind_of(&self, v: u32) -> (usize, usize) {
        let veh = &self.vehicles[v as usize];
        (veh.arch as usize, veh.class as usize)
    }

    pub fn is_eligible(&self, v: u32) -> bool {
        self.vehicles[v as usize].eligible
    }

    pub fn governor(&self, v: u32) -> &Governor {
        &self.governors[v as usize]
    }
}
