//! The vehicle and energy model used by the simulator: where a vehicle parks and for how long
//! (per archetype), charging, the governor's eligibility rule and battery wear.
//!
//! Eligibility is decided by `tokenfleet-vehicle`'s [`Governor`], the one the agent runs: each
//! vehicle has its own, under its archetype's [`Policy`] ([`governor_policy`]), stepped with
//! the vehicle's gear, 12 V state, cable and SoC as VSS signals ([`Signals`]) whenever one of
//! them changes or a dwell ends.
//!
//! Dwell figures (FIELD-NOTES, ElaadNL-derived data in ev2gym): home arrivals 15-18 h stay
//! 13.9-15.5 h; work arrivals 7-8:30 stay 7.6-8.5 h; public stays about 3 h; cars are parked
//! about 95% of the time. Van, ride-hail and car-share patterns are ASSUMPTIONS built around them.
//!
//! Owns: dwell, charging, trip energy, wear, governor signals. May import: `scenario`, `rng`.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::scenario::{Archetype, ArchetypeKind, PlugProb};
use tokenfleet_scheduler::Millis;
use tokenfleet_vehicle::signals::GEAR_PARK;
use tokenfleet_vehicle::{
    Governor, GovernorDecision, GovernorState, LowVoltageSystemState, Millis as VMillis, Policy,
    PolicyError, Reason, Signal, SignalValue, StepContext, VehicleState,
};

pub const MIN: u64 = 60_000;
pub const HOUR: u64 = 60 * MIN;
pub const DAY: u64 = 24 * HOUR;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Place {
    Home,
    Work,
    Depot,
    Public,
}

/// One parked stay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stay {
    pub place: Place,
    pub arrive: Millis,
    pub depart: Millis,
    pub plugged: bool,
    /// Departure announced by the operator's schedule (vans).
    pub scheduled_departure: Option<Millis>,
}

/// Local calendar helpers; `t0` is Monday 00:00 local.
#[derive(Clone, Copy)]
pub struct Clock {
    pub t0: Millis,
}

impl Clock {
    pub fn day_index(&self, t: Millis) -> u64 {
        t.saturating_sub(self.t0) / DAY
    }
    pub fn hour(&self, t: Millis) -> f64 {
        (t.saturating_sub(self.t0) % DAY) as f64 / HOUR as f64
    }
    pub fn weekday(&self, t: Millis) -> u64 {
        self.day_index(t) % 7
    }
    /// `day` days after the day of `t`, at local hour `h`.
    pub fn at(&self, t: Millis, day: u64, h: f64) -> Millis {
        let d = self.day_index(t) + day;
        self.t0 + d * DAY + (h.max(0.0) * HOUR as f64) as u64
    }
}

fn hours(h: f64) -> u64 {
    (h.max(0.0) * HOUR as f64) as u64
}

