//! A simulated vehicle: a driving/parking/charging schedule, state-of-charge dynamics that
//! include the compute load, and a first-order thermal model of the compute unit.
//!
//! [`SimulatedVehicle::advance`] integrates exactly between `self`'s last time and `now`
//! (piecewise over schedule segments and charge-limit crossings), never reads a clock and
//! never allocates, so a fleet simulator can step millions of them. It emits the same VSS
//! signals as a real vehicle into a [`VehicleState`], with noise on SoC, temperatures and
//! voltages (deterministic from the seed).
//!
//! # Layout
//!
//! - `schedule` — [`Schedule`]: what the vehicle does when ([`Activity`], [`Segment`]).
//! - `params` — [`VehicleParams`], including the diurnal ambient temperature.
//! - `thermal` — [`ComputeThermal`], the compute unit's first-order thermal model.
//! - here — [`SimulatedVehicle`], which integrates all of them and emits the signals.

use std::time::Duration;

use crate::signals::{LowVoltageSystemState, Signal, SignalValue, VehicleState, GEAR_PARK};
use crate::time::Millis;

mod params;
mod schedule;
mod thermal;

pub use params::VehicleParams;
pub use schedule::{Activity, Schedule, Segment, HOME, WORK};
pub use thermal::ComputeThermal;

/// VSS `SelectedGear` for Drive.
pub const GEAR_DRIVE: i32 = 127;

/// splitmix64: tiny deterministic PRNG (no dependency, no allocation).
#[derive(Debug, Clone, Copy)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Approximately normal (Irwin–Hall, 4 terms), unit variance.
    fn normal(&mut self) -> f64 {
        let s: f64 = (0..4).map(|_| self.uniform()).sum();
        (s - 2.0) * (3.0f64).sqrt()
    }
}

/// A vehicle following a schedule.
#[derive(Debug, Clone)]
pub struct SimulatedVehicle {
    schedule: Schedule,
    params: VehicleParams,
    rng: Rng,
    t: Millis,
    seg: usize,
    seg_start: Millis,
    seg_from: (f64, f64),
    soc_pct: f64,
    battery_temp_c: f64,
    battery_power_w: f64,
    thermal: ComputeThermal,
    lv_voltage: f64,
    pos: (f64, f64),
    charging: bool,
    state: VehicleState,
}

/// Which phase the vehicle is in at an instant.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Parked { charger_kw: Option<f64> },
    Preparing,
    Driving { speed_kmh: f64, kwh_per_km: f64 },
}

impl SimulatedVehicle {
    /// A vehicle at the start of its schedule. `seed` makes the measurement noise
    /// reproducible.
    pub fn new(schedule: Schedule, params: VehicleParams, seed: u64) -> SimulatedVehicle {
        let start = schedule.start;
        let pos = match schedule.segments.first().map(|s| s.activity) {
            Some(Activity::Park { lat, lon, .. }) => (lat, lon),
            Some(Activity::Drive { .. }) | None => HOME,
        };
        let ambient = params.ambient_c(start);
        let charger = match schedule.segments.first().map(|s| s.activity) {
            Some(Activity::Park {
                charger_kw: Some(kw),
                ..
            }) if params.initial_soc_pct < params.charge_limit_pct => Some(kw),
            _ => None,
        };
        let mut v = SimulatedVehicle {
            schedule,
            params,
            rng: Rng(seed ^ 0x05EE_D0F7_E51A),
            t: start,
            seg: 0,
            seg_start: start,
            seg_from: pos,
            soc_pct: params.initial_soc_pct,
            battery_temp_c: ambient + 2.0,
            battery_power_w: charger.map_or(0.0, |kw| kw * 1000.0 * params.charge_efficiency),
            thermal: ComputeThermal {
                r_th_k_per_w: params.compute_r_th_k_per_w,
                tau_s: params.compute_tau_s,
                temp_c: ambient + params.enclosure_offset_c,
            },
            lv_voltage: 12.7,
            pos,
            charging: charger.is_some(),
            state: VehicleState::new(),
        };
        v.emit(start, 0.0);
        v
    }

    /// The signals as of the last `advance`.
    pub fn state(&self) -> &VehicleState {
        &self.state
    }
    /// True state of charge (no noise), percent.
    pub fn true_soc_pct(&self) -> f64 {
        self.soc_pct
    }
    /// True compute-unit temperature (no noise), °C.
    pub fn true_compute_temp_c(&self) -> f64 {
        self.thermal.temp_c
    }
    /// The parameters.
    pub fn params(&self) -> &VehicleParams {
        &self.params
    }
    /// Simulation time.
    pub fn now(&self) -> Millis {
        self.t
    }

