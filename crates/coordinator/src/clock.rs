//! Time, read in one place: wall-clock Unix time for what is stored or sent (deadlines,
//! timestamps) and a process-local monotonic clock for what is only compared (last seen,
//! leases). Imports nothing from the crate.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Unix milliseconds of `t` (0 before 1970: a clock set that far back is not worth an error).
pub fn unix_ms_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    unix_ms_of(SystemTime::now())
}

/// Unix seconds now.
pub fn unix_s() -> u64 {
    unix_ms() / 1000
}

/// Milliseconds on a monotonic clock shared by the sessions and the manager (its epoch is the
/// first call in this process). Tokio's clock, so tests can pause and advance it; outside a
/// paused runtime it is the system's monotonic clock.
pub fn clock_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}
