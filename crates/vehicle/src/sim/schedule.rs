//! The driving, parking and charging [`Schedule`] a simulated vehicle follows, and the
//! commuter day used by the demos and tests.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Millis;

/// What the vehicle does during one segment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Activity {
    /// Parked at a location, with or without a charger of the given AC power (kW).
    Park {
        lat: f64,
        lon: f64,
        charger_kw: Option<f64>,
    },
    /// Driving to a location at an average speed, consuming kWh per km.
    Drive {
        to_lat: f64,
        to_lon: f64,
        speed_kmh: f64,
        kwh_per_km: f64,
    },
}

/// One schedule segment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub duration: Duration,
    pub activity: Activity,
}

/// A sequence of segments starting at `start`; repeated forever if `repeat`, otherwise
/// the last segment lasts forever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub start: Millis,
    pub segments: Vec<Segment>,
    pub repeat: bool,
}

/// Home and work coordinates used by [`Schedule::commuter_day`].
pub const HOME: (f64, f64) = (52.3702, 4.8952);
/// Workplace coordinates.
pub const WORK: (f64, f64) = (52.3340, 4.8690);

impl Schedule {
    /// A commuter's day starting at local midnight `midnight`: home overnight on a 7.4 kW
    /// charger, a 35-minute drive at 07:40, work without a charger until 17:30, a 40-minute
    /// drive home, plugged in at home for the evening.
    pub fn commuter_day(midnight: Millis, repeat: bool) -> Schedule {
        let min = |m: u64| Duration::from_secs(m * 60);
        let home = Activity::Park {
            lat: HOME.0,
            lon: HOME.1,
            charger_kw: Some(7.4),
        };
        Schedule {
            start: midnight,
            segments: vec![
                Segment {
                    duration: min(7 * 60 + 40),
                    activity: home,
                },
                Segment {
                    duration: min(35),
                    activity: Activity::Drive {
                        to_lat: WORK.0,
                        to_lon: WORK.1,
                        speed_kmh: 52.0,
                        kwh_per_km: 0.17,
                    },
                },
                Segment {
                    duration: min(9 * 60 + 15),
                    activity: Activity::Park {
                        lat: WORK.0,
                        lon: WORK.1,
                        charger_kw: None,
                    },
                },
                Segment {
                    duration: min(40),
                    activity: Activity::Drive {
                        to_lat: HOME.0,
                        to_lon: HOME.1,
                        speed_kmh: 46.0,
                        kwh_per_km: 0.18,
                    },
                },
                Segment {
                    duration: min(5 * 60 + 50),
                    activity: home,
                },
            ],
            repeat,
        }
    }

    pub(super) fn period_ms(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.duration.as_millis() as u64)
            .sum()
    }
}