/// The stay that starts after leaving `from` at `now` (a trip, then a parked stay).
/// `slot_h` is a fixed per-vehicle offset (a van's departure slot, a commuter's habit).
pub fn next_stay(
    kind: ArchetypeKind,
    plug: &PlugProb,
    rng: &mut Rng,
    clock: &Clock,
    now: Millis,
    from: Place,
    slot_h: f64,
) -> Stay {
    let trip =
        |rng: &mut Rng, median_min: f64| (rng.lognormal(median_min, 0.4) * MIN as f64) as u64;
    let plugged = |rng: &mut Rng, p: Place| {
        rng.chance(match p {
            Place::Home => plug.home,
            Place::Work => plug.work,
            Place::Depot => plug.depot,
            Place::Public => plug.public,
        })
    };
    let (place, arrive, depart, sched) = match kind {
        ArchetypeKind::Commuter => {
            let arrive = now + trip(rng, 25.0);
            let wd = clock.weekday(arrive);
            let h = clock.hour(arrive);
            let (place, depart) = if from == Place::Home && wd < 5 && h < 11.0 {
                // Work: arrivals 7-8:30, stay 7.6-8.5 h.
                (Place::Work, arrive + hours(rng.normal(8.05, 0.45)))
            } else if from != Place::Public && rng.chance(if wd < 5 { 0.2 } else { 0.7 }) {
                // Errand or leisure: public, about 3 h.
                (
                    Place::Public,
                    arrive + hours(rng.lognormal(2.5, 0.5).min(8.0)),
                )
            } else {
                // Home until the next morning (weekday) or late morning (weekend).
                let next_wd = clock.weekday(clock.at(arrive, 1, 0.0));
                let leave_h = if next_wd < 5 {
                    6.6 + slot_h + rng.normal(0.0, 0.3)
                } else {
                    rng.uniform(9.5, 14.0)
                };
                let dep = clock.at(arrive, 1, leave_h);
                // Home arrivals after midnight (rare) leave the same day.
                let dep = if h < 4.0 {
                    clock.at(arrive, 0, leave_h)
                } else {
                    dep
                };
                (Place::Home, dep.max(arrive + 30 * MIN))
            };
            (place, arrive, depart, None)
        }
        ArchetypeKind::DeliveryVan => {
            // Out on the route all day, back to the depot 17-19 h; leave on the schedule.
            let back = clock.at(now, 0, rng.normal(18.0, 0.6));
            let arrive = back.max(now + 6 * HOUR);
            let mut day = 1;
            if clock.weekday(clock.at(arrive, 1, 0.0)) == 6 {
                day = 2; // Sunday off.
            }
            let sched = clock.at(arrive, day, 5.5 + slot_h);
            let depart = (sched as i64 + (rng.normal(0.0, 8.0) * MIN as f64) as i64).max(0) as u64;
            (Place::Depot, arrive, depart.max(arrive + HOUR), Some(sched))
        }
        ArchetypeKind::RideHail => {
            if from == Place::Home {
                // Shift: 4-6 h driving, then a 30-60 min fast-charge break.
                let arrive = now + hours(rng.uniform(4.0, 6.0));
                (
                    Place::Public,
                    arrive,
                    arrive + hours(rng.uniform(0.5, 1.0)),
                    None,
                )
            } else {
                // Second half of the shift, then off-shift at home ~8-10 h.
                let arrive = now + hours(rng.uniform(4.0, 6.0));
                (
                    Place::Home,
                    arrive,
                    arrive + hours(rng.uniform(8.0, 10.0)),
                    None,
                )
            }
        }
        ArchetypeKind::CarShare => {
            // Rentals ~1.5 h; parked at a station between them, overnight from late evening.
            let arrive = now + (rng.lognormal(1.5, 0.6).min(10.0) * HOUR as f64) as u64;
            let h = clock.hour(arrive);
            let depart = if !(6.0..21.0).contains(&h) {
                let d = if h >= 21.0 { 1 } else { 0 };
                clock.at(arrive, d, rng.uniform(7.0, 10.0))
            } else {
                arrive + (rng.exp(3.0).clamp(0.25, 12.0) * HOUR as f64) as u64
            };
            (Place::Public, arrive, depart.max(arrive + 15 * MIN), None)
        }
    };
    let place_plug = match (kind, place) {
        // Ride-hail breaks are at fast chargers.
        (ArchetypeKind::RideHail, Place::Public) => true,
        _ => plugged(rng, place),
    };
    Stay {
        place,
        arrive,
        depart,
        plugged: place_plug,
        scheduled_departure: sched,
    }
}

/// Charger power at a place, kW.
pub fn charger_kw(kind: ArchetypeKind, place: Place) -> f32 {
    match (kind, place) {
        (ArchetypeKind::RideHail, Place::Public) => 50.0,
        (_, Place::Home) => 7.4,
        (_, Place::Work) | (_, Place::Depot) => 11.0,
        (_, Place::Public) => 11.0,
    }
}

/// Daily charge limit, percent: charging stops here.
pub const CHARGE_LIMIT_PCT: f32 = 90.0;

/// State of charge after charging (no compute) from the stay's arrival until `until`, capped at
/// 90% (the usual daily charge limit).
pub fn charge_during(a: &Archetype, stay: &Stay, until: Millis, soc: f32) -> f32 {
    if !stay.plugged || soc >= 90.0 {
        return soc;
    }
    let h = until.saturating_sub(stay.arrive) as f32 / HOUR as f32;
    (soc + 100.0 * charger_kw(a.kind, stay.place) * h / a.battery_kwh).min(90.0)
}

/// Driving energy for a trip, kWh (about 15 kWh/h of driving, an assumption).
pub fn trip_kwh(duration_ms: u64) -> f32 {
    15.0 * duration_ms as f32 / HOUR as f32
}

pub use crate::scenario::HYSTERESIS_PCT;

