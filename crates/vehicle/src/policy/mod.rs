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
//!
//! # Layout
//!
//! - `raw` — the file as written: every field optional, and the deep merge of an override
//!   table over the fleet table.
//! - `validate` — range and unit checks that turn a raw table into a [`Policy`].
//! - `types` — the validated [`Policy`] and its parts.
//! - `fleet` — [`FleetPolicy`]: the fleet defaults plus per-vehicle override tables.

/// The commuter example policy that fits `fixtures/commuter-day.jsonl` (CEST, 74 % departure
/// reserve): the replay report's default and the replayed-day test's policy.
pub const COMMUTER_EXAMPLE_POLICY: &str = include_str!("../../fixtures/commuter-policy.toml");

use thiserror::Error;

mod fleet;
mod raw;
mod types;
mod validate;

pub use fleet::FleetPolicy;
pub use types::{
    Budgets, ComputeLimits, HardwareProfile, LowVoltagePolicy, Policy, QuietRange, Timing,
    WearBudget,
};

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::time::Millis;

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
