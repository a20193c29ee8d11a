//! Progress reporting shared by a run's partitions.
//!
//! Owns: [`SharedProgress`] (each partition's fraction, and the caller's callback).
//! May import: `options`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokenfleet_scheduler::PolicyKind;

use crate::options::{Progress, ProgressFn};

/// The progress callback shared by the partitions: each reports its own fraction, the
/// callback sees their mean.
pub(crate) struct SharedProgress {
    fractions: Vec<AtomicU64>,
    callback: ProgressFn,
}

impl SharedProgress {
    /// For `parts` partitions, all at 0.
    pub fn new(parts: usize, callback: &ProgressFn) -> Self {
        Self {
            fractions: (0..parts).map(|_| AtomicU64::new(0)).collect(),
            callback: Arc::clone(callback),
        }
    }

    pub fn report(&self, part: usize, policy: PolicyKind, fraction: f64) {
        if let Some(f) = self.fractions.get(part) {
            f.store(fraction.to_bits(), Ordering::Relaxed);
        }
        let sum: f64 = self
            .fractions
            .iter()
            .map(|f| f64::from_bits(f.load(Ordering::Relaxed)))
            .sum();
        (self.callback)(Progress {
            policy,
            fraction: sum / self.fractions.len().max(1) as f64,
        });
    }
}