    fn seg_end(&self) -> Millis {
        match self.schedule.segments.get(self.seg) {
            Some(s) => {
                if !self.schedule.repeat && self.seg + 1 == self.schedule.segments.len() {
                    Millis(u64::MAX)
                } else {
                    self.seg_start + s.duration
                }
            }
            None => Millis(u64::MAX),
        }
    }

    fn next_segment(&mut self) {
        let end = self.seg_end();
        self.seg_start = end;
        self.seg_from = self.pos;
        self.seg += 1;
        if self.seg >= self.schedule.segments.len() {
            self.seg = 0;
        }
    }

    fn phase_at(&self, t: Millis) -> Phase {
        match self.schedule.segments.get(self.seg).map(|s| s.activity) {
            Some(Activity::Park { charger_kw, .. }) => Phase::Parked { charger_kw },
            Some(Activity::Drive {
                speed_kmh,
                kwh_per_km,
                ..
            }) => {
                if t.ms_since(self.seg_start) < (self.params.departure_prep_s * 1000.0) as u64 {
                    Phase::Preparing
                } else {
                    Phase::Driving {
                        speed_kmh,
                        kwh_per_km,
                    }
                }
            }
            None => Phase::Parked { charger_kw: None },
        }
    }

    /// Advance to `now` with the compute unit drawing `compute_power_w` (0 when not
    /// computing) and return the signals at `now`.
    pub fn advance(&mut self, now: Millis, compute_power_w: f64) -> &VehicleState {
        let compute_w = compute_power_w.max(0.0);
        let period = self.schedule.period_ms();
        if period == 0 {
            self.t = self.t.max(now);
            self.emit(now, compute_w);
            return &self.state;
        }
        let cap_wh = self.params.pack_capacity_kwh * 1000.0;
        while self.t < now {
            while self.t >= self.seg_end() {
                self.next_segment();
            }
            let mut piece_end = now.min(self.seg_end());
            let phase = self.phase_at(self.t);
            if phase == Phase::Preparing {
                let prep_end =
                    self.seg_start + Duration::from_secs_f64(self.params.departure_prep_s);
                piece_end = piece_end.min(prep_end);
            }
            let (power_into_battery_w, charging) = match phase {
                Phase::Parked {
                    charger_kw: Some(kw),
                } => {
                    let overhead = if compute_w > 0.0 {
                        self.params.awake_overhead_w
                    } else {
                        0.0
                    };
                    if self.soc_pct < self.params.charge_limit_pct {
                        let p = kw * 1000.0 * self.params.charge_efficiency - compute_w - overhead;
                        if p > 0.0 {
                            let to_limit_h =
                                (self.params.charge_limit_pct - self.soc_pct) / 100.0 * cap_wh / p;
                            let lim =
                                self.t + Duration::from_secs_f64((to_limit_h * 3600.0).max(0.001));
                            piece_end = piece_end.min(lim);
                        }
                        (p, true)
                    } else {
                        // charger tops up the load but does not charge the pack
                        (0.0, false)
                    }
                }
                Phase::Parked { charger_kw: None } => {
                    let overhead = if compute_w > 0.0 {
                        self.params.awake_overhead_w
                    } else {
                        0.0
                    };
                    (-(compute_w + overhead), false)
                }
                Phase::Preparing => (-(compute_w + self.params.driving_aux_w), false),
                Phase::Driving {
                    speed_kmh,
                    kwh_per_km,
                } => (
                    -(speed_kmh * kwh_per_km * 1000.0
                        + self.params.driving_aux_w
                        + self.params.driving_compute_w
                        + compute_w),
                    false,
                ),
            };
            let dt_s = piece_end.ms_since(self.t) as f64 / 1000.0;
            let mut soc = self.soc_pct + power_into_battery_w * dt_s / 3600.0 / cap_wh * 100.0;
            if charging {
                soc = soc.min(self.params.charge_limit_pct.max(self.soc_pct));
            }
            self.soc_pct = soc.clamp(0.0, 100.0);
            self.battery_power_w = power_into_battery_w;
            self.charging = charging;
            let mid = self.t + Duration::from_secs_f64(dt_s / 2.0);
            let ambient = self.params.ambient_c(mid);
            let b_ss = ambient + self.params.battery_heat_k_per_w * power_into_battery_w.abs();
            self.battery_temp_c =
                b_ss + (self.battery_temp_c - b_ss) * (-dt_s / self.params.battery_tau_s).exp();
            let unit_w = match phase {
                Phase::Driving { .. } => compute_w + self.params.driving_compute_w,
                _ => compute_w,
            };
            self.thermal
                .step(ambient + self.params.enclosure_offset_c, unit_w, dt_s);
            // 12 V: DC-DC keeps it up while driving, charging or awake; slow drain otherwise
            let supported = !matches!(phase, Phase::Parked { .. }) || charging || compute_w > 0.0;
            if supported {
                self.lv_voltage = 14.0;
            } else {
                self.lv_voltage = (self.lv_voltage.min(12.75) - 0.01 * dt_s / 3600.0).max(11.5);
            }
            // position
            if let (Some(Activity::Drive { to_lat, to_lon, .. }), Some(seg)) = (
                self.schedule.segments.get(self.seg).map(|s| s.activity),
                self.schedule.segments.get(self.seg),
            ) {
                let f = (piece_end.ms_since(self.seg_start) as f64
                    / seg.duration.as_millis().max(1) as f64)
                    .clamp(0.0, 1.0);
                self.pos = (
                    self.seg_from.0 + (to_lat - self.seg_from.0) * f,
                    self.seg_from.1 + (to_lon - self.seg_from.1) * f,
                );
            } else if let Some(Activity::Park { lat, lon, .. }) =
                self.schedule.segments.get(self.seg).map(|s| s.activity)
            {
                self.pos = (lat, lon);
            }
            self.t = piece_end;
        }
        self.emit(now, compute_w);
        &self.state
    }

