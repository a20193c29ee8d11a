//! Operator policy: when a vehicle may compute, and within which limits.
//!
//! Written once by the operator in TOML. Top-level keys are the fleet defaults; a table
//! `[vehicles."VIN"]` holds per-vehicle overrides that are deep-merged over the fleet
//! table (a key set in the override wins; tables merge key by key).
//!
//! ```toml
//! pack_capacity_kwh = 75.0
//! utc_offset = "+01:00"          # local time for quiet hours and daily budgets
//! require_plugged_in = false     # false: computing from the battery is allowed
//! quiet_hours = ["22:30-06:00"]  # local time ranges, may wrap midnight
//!
//! [soc]
//! start = "60%"                  # percent, or energy: "45 kWh"
//! stop = "30 kWh"                # the departure reserve
//!
//! [battery]
//! max_temperature_c = 45.0
//!
//! [compute]
//! max_temperature_c = 80.0
//! max_power_w = 25.0
//! max_threads = 2
//! max_batch = 8
//! idle_power_w = 6.0             # per-hardware power model, used when nothing is measured
//! full_power_w = 30.0
//!
//! [low_voltage]
//! allowed_states = ["OFF", "LOCK"]
//! min_voltage_v = 12.0
//!
//! [budget]
//! daily_energy_kwh = 4.0
//! daily_wear_usd = 0.25          # or daily_wear_capacity_percent = 0.002
//! replacement_usd_per_kwh = 140.0
//!
//! [vehicles."WVWZZZ1JZXW000001"]
//! require_plugged_in = true
//! soc = { stop = "40%" }
//! ```
//!
//! [`Policy::from_toml_str`] parses, merges and validates; the result is the only way to get a
//! [`Policy`], so the governor never sees an unchecked one.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::signals::LowVoltageSystemState;
use crate::time::Millis;

/// Why a policy was rejected.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("policy is not valid TOML or has an unknown key: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("`{0}` is required")]
    Missing(&'static str),
    #[error("`{field}` = {value} is out of range: {expected}")]
    OutOfRange {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("`{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(
        "start SoC ({start_pct:.1}%) must exceed stop SoC ({stop_pct:.1}%) by at least \
         {min_band:.1} percentage points, or the vehicle would start and stop on noise"
    )]
    StartNotAboveStop {
        start_pct: f64,
        stop_pct: f64,
        min_band: f64,
    },
    #[error("`vehicles.\"{0}\"` must be a table")]
    OverrideNotTable(String),
    #[error("vehicle {vin}: {source}")]
    Vehicle {
        vin: String,
        #[source]
        source: Box<PolicyError>,
    },
}

/// Minimum distance between start and stop SoC, percentage points.
pub const MIN_SOC_BAND_PCT: f64 = 2.0;

