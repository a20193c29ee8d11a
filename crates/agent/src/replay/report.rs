//! What a replay produced: the per-day reports, the governor timeline by vehicle situation,
//! the engine calibration, and the limits observed; as text (`Display`, [`Timeline`]) and JSON.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use tokenfleet_vehicle::signals::GEAR_PARK;
use tokenfleet_vehicle::{DailyReport, GovernorState, Millis, VehicleState};

use super::Calibration;

/// What the vehicle is doing, from its signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Situation {
    /// Out of Park or moving.
    Driving,
    /// In Park with the 12 V system ON/START: the driver is about to leave.
    DriverPresent,
    /// Parked, plugged in and charging.
    Charging,
    /// Parked and plugged in, not charging.
    PluggedIn,
    /// Parked without a cable.
    Parked,
    /// Gear and park lock unknown.
    Unknown,
}

impl Situation {
    /// Classify the vehicle at `now` from fresh signals.
    pub fn of(vs: &VehicleState, now: Millis) -> Situation {
        let gear = vs.selected_gear(now).fresh();
        let moving = vs.speed_kmh(now).fresh().is_some_and(|v| v > 0.0)
            || vs.is_moving(now).fresh() == Some(true);
        if moving || gear.is_some_and(|g| g != GEAR_PARK) {
            return Situation::Driving;
        }
        if gear.is_none() && vs.park_lock_engaged(now).fresh() != Some(true) {
            return Situation::Unknown;
        }
        if vs
            .low_voltage_state(now)
            .fresh()
            .is_some_and(|s| s.is_driving_ready())
        {
            return Situation::DriverPresent;
        }
        match (vs.cable_connected(now).fresh(), vs.is_charging(now).fresh()) {
            (Some(true), Some(true)) => Situation::Charging,
            (Some(true), _) => Situation::PluggedIn,
            _ => Situation::Parked,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Situation::Driving => "driving",
            Situation::DriverPresent => "driver present",
            Situation::Charging => "charging",
            Situation::PluggedIn => "plugged in",
            Situation::Parked => "parked",
            Situation::Unknown => "unknown",
        }
    }
}

/// A stretch of the replay with one governor state and one vehicle situation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    pub start: Millis,
    pub end: Millis,
    pub state: GovernorState,
    pub situation: Situation,
    /// The governor's reason when the segment began.
    pub reason: String,
    /// Compute energy accounted in the segment, kWh (estimated).
    pub grid_kwh: f64,
    pub battery_kwh: f64,
    pub tokens: f64,
}

/// The outcome of a replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    pub file: PathBuf,
    pub start: Millis,
    pub end: Millis,
    pub utc_offset_min: i32,
    pub updates: usize,
    pub skipped_lines: u64,
    pub governor_steps: u64,
    /// One report per local day of the recording.
    pub days: Vec<DailyReport>,
    pub tokens: u64,
    pub tokens_method: &'static str,
    pub energy_method: String,
    pub calibration: Vec<Calibration>,
    pub segments: Vec<Segment>,
    /// Compute energy (grid + battery) in segments where the vehicle was driving, kWh.
    pub driving_compute_kwh: f64,
    pub min_soc_computing_pct: Option<f64>,
    pub reserve_pct: f64,
    pub max_compute_temp_c: f64,
    pub compute_limit_c: f64,
}

/// `HH:MM` local time, with `+Nd` when on a later day than `origin`.
fn clock(t: Millis, origin: Millis, offset_min: i32) -> String {
    let m = t.ms_of_local_day(offset_min) / 60_000;
    let days = t.local_day(offset_min) - origin.local_day(offset_min);
    let day = if days > 0 {
        format!("+{days}d")
    } else {
        String::new()
    };
    format!("{:02}:{:02}{day}", m / 60, m % 60)
}

impl ReplayReport {
    /// The governor timeline: one line per segment.
    pub fn timeline(&self) -> Timeline<'_> {
        Timeline(self)
    }
}

/// Display of [`ReplayReport::timeline`].
pub struct Timeline<'r>(&'r ReplayReport);

impl fmt::Display for Timeline<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        let at = |t| clock(t, r.start, r.utc_offset_min);
        for s in &r.segments {
            write!(
                f,
                "  {:>7}-{:<7} {:<11} {:<14} {}",
                at(s.start),
                at(s.end),
                s.state.as_str(),
                s.situation.as_str(),
                s.reason
            )?;
            if s.grid_kwh + s.battery_kwh > 0.0 || s.tokens > 0.0 {
                write!(
                    f,
                    "  [grid {:.3} kWh, battery {:.3} kWh, {:.0} tokens]",
                    s.grid_kwh, s.battery_kwh, s.tokens
                )?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |t| clock(t, self.start, self.utc_offset_min);
        writeln!(
            f,
            "replay {}: {} to {} local, {} signal updates ({} lines skipped), {} governor steps",
            self.file.display(),
            at(self.start),
            at(self.end),
            self.updates,
            self.skipped_lines,
            self.governor_steps
        )?;
        for d in &self.days {
            write!(f, "{d}")?;
        }
        writeln!(f, "  tokens: {}", self.tokens_method)?;
        writeln!(f, "  energy: {}", self.energy_method)?;
        let soc = self
            .min_soc_computing_pct
            .map_or("-".to_string(), |s| format!("{s:.4}%"));
        writeln!(
            f,
            "  limits: compute energy while driving {:.3} kWh; lowest SoC while computing {soc} (reserve {:.1}%); hottest compute unit {:.1} °C (limit {:.1} °C)",
            self.driving_compute_kwh, self.reserve_pct, self.max_compute_temp_c, self.compute_limit_c
        )?;
        let real: f64 = self.calibration.iter().map(|c| c.measured_s).sum();
        writeln!(
            f,
            "  engine measured at {} budget levels ({real:.1} s of real decoding):",
            self.calibration.len()
        )?;
        writeln!(f, "    utilization  batch  duty   tok/s   computed")?;
        for c in &self.calibration {
            let h = Duration::from_secs_f64(c.virtual_s.max(0.0));
            writeln!(
                f,
                "    {:>11.2}  {:>5}  {:>4.2}  {:>6.1}   {:>2}h{:02}m",
                c.utilization,
                c.max_active,
                c.duty_cycle,
                c.tokens_per_s,
                h.as_secs() / 3600,
                h.as_secs() / 60 % 60
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_local_and_marks_later_days() {
        let midnight = Millis::from_secs(1_748_815_200); // 2025-06-02T00:00+02:00
        assert_eq!(clock(midnight, midnight, 120), "00:00");
        let t = midnight + Duration::from_secs(25 * 3600 + 90);
        assert_eq!(clock(t, midnight, 120), "01:01+1d");
    }
}
