//! `DepartureForecast`: predicted remaining parked time as a distribution.

use serde::{Deserialize, Serialize};

use crate::types::Millis;

/// Cumulative levels of [`DepartureForecast::remaining_s`].
pub const LEVELS: [f32; 5] = [0.1, 0.25, 0.5, 0.75, 0.9];

/// Remaining parked time as five quantiles: `remaining_s[i]` is the time (seconds from the
/// moment the forecast was made) by which the vehicle has left with probability `LEVELS[i]`.
/// The survival function `P(still parked after t)` interpolates linearly between them, from
/// `(0, 1)` to the first quantile and with a linear tail to twice the last one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DepartureForecast {
    pub remaining_s: [f32; 5],
    /// When the forecast was made; survival is evaluated relative to it.
    pub made_at: Millis,
}

impl DepartureForecast {
    /// A forecast from (possibly unsorted, possibly negative) quantiles; they are clamped to
    /// `>= 0` and made non-decreasing.
    pub fn from_quantiles(made_at: Millis, mut remaining_s: [f32; 5]) -> Self {
        let mut prev = 0.0f32;
        for q in remaining_s.iter_mut() {
            if !q.is_finite() || *q < prev {
                *q = prev;
            }
            prev = *q;
        }
        Self {
            remaining_s,
            made_at,
        }
    }

    /// Nothing is known: a broad prior (median 2 h, P10 10 min, P90 10 h).
    pub fn unknown(made_at: Millis) -> Self {
        Self::from_quantiles(made_at, [600.0, 2400.0, 7200.0, 18000.0, 36000.0])
    }

    /// Departure known exactly at `at`.
    pub fn certain(made_at: Millis, at: Millis) -> Self {
        let s = at.saturating_sub(made_at) as f32 / 1000.0;
        Self::from_quantiles(made_at, [s; 5])
    }

    /// P(still parked `dur_ms` after `now`), given that the vehicle is still parked at `now`
    /// (the caller only asks about parked vehicles): `S(now + dur) / S(now)`, both measured from
    /// `made_at`. So a forecast stays usable for a while after it was made.
    pub fn survival(&self, now: Millis, dur_ms: u64) -> f32 {
        let elapsed = now.saturating_sub(self.made_at);
        let s_now = self.unconditional(elapsed);
        let s_end = self.unconditional(elapsed.saturating_add(dur_ms));
        if s_now <= 1e-6 {
            return 0.0;
        }
        (s_end / s_now).clamp(0.0, 1.0)
    }

    /// P(still parked `t_ms` after `made_at`).
    fn unconditional(&self, t_ms: u64) -> f32 {
        let t = t_ms as f32 / 1000.0;
        let q = &self.remaining_s;
        let cdf = if t <= 0.0 {
            0.0
        } else if t < q[0] {
            LEVELS[0] * t / q[0].max(1e-3)
        } else if t >= q[4] {
            let tail = q[4].max(1.0);
            (LEVELS[4] + (1.0 - LEVELS[4]) * (t - q[4]) / tail).min(1.0)
        } else {
            let mut c = LEVELS[4];
            for i in 0..4 {
                if t < q[i + 1] {
                    let w = q[i + 1] - q[i];
                    let f = if w > 0.0 { (t - q[i]) / w } else { 1.0 };
                    c = LEVELS[i] + f * (LEVELS[i + 1] - LEVELS[i]);
                    break;
                }
            }
            c
        };
        (1.0 - cdf).clamp(0.0, 1.0)
    }

    /// Median remaining seconds measured from `now`.
    pub fn median_remaining_s(&self, now: Millis) -> f32 {
        let elapsed = now.saturating_sub(self.made_at) as f32 / 1000.0;
        (self.remaining_s[2] - elapsed).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survival_is_monotone_and_hits_levels() {
        let f = DepartureForecast::from_quantiles(0, [60.0, 120.0, 300.0, 600.0, 1200.0]);
        assert!((f.survival(0, 0) - 1.0).abs() < 1e-6);
        assert!((f.survival(0, 300_000) - 0.5).abs() < 1e-5);
        assert!((f.survival(0, 1_200_000) - 0.1).abs() < 1e-5);
        assert_eq!(f.survival(0, 10_000_000), 0.0);
        let mut prev = 1.0;
        for t in (0..3_000_000).step_by(10_000) {
            let s = f.survival(0, t);
            assert!(s <= prev + 1e-6, "not monotone at {t}");
            prev = s;
        }
        // Evaluated later, survival is conditional on having stayed so far: at 120 s (S = 0.75),
        // reaching 300 s (S = 0.5) has probability 0.5 / 0.75.
        assert!((f.survival(120_000, 180_000) - 0.5 / 0.75).abs() < 1e-5);
        // Once past the last quantile's tail, nothing survives.
        assert_eq!(f.survival(2_500_000, 1), 0.0);
    }

    #[test]
    fn quantiles_are_sanitised() {
        let f = DepartureForecast::from_quantiles(0, [50.0, -1.0, f32::NAN, 10.0, 100.0]);
        assert_eq!(f.remaining_s, [50.0, 50.0, 50.0, 50.0, 100.0]);
    }
}
