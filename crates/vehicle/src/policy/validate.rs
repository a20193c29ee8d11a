//! Validation at the edge: range and unit checks (percent or kWh levels, `HH:MM` ranges,
//! UTC offsets) that turn a merged raw table into a [`Policy`].

use std::time::Duration;

use serde::Deserialize;

use super::raw::{RawLevel, RawPolicy};
use super::types::{
    Budgets, ComputeLimits, HardwareProfile, LowVoltagePolicy, Policy, QuietRange, Timing,
    WearBudget,
};
use super::{PolicyError, MIN_SOC_BAND_PCT};
use crate::signals::LowVoltageSystemState;

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

pub(super) fn validate(table: &toml::Table, vin: Option<&str>) -> Result<Policy, PolicyError> {
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