// ----- raw file (every field optional; merged before validation) -----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    pack_capacity_kwh: Option<f64>,
    utc_offset: Option<String>,
    require_plugged_in: Option<bool>,
    #[serde(default)]
    quiet_hours: Vec<String>,
    #[serde(default)]
    soc: RawSoc,
    #[serde(default)]
    battery: RawBattery,
    #[serde(default)]
    compute: RawCompute,
    #[serde(default)]
    low_voltage: RawLowVoltage,
    #[serde(default)]
    budget: RawBudget,
    #[serde(default)]
    timing: RawTiming,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSoc {
    start: Option<RawLevel>,
    stop: Option<RawLevel>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawLevel {
    Number(f64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBattery {
    max_temperature_c: Option<f64>,
    temperature_hysteresis_c: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompute {
    max_temperature_c: Option<f64>,
    temperature_hysteresis_c: Option<f64>,
    max_power_w: Option<f64>,
    max_threads: Option<u16>,
    max_batch: Option<u16>,
    idle_power_w: Option<f64>,
    full_power_w: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLowVoltage {
    allowed_states: Option<Vec<String>>,
    min_voltage_v: Option<f64>,
    voltage_hysteresis_v: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    daily_energy_kwh: Option<f64>,
    daily_wear_usd: Option<f64>,
    daily_wear_capacity_percent: Option<f64>,
    replacement_usd_per_kwh: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTiming {
    eligible_dwell_s: Option<f64>,
    restart_dwell_s: Option<f64>,
    drain_timeout_s: Option<f64>,
    throttle_exit_dwell_s: Option<f64>,
}

// ----- validated policy -----

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
    allowed_mask: u8,
    /// Stop below this voltage.
    pub min_voltage_v: f64,
    /// Restart only at `min_voltage_v + voltage_hysteresis_v` or above.
    pub voltage_hysteresis_v: f64,
}

impl LowVoltagePolicy {
    fn bit(s: LowVoltageSystemState) -> u8 {
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

/// A whole policy file, every vehicle validated (for the coordinator or a `check` command).
#[derive(Debug, Clone)]
pub struct FleetPolicy {
    defaults: toml::Table,
    vehicles: BTreeMap<String, toml::Table>,
}

impl FleetPolicy {
    fn parse_tables(s: &str) -> Result<FleetPolicy, PolicyError> {
        let mut root: toml::Table = toml::from_str(s)?;
        let mut vehicles = BTreeMap::new();
        if let Some(v) = root.remove("vehicles") {
            let toml::Value::Table(t) = v else {
                return Err(PolicyError::Invalid {
                    field: "vehicles",
                    reason: "must be a table of VIN tables".into(),
                });
            };
            for (vin, over) in t {
                match over {
                    toml::Value::Table(o) => {
                        vehicles.insert(vin, o);
                    }
                    _ => return Err(PolicyError::OverrideNotTable(vin)),
                }
            }
        }
        // The fleet table alone must be valid: it applies to every vehicle without an override.
        validate(&root, None)?;
        Ok(FleetPolicy {
            defaults: root,
            vehicles,
        })
    }

    /// Parse and validate the fleet defaults and every vehicle override.
    pub fn from_toml_str(s: &str) -> Result<FleetPolicy, PolicyError> {
        let fleet = Self::parse_tables(s)?;
        for vin in fleet.vehicles.keys() {
            fleet.resolve(vin)?;
        }
        Ok(fleet)
    }

    /// VINs that have overrides.
    pub fn vins(&self) -> impl Iterator<Item = &str> {
        self.vehicles.keys().map(String::as_str)
    }

    /// The policy for one vehicle.
    pub fn resolve(&self, vin: &str) -> Result<Policy, PolicyError> {
        let mut merged = self.defaults.clone();
        if let Some(over) = self.vehicles.get(vin) {
            merge(&mut merged, over);
        }
        validate(&merged, Some(vin)).map_err(|e| match e {
            e @ PolicyError::Vehicle { .. } => e,
            e => PolicyError::Vehicle {
                vin: vin.to_string(),
                source: Box::new(e),
            },
        })
    }
}

fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

fn range(
    field: &'static str,
    v: f64,
    lo: f64,
    hi: f64,
    expected: &'static str,
) -> Result<f64, PolicyError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(v)
    } else {
        Err(PolicyError::OutOfRange {
            field,
            value: v,
            expected,
        })
    }
}

fn positive(field: &'static str, v: f64) -> Result<f64, PolicyError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(PolicyError::OutOfRange {
            field,
            value: v,
            expected: "must be a positive number",
        })
    }
}

fn level_pct(field: &'static str, raw: &RawLevel, capacity_kwh: f64) -> Result<f64, PolicyError> {
    let pct = match raw {
        RawLevel::Number(n) => *n,
        RawLevel::Text(s) => {
            let t = s.trim();
            let (num, unit) = if let Some(n) = t.strip_suffix('%') {
                (n, "%")
            } else if let Some(n) = t
                .strip_suffix("kWh")
                .or_else(|| t.strip_suffix("kwh"))
                .or_else(|| t.strip_suffix("KWH"))
            {
                (n, "kWh")
            } else {
                return Err(PolicyError::Invalid {
                    field,
                    reason: format!(
                        "{s:?}: write a percentage (\"60%\") or an energy (\"30 kWh\")"
                    ),
                });
            };
            let n: f64 = num.trim().parse().map_err(|_| PolicyError::Invalid {
                field,
                reason: format!("{s:?} is not a number followed by % or kWh"),
            })?;
            if unit == "kWh" {
                if n > capacity_kwh {
                    return Err(PolicyError::OutOfRange {
                        field,
                        value: n,
                        expected: "an energy level cannot exceed pack_capacity_kwh",
                    });
                }
                n / capacity_kwh * 100.0
            } else {
                n
            }
        }
    };
    range(field, pct, 0.0, 100.0, "0..=100 percent")
}

fn parse_hhmm(s: &str) -> Option<u64> {
    let (h, m) = s.trim().split_once(':')?;
    let h: u64 = h.parse().ok()?;
    let m: u64 = m.parse().ok()?;
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return None;
    }
    Some((h * 60 + m) * 60_000)
}

fn parse_quiet(s: &str) -> Result<QuietRange, PolicyError> {
    let bad = || PolicyError::Invalid {
        field: "quiet_hours",
        reason: format!("{s:?}: expected \"HH:MM-HH:MM\" in local time"),
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let start_ms = parse_hhmm(a).ok_or_else(bad)?;
    let end_ms = parse_hhmm(b).ok_or_else(bad)?;
    if start_ms == end_ms {
        return Err(PolicyError::Invalid {
            field: "quiet_hours",
            reason: format!("{s:?} is empty (start equals end)"),
        });
    }
    Ok(QuietRange {
        start_ms: start_ms % crate::time::DAY_MS,
        end_ms: end_ms % crate::time::DAY_MS,
    })
}

fn parse_offset(s: &str) -> Result<i32, PolicyError> {
    let t = s.trim();
    if t == "Z" || t == "UTC" {
        return Ok(0);
    }
    let bad = || PolicyError::Invalid {
        field: "utc_offset",
        reason: format!("{s:?}: expected \"+HH:MM\", \"-HH:MM\" or \"Z\""),
    };
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => return Err(bad()),
    };
    let ms = parse_hhmm(rest).ok_or_else(bad)?;
    if ms > 14 * 3_600_000 {
        return Err(bad());
    }
    Ok(sign * (ms / 60_000) as i32)
}

fn secs(field: &'static str, v: Option<f64>, default: f64) -> Result<Duration, PolicyError> {
    let v = range(
        field,
        v.unwrap_or(default),
        0.0,
        7.0 * 86_400.0,
        "0 s ..= 7 days",
    )?;
    Ok(Duration::from_secs_f64(v))
}

fn validate(table: &toml::Table, vin: Option<&str>) -> Result<Policy, PolicyError> {
    let raw =
        RawPolicy::deserialize(toml::Value::Table(table.clone())).map_err(PolicyError::Toml)?;

    let cap = positive(
        "pack_capacity_kwh",
        raw.pack_capacity_kwh
            .ok_or(PolicyError::Missing("pack_capacity_kwh"))?,
    )?;
    let cap = range("pack_capacity_kwh", cap, 1.0, 1000.0, "1..=1000 kWh")?;
    let utc_offset_min = match &raw.utc_offset {
        Some(s) => parse_offset(s)?,
        None => 0,
    };

    let stop = level_pct(
        "soc.stop",
        raw.soc.stop.as_ref().unwrap_or(&RawLevel::Number(50.0)),
        cap,
    )?;
    let start = level_pct(
        "soc.start",
        raw.soc
            .start
            .as_ref()
            .unwrap_or(&RawLevel::Number(stop + 5.0)),
        cap,
    )?;
    if start < stop + MIN_SOC_BAND_PCT {
        return Err(PolicyError::StartNotAboveStop {
            start_pct: start,
            stop_pct: stop,
            min_band: MIN_SOC_BAND_PCT,
        });
    }

    let battery_max = range(
        "battery.max_temperature_c",
        raw.battery.max_temperature_c.unwrap_or(45.0),
        0.0,
        80.0,
        "0..=80 °C",
    )?;
    let battery_hyst = range(
        "battery.temperature_hysteresis_c",
        raw.battery.temperature_hysteresis_c.unwrap_or(3.0),
        0.5,
        20.0,
        "0.5..=20 °C",
    )?;

    let c = &raw.compute;
    let cmax = range(
        "compute.max_temperature_c",
        c.max_temperature_c.unwrap_or(85.0),
        20.0,
        125.0,
        "20..=125 °C",
    )?;
    let chyst = range(
        "compute.temperature_hysteresis_c",
        c.temperature_hysteresis_c.unwrap_or(5.0),
        1.0,
        30.0,
        "1..=30 °C",
    )?;
    let idle = range(
        "compute.idle_power_w",
        c.idle_power_w.unwrap_or(5.0),
        0.0,
        10_000.0,
        "0..=10000 W",
    )?;
    let full = positive("compute.full_power_w", c.full_power_w.unwrap_or(30.0))?;
    if full <= idle {
        return Err(PolicyError::Invalid {
            field: "compute.full_power_w",
            reason: format!("must exceed compute.idle_power_w ({idle} W), got {full} W"),
        });
    }
    let max_power = match c.max_power_w {
        Some(p) => {
            let p = positive("compute.max_power_w", p)?;
            if p <= idle {
                return Err(PolicyError::Invalid {
                    field: "compute.max_power_w",
                    reason: format!("{p} W leaves nothing above the idle power ({idle} W)"),
                });
            }
            Some(p)
        }
        None => None,
    };
    let max_threads = c.max_threads.unwrap_or(2);
    let max_batch = c.max_batch.unwrap_or(8);
    if max_threads == 0 {
        return Err(PolicyError::Invalid {
            field: "compute.max_threads",
            reason: "must be at least 1".into(),
        });
    }
    if max_batch == 0 {
        return Err(PolicyError::Invalid {
            field: "compute.max_batch",
            reason: "must be at least 1".into(),
        });
    }

    let lv = &raw.low_voltage;
    let mut mask = 0u8;
    let states = lv
        .allowed_states
        .clone()
        .unwrap_or_else(|| vec!["OFF".into(), "LOCK".into()]);
    for s in &states {
        let st: LowVoltageSystemState = s.parse().map_err(|_| PolicyError::Invalid {
            field: "low_voltage.allowed_states",
            reason: format!("unknown state {s:?} (UNDEFINED, LOCK, OFF, ACC, ON, START)"),
        })?;
        if st.is_driving_ready() {
            return Err(PolicyError::Invalid {
                field: "low_voltage.allowed_states",
                reason: format!("{st} means the driver is starting the car; it cannot be allowed"),
            });
        }
        mask |= LowVoltagePolicy::bit(st);
    }
    if mask == 0 {
        return Err(PolicyError::Invalid {
            field: "low_voltage.allowed_states",
            reason: "allows no state: the vehicle could never compute".into(),
        });
    }
    let min_v = range(
        "low_voltage.min_voltage_v",
        lv.min_voltage_v.unwrap_or(11.8),
        0.0,
        60.0,
        "0..=60 V",
    )?;
    let v_hyst = range(
        "low_voltage.voltage_hysteresis_v",
        lv.voltage_hysteresis_v.unwrap_or(0.3),
        0.05,
        5.0,
        "0.05..=5 V",
    )?;

    let quiet_hours = raw
        .quiet_hours
        .iter()
        .map(|s| parse_quiet(s))
        .collect::<Result<Vec<_>, _>>()?;

    let b = &raw.budget;
    let daily_energy_kwh = b
        .daily_energy_kwh
        .map(|v| positive("budget.daily_energy_kwh", v))
        .transpose()?;
    let daily_wear = match (b.daily_wear_usd, b.daily_wear_capacity_percent) {
        (Some(_), Some(_)) => {
            return Err(PolicyError::Invalid {
                field: "budget",
                reason: "give daily_wear_usd or daily_wear_capacity_percent, not both".into(),
            })
        }
        (Some(u), None) => Some(WearBudget::Usd(positive("budget.daily_wear_usd", u)?)),
        (None, Some(p)) => Some(WearBudget::CapacityPercent(range(
            "budget.daily_wear_capacity_percent",
            p,
            1e-9,
            100.0,
            "a positive percentage",
        )?)),
        (None, None) => None,
    };
    let replacement = positive(
        "budget.replacement_usd_per_kwh",
        b.replacement_usd_per_kwh.unwrap_or(140.0),
    )?;

    let t = &raw.timing;
    let timing = Timing {
        eligible_dwell: secs("timing.eligible_dwell_s", t.eligible_dwell_s, 60.0)?,
        restart_dwell: secs("timing.restart_dwell_s", t.restart_dwell_s, 300.0)?,
        drain_timeout: secs("timing.drain_timeout_s", t.drain_timeout_s, 10.0)?,
        throttle_exit_dwell: secs(
            "timing.throttle_exit_dwell_s",
            t.throttle_exit_dwell_s,
            30.0,
        )?,
    };

    Ok(Policy {
        vin: vin.map(str::to_string),
        pack_capacity_kwh: cap,
        utc_offset_min,
        start_soc_pct: start,
        stop_soc_pct: stop,
        require_plugged_in: raw.require_plugged_in.unwrap_or(true),
        battery_max_temperature_c: battery_max,
        battery_temperature_hysteresis_c: battery_hyst,
        compute: ComputeLimits {
            max_temperature_c: cmax,
            temperature_hysteresis_c: chyst,
            max_power_w: max_power,
            max_threads,
            max_batch,
            hardware: HardwareProfile {
                idle_w: idle,
                full_w: full,
            },
        },
        low_voltage: LowVoltagePolicy {
            allowed_mask: mask,
            min_voltage_v: min_v,
            voltage_hysteresis_v: v_hyst,
        },
        quiet_hours,
        budgets: Budgets {
            daily_energy_kwh,
            daily_wear,
            replacement_usd_per_kwh: replacement,
        },
        timing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = r#"
pack_capacity_kwh = 75.0
utc_offset = "+01:00"
require_plugged_in = false
quiet_hours = ["22:30-06:00", "12:00-12:30"]

[soc]
start = "60%"
stop = "30 kWh"

[compute]
max_temperature_c = 80.0
max_power_w = 25.0

[budget]
daily_energy_kwh = 4.0
daily_wear_usd = 0.25

[vehicles."VIN-PLUGGED"]
require_plugged_in = true
soc = { stop = "45%" }
compute = { max_threads = 4 }
"#;

    #[test]
    fn fleet_defaults_apply_to_a_vehicle_without_override() {
        let p = Policy::from_toml_str(FLEET, "VIN-OTHER").unwrap();
        assert_eq!(p.vin.as_deref(), Some("VIN-OTHER"));
        assert!(!p.require_plugged_in);
        assert_eq!(p.start_soc_pct, 60.0);
        assert!((p.stop_soc_pct - 40.0).abs() < 1e-9, "30 of 75 kWh is 40%");
        assert!((p.reserve_kwh() - 30.0).abs() < 1e-9);
        assert_eq!(p.utc_offset_min, 60);
        assert_eq!(p.compute.max_temperature_c, 80.0);
        assert_eq!(p.compute.max_power_w, Some(25.0));
        assert_eq!(p.compute.max_threads, 2);
        assert_eq!(p.budgets.daily_wear, Some(WearBudget::Usd(0.25)));
    }

    #[test]
    fn vehicle_override_is_merged_over_the_fleet_table() {
        let p = Policy::from_toml_str(FLEET, "VIN-PLUGGED").unwrap();
        assert!(p.require_plugged_in);
        assert_eq!(p.stop_soc_pct, 45.0);
        // start comes from the fleet table, threads from the override, power cap from the fleet
        assert_eq!(p.start_soc_pct, 60.0);
        assert_eq!(p.compute.max_threads, 4);
        assert_eq!(p.compute.max_power_w, Some(25.0));
        assert_eq!(p.compute.max_temperature_c, 80.0);
    }

    #[test]
    fn quiet_hours_wrap_midnight_in_local_time() {
        let p = Policy::from_toml_str(FLEET, "x").unwrap();
        // 2025-06-02T00:00:00Z = 01:00 local (UTC+1): quiet
        let midnight_utc = Millis::from_secs(1_748_822_400);
        assert!(p.in_quiet_hours(midnight_utc));
        // 05:30 UTC = 06:30 local: not quiet
        assert!(!p.in_quiet_hours(midnight_utc + Duration::from_secs(5 * 3600 + 1800)));
        // 21:35 UTC = 22:35 local: quiet
        assert!(p.in_quiet_hours(midnight_utc + Duration::from_secs(21 * 3600 + 35 * 60)));
        // 11:10 UTC = 12:10 local: quiet
        assert!(p.in_quiet_hours(midnight_utc + Duration::from_secs(11 * 3600 + 600)));
        // 11:40 UTC = 12:40 local: not quiet
        assert!(!p.in_quiet_hours(midnight_utc + Duration::from_secs(11 * 3600 + 2400)));
    }

    fn err(toml: &str) -> PolicyError {
        match Policy::from_toml_str(toml, "V") {
            Ok(p) => panic!("expected an error, got {p:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn validation_errors_are_specific() {
        let base = "pack_capacity_kwh = 60.0\n";
        assert!(matches!(err(""), PolicyError::Missing("pack_capacity_kwh")));
        assert!(matches!(
            err(&format!("{base}[soc]\nstart = \"40%\"\nstop = \"50%\"")),
            PolicyError::StartNotAboveStop { .. }
        ));
        assert!(matches!(
            err(&format!("{base}[soc]\nstart = 51\nstop = 50")),
            PolicyError::StartNotAboveStop { .. }
        ));
        assert!(matches!(
            err(&format!("{base}[soc]\nstop = \"80 kWh\"")),
            PolicyError::OutOfRange {
                field: "soc.stop",
                ..
            }
        ));
        assert!(matches!(
            err(&format!("{base}[soc]\nstop = \"lots\"")),
            PolicyError::Invalid {
                field: "soc.stop",
                ..
            }
        ));
        assert!(matches!(
            err(&format!("{base}quiet_hours = [\"25:00-06:00\"]")),
            PolicyError::Invalid {
                field: "quiet_hours",
                ..
            }
        ));
        assert!(matches!(
            err(&format!("{base}[low_voltage]\nallowed_states = [\"ON\"]")),
            PolicyError::Invalid {
                field: "low_voltage.allowed_states",
                ..
            }
        ));
        assert!(matches!(
            err(&format!(
                "{base}[compute]\nidle_power_w = 30.0\nfull_power_w = 20.0"
            )),
            PolicyError::Invalid {
                field: "compute.full_power_w",
                ..
            }
        ));
        assert!(matches!(
            err(&format!(
                "{base}[budget]\ndaily_wear_usd = 1.0\ndaily_wear_capacity_percent = 0.01"
            )),
            PolicyError::Invalid {
                field: "budget",
                ..
            }
        ));
        // unknown keys are typos, not silently ignored
        let e = err(&format!("{base}[soc]\nstrat = \"60%\""));
        assert!(matches!(e, PolicyError::Toml(_)));
        assert!(e.to_string().contains("strat"), "{e}");
        assert!(matches!(
            err("pack_capacity_kwh = \"big\""),
            PolicyError::Toml(_)
        ));
    }

    #[test]
    fn a_bad_override_is_reported_with_its_vin() {
        let toml =
            "pack_capacity_kwh = 60.0\n[vehicles.\"BAD1\"]\nsoc = { start = 10, stop = 20 }\n";
        let e = Policy::from_toml_str(toml, "BAD1").unwrap_err();
        assert!(matches!(&e, PolicyError::Vehicle { vin, .. } if vin == "BAD1"));
        assert!(e.to_string().contains("BAD1"), "{e}");
        // the other vehicles still resolve; the whole-file check catches it
        assert!(Policy::from_toml_str(toml, "GOOD").is_ok());
        assert!(FleetPolicy::from_toml_str(toml).is_err());
    }
}
