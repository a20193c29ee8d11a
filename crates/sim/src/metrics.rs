//! Run metrics and the serialised reports (`RunReport`, `CompareReport`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use tokenfleet_scheduler::forecast::LEVELS;

/// One point of the time series (every 15 simulated minutes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Hours since the start of measurement.
    pub t_h: f64,
    pub vehicles_parked: u32,
    pub vehicles_eligible: u32,
    pub slots_busy: u64,
    /// Tokens delivered during the interval.
    pub tokens: u64,
}

/// Forecast calibration: for each quantile level, the fraction of placements whose vehicle had
/// left by that quantile (ideal: equal to the level).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub levels: Vec<f32>,
    pub observed: Vec<f64>,
    pub samples: u64,
    /// Mean absolute gap between observed and nominal coverage.
    pub mean_abs_error: f64,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub scenario: String,
    pub policy: String,
    pub seed: u64,
    pub vehicles: u32,
    pub days: f64,
    pub delivered_tokens: u64,
    pub delivered_tokens_per_day: f64,
    pub delivered_interactive: u64,
    pub delivered_batch: u64,
    /// Tokens computed and then lost to evictions/preemptions (not acknowledged).
    pub wasted_tokens: u64,
    /// wasted / (delivered + wasted).
    pub wasted_frac: f64,
    /// Prompt + generated tokens re-processed after a resume (extra compute, in the energy).
    pub reprefill_tokens: u64,
    pub evictions: u64,
    pub preemptions: u64,
    pub interactive_jobs: u64,
    /// Fraction of interactive requests served with TTFT within the SLO.
    pub slo_interactive: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub interactive_rejected: u64,
    pub batch_jobs: u64,
    pub batch_completed: u64,
    /// Fraction of batch jobs due within the run that finished by their deadline.
    pub slo_batch: f64,
    pub batch_rejected: u64,
    pub energy_kwh_grid: f64,
    pub energy_kwh_battery: f64,
    pub energy_cost: f64,
    pub wear_cost: f64,
    pub revenue: f64,
    pub cost_per_mtok: f64,
    pub monthly_net_per_vehicle: f64,
    pub tokens_per_kwh: f64,
    pub calibration: Calibration,
    pub rejections: BTreeMap<String, u64>,
    pub events: u64,
    pub scheduler_calls: u64,
    pub series: Vec<SeriesPoint>,
}

/// Results of all policies on the same scenario and seed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompareReport {
    pub scenario: String,
    pub seed: u64,
    pub policies: BTreeMap<String, RunReport>,
}

/// Accumulators filled during a run.
#[derive(Default)]
pub struct Metrics {
    pub delivered_int: u64,
    pub delivered_batch: u64,
    pub wasted: u64,
    pub reprefill: u64,
    pub evictions: u64,
    pub preemptions: u64,
    pub ttft_ms: Vec<u32>,
    pub int_jobs: u64,
    pub int_slo_ok: u64,
    pub int_rejected: u64,
    pub batch_jobs: u64,
    pub batch_completed: u64,
    pub batch_due: u64,
    pub batch_on_time: u64,
    pub batch_rejected: u64,
    pub grid_kwh: f64,
    pub battery_kwh: f64,
    pub energy_cost: f64,
    pub calib_hits: [u64; 5],
    pub calib_n: u64,
    pub rejections: BTreeMap<String, u64>,
    pub series: Vec<SeriesPoint>,
    pub tokens_in_bucket: u64,
    pub events: u64,
    pub scheduler_calls: u64,
}

impl Metrics {
    pub fn calibration(&self) -> Calibration {
        let observed: Vec<f64> = self
            .calib_hits
            .iter()
            .map(|&h| {
                if self.calib_n == 0 {
                    0.0
                } else {
                    h as f64 / self.calib_n as f64
                }
            })
            .collect();
        let mae = observed
            .iter()
            .zip(LEVELS)
            .map(|(o, l)| (o - l as f64).abs())
            .sum::<f64>()
            / LEVELS.len() as f64;
        Calibration {
            levels: LEVELS.to_vec(),
            observed,
            samples: self.calib_n,
            mean_abs_error: if self.calib_n == 0 { 0.0 } else { mae },
        }
    }
}

/// Percentile (nearest rank) of an unsorted sample, 0 when empty.
pub fn percentile(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1] as f64
}
