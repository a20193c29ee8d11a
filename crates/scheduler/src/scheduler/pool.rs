//! The candidate pool that the `tokenfleet`/`oracle` interactive jobs of one group share during
//! a `decide` call.

use super::{Group, Pick, Scheduler};
use crate::constraints::check_placement;
use crate::policy::Card;
use crate::types::{Millis, QueuedJob};

/// The candidates the interactive jobs of one group share during one `decide` call: the first
/// `sample_size_interactive` members of the group's `Free` sets from a random position, with
/// copies of their cards, in one small array. Every job scores all of them (its own run time
/// and prefill enter the score) and takes the best; a candidate that fills up is replaced by
/// the next member after the window. So each job still chooses the best of
/// `sample_size_interactive` nodes that can take it, but a dispatch tick's jobs read the
/// million-node index once per group, not once per job.
pub(super) struct Pool {
    /// Position of the window in the concatenated sets and how far it has advanced.
    start: usize,
    next: usize,
    /// (slot, index version the card was copied at, card).
    members: Vec<(u32, u32, Card)>,
}

impl Scheduler {
    /// Add up to `k` members after the pool's window (skipping unattested nodes for a sensitive
    /// job and nodes already in the pool); stops early when the sets have no other member.
    fn pool_refill(&self, pool: &mut Pool, ids: &[u32], sensitive: bool, k: usize) {
        let total = self.total(ids);
        let mut added = 0;
        // Each refill looks at every member at most once.
        for _ in 0..total {
            if added == k {
                break;
            }
            let m = self.member(ids, (pool.start + pool.next) % total);
            pool.next += 1;
            if sensitive && !m.card.attested {
                continue;
            }
            if pool.members.iter().any(|&(s, _, _)| s == m.slot) {
                continue;
            }
            pool.members.push((m.slot, m.version, m.card));
            // One of the next jobs may take it: start loading its entry.
            self.index.prefetch_slot(m.slot);
            added += 1;
        }
    }

    /// `tokenfleet`/`oracle`, interactive: the best node of the group's shared [`Pool`].
    pub(super) fn pick_pooled(&mut self, now: Millis, job: &QueuedJob, group: &mut Group) -> Pick {
        let want = self.config.sample_size_interactive.max(1);
        let mut pool = match group.pool.take() {
            Some(p) => p,
            None => {
                let total = self.total(&group.free);
                if total == 0 {
                    return Pick::Nothing;
                }
                let mut p = Pool {
                    start: self.rng.below(total),
                    next: 0,
                    members: Vec::with_capacity(want),
                };
                self.pool_refill(&mut p, &group.free, job.sensitive, want);
                p
            }
        };
        // Turnover: the oldest members leave for the next ones after the window, so that the
        // pool does not end up holding only the nodes every earlier job passed over.
        let turnover = self.config.interactive_pool_turnover;
        if pool.members.len() >= want {
            let k = turnover.min(pool.members.len());
            pool.members.drain(..k);
            self.pool_refill(&mut pool, &group.free, job.sensitive, k);
        }
        let pick = loop {
            // Score every member for this job; the first best wins (as in `pick_in`). A member
            // whose upper bound does not beat the best so far is skipped: same winner, and most
            // members never need their forecast evaluated.
            let mut best: Option<(f32, usize)> = None;
            for (i, (_, _, card)) in pool.members.iter().enumerate() {
                if best.is_some_and(|(bs, _)| card.interactive_score_bound(job) <= bs) {
                    continue;
                }
                let (s, _, _) = card.score(self.policy, job, now);
                if best.is_none_or(|(bs, _)| s > bs) {
                    best = Some((s, i));
                }
            }
            let Some((_, i)) = best else {
                break Pick::Nothing;
            };
            let (slot, version, _) = pool.members[i];
            if self.index.version(slot) == version {
                // Unchanged since its card was copied from one of the group's `Free` sets (an
                // unattested node never enters a sensitive job's pool), so it passes every hard
                // constraint: eligible, SoC, free slot, model, region.
                debug_assert!(check_placement(job, self.index.view(slot), false).is_ok());
                break Pick::Free(slot);
            }
            // The node changed in this call (an assignment of this or another group): take its
            // current card if it can still take work, else replace it.
            match self.index.free_card(slot) {
                Some((v, card)) if v != version => pool.members[i] = (slot, v, card),
                _ => {
                    pool.members.remove(i);
                    self.pool_refill(&mut pool, &group.free, job.sensitive, 1);
                }
            }
        };
        group.pool = Some(pool);
        pick
    }
}
