//! Simulating a run's partitions on up to `RunOptions::threads` threads.
//!
//! Owns: the work queue of partitions and their results.
//! May import: `engine`, `partition`, `progress`, `options`, `scenario`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use tokenfleet_scheduler::PolicyKind;

use crate::engine::{Outcome, Sim};
use crate::options::{RunOptions, DEFAULT_THREADS};
use crate::partition::Part;
use crate::progress::SharedProgress;
use crate::scenario::Scenario;

/// Simulate the partitions on up to `opts.threads` threads (the calling thread is one of
/// them), the biggest first; results in partition order.
pub(crate) fn run_parts(
    sc: &Scenario,
    policy: PolicyKind,
    opts: &RunOptions,
    parts: Vec<Part>,
) -> Vec<Outcome> {
    let n = parts.len();
    let threads = opts.threads.unwrap_or(DEFAULT_THREADS).clamp(1, n.max(1));
    let progress = opts.progress.as_ref().map(|cb| SharedProgress::new(n, cb));
    let mut order: Vec<usize> = (0..n).collect();
    let weights: Vec<f64> = parts.iter().map(|p| p.weight).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let slots: Vec<Mutex<Option<Part>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let results: Vec<Mutex<Option<Outcome>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        let Some(&i) = order.get(k) else { break };
        let Some(part) = slots[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            continue;
        };
        let r = Sim::new(sc, policy, opts, part, progress.as_ref()).run();
        *results[i].lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
    };
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(work);
            }
            work();
        });
    }
    results
        .into_iter()
        .filter_map(|r| r.into_inner().unwrap_or_else(PoisonError::into_inner))
        .collect()
}
