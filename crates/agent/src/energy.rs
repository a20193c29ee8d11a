//! Per-job energy, split grid vs battery, and the battery wear it caused: what `JobDone`
//! reports.
//!
//! The compute unit's power comes from the best source present, in this order: the vehicle's
//! own power signal (VSS `Vehicle.ControlUnit.Central.Health.Resources.Power`, carried in the
//! [`VehicleStatus`]) when the vehicle side says it is measured; Linux powercap/RAPL; the
//! hardware power model at the engine's current duty cycle. Anything from the model is
//! reported as estimated, never as measured.
//!
//! Power is shared equally by the jobs running during an interval (they share every decode
//! step). Energy drawn while plugged in is grid energy; unplugged it comes out of the traction
//! battery and is priced with the vehicle crate's cycle-wear model.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokenfleet_vehicle::{HardwareProfile, JobEnergy, Millis, Quality, RaplReader, WearModel};

use crate::status::VehicleStatus;

/// Power is re-read at most this often; the integral in between uses the last reading.
const POWER_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Battery temperature assumed for wear when the vehicle does not report one.
const DEFAULT_BATTERY_TEMP_C: f64 = 25.0;

/// The agent's energy ledger: which jobs are running and what each has used so far.
#[derive(Debug)]
pub struct JobEnergyLedger {
    hardware: HardwareProfile,
    wear: WearModel,
    rapl: Option<RaplReader>,
    /// Last power reading and its quality.
    power: Option<(f64, Quality)>,
    power_read_at: Option<Instant>,
    last: Instant,
    jobs: HashMap<String, JobEnergy>,
}

impl JobEnergyLedger {
    /// A ledger using RAPL when the host exposes it (`/sys/class/powercap/intel-rapl:0`).
    pub fn new(hardware: HardwareProfile, wear: WearModel) -> Self {
        Self::with_rapl(hardware, wear, RaplReader::open_default())
    }

    /// A ledger with an explicit RAPL reader (or none).
    pub fn with_rapl(hardware: HardwareProfile, wear: WearModel, rapl: Option<RaplReader>) -> Self {
        Self {
            hardware,
            wear,
            rapl,
            power: None,
            power_read_at: None,
            last: Instant::now(),
            jobs: HashMap::new(),
        }
    }

    /// Attributes the interval since the previous call to the jobs running during it. Call it
    /// before the set of running jobs changes.
    pub fn account(&mut self, status: &VehicleStatus, now: Instant) {
        let dt = now.saturating_duration_since(self.last);
        self.last = now;
        if self.jobs.is_empty() {
            // Idle power is not any job's; the next interval starts fresh.
            self.power = None;
            return;
        }
        let stale = self
            .power_read_at
            .is_none_or(|t| now.saturating_duration_since(t) >= POWER_SAMPLE_INTERVAL);
        if stale || self.power.is_none() {
            if let Some(p) = self.read_power(status) {
                self.power = Some(p);
                self.power_read_at = Some(now);
            }
        }
        let (watts, quality) = self.power.unwrap_or_else(|| self.modelled(status));
        let kwh = watts * dt.as_secs_f64() / JOULES_PER_KWH;
        if kwh <= 0.0 {
            return;
        }
        let share = 1.0 / self.jobs.len() as f64;
        let plugged_in = status.state.plugged_in;
        let wear = if plugged_in {
            None
        } else {
            let temp = status
                .state
                .battery_temp_c
                .map_or(DEFAULT_BATTERY_TEMP_C, f64::from);
            Some(self.wear.cycle_wear(kwh * share, temp))
        };
        for job in self.jobs.values_mut() {
            job.compute_time += dt;
            match wear {
                None => job.grid.add(kwh * share, quality),
                Some(w) => {
                    job.battery.add(kwh * share, quality);
                    job.wear.capacity_fraction += w.capacity_fraction;
                    job.wear.usd += w.usd;
                }
            }
        }
    }

    /// A job started running (call [`Self::account`] first).
    pub fn begin(&mut self, job_id: &str) {
        self.jobs.entry(job_id.to_string()).or_default();
    }

    /// A job stopped running (finished, evicted, cancelled or failed): what it used.
    pub fn end(&mut self, job_id: &str) -> JobEnergy {
        self.jobs.remove(job_id).unwrap_or_default()
    }

    /// The best reading available now: the vehicle's measured signal, then RAPL. `None` when
    /// neither is present (the model is used).
    fn read_power(&mut self, status: &VehicleStatus) -> Option<(f64, Quality)> {
        let signal = f64::from(status.state.compute_power_w);
        if status.compute_power_measured && signal > 0.0 {
            return Some((signal, Quality::Measured));
        }
        let rapl = self.rapl.as_mut()?.sample_w(Millis::now())?;
        Some((rapl, Quality::Measured))
    }

