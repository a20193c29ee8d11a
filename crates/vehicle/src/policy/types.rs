//! The validated policy: [`Policy`] and the limits, budgets and timing it is made of.

use std::time::Duration;

use serde::Serialize;

use super::fleet::FleetPolicy;
use super::validate::validate;
use super::PolicyError;
use crate::signals::LowVoltageSystemState;
use crate::time::Millis;

/// Per-hardware power model: power ≈ idle + utilization × (full − idle).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HardwareProfile {
    /// Compute unit powered but not inferring, W.
    pub idle_w: f64,
    /// Compute unit inferring on every thread, W.
    pub full_w: f64,
}

impl HardwareProfile {
    /// Estimated power at a utilization in 0..=1.
    pub fn power_w(&self, utilization: f64) -> f64 {
        self.idle_w + utilization.clamp(0.0, 1.0) * (self.full_w - self.idle_w)
    }

    /// The utilization that draws `watts` (clamped to 0..=1).
    pub fn utilization_for(&self, watts: f64) -> f64 {
        ((watts - self.idle_w) / (self.full_w - self.idle_w)).clamp(0.0, 1.0)
    }
}

/// Compute-unit limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ComputeLimits {
    /// Hard limit: the compute unit must never exceed it.
    pub max_temperature_c: f64,
    /// Restart only below `max_temperature_c - temperature_hysteresis_c`; the throttle aims at
    /// the same point.
    pub temperature_hysteresis_c: f64,
    /// Power cap for the compute unit, W.
    pub max_power_w: Option<f64>,
    /// Engine threads at full budget.
    pub max_threads: u16,
    /// Concurrent sequences (batch) at full budget.
    pub max_batch: u16,
    /// Power model for this hardware.
    pub hardware: HardwareProfile,
}

/// 12 V system requirements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LowVoltagePolicy {
    pub(super) allowed_mask: u8,
    /// Stop below this voltage.
    pub min_voltage_v: f64,
    /// Restart only at `min_voltage_v + voltage_hysteresis_v` or above.
    pub voltage_hysteresis_v: f64,
}

impl LowVoltagePolicy {
    pub(super) fn bit(s: LowVoltageSystemState) -> u8 {
        1 << (s as u8)
    }
    /// Whether the policy allows computing in this 12 V state.
    pub fn allows(&self, s: LowVoltageSystemState) -> bool {
        self.allowed_mask & Self::bit(s) != 0
    }
}

/// A local-time range `[start, end)`, milliseconds after midnight; wraps midnight when
/// `start > end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuietRange {
    pub start_ms: u64,
    pub end_ms: u64,
}

impl QuietRange {
    /// Whether a local time of day (ms after midnight) falls in the range.
    pub fn contains(&self, ms_of_day: u64) -> bool {
        if self.start_ms <= self.end_ms {
            ms_of_day >= self.start_ms && ms_of_day < self.end_ms
        } else {
            ms_of_day >= self.start_ms || ms_of_day < self.end_ms
        }
    }
}

/// Daily battery-wear budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum WearBudget {
    /// Dollars of battery replacement cost per day.
    Usd(f64),
    /// Percent of pack capacity per day.
    CapacityPercent(f64),
}

/// Daily budgets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Budgets {
    /// Compute energy per local day (grid + battery), kWh.
    pub daily_energy_kwh: Option<f64>,
    /// Battery wear per local day.
    pub daily_wear: Option<WearBudget>,
    /// Pack replacement cost, $ per kWh of capacity (prices wear).
    pub replacement_usd_per_kwh: f64,
}

/// Governor timing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Timing {
    /// Start conditions must hold this long before `Unavailable → Eligible`.
    pub eligible_dwell: Duration,
    /// Minimum time after a stop before the vehicle may become eligible again.
    pub restart_dwell: Duration,
    /// `Draining → Unavailable` at the latest after this, even if work is still reported.
    pub drain_timeout: Duration,
    /// The controller must be unsaturated this long before `Throttled → Computing`.
    pub throttle_exit_dwell: Duration,
}

/// A validated operator policy for one vehicle. Only [`Policy::from_toml_str`] (or
/// [`FleetPolicy::resolve`]) makes one: other crates cannot build it field by field.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Policy {
    /// The vehicle this policy was resolved for (`None`: fleet defaults).
    pub vin: Option<String>,
    /// Usable pack capacity, kWh.
    pub pack_capacity_kwh: f64,
    /// Local time = UTC + this many minutes.
    pub utc_offset_min: i32,
    /// Start computing at or above this SoC, percent.
    pub start_soc_pct: f64,
    /// Stop at or below this SoC (the departure reserve), percent.
    pub stop_soc_pct: f64,
    /// Compute only with the charging cable connected.
    pub require_plugged_in: bool,
    /// Stop above this battery temperature, °C.
    pub battery_max_temperature_c: f64,
    /// Restart only below `battery_max_temperature_c - this`.
    pub battery_temperature_hysteresis_c: f64,
    /// Compute-unit limits and hardware model.
    pub compute: ComputeLimits,
    /// 12 V requirements.
    pub low_voltage: LowVoltagePolicy,
    /// Local quiet hours.
    pub quiet_hours: Vec<QuietRange>,
    /// Daily budgets.
    pub budgets: Budgets,
    /// Governor timing.
    pub timing: Timing,
}

impl Policy {
    /// Parse a fleet policy file and resolve it for one vehicle (fleet defaults merged with
    /// `[vehicles."VIN"]`, if present). Validates the fleet table and the merged result.
    pub fn from_toml_str(fleet_toml: &str, vin: &str) -> Result<Policy, PolicyError> {
        let fleet = FleetPolicy::parse_tables(fleet_toml)?;
        fleet.resolve(vin)
    }

    /// The policy with no overrides: fleet defaults only.
    pub fn fleet_defaults_from_toml_str(fleet_toml: &str) -> Result<Policy, PolicyError> {
        let fleet = FleetPolicy::parse_tables(fleet_toml)?;
        validate(&fleet.defaults, None)
    }

    /// True if `now` is inside a quiet-hours range (local time).
    pub fn in_quiet_hours(&self, now: Millis) -> bool {
        let t = now.ms_of_local_day(self.utc_offset_min);
        self.quiet_hours.iter().any(|r| r.contains(t))
    }

    /// Stop SoC expressed as energy, kWh.
    pub fn reserve_kwh(&self) -> f64 {
        self.stop_soc_pct / 100.0 * self.pack_capacity_kwh
    }
}
