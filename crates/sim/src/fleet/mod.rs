//! Vehicles inside the simulation: energy and SoC integration, governor eligibility (with
//! evictions when a vehicle stops being eligible), the SoC-floor timer and the `NodeView` the
//! scheduler sees.

use tokenfleet_scheduler::{DepartureForecast, DepartureHints, JobId, Millis, NodeId, NodeView};

use crate::engine::{Ev, Sim};
use crate::vehicle_model::{self, Place, Signals, CHARGE_LIMIT_PCT, HOUR, HYSTERESIS_PCT};

impl Sim<'_> {
    /// Integrate energy and SoC from the vehicle's last update to now.
    pub fn settle(&mut self, v: u32) {
        let sc = self.sc;
        let veh = &mut self.vehicles[v as usize];
        let now = self.now;
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
            self.m.grid_kwh += kwh;
            self.m.energy_cost += kwh * tariff;
            let charge_kw = vehicle_model::charger_kw(a.kind, veh.stay.place) as f64;
            let gain = 100.0 * charge_kw * dt_h / a.battery_kwh as f64;
            if veh.soc < CHARGE_LIMIT_PCT {
                veh.soc = (veh.soc + gain as f32).min(CHARGE_LIMIT_PCT);
            }
        } else {
            self.m.battery_kwh += kwh;
            self.m.energy_cost +=
                kwh * (sc.economics.tariff_home / sc.economics.charge_efficiency) as f64;
            veh.soc = (veh.soc - (100.0 * kwh / a.battery_kwh as f64) as f32).max(0.0);
        }
        veh.last_t = now;
    }

    /// Step the vehicle's governor with its current signals; hand work back when the governor
    /// drains (or the link is down); schedule the next check; upsert when live.
    pub fn reevaluate(&mut self, v: u32, graceful: bool) {
        let sc = self.sc;
        let now = self.now;
        let veh = &self.vehicles[v as usize];
        let signals = Signals {
            parked: veh.parked,
            plugged: veh.stay.plugged,
            soc_pct: veh.soc,
        };
        let gov = &mut self.governors[v as usize];
        let mut d = vehicle_model::step_governor(gov, signals, now, veh.busy > 0);
        let must_evict = d.must_evict;
        if must_evict {
            // In-flight work is handed back now; with nothing left the governor stops draining.
            if self.live {
                self.evict_all(v, graceful);
            }
            let busy = self.vehicles[v as usize].busy > 0;
            d = vehicle_model::step_governor(&mut self.governors[v as usize], signals, now, busy);
        }
        let allowed = vehicle_model::allows_compute(d.state);
        let wake = vehicle_model::dwell_remaining_ms(&d).map_or(0, |ms| now + ms);
        let veh = &mut self.vehicles[v as usize];
        veh.gov_allowed = allowed;
        veh.gov_wake = wake;
        let eligible = allowed && veh.parked && veh.link_up;
        let was = veh.eligible;
        veh.eligible = eligible;
        if was && !eligible {
            self.eligible_count -= 1;
        } else if !was && eligible {
            self.eligible_count += 1;
            let free = sc.classes[veh.class as usize]
                .slots
                .saturating_sub(veh.busy);
            self.freed += free as usize;
        }
        if !self.live {
            return;
        }
        if was && !eligible && !must_evict {
            // The link went down: the coordinator loses the node and requeues its work.
            self.evict_all(v, graceful);
        }
        self.schedule_check(v);
        self.upsert(v);
        if !was && eligible {
            self.want_dispatch();
        }
    }

    /// Schedule the next time the vehicle's governor must look again by itself: the end of a
    /// dwell, the SoC reaching the reserve while computing on battery, or charging reaching the
    /// start SoC. Earlier checks are superseded (`epoch`).
    pub fn schedule_check(&mut self, v: u32) {
        let sc = self.sc;
        let now = self.now;
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
            self.push(at, Ev::Check(v, e));
        }
    }

    /// Tell the scheduler about vehicle `v`: a full view the first time, then only the dynamic
    /// fields through `Driver::update` (no allocation on the per-job path).
    pub fn upsert(&mut self, v: u32) {
        let d = self.dynamic(v);
        if !self.registered[v as usize] {
            self.registered[v as usize] = true;
            let mut view = self.static_view(v);
            d.apply(&mut view, &self.scratch);
            self.driver.upsert(view);
        } else {
            let scratch = &self.scratch;
            self.driver
                .update(NodeId(v as u64), |view| d.apply(view, scratch));
        }
    }

    fn static_view(&self, v: u32) -> NodeView {
        let sc = self.sc;
        let veh = &self.vehicles[v as usize];
        let a = &sc.archetypes[veh.arch as usize];
        let class = &sc.classes[veh.class as usize];
        NodeView {
            id: NodeId(v as u64),
            models: vec![class.model.clone()],
            slots_total: class.slots,
            slots_busy: 0,
            decode_tps_single: class.decode_tps_single,
            decode_tps_batched: class.decode_tps_batched,
            prefill_tps: class.prefill_tps,
            eligible: false,
            soc_pct: None,
            soc_reserve_pct: a.soc_reserve_pct,
            plugged_in: false,
            regions: sc.regions[veh.region as usize].names.clone(),
            tariff_per_kwh: 0.0,
            power_w: sc.economics.awake_w + class.power_max_w,
            link_rtt_ms: 0.0,
            reputation: 1.0,
            attested: true,
            departure: DepartureForecast::unknown(self.now),
            running_batch: Vec::new(),
            oracle_departure: None,
        }
    }

    /// The departure forecast for the current stay: made at arrival and refreshed every
    /// [`FORECAST_REFRESH_MS`] (survival is conditional on the time already parked, so a forecast
    /// stays valid for a while; the refresh picks up the charging time to complete).
    pub fn forecast(&mut self, v: u32) -> DepartureForecast {
        let sc = self.sc;
        let now = self.now;
        let veh = &mut self.vehicles[v as usize];
        if !veh.parked {
            return DepartureForecast::certain(now, now);
        }
        if veh.forecast_stay == veh.stay_no
            && now.saturating_sub(veh.forecast.made_at) < FORECAST_REFRESH_MS
        {
            return veh.forecast;
        }
        let a = &sc.archetypes[veh.arch as usize];
        let ttc = if veh.stay.plugged && veh.soc < 90.0 {
            let kw = vehicle_model::charger_kw(a.kind, veh.stay.place);
            Some(((90.0 - veh.soc) / 100.0 * a.battery_kwh / kw * 3600.0) as u32)
        } else {
            None
        };
        let hints = DepartureHints {
            scheduled_departure: veh.stay.scheduled_departure,
            charge_time_to_complete_s: ttc,
        };
        veh.forecast = self.histories[v as usize].forecast(veh.stay.arrive, now, &hints);
        veh.forecast_stay = veh.stay_no;
        veh.forecast
    }

    fn dynamic(&mut self, v: u32) -> Dynamic {
        let departure = self.forecast(v);
        let sc = self.sc;
        let veh = &self.vehicles[v as usize];
        self.scratch.clear();
        self.scratch.extend(
            veh.running
                .iter()
                .filter(|&&(_, batch)| batch)
                .map(|&(j, _)| JobId(j as u64)),
        );
        Dynamic {
            slots_busy: veh.busy,
            eligible: veh.eligible,
            soc_pct: veh.soc,
            plugged_in: veh.parked && veh.stay.plugged,
            tariff_per_kwh: tariff(sc, veh.stay.place),
            link_rtt_ms: veh.rtt_ms,
            departure,
            oracle_departure: veh.parked.then_some(veh.stay.depart),
        }
    }
}