    fn emit(&mut self, now: Millis, compute_w: f64) {
        let p = self.params;
        let phase = self.phase_at(now);
        let (speed, gear, lv, plugged) = match phase {
            Phase::Parked { charger_kw } => (
                0.0,
                GEAR_PARK,
                LowVoltageSystemState::Off,
                charger_kw.is_some(),
            ),
            Phase::Preparing => (0.0, GEAR_PARK, LowVoltageSystemState::On, false),
            Phase::Driving { speed_kmh, .. } => {
                let wobble = (now.as_secs_f64() / 90.0).sin() * 0.35;
                let s = (speed_kmh * (1.0 + wobble) + 2.0 * self.rng.normal()).max(3.0);
                (s, GEAR_DRIVE, LowVoltageSystemState::On, false)
            }
        };
        let soc = (self.soc_pct + p.soc_noise_pct * self.rng.normal()).clamp(0.0, 100.0);
        let btemp = self.battery_temp_c + p.temp_noise_c * self.rng.normal();
        let ctemp = self.thermal.temp_c + p.temp_noise_c * self.rng.normal();
        let air = self.params.ambient_c(now) + p.temp_noise_c * self.rng.normal();
        let volts = self.lv_voltage + p.voltage_noise_v * self.rng.normal();
        let unit_w = match phase {
            Phase::Driving { .. } => compute_w + p.driving_compute_w,
            _ => compute_w,
        };
        let ttc = if self.charging && self.battery_power_w > 0.0 {
            let wh =
                (p.charge_limit_pct - self.soc_pct).max(0.0) / 100.0 * p.pack_capacity_kwh * 1000.0;
            (wh / self.battery_power_w * 3600.0).round() as i64
        } else {
            0
        };
        let st = &mut self.state;
        use SignalValue::*;
        st.set(Signal::Speed, now, Float(speed));
        st.set(Signal::IsMoving, now, Bool(speed > 0.0));
        st.set(Signal::SelectedGear, now, Int(i64::from(gear)));
        st.set(Signal::IsParkLockEngaged, now, Bool(gear == GEAR_PARK));
        st.set(Signal::StateOfCharge, now, Float(soc));
        st.set(Signal::IsCharging, now, Bool(self.charging));
        st.set(Signal::ChargingCableConnected, now, Bool(plugged));
        st.set(Signal::TimeToComplete, now, Int(ttc));
        st.set(Signal::BatteryTemperature, now, Float(btemp));
        st.set(
            Signal::BatteryCurrentPower,
            now,
            Float(self.battery_power_w),
        );
        st.set(Signal::LowVoltageSystemState, now, LowVoltage(lv));
        st.set(Signal::LowVoltageBatteryVoltage, now, Float(volts));
        st.set(Signal::Latitude, now, Float(self.pos.0));
        st.set(Signal::Longitude, now, Float(self.pos.1));
        st.set(Signal::AirTemperature, now, Float(air));
        st.set(Signal::ComputeTemperature, now, Float(ctemp));
        st.set(Signal::ComputePower, now, Float(unit_w));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn midnight() -> Millis {
        // 2025-06-02T00:00:00+02:00
        Millis::from_secs(1_748_815_200)
    }

    #[test]
    fn commuter_day_charges_drives_and_parks() {
        let t0 = midnight();
        let mut v = SimulatedVehicle::new(
            Schedule::commuter_day(t0, false),
            VehicleParams::default(),
            1,
        );
        let at = |h: u64, m: u64| t0 + Duration::from_secs(h * 3600 + m * 60);
        let s = v.advance(at(2, 0), 0.0).clone();
        assert_eq!(s.is_charging(at(2, 0)).fresh(), Some(true));
        assert_eq!(s.cable_connected(at(2, 0)).fresh(), Some(true));
        assert_eq!(s.selected_gear(at(2, 0)).fresh(), Some(GEAR_PARK));
        let soc_morning = {
            v.advance(at(7, 30), 0.0);
            v.true_soc_pct()
        };
        assert!(
            (soc_morning - 85.0).abs() < 1e-6,
            "charged to the limit: {soc_morning}"
        );
        let s = v.advance(at(7, 40) + Duration::from_secs(30), 0.0).clone();
        let t = at(7, 40) + Duration::from_secs(30);
        assert_eq!(
            s.low_voltage_state(t).fresh(),
            Some(LowVoltageSystemState::On)
        );
        assert_eq!(
            s.selected_gear(t).fresh(),
            Some(GEAR_PARK),
            "driver preparing"
        );
        let s = v.advance(at(8, 0), 0.0).clone();
        assert_eq!(s.selected_gear(at(8, 0)).fresh(), Some(GEAR_DRIVE));
        assert!(s.speed_kmh(at(8, 0)).fresh().unwrap() > 0.0);
        v.advance(at(9, 0), 0.0);
        let soc_work = v.true_soc_pct();
        assert!(
            soc_work < soc_morning - 5.0 && soc_work > soc_morning - 12.0,
            "{soc_work}"
        );
        assert_eq!(v.state().cable_connected(at(9, 0)).fresh(), Some(false));
        // computing at work drains the pack: 40 W + 300 W awake overhead for 2 h = 0.68 kWh
        for k in 1..=120 {
            v.advance(at(9, k), 40.0);
        }
        let drop = soc_work - v.true_soc_pct();
        assert!((drop - 0.68 / 75.0 * 100.0).abs() < 1e-6, "{drop}");
        // and heats the compute unit toward ambient + offset + R_th·P
        let amb = VehicleParams::default().ambient_c(at(11, 0)) + 4.0;
        assert!((v.true_compute_temp_c() - (amb + 40.0)).abs() < 1.5);
        // home in the evening, plugged in and charging again
        v.advance(at(19, 0), 0.0);
        assert_eq!(v.state().is_charging(at(19, 0)).fresh(), Some(true));
        let (lat, _) = v.state().location(at(19, 0)).fresh().unwrap();
        assert!((lat - HOME.0).abs() < 1e-9);
    }

    #[test]
    fn big_steps_and_small_steps_agree() {
        let t0 = midnight();
        let sched = Schedule::commuter_day(t0, true);
        let mut a = SimulatedVehicle::new(sched.clone(), VehicleParams::default(), 7);
        let mut b = SimulatedVehicle::new(sched, VehicleParams::default(), 7);
        let end = t0 + Duration::from_secs(30 * 3600);
        a.advance(end, 20.0);
        let mut t = t0;
        while t < end {
            t = t + Duration::from_secs(10);
            b.advance(t, 20.0);
        }
        assert!(
            (a.true_soc_pct() - b.true_soc_pct()).abs() < 0.5,
            "{} vs {}",
            a.true_soc_pct(),
            b.true_soc_pct()
        );
        assert!((a.true_compute_temp_c() - b.true_compute_temp_c()).abs() < 1.0);
    }
}
