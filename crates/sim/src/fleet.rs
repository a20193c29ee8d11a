//! Vehicles inside the simulation: energy and SoC integration, governor eligibility (with
//! evictions when a vehicle stops being eligible), the SoC-floor timer and the `NodeView` the
//! scheduler sees.

use tokenfleet_scheduler::{DepartureForecast, DepartureHints, JobClass, JobId, NodeId, NodeView};

use crate::engine::{Ev, Sim};
use crate::vehicle_model::{self, Governor, Place, HOUR};

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
            let tariff = match veh.stay.place {
                Place::Home => sc.economics.tariff_home,
                Place::Work => sc.economics.tariff_work,
                Place::Depot => sc.economics.tariff_depot,
                Place::Public => sc.economics.tariff_public,
            } as f64;
            self.m.grid_kwh += kwh;
            self.m.energy_cost += kwh * tariff;
            let charge_kw = vehicle_model::charger_kw(a.kind, veh.stay.place) as f64;
            let gain = 100.0 * charge_kw * dt_h / a.battery_kwh as f64;
            if veh.soc < 90.0 {
                veh.soc = (veh.soc + gain as f32).min(90.0);
            }
        } else {
            self.m.battery_kwh += kwh;
            self.m.energy_cost +=
                kwh * (sc.economics.tariff_home / sc.economics.charge_efficiency) as f64;
            veh.soc = (veh.soc - (100.0 * kwh / a.battery_kwh as f64) as f32).max(0.0);
        }
        veh.last_t = now;
    }

    /// Recompute governor eligibility; evict work when the vehicle becomes ineligible; schedule
    /// the SoC-floor check; upsert when live.
    pub fn reevaluate(&mut self, v: u32, graceful: bool) {
        let sc = self.sc;
        let veh = &mut self.vehicles[v as usize];
        let a = &sc.archetypes[veh.arch as usize];
        let (eligible, blocked) = Governor::eligible(
            veh.parked,
            veh.link_up,
            veh.stay.plugged,
            a.compute_on_battery,
            veh.soc,
            a.soc_reserve_pct,
            veh.soc_blocked,
        );
        veh.soc_blocked = blocked;
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
        if was && !eligible {
            self.evict_all(v, graceful);
        }
        self.schedule_soc_floor(v);
        self.upsert(v);
        if !was && eligible {
            self.want_dispatch();
        }
    }

    pub fn schedule_soc_floor(&mut self, v: u32) {
        let sc = self.sc;
        let veh = &mut self.vehicles[v as usize];
        veh.epoch += 1;
        if veh.busy == 0 || veh.stay.plugged || !veh.eligible {
            return;
        }
        let a = &sc.archetypes[veh.arch as usize];
        let class = &sc.classes[veh.class as usize];
        let kw = (sc.economics.awake_w
            + class.power_idle_w
            + (class.power_max_w - class.power_idle_w) * veh.busy as f32 / class.slots as f32)
            / 1000.0;
        let pct_per_h = 100.0 * kw / a.battery_kwh;
        let h = ((veh.soc - a.soc_reserve_pct).max(0.0) / pct_per_h) as f64;
        let at = self.now + (h * HOUR as f64) as u64 + 1;
        let e = veh.epoch;
        if at < veh.stay.depart {
            self.push(at, Ev::SocFloor(v, e));
        }
    }

    pub fn view(&mut self, v: u32) -> NodeView {
        let sc = self.sc;
        let now = self.now;
        let veh = &mut self.vehicles[v as usize];
        let a = &sc.archetypes[veh.arch as usize];
        let class = &sc.classes[veh.class as usize];
        let ttc = if veh.parked && veh.stay.plugged && veh.soc < 90.0 {
            let kw = vehicle_model::charger_kw(a.kind, veh.stay.place);
            Some(((90.0 - veh.soc) / 100.0 * a.battery_kwh / kw * 3600.0) as u32)
        } else {
            None
        };
        let hints = DepartureHints {
            scheduled_departure: veh.stay.scheduled_departure,
            charge_time_to_complete_s: ttc,
        };
        veh.forecast = if veh.parked {
            veh.history.forecast(veh.stay.arrive, now, &hints)
        } else {
            DepartureForecast::certain(now, now)
        };
        let tariff = match veh.stay.place {
            Place::Home => sc.economics.tariff_home,
            Place::Work => sc.economics.tariff_work,
            Place::Depot => sc.economics.tariff_depot,
            Place::Public => sc.economics.tariff_public,
        };
        NodeView {
            id: NodeId(v as u64),
            models: vec![class.model.clone()],
            slots_total: class.slots,
            slots_busy: veh.busy,
            decode_tps_single: class.decode_tps_single,
            decode_tps_batched: class.decode_tps_batched,
            prefill_tps: class.prefill_tps,
            eligible: veh.eligible,
            soc_pct: Some(veh.soc),
            soc_reserve_pct: a.soc_reserve_pct,
            plugged_in: veh.parked && veh.stay.plugged,
            regions: sc.regions[veh.region as usize].names.clone(),
            tariff_per_kwh: tariff,
            power_w: sc.economics.awake_w + class.power_max_w,
            link_rtt_ms: veh.rtt_ms,
            reputation: 1.0,
            attested: true,
            departure: veh.forecast,
            running_batch: veh
                .running
                .iter()
                .filter(|&&j| self.jobs[j as usize].class == JobClass::Batch)
                .map(|&j| JobId(j as u64))
                .collect(),
            oracle_departure: veh.parked.then_some(veh.stay.depart),
        }
    }
}
