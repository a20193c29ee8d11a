//! The policy file as written: every field optional, so that an override table can be
//! merged over the fleet table before anything is validated.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) pack_capacity_kwh: Option<f64>,
    pub(super) utc_offset: Option<String>,
    pub(super) require_plugged_in: Option<bool>,
    #[serde(default)]
    pub(super) quiet_hours: Vec<String>,
    #[serde(default)]
    pub(super) soc: RawSoc,
    #[serde(default)]
    pub(super) battery: RawBattery,
    #[serde(default)]
    pub(super) compute: RawCompute,
    #[serde(default)]
    pub(super) low_voltage: RawLowVoltage,
    #[serde(default)]
    pub(super) budget: RawBudget,
    #[serde(default)]
    pub(super) timing: RawTiming,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSoc {
    pub(super) start: Option<RawLevel>,
    pub(super) stop: Option<RawLevel>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum RawLevel {
    Number(f64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBattery {
    pub(super) max_temperature_c: Option<f64>,
    pub(super) temperature_hysteresis_c: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCompute {
    pub(super) max_temperature_c: Option<f64>,
    pub(super) temperature_hysteresis_c: Option<f64>,
    pub(super) max_power_w: Option<f64>,
    pub(super) max_threads: Option<u16>,
    pub(super) max_batch: Option<u16>,
    pub(super) idle_power_w: Option<f64>,
    pub(super) full_power_w: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLowVoltage {
    pub(super) allowed_states: Option<Vec<String>>,
    pub(super) min_voltage_v: Option<f64>,
    pub(super) voltage_hysteresis_v: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    pub(super) daily_energy_kwh: Option<f64>,
    pub(super) daily_wear_usd: Option<f64>,
    pub(super) daily_wear_capacity_percent: Option<f64>,
    pub(super) replacement_usd_per_kwh: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTiming {
    pub(super) eligible_dwell_s: Option<f64>,
    pub(super) restart_dwell_s: Option<f64>,
    pub(super) drain_timeout_s: Option<f64>,
    pub(super) throttle_exit_dwell_s: Option<f64>,
}

pub(super) fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}
