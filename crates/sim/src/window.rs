//! The run's clock and measurement window, from the scenario and the run's options.
//!
//! Owns: [`Window`] and the epoch the simulated calendar starts from.
//! May import: `options`, `scenario`, `vehicle_model`.

use tokenfleet_scheduler::Millis;

use crate::options::RunOptions;
use crate::scenario::Scenario;
use crate::vehicle_model::{Clock, DAY, HOUR};

/// 2024-01-01 00:00 UTC, a Monday.
pub const EPOCH_MONDAY: Millis = 1_704_067_200_000;

/// The run's clock and measurement window `[t_start, t_end)`.
#[derive(Clone, Copy)]
pub(crate) struct Window {
    pub clock: Clock,
    pub t_start: Millis,
    pub t_end: Millis,
}

impl Window {
    pub fn of(sc: &Scenario, opts: &RunOptions) -> Self {
        let days = opts.days.unwrap_or(sc.days);
        let t0 = (EPOCH_MONDAY as i64 - sc.utc_offset_min as i64 * 60_000) as Millis;
        let t_start = t0
            + sc.warmup_days as u64 * DAY
            + (sc.start_hour.clamp(0.0, 24.0) * HOUR as f64) as u64;
        let t_end = t_start + (days * DAY as f64) as u64;
        Window {
            clock: Clock { t0 },
            t_start,
            t_end,
        }
    }

    /// Measured days.
    pub fn days(&self) -> f64 {
        (self.t_end - self.t_start) as f64 / DAY as f64
    }
}