    /// The hardware model at the engine's duty cycle (full power when not throttled).
    fn modelled(&self, status: &VehicleStatus) -> (f64, Quality) {
        let signal = f64::from(status.state.compute_power_w);
        if signal > 0.0 {
            // The vehicle side's own estimate (a simulated or modelled signal).
            return (signal, Quality::Estimated);
        }
        let utilization = status.limits.map_or(1.0, |l| f64::from(l.duty_cycle));
        (self.hardware.power_w(utilization), Quality::Estimated)
    }
}

/// Joules in a kWh.
pub const JOULES_PER_KWH: f64 = 3.6e6;

#[cfg(test)]
mod tests {
    use super::*;

    const HW: HardwareProfile = HardwareProfile {
        idle_w: 10.0,
        full_w: 50.0,
    };

    fn ledger() -> JobEnergyLedger {
        JobEnergyLedger::with_rapl(HW, WearModel::new(75.0, 150.0), None)
    }

    #[test]
    fn modelled_power_is_shared_by_running_jobs_and_marked_estimated() {
        let mut l = ledger();
        let status = VehicleStatus::parked();
        let t0 = Instant::now();
        l.account(&status, t0);
        l.begin("a");
        l.account(&status, t0 + Duration::from_secs(10));
        l.begin("b");
        l.account(&status, t0 + Duration::from_secs(20));
        let a = l.end("a");
        l.account(&status, t0 + Duration::from_secs(30));
        let b = l.end("b");
        // a: 10 s alone + 10 s shared at 50 W = 750 J; b: 10 s shared + 10 s alone = 750 J.
        let j = |e: &JobEnergy| e.total().kwh * JOULES_PER_KWH;
        assert!((j(&a) - 750.0).abs() < 1e-6, "{}", j(&a));
        assert!((j(&b) - 750.0).abs() < 1e-6, "{}", j(&b));
        assert_eq!(a.total().quality, Quality::Estimated);
        // Plugged in: all grid, no wear.
        assert_eq!(a.battery.kwh, 0.0);
        assert_eq!(a.wear.usd, 0.0);
        assert_eq!(a.compute_time, Duration::from_secs(20));
    }

    #[test]
    fn unplugged_energy_comes_from_the_battery_and_costs_wear() {
        let mut l = ledger();
        let mut status = VehicleStatus::parked();
        status.state.plugged_in = false;
        let t0 = Instant::now();
        l.account(&status, t0);
        l.begin("a");
        l.account(&status, t0 + Duration::from_secs(3600));
        let a = l.end("a");
        assert!((a.battery.kwh - 0.05).abs() < 1e-9, "{}", a.battery.kwh);
        assert_eq!(a.grid.kwh, 0.0);
        assert!(a.wear.usd > 0.0 && a.wear.capacity_fraction > 0.0);
    }

    #[test]
    fn a_measured_vehicle_signal_wins_over_the_model_and_a_throttle_lowers_the_model() {
        let mut measured = VehicleStatus::parked();
        measured.state.compute_power_w = 20.0;
        measured.compute_power_measured = true;
        let mut l = ledger();
        let t0 = Instant::now();
        l.account(&measured, t0);
        l.begin("a");
        l.account(&measured, t0 + Duration::from_secs(100));
        let a = l.end("a");
        assert!((a.total().kwh * JOULES_PER_KWH - 2000.0).abs() < 1e-6);
        assert_eq!(a.total().quality, Quality::Measured);

        let mut throttled = VehicleStatus::parked();
        throttled.limits = Some(tokenfleet_engine::Limits {
            max_active: 1,
            duty_cycle: 0.5,
        });
        let mut l = ledger();
        l.account(&throttled, t0);
        l.begin("b");
        l.account(&throttled, t0 + Duration::from_secs(100));
        let b = l.end("b");
        // 10 W idle + 0.5 * 40 W = 30 W for 100 s.
        assert!((b.total().kwh * JOULES_PER_KWH - 3000.0).abs() < 1e-6);
    }

    #[test]
    fn idle_time_is_nobodys() {
        let mut l = ledger();
        let status = VehicleStatus::parked();
        let t0 = Instant::now();
        l.account(&status, t0);
        l.account(&status, t0 + Duration::from_secs(100));
        l.begin("a");
        let a = l.end("a");
        assert_eq!(a.total().kwh, 0.0);
    }
}
