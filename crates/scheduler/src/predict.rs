//! Departure prediction (pure): a vehicle's own dwell history by time of day and weekday, the
//! operator's schedule when given, and `Charging.TimeToComplete`.
//!
//! History is kept per vehicle in 16 buckets (weekday/weekend x eight 3-hour arrival windows),
//! each a ring of the last [`SAMPLES`] dwell durations in minutes: 224 bytes per vehicle, so a
//! million vehicles fit in about 230 MB.

use serde::{Deserialize, Serialize};

use crate::forecast::{DepartureForecast, LEVELS};
use crate::types::Millis;

/// Dwell samples kept per bucket.
pub const SAMPLES: usize = 6;
const BUCKETS: usize = 16;
const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Calendar position of a timestamp: (`weekend`, 3-hour window 0..8) in local time.
pub fn calendar(t: Millis, utc_offset_min: i32) -> (bool, usize) {
    let local = (t as i64 + utc_offset_min as i64 * 60_000).max(0) as u64;
    let days = local / DAY_MS;
    // 1970-01-01 was a Thursday; Monday = 0.
    let weekday = (days + 3) % 7;
    let hour = (local % DAY_MS) / HOUR_MS;
    (weekday >= 5, (hour / 3) as usize)
}

fn bucket_of(t: Millis, utc_offset_min: i32) -> usize {
    let (weekend, window) = calendar(t, utc_offset_min);
    usize::from(weekend) * 8 + window
}

/// What else is known about the current stay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DepartureHints {
    /// The operator's schedule says the vehicle leaves at this time.
    pub scheduled_departure: Option<Millis>,
    /// `Vehicle.Powertrain.TractionBattery.Charging.TimeToComplete`, seconds, while charging.
    pub charge_time_to_complete_s: Option<u32>,
}

/// One vehicle's dwell history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DwellHistory {
    minutes: [[u16; SAMPLES]; BUCKETS],
    next: [u8; BUCKETS],
    filled: [u8; BUCKETS],
    /// Local time offset of the vehicle's home, minutes.
    pub utc_offset_min: i32,
}

impl Default for DwellHistory {
    fn default() -> Self {
        Self::new(0)
    }
}

impl DwellHistory {
    pub fn new(utc_offset_min: i32) -> Self {
        Self {
            minutes: [[0; SAMPLES]; BUCKETS],
            next: [0; BUCKETS],
            filled: [0; BUCKETS],
            utc_offset_min,
        }
    }

    /// Record a completed stay.
    pub fn record(&mut self, arrived_at: Millis, departed_at: Millis) {
        let b = bucket_of(arrived_at, self.utc_offset_min);
        let mins = (departed_at.saturating_sub(arrived_at) / 60_000).min(u16::MAX as u64) as u16;
        let i = self.next[b] as usize % SAMPLES;
        self.minutes[b][i] = mins;
        self.next[b] = ((i + 1) % SAMPLES) as u8;
        self.filled[b] = (self.filled[b] + 1).min(SAMPLES as u8);
    }

    fn samples(&self, b: usize, out: &mut Vec<f32>) {
        let n = self.filled[b] as usize;
        out.extend(self.minutes[b][..n].iter().map(|&m| m as f32 * 60.0));
    }

