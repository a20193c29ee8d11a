//! Energy accounting per job and per local day, split grid vs battery, with battery wear.
//!
//! Power comes, in order of preference, from the vehicle's own signal
//! (`Vehicle.ControlUnit.Central.Health.Resources.Power`), from Linux powercap/RAPL
//! (`/sys/class/powercap/intel-rapl:0/energy_uj`, see [`RaplReader`]), or from the
//! per-hardware power model ([`crate::policy::HardwareProfile`]). The first two are
//! [`Quality::Measured`]; the model is [`Quality::Estimated`], and a sum that contains any
//! estimate is itself estimated — an estimate is never reported as a measurement.
//!
//! Compute energy is the compute unit's power while the governor is Computing, Throttled
//! or Draining (the unit would otherwise be allowed to sleep). It comes from the grid when
//! the cable is connected and the vehicle is charging, otherwise from the traction battery;
//! battery energy is priced with the [`WearModel`].

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::governor::{GovernorDecision, GovernorState, UsageToday};
use crate::policy::{HardwareProfile, Policy};
use crate::report::DailyReport;
use crate::signals::VehicleState;
use crate::time::Millis;
use crate::wear::{Wear, WearModel};

/// Whether a number was measured or estimated from a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Quality {
    Measured,
    Estimated,
}

impl Quality {
    /// Estimated if either is.
    pub fn combine(self, other: Quality) -> Quality {
        if self == Quality::Estimated || other == Quality::Estimated {
            Quality::Estimated
        } else {
            Quality::Measured
        }
    }
}

/// An energy with its quality.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Kwh {
    pub kwh: f64,
    pub quality: Quality,
}

impl Default for Kwh {
    fn default() -> Self {
        Kwh {
            kwh: 0.0,
            quality: Quality::Measured,
        }
    }
}

impl Kwh {
    /// Add energy of some quality.
    pub fn add(&mut self, kwh: f64, quality: Quality) {
        if kwh > 0.0 {
            self.kwh += kwh;
            self.quality = self.quality.combine(quality);
        }
    }

    /// Sum of two energies.
    pub fn plus(self, other: Kwh) -> Kwh {
        Kwh {
            kwh: self.kwh + other.kwh,
            quality: self.quality.combine(other.quality),
        }
    }
}

impl std::fmt::Display for Kwh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.quality {
            Quality::Measured => write!(f, "{:.3} kWh", self.kwh),
            Quality::Estimated => write!(f, "{:.3} kWh (estimated)", self.kwh),
        }
    }
}

/// Where a power reading came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PowerOrigin {
    VehicleSignal,
    Rapl,
    Model,
}

/// Where the compute energy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EnergySource {
    Grid,
    Battery,
}

/// Energy of one job.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct JobEnergy {
    pub grid: Kwh,
    pub battery: Kwh,
    pub wear: Wear,
    pub compute_time: Duration,
}

impl JobEnergy {
    /// Grid + battery.
    pub fn total(&self) -> Kwh {
        self.grid.plus(self.battery)
    }
}

/// Linux powercap/RAPL package energy counter (x86). Reading it does file I/O: for the
/// agent, not for the simulator.
#[derive(Debug)]
pub struct RaplReader {
    path: PathBuf,
    max_range_uj: u64,
    last: Option<(Millis, u64)>,
}

impl RaplReader {
    /// The default package-0 counter, if readable.
    pub fn open_default() -> Option<RaplReader> {
        Self::open(Path::new("/sys/class/powercap/intel-rapl:0"))
    }

    /// A powercap zone directory holding `energy_uj` (and `max_energy_range_uj`), if readable.
    pub fn open(zone: &Path) -> Option<RaplReader> {
        let path = zone.join("energy_uj");
        read_u64(&path)?;
        let max_range_uj = read_u64(&zone.join("max_energy_range_uj")).unwrap_or(u64::MAX);
        Some(RaplReader {
            path,
            max_range_uj,
            last: None,
        })
    }

