//! Run metrics and the serialised reports (`RunReport`, `CompareReport`).
//!
//! Owns: `Metrics` (a run's accumulators), `RunReport`, `CompareReport`. May import: no
//! simulator module.

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
    /// Tokens computed and then lost to evictions/preemptions (not acknowledged), plus the
    /// re-prefill after each resume expressed in decode-token equivalents of slot time.
    pub wasted_tokens: u64,
    /// wasted / (delivered + wasted).
    pub wasted_frac: f64,
    /// Where the waste comes from: unacknowledged tokens lost on evictions, re-prefill after
    /// resumes (decode-token equivalents), and partial answers of refused jobs.
    #[serde(default)]
    pub wasted_breakdown: WasteBreakdown,
    /// Prompt + generated tokens re-processed after a resume (extra compute, in the energy).
    pub reprefill_tokens: u64,
    pub evictions: u64,
    pub preemptions: u64,
    pub interactive_jobs: u64,
    /// Fraction of interactive requests served with TTFT within the SLO and not cut by an
    /// eviction (a cut answer stalls and costs the user a second TTFT).
    pub slo_interactive: f64,
    /// Interactive answers cut while streaming (each costs a second TTFT, which is also part of
    /// the TTFT percentiles).
    #[serde(default)]
    pub interactive_cut: u64,
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

/// The parts of [`RunReport::wasted_tokens`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WasteBreakdown {
    pub lost_on_eviction: u64,
    pub reprefill: u64,
    pub refused_partial: u64,
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
    pub waste: WasteBreakdown,
    pub reprefill: u64,
    pub evictions: u64,
    pub preemptions: u64,
    pub ttft_ms: MsHistogram,
    pub int_jobs: u64,
    pub int_slo_ok: u64,
    pub int_cut: u64,
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
    /// Add another partition's metrics (partitions share the run's window and sampling
    /// times). Counts and energy are sums; TTFT histograms are merged bucket by bucket, so the
    /// percentiles are exactly those of all partitions' samples together; series points are
    /// summed by sample time. Merging in partition order keeps floating-point sums
    /// deterministic.
    pub fn merge(&mut self, o: Metrics) {
        self.delivered_int += o.delivered_int;
        self.delivered_batch += o.delivered_batch;
        self.wasted += o.wasted;
        self.waste.lost_on_eviction += o.waste.lost_on_eviction;
        self.waste.reprefill += o.waste.reprefill;
        self.waste.refused_partial += o.waste.refused_partial;
        self.reprefill += o.reprefill;
        self.evictions += o.evictions;
        self.preemptions += o.preemptions;
        self.ttft_ms.merge(o.ttft_ms);
        self.int_jobs += o.int_jobs;
        self.int_slo_ok += o.int_slo_ok;
        self.int_cut += o.int_cut;
        self.int_rejected += o.int_rejected;
        self.batch_jobs += o.batch_jobs;
        self.batch_completed += o.batch_completed;
        self.batch_due += o.batch_due;
        self.batch_on_time += o.batch_on_time;
        self.batch_rejected += o.batch_rejected;
        self.grid_kwh += o.grid_kwh;
        self.battery_kwh += o.battery_kwh;
        self.energy_cost += o.energy_cost;
        for (a, b) in self.calib_hits.iter_mut().zip(o.calib_hits) {
            *a += b;
        }
        self.calib_n += o.calib_n;
        for (k, v) in o.rejections {
            *self.rejections.entry(k).or_default() += v;
        }
        if self.series.len() < o.series.len() {
            self.series.resize(o.series.len(), SeriesPoint::default());
        }
        for (a, b) in self.series.iter_mut().zip(o.series) {
            a.t_h = b.t_h;
            a.vehicles_parked += b.vehicles_parked;
            a.vehicles_eligible += b.vehicles_eligible;
            a.slots_busy += b.slots_busy;
            a.tokens += b.tokens;
        }
        self.tokens_in_bucket += o.tokens_in_bucket;
        self.events += o.events;
        self.scheduler_calls += o.scheduler_calls;
    }

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

/// Millisecond values with exact nearest-rank percentiles in constant memory: 1 ms buckets up to
/// [`MsHistogram::EXACT_MS`], the (rare) larger values kept as they are.
#[derive(Default)]
pub struct MsHistogram {
    counts: Vec<u64>,
    over: Vec<u32>,
    n: u64,
}

impl MsHistogram {
    pub const EXACT_MS: usize = 120_000;

    pub fn push(&mut self, ms: u32) {
        if self.counts.is_empty() {
            self.counts = vec![0; Self::EXACT_MS];
        }
        match self.counts.get_mut(ms as usize) {
            Some(c) => *c += 1,
            None => self.over.push(ms),
        }
        self.n += 1;
    }

    /// Add every value of `o` (percentiles are then those of both samples together).
    pub fn merge(&mut self, o: MsHistogram) {
        if o.counts.is_empty() && o.over.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.counts = o.counts;
        } else {
            for (a, b) in self.counts.iter_mut().zip(&o.counts) {
                *a += b;
            }
        }
        self.over.extend(o.over);
        self.n += o.n;
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Nearest-rank percentile, 0 when empty (the same value as [`percentile`] on the sample).
    pub fn percentile(&mut self, p: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let rank = ((p * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (ms, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return ms as f64;
            }
        }
        self.over.sort_unstable();
        self.over[(rank - seen - 1) as usize] as f64
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_equal_the_exact_nearest_rank() {
        let mut h = MsHistogram::default();
        let mut raw = Vec::new();
        let mut x: u64 = 12345;
        for i in 0..5000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Mostly small, a few beyond the exact range.
            let ms = if i % 500 == 0 {
                200_000 + (x >> 40) as u32 % 1000
            } else {
                (x >> 33) as u32 % 5000
            };
            h.push(ms);
            raw.push(ms);
        }
        for p in [0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(h.percentile(p), percentile(&mut raw, p), "p = {p}");
        }
        assert_eq!(MsHistogram::default().percentile(0.5), 0.0);
        // Split into three histograms and merged back: the same percentiles.
        let mut parts: Vec<MsHistogram> = (0..3).map(|_| MsHistogram::default()).collect();
        for (i, &ms) in raw.iter().enumerate() {
            parts[i % 3].push(ms);
        }
        let mut merged = MsHistogram::default();
        merged.merge(MsHistogram::default());
        for p in parts {
            merged.merge(p);
        }
        assert_eq!(merged.len(), h.len());
        for p in [0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(merged.percentile(p), percentile(&mut raw, p), "p = {p}");
        }
    }
}
