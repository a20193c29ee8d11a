//! What the scheduler sees of the fleet: each vehicle's `NodeView` (a full view once, then its
//! dynamic fields), its departure forecast, and the forecasts' calibration.
//!
//! Part of `fleet` (owns nothing of its own; reads and caches into the fleet's vehicles).
//! May import what `fleet` may.

use tokenfleet_scheduler::forecast::LEVELS;
use tokenfleet_scheduler::{DepartureForecast, DepartureHints, JobId, Millis, NodeId, NodeView};

use super::{Fleet, FORECAST_REFRESH_MS};
use crate::driver::Driver;
use crate::metrics::Metrics;
use crate::scenario::Scenario;
use crate::vehicle_model::{self, Place};

/// Vehicles looked at per calibration sample.
const CALIB_PER_SAMPLE: usize = 1000;

impl Fleet {
    /// Forecast calibration over parked, eligible vehicles (not over placements, which would be
    /// biased towards vehicles whose forecast happened to be long): the probability integral
    /// transform `u = 1 - S(true remaining)` is counted against each quantile level.
    pub fn sample_calibration(&mut self, sc: &Scenario, now: Millis, m: &mut Metrics) {
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
            let remaining = veh.stay.depart.saturating_sub(now);
            let f = self.forecast(sc, now, v as u32);
            let u = 1.0 - f.survival(now, remaining);
            for (i, level) in LEVELS.iter().enumerate() {
                if u <= *level + 1e-6 {
                    m.calib_hits[i] += 1;
                }
            }
            m.calib_n += 1;
        }
    }

    /// Tell the scheduler about vehicle `v`: a full view the first time, then only the dynamic
    /// fields through `Driver::update` (no allocation on the per-job path).
    pub fn upsert(&mut self, sc: &Scenario, now: Millis, v: u32, driver: &mut Driver) {
        let d = self.dynamic(sc, now, v);
        if !self.registered[v as usize] {
            self.registered[v as usize] = true;
            let mut view = self.static_view(sc, now, v);
            d.apply(&mut view, &self.scratch);
            driver.upsert(view);
        } else {
            let scratch = &self.scratch;
            driver.update(NodeId(v as u64), |view| d.apply(view, scratch));
        }
    }

    fn static_view(&self, sc: &Scenario, now: Millis, v: u32) -> NodeView {
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
            departure: DepartureForecast::unknown(now),
            running_batch: Vec::new(),
            oracle_departure: None,
        }
    }

    /// The departure forecast for the current stay: made at arrival and refreshed every
    /// [`FORECAST_REFRESH_MS`] (survival is conditional on the time already parked, so a forecast
    /// stays valid for a while; the refresh picks up the charging time to complete).
    fn forecast(&mut self, sc: &Scenario, now: Millis, v: u32) -> DepartureForecast {
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

    fn dynamic(&mut self, sc: &Scenario, now: Millis, v: u32) -> Dynamic {
        let departure = self.forecast(sc, now, v);
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

/// Tariff where a vehicle is parked.
pub(super) fn tariff(sc: &Scenario, place: Place) -> f32 {
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
    oracle_departure: Option<Millis>,
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