/// How long a departure forecast is reused before it is recomputed.
pub const FORECAST_REFRESH_MS: u64 = 30 * 60_000;

/// Tariff where a vehicle is parked.
pub fn tariff(sc: &crate::Scenario, place: Place) -> f32 {
    match place {
        Place::Home => sc.economics.tariff_home,
        Place::Work => sc.economics.tariff_work,
        Place::Depot => sc.economics.tariff_depot,
        Place::Public => sc.economics.tariff_public,
    }
}

/// The fields of a vehicle's `NodeView` that change while it is registered.
struct Dynamic {
    slots_busy: u32,
    eligible: bool,
    soc_pct: f32,
    plugged_in: bool,
    tariff_per_kwh: f32,
    link_rtt_ms: f32,
    departure: DepartureForecast,
    oracle_departure: Option<tokenfleet_scheduler::Millis>,
}

impl Dynamic {
    fn apply(&self, v: &mut NodeView, running_batch: &[JobId]) {
        v.slots_busy = self.slots_busy;
        v.eligible = self.eligible;
        v.soc_pct = Some(self.soc_pct);
        v.plugged_in = self.plugged_in;
        v.tariff_per_kwh = self.tariff_per_kwh;
        v.link_rtt_ms = self.link_rtt_ms;
        v.departure = self.departure;
        v.oracle_departure = self.oracle_departure;
        v.running_batch.clear();
        v.running_batch.extend_from_slice(running_batch);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokenfleet_scheduler::{JobClass, JobId, PolicyKind, QueuedJob};
    use tokenfleet_vehicle::{GovernorState, Policy};

    use crate::engine::Sim;
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
            .find(|p| !p.vehicles.is_empty())
            .expect("the vehicle's partition");
        let mut sim = Sim::new(&sc, PolicyKind::Tokenfleet, &opts, part, None);
        sim.live = true;
        let now = sim.t_start;
        sim.now = now;
        let reserve = sc.archetypes[sim.vehicles[0].arch as usize].soc_reserve_pct;
        let model = sc.classes[sim.vehicles[0].class as usize].model.clone();
        {
            let veh = &mut sim.vehicles[0];
            veh.parked = true;
            veh.link_up = true;
            veh.last_t = now;
            veh.stay.arrive = now - 2 * 60 * MIN;
            veh.stay.depart = now + 10 * 60 * MIN;
            veh.stay.plugged = false;
            veh.soc = reserve - 1.0;
        }
        let offer = |sim: &mut Sim, at: u64| {
            sim.now = at;
            sim.reevaluate(0, true);
            sim.driver.decide(at, &[interactive(&model, at)])
        };
        // Below the reserve, unplugged: never given work, however long it waits.
        for k in 0..5 {
            let d = offer(&mut sim, now + k * 10 * MIN);
            assert!(d.assignments.is_empty(), "{d:?}");
            assert!(!sim.vehicles[0].eligible);
            assert_eq!(sim.governors[0].state(), GovernorState::Unavailable);
        }
        // Plugged in, still below the start SoC: the governor keeps it unavailable.
        sim.vehicles[0].stay.plugged = true;
        let t = now + 60 * MIN;
        assert!(offer(&mut sim, t).assignments.is_empty());
        // Above the start SoC: eligible once the governor's dwell has passed.
        sim.vehicles[0].soc = reserve + HYSTERESIS_PCT + 1.0;
        assert!(offer(&mut sim, t + 1).assignments.is_empty());
        assert_eq!(sim.governors[0].state(), GovernorState::Unavailable);
        let dwell = sim.governors[0].policy().timing.eligible_dwell.as_millis() as u64;
        let d = offer(&mut sim, t + 1 + dwell);
        assert_eq!(d.assignments.len(), 1, "{d:?}");
        assert!(sim.vehicles[0].eligible);
        assert_eq!(sim.governors[0].state(), GovernorState::Eligible);
    }
}