    /// Number of stays recorded (saturating at `SAMPLES` per bucket).
    pub fn len(&self) -> usize {
        let mut v = Vec::new();
        for b in 0..BUCKETS {
            self.samples(b, &mut v);
        }
        v.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forecast of the remaining stay of a vehicle that arrived at `arrived_at`, made at `now`.
    pub fn forecast(
        &self,
        arrived_at: Millis,
        now: Millis,
        hints: &DepartureHints,
    ) -> DepartureForecast {
        if let Some(at) = hints.scheduled_departure {
            let r = at.saturating_sub(now) as f32 / 1000.0;
            return DepartureForecast::from_quantiles(
                now,
                [r - 900.0, r - 300.0, r, r + 300.0, r + 900.0],
            );
        }
        let elapsed = now.saturating_sub(arrived_at) as f32 / 1000.0;
        let b = bucket_of(arrived_at, self.utc_offset_min);
        let mut dwell = Vec::with_capacity(3 * SAMPLES);
        self.samples(b, &mut dwell);
        if dwell.len() < 3 {
            let base = b - b % 8;
            self.samples(base + (b + 1) % 8, &mut dwell);
            self.samples(base + (b + 7) % 8, &mut dwell);
        }
        let mut rem: Vec<f32> = dwell
            .iter()
            .filter(|&&d| d > elapsed)
            .map(|&d| d - elapsed)
            .collect();
        let prior = prior_remaining(elapsed);
        let mut q = prior;
        if !rem.is_empty() {
            rem.sort_by(f32::total_cmp);
            // Shrink towards the prior when history is thin: weight n / (n + 2).
            let n = rem.len() as f32;
            let w = n / (n + 2.0);
            for (i, level) in LEVELS.iter().enumerate() {
                q[i] = w * empirical_quantile(&rem, *level) + (1.0 - w) * prior[i];
            }
            // A handful of samples underestimates the spread: widen the outer quantiles.
            q[0] *= 0.6;
            q[1] *= 0.85;
            q[4] *= 1.15;
        }
        if let Some(ttc) = hints.charge_time_to_complete_s {
            let ttc = ttc as f32;
            for v in q.iter_mut().skip(1) {
                *v = v.max(ttc);
            }
        }
        DepartureForecast::from_quantiles(now, q)
    }
}

/// Remaining-time quantiles with no usable history: the longer a car has been parked, the longer
/// it tends to stay (heavy tail), floored at a broad default.
fn prior_remaining(elapsed_s: f32) -> [f32; 5] {
    let scale = (elapsed_s * 0.5).max(3600.0);
    [
        0.1 * scale,
        0.3 * scale,
        0.8 * scale,
        1.8 * scale,
        3.5 * scale,
    ]
}

fn empirical_quantile(sorted: &[f32], p: f32) -> f32 {
    let pos = p * (sorted.len() - 1) as f32;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let f = pos - lo as f32;
    sorted[lo] * (1.0 - f) + sorted[hi] * f
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-01-01 00:00 UTC, a Monday.
    const MONDAY: Millis = 1_704_067_200_000;

    #[test]
    fn calendar_knows_the_weekday() {
        assert_eq!(calendar(MONDAY, 0), (false, 0));
        assert_eq!(calendar(MONDAY + 5 * DAY_MS + 13 * HOUR_MS, 0), (true, 4));
        assert_eq!(calendar(MONDAY + 23 * HOUR_MS, 120), (false, 0));
    }

    #[test]
    fn history_drives_the_forecast() {
        let mut h = DwellHistory::new(0);
        for d in 0..5 {
            let arrive = MONDAY + d * DAY_MS + 8 * HOUR_MS;
            h.record(arrive, arrive + 8 * HOUR_MS);
        }
        let arrive = MONDAY + 7 * DAY_MS + 8 * HOUR_MS;
        let f = h.forecast(arrive, arrive + HOUR_MS, &DepartureHints::default());
        let med = f.median_remaining_s(arrive + HOUR_MS);
        assert!((5.0 * 3600.0..7.5 * 3600.0).contains(&med), "median {med}");
        // Staying 2 h must be far more likely than staying 10 h.
        assert!(f.survival(arrive + HOUR_MS, 2 * HOUR_MS) > 0.8);
        assert!(f.survival(arrive + HOUR_MS, 10 * HOUR_MS) < 0.2);
    }

    #[test]
    fn schedule_and_charging_hints_are_used() {
        let h = DwellHistory::new(0);
        let now = MONDAY;
        let sched = DepartureHints {
            scheduled_departure: Some(now + 3 * HOUR_MS),
            charge_time_to_complete_s: None,
        };
        let f = h.forecast(now, now, &sched);
        assert!((f.median_remaining_s(now) - 3.0 * 3600.0).abs() < 1.0);
        let ttc = DepartureHints {
            scheduled_departure: None,
            charge_time_to_complete_s: Some(20_000),
        };
        let f = h.forecast(now, now, &ttc);
        assert!(f.remaining_s[1] >= 20_000.0);
    }

    #[test]
    fn ring_keeps_the_latest_samples() {
        let mut h = DwellHistory::new(0);
        for i in 0..20u64 {
            h.record(
                MONDAY + i * 7 * DAY_MS,
                MONDAY + i * 7 * DAY_MS + (i + 1) * 60_000,
            );
        }
        assert_eq!(h.len(), SAMPLES);
    }
}
