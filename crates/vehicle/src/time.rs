//! Time as a plain number: [`Millis`], milliseconds since the Unix epoch (UTC).
//!
//! Everything in this crate that depends on time takes `now: Millis` as an argument; nothing
//! reads a clock except the async sources (which timestamp what they receive) and
//! [`Millis::now`], which callers use at the edge. The simulator can therefore step millions
//! of vehicles in virtual time with the same code the agent runs in real time.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time: milliseconds since 1970-01-01T00:00:00Z.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Millis(pub u64);

/// One day in milliseconds.
pub const DAY_MS: u64 = 86_400_000;

impl Millis {
    /// The epoch itself.
    pub const ZERO: Millis = Millis(0);

    /// The wall clock, for callers at the edge (agent main loop). Never used inside models.
    pub fn now() -> Millis {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// From seconds since the epoch (fractional seconds kept to the millisecond).
    /// Negative and non-finite inputs give `None`.
    pub fn from_secs_f64(secs: f64) -> Option<Millis> {
        if !secs.is_finite() || secs < 0.0 || secs > (u64::MAX / 1000) as f64 {
            return None;
        }
        Some(Millis((secs * 1000.0).round() as u64))
    }

    /// Whole seconds since the epoch.
    pub const fn from_secs(secs: u64) -> Millis {
        Millis(secs.saturating_mul(1000))
    }

    /// Seconds since the epoch as a float.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    /// Time elapsed since `earlier` (zero if `earlier` is in the future).
    pub fn since(self, earlier: Millis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Milliseconds elapsed since `earlier` (zero if `earlier` is in the future).
    pub fn ms_since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Milliseconds since local midnight for a fixed UTC offset (minutes east of UTC).
    pub fn ms_of_local_day(self, utc_offset_min: i32) -> u64 {
        let local = self.0 as i128 + i128::from(utc_offset_min) * 60_000;
        local.rem_euclid(i128::from(DAY_MS)) as u64
    }

    /// The local day number (days since the epoch in local time) for a fixed UTC offset.
    pub fn local_day(self, utc_offset_min: i32) -> i64 {
        let local = self.0 as i128 + i128::from(utc_offset_min) * 60_000;
        local.div_euclid(i128::from(DAY_MS)) as i64
    }
}

impl Add<Duration> for Millis {
    type Output = Millis;
    fn add(self, rhs: Duration) -> Millis {
        let ms = u64::try_from(rhs.as_millis()).unwrap_or(u64::MAX);
        Millis(self.0.saturating_add(ms))
    }
}

impl Sub<Duration> for Millis {
    type Output = Millis;
    fn sub(self, rhs: Duration) -> Millis {
        let ms = u64::try_from(rhs.as_millis()).unwrap_or(u64::MAX);
        Millis(self.0.saturating_sub(ms))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_day_and_time_of_day_follow_the_offset() {
        // 2025-06-02T23:30:00Z
        let t = Millis::from_secs(1_748_907_000);
        assert_eq!(t.ms_of_local_day(0), (23 * 3600 + 30 * 60) * 1000);
        // UTC+2: 01:30 the next day
        assert_eq!(t.ms_of_local_day(120), (3600 + 30 * 60) * 1000);
        assert_eq!(t.local_day(120), t.local_day(0) + 1);
        // UTC-5: 18:30 the same day
        assert_eq!(t.ms_of_local_day(-300), (18 * 3600 + 30 * 60) * 1000);
    }

    #[test]
    fn from_secs_f64_rejects_garbage() {
        assert_eq!(Millis::from_secs_f64(1.5), Some(Millis(1500)));
        assert_eq!(Millis::from_secs_f64(-1.0), None);
        assert_eq!(Millis::from_secs_f64(f64::NAN), None);
    }
}
