//! A run's vehicles as built from its seed, before any simulation: archetype, class, region and
//! the pre-history up to the start of measurement; dealt out to partitions.
//!
//! Part of `fleet`: owns [`Roster`]. May import what `fleet` may.

use std::sync::Arc;

use tokenfleet_scheduler::{DepartureForecast, DwellHistory, Millis};
use tokenfleet_vehicle::{Governor, Millis as VMillis, Policy};

use super::Vehicle;
use crate::options::RunOptions;
use crate::rng::Rng;
use crate::scenario::{ArchetypeKind, Scenario};
use crate::vehicle_model::{self, Place, HOUR};
use crate::window::Window;

/// A run's vehicles as built, before any simulation: each with its dwell history and governor.
pub(crate) struct Roster {
    pub(super) vehicles: Vec<Vehicle>,
    /// Each vehicle's dwell history, apart from [`Vehicle`]: it is read only at arrival and
    /// departure and when a forecast is refreshed, while the vehicle's hot fields are touched on
    /// every job start and finish (a million vehicles do not fit in cache; small records do
    /// better).
    pub(super) histories: Vec<DwellHistory>,
    /// Each vehicle's governor (`tokenfleet-vehicle`), under its archetype's shared policy.
    pub(super) governors: Vec<Governor>,
}

impl Roster {
    /// Build the whole fleet in vehicle order from the run's seed: archetype, class, region and
    /// each vehicle's pre-history up to the start of measurement. Partitioning takes vehicles
    /// from this list, so the fleet is the same whatever the partitioning.
    pub fn build(sc: &Scenario, opts: &RunOptions, policies: &[Arc<Policy>]) -> Roster {
        let seed = opts.seed.unwrap_or(sc.seed);
        let n = opts.vehicles.unwrap_or(sc.vehicles) as usize;
        let w = Window::of(sc, opts);
        let mut rng = Rng::derive(seed, 1);
        let mut r = Roster {
            vehicles: Vec::with_capacity(n),
            histories: Vec::with_capacity(n),
            governors: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let arch = rng.weighted(sc.archetypes.iter().map(|a| a.share));
            let class = rng.weighted(sc.compute.iter().map(|c| c.share));
            let region = rng.weighted(sc.regions.iter().map(|r| r.share));
            let (veh, history, started) = prehistory(sc, &w, &mut rng, arch, class, region);
            r.vehicles.push(veh);
            r.histories.push(history);
            r.governors.push(Governor::shared(
                Arc::clone(&policies[arch]),
                VMillis(started),
            ));
        }
        r
    }

    pub fn len(&self) -> usize {
        self.vehicles.len()
    }

    /// Deal the vehicles out in order to `n` rosters, vehicle of class `c` to `part_of_class[c]`.
    pub fn split(self, part_of_class: &[usize], n: usize) -> Vec<Roster> {
        let mut out: Vec<Roster> = (0..n)
            .map(|_| Roster {
                vehicles: Vec::new(),
                histories: Vec::new(),
                governors: Vec::new(),
            })
            .collect();
        let all = self
            .vehicles
            .into_iter()
            .zip(self.histories)
            .zip(self.governors);
        for ((veh, h), g) in all {
            let r = &mut out[part_of_class[veh.class as usize]];
            r.vehicles.push(veh);
            r.histories.push(h);
            r.governors.push(g);
        }
        out
    }
}

/// One vehicle of archetype `arch`, class `class` in region `region`, with its pre-history:
/// its stays walked from some hours before the calendar's start to the start of measurement
/// without the event loop (nothing computes before it), each finished stay recorded in the
/// dwell history and the state of charge tracked. Also returns when its governor started.
fn prehistory(
    sc: &Scenario,
    w: &Window,
    rng: &mut Rng,
    arch: usize,
    class: usize,
    region: usize,
) -> (Vehicle, DwellHistory, Millis) {
    let (clock, t_start) = (w.clock, w.t_start);
    let t0 = clock.t0;
    let a = &sc.archetypes[arch];
    let slot_h = rng.uniform(0.0, 1.5) as f32;
    // Start somewhere in the last stay before t0, then let warm-up settle things.
    let from = match a.kind {
        ArchetypeKind::Commuter => Place::Work,
        ArchetypeKind::DeliveryVan => Place::Depot,
        ArchetypeKind::RideHail => Place::Public,
        ArchetypeKind::CarShare => Place::Public,
    };
    let back = rng.uniform(2.0, 20.0) as u64 * HOUR;
    let mut soc = rng.uniform(40.0, 90.0) as f32;
    let mut history = DwellHistory::new(sc.utc_offset_min);
    let mut stay = vehicle_model::next_stay(
        a.kind,
        &a.plug_prob,
        rng,
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
            rng,
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
    let veh = Vehicle {
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
    };
    (veh, history, t0 - back)
}