    /// Average power since the previous call, W (`None` on the first call or on error).
    pub fn sample_w(&mut self, now: Millis) -> Option<f64> {
        let e = read_u64(&self.path)?;
        let prev = self.last.replace((now, e));
        let (t0, e0) = prev?;
        let dt_ms = now.ms_since(t0);
        if dt_ms == 0 {
            return None;
        }
        let de = if e >= e0 {
            e - e0
        } else {
            // counter wrapped
            self.max_range_uj.saturating_sub(e0).saturating_add(e)
        };
        Some(de as f64 / 1e6 / (dt_ms as f64 / 1000.0))
    }
}

fn read_u64(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Meter for one vehicle: integrates compute power into per-job and per-day energy and wear.
#[derive(Debug, Clone)]
pub struct EnergyMeter {
    hardware: HardwareProfile,
    wear_model: WearModel,
    utc_offset_min: i32,
    last: Option<Millis>,
    last_state: GovernorState,
    last_utilization: f64,
    day: i64,
    today: DailyReport,
    finished: Vec<DailyReport>,
    jobs: HashMap<String, JobEnergy>,
}

impl EnergyMeter {
    /// A meter using the policy's hardware model, pack capacity, replacement price and
    /// local time zone.
    pub fn new(policy: &Policy, now: Millis) -> EnergyMeter {
        let wear_model = WearModel::new(
            policy.pack_capacity_kwh,
            policy.budgets.replacement_usd_per_kwh,
        );
        Self::with_wear_model(policy, wear_model, now)
    }

    /// Same, with an explicit wear model (pack age and history).
    pub fn with_wear_model(policy: &Policy, wear_model: WearModel, now: Millis) -> EnergyMeter {
        let day = now.local_day(policy.utc_offset_min);
        EnergyMeter {
            hardware: policy.compute.hardware,
            wear_model,
            utc_offset_min: policy.utc_offset_min,
            last: None,
            last_state: GovernorState::Unavailable,
            last_utilization: 0.0,
            day,
            today: DailyReport::new(day),
            finished: Vec::new(),
            jobs: HashMap::new(),
        }
    }

    /// The wear model in use.
    pub fn wear_model(&self) -> &WearModel {
        &self.wear_model
    }

    /// Start attributing energy to a job.
    pub fn begin_job(&mut self, job_id: &str) {
        self.jobs.entry(job_id.to_string()).or_default();
    }

    /// Stop attributing energy to a job and return what it used.
    pub fn end_job(&mut self, job_id: &str) -> Option<JobEnergy> {
        self.jobs.remove(job_id)
    }

    /// Tokens produced (counted in today's report).
    pub fn add_tokens(&mut self, n: u64) {
        self.today.tokens += n;
    }

    /// Extra calendar wear from holding the SoC higher for compute (caller's decision).
    pub fn add_calendar_hold(
        &mut self,
        baseline_soc_pct: f64,
        held_soc_pct: f64,
        temp_c: f64,
        hours: f64,
    ) {
        let w = self
            .wear_model
            .calendar_hold_wear(baseline_soc_pct, held_soc_pct, temp_c, hours);
        self.today.wear += w;
    }

    /// Usage so far today, for the governor's budgets.
    pub fn usage_today(&self) -> UsageToday {
        UsageToday {
            energy_kwh: self.today.grid.kwh + self.today.battery.kwh,
            wear_usd: self.today.wear.usd,
            wear_capacity_pct: self.today.wear.capacity_percent(),
        }
    }

    /// Today's report so far.
    pub fn today(&self) -> &DailyReport {
        &self.today
    }

    /// Reports of days that have ended (drained).
    pub fn take_finished_days(&mut self) -> Vec<DailyReport> {
        std::mem::take(&mut self.finished)
    }

    /// End the current day now (e.g. at the end of a replay) and return every report.
    pub fn finish(mut self) -> Vec<DailyReport> {
        let today = std::mem::replace(&mut self.today, DailyReport::new(self.day));
        self.finished.push(today);
        self.finished
    }

    /// Account the interval since the previous step. `decision` is the governor's decision
    /// at `now` (it applies to the next interval); `rapl_w` is an optional RAPL reading.
    pub fn step(
        &mut self,
        vs: &VehicleState,
        now: Millis,
        decision: &GovernorDecision,
        rapl_w: Option<f64>,
    ) {
        if let Some(last) = self.last {
            let dt = now.since(last);
            let hours = dt.as_secs_f64() / 3600.0;
            self.today.time_in_state[state_index(self.last_state)] += dt;
            let active = matches!(
                self.last_state,
                GovernorState::Computing | GovernorState::Throttled | GovernorState::Draining
            );
            if active && hours > 0.0 {
                let (watts, quality, _) = self.power(vs, now, rapl_w);
                let kwh = watts * hours / 1000.0;
                let source = if vs.cable_connected(now).fresh() == Some(true)
                    && vs.is_charging(now).fresh() == Some(true)
                {
                    EnergySource::Grid
                } else {
                    EnergySource::Battery
                };
                let wear = match source {
                    EnergySource::Grid => Wear::default(),
                    EnergySource::Battery => {
                        let t = vs.battery_temperature_c(now).fresh().unwrap_or(25.0);
                        self.wear_model.cycle_wear(kwh, t)
                    }
                };
                self.today.add(source, kwh, quality, wear);
                let n = self.jobs.len();
                if n > 0 {
                    let share = 1.0 / n as f64;
                    for j in self.jobs.values_mut() {
                        match source {
                            EnergySource::Grid => j.grid.add(kwh * share, quality),
                            EnergySource::Battery => j.battery.add(kwh * share, quality),
                        }
                        j.wear.capacity_fraction += wear.capacity_fraction * share;
                        j.wear.usd += wear.usd * share;
                        j.compute_time += dt;
                    }
                }
            }
        }
        // day rollover (after accounting the interval to the day it mostly belongs to)
        let day = now.local_day(self.utc_offset_min);
        if day != self.day {
            let done = std::mem::replace(&mut self.today, DailyReport::new(day));
            self.finished.push(done);
            self.day = day;
        }
        self.last = Some(now);
        self.last_state = decision.state;
        self.last_utilization = decision.budget.utilization;
    }

    /// Compute-unit power now: vehicle signal, then RAPL, then the hardware model.
    pub fn power(
        &self,
        vs: &VehicleState,
        now: Millis,
        rapl_w: Option<f64>,
    ) -> (f64, Quality, PowerOrigin) {
        if let Some(w) = vs.compute_power_w(now).fresh() {
            return (w, Quality::Measured, PowerOrigin::VehicleSignal);
        }
        if let Some(w) = rapl_w.filter(|w| w.is_finite() && *w >= 0.0) {
            return (w, Quality::Measured, PowerOrigin::Rapl);
        }
        (
            self.hardware.power_w(self.last_utilization),
            Quality::Estimated,
            PowerOrigin::Model,
        )
    }
}

pub(crate) fn state_index(s: GovernorState) -> usize {
    match s {
        GovernorState::Unavailable => 0,
        GovernorState::Eligible => 1,
        GovernorState::Computing => 2,
        GovernorState::Throttled => 3,
        GovernorState::Draining => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governor::Reason;
    use crate::signals::{Signal, SignalValue};
    use crate::throttle::ComputeBudget;

    fn policy() -> Policy {
        Policy::from_toml_str(
            "pack_capacity_kwh = 60.0\n[compute]\nidle_power_w = 10.0\nfull_power_w = 30.0\n",
            "V",
        )
        .unwrap()
    }

    fn decision(state: GovernorState, u: f64, p: &Policy) -> GovernorDecision {
        GovernorDecision {
            state,
            budget: ComputeBudget::from_utilization(u, &p.compute),
            reason: Reason::FullBudget,
            must_evict: false,
        }
    }

    #[test]
    fn grid_vs_battery_split_and_quality() {
        let p = policy();
        let t0 = Millis::from_secs(1_748_822_400); // midnight UTC
        let mut m = EnergyMeter::new(&p, t0);
        let mut vs = VehicleState::new();
        let set = |vs: &mut VehicleState, t: Millis, plugged: bool| {
            vs.set(
                Signal::ChargingCableConnected,
                t,
                SignalValue::Bool(plugged),
            );
            vs.set(Signal::IsCharging, t, SignalValue::Bool(plugged));
            vs.set(Signal::BatteryTemperature, t, SignalValue::Float(25.0));
        };
        let computing = decision(GovernorState::Computing, 1.0, &p);
        m.begin_job("j1");
        // one hour plugged in at the model's 30 W: estimated grid energy
        set(&mut vs, t0, true);
        m.step(&vs, t0, &computing, None);
        let t1 = t0 + Duration::from_secs(3600);
        set(&mut vs, t1, true);
        m.step(&vs, t1, &computing, None);
        assert!((m.today().grid.kwh - 0.030).abs() < 1e-9);
        assert_eq!(m.today().grid.quality, Quality::Estimated);
        assert_eq!(m.today().battery.kwh, 0.0);
        assert_eq!(m.today().wear.usd, 0.0);
        // one hour on battery with a measured 20 W
        let t2 = t1 + Duration::from_secs(3600);
        set(&mut vs, t2, false);
        vs.set(Signal::ComputePower, t2, SignalValue::Float(20.0));
        m.step(&vs, t2, &computing, None);
        assert!((m.today().battery.kwh - 0.020).abs() < 1e-9);
        assert_eq!(m.today().battery.quality, Quality::Measured);
        assert!(m.today().wear.usd > 0.0);
        let job = m.end_job("j1").unwrap();
        assert!((job.total().kwh - 0.050).abs() < 1e-9);
        assert_eq!(job.total().quality, Quality::Estimated);
        assert_eq!(job.compute_time, Duration::from_secs(7200));
        // time in state
        assert_eq!(
            m.today().time_in_state[state_index(GovernorState::Computing)],
            Duration::from_secs(7200)
        );
        // not computing: no energy
        let idle = decision(GovernorState::Eligible, 1.0, &p);
        let t3 = t2 + Duration::from_secs(3600);
        vs.set(Signal::ComputePower, t3, SignalValue::Float(20.0));
        m.step(&vs, t3, &idle, None);
        let t4 = t3 + Duration::from_secs(3600);
        m.step(&vs, t4, &idle, None);
        assert!(
            (m.today().battery.kwh - 0.040).abs() < 1e-9,
            "the t2..t3 hour computed"
        );
        let usage = m.usage_today();
        assert!((usage.energy_kwh - 0.070).abs() < 1e-9);
    }

    #[test]
    fn days_roll_over_at_local_midnight() {
        let p = policy();
        let t0 = Millis::from_secs(1_748_822_400);
        let mut m = EnergyMeter::new(&p, t0);
        let vs = VehicleState::new();
        let d = decision(GovernorState::Computing, 1.0, &p);
        m.step(&vs, t0, &d, None);
        m.add_tokens(100);
        m.step(&vs, t0 + Duration::from_secs(86_400 + 60), &d, None);
        let days = m.take_finished_days();
        assert_eq!(days.len(), 1);
        assert_eq!(days[0].tokens, 100);
        assert_eq!(m.today().tokens, 0);
    }

    #[test]
    fn rapl_reader_handles_wraparound() {
        let dir = std::env::temp_dir().join(format!("tf-rapl-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("energy_uj"), "999000000\n").unwrap();
        fs::write(dir.join("max_energy_range_uj"), "1000000000\n").unwrap();
        let mut r = RaplReader::open(&dir).unwrap();
        assert_eq!(r.sample_w(Millis(0)), None);
        fs::write(dir.join("energy_uj"), "9000000\n").unwrap(); // wrapped: +10 J
        let w = r.sample_w(Millis(1000)).unwrap();
        assert!((w - 10.0).abs() < 1e-9, "{w}");
        fs::remove_dir_all(&dir).ok();
        assert!(RaplReader::open(Path::new("/nonexistent/powercap")).is_none());
    }
}