/// Battery, compute-unit and 12 V readings the simulator reports to every governor. The
/// simulator does not model temperatures or the 12 V battery; these nominal values keep the
/// governor's thermal and low-voltage rules satisfied (and its throttle at full budget).
const BATTERY_C: f64 = 25.0;
const COMPUTE_C: f64 = 45.0;
const LOW_VOLTAGE_V: f64 = 12.6;
/// VSS `SelectedGear` while driving (any gear but Park, 126).
const GEAR_DRIVE: i64 = 1;

/// The operator policy of an archetype (see [`Archetype::governor_policy`]).
pub fn governor_policy(a: &Archetype, utc_offset_min: i32) -> Result<Policy, PolicyError> {
    a.governor_policy(utc_offset_min)
}

/// What the simulator knows about a vehicle, as the VSS signals its governor reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Signals {
    pub parked: bool,
    pub plugged: bool,
    pub soc_pct: f32,
}

impl Signals {
    /// A [`VehicleState`] with every signal the governor needs measured at `now`.
    pub fn state(&self, now: Millis) -> VehicleState {
        let at = VMillis(now);
        let mut vs = VehicleState::new();
        let gear = if self.parked {
            GEAR_PARK as i64
        } else {
            GEAR_DRIVE
        };
        let lv = if self.parked {
            LowVoltageSystemState::Off
        } else {
            LowVoltageSystemState::On
        };
        vs.set(Signal::SelectedGear, at, SignalValue::Int(gear));
        vs.set(Signal::IsMoving, at, SignalValue::Bool(!self.parked));
        vs.set(
            Signal::Speed,
            at,
            SignalValue::Float(if self.parked { 0.0 } else { 30.0 }),
        );
        vs.set(
            Signal::LowVoltageSystemState,
            at,
            SignalValue::LowVoltage(lv),
        );
        vs.set(
            Signal::ChargingCableConnected,
            at,
            SignalValue::Bool(self.parked && self.plugged),
        );
        vs.set(
            Signal::StateOfCharge,
            at,
            SignalValue::Float(self.soc_pct as f64),
        );
        vs.set(
            Signal::BatteryTemperature,
            at,
            SignalValue::Float(BATTERY_C),
        );
        vs.set(
            Signal::ComputeTemperature,
            at,
            SignalValue::Float(COMPUTE_C),
        );
        vs.set(
            Signal::LowVoltageBatteryVoltage,
            at,
            SignalValue::Float(LOW_VOLTAGE_V),
        );
        vs
    }
}

/// Step a vehicle's governor (`tokenfleet-vehicle`'s, the one the agent runs) with the
/// simulator's view of the vehicle. Returns the decision; `allowed` is
/// [`allows_compute`]`(decision.state)`.
pub fn step_governor(
    gov: &mut Governor,
    signals: Signals,
    now: Millis,
    work_present: bool,
) -> GovernorDecision {
    gov.step(
        &signals.state(now),
        VMillis(now),
        StepContext::with_work(work_present),
    )
}

/// The governor lets the vehicle take work (Eligible, Computing or Throttled).
pub fn allows_compute(state: GovernorState) -> bool {
    matches!(
        state,
        GovernorState::Eligible | GovernorState::Computing | GovernorState::Throttled
    )
}

/// When the governor should be stepped again by itself: the end of a dwell it is waiting out.
pub fn dwell_remaining_ms(d: &GovernorDecision) -> Option<u64> {
    match d.reason {
        Reason::Dwell { remaining_ms } | Reason::RestartDwell { remaining_ms } => {
            Some(remaining_ms)
        }
        _ => None,
    }
}

/// BLAST-Lite-style battery wear attributable to compute (NMC, 25 C, FIELD-NOTES):
/// cycling term about 0.003% of capacity per full equivalent cycle. The calendar term (1.02%/yr
/// at 50% SoC, 1.95% at 70%) is not charged to compute: computing on battery lowers the SoC
/// and so slightly *reduces* calendar loss, which is conservatively ignored.
pub fn wear_cost(battery_kwh_used: f64, pack_kwh: f64, pack_cost_per_kwh: f64) -> f64 {
    if pack_kwh <= 0.0 {
        return 0.0;
    }
    let efc = battery_kwh_used / pack_kwh;
    let loss_frac = 3.0e-5 * efc;
    loss_frac * pack_kwh * pack_cost_per_kwh
}
