//! The event queue: a calendar (bucket) queue keyed by virtual time.
//!
//! Events are ordered by `(time, sequence number)`, exactly as a binary heap of
//! `Reverse((time, seq, event))` would pop them, so replacing the heap changes no result. Time is
//! cut into buckets of 1,024 ms; a ring of [`BUCKETS`] unsorted buckets covers the next
//! ~37 hours. The bucket being drained is sorted once and popped from the end; events pushed
//! into it while it drains go to a small binary heap, and each pop takes the earlier of the
//! two. Events further out wait in an overflow heap and move into the ring as it advances. With a million vehicles
//! the queue holds millions of events; a heap pop then costs ~22 cache misses, a bucket push one.
//!
//! Owns: `EventQueue`. May import: no simulator module (its tests use `rng`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tokenfleet_scheduler::Millis;

const BUCKET_SHIFT: u32 = 10;
/// Buckets in the ring (a horizon of about 37 hours).
const BUCKETS: usize = 1 << 17;

type Item<E> = Reverse<(Millis, u64, E)>;

pub struct EventQueue<E: Ord> {
    seq: u64,
    /// Bucket number (time >> shift) being drained.
    cursor: u64,
    /// Events of bucket `cursor` as it was opened, sorted latest first (popped from the end).
    sorted: Vec<(Millis, u64, E)>,
    /// Events pushed for bucket `cursor` (or earlier) after it was opened.
    current: BinaryHeap<Item<E>>,
    ring: Vec<Vec<(Millis, u64, E)>>,
    /// Events in `ring`.
    in_ring: usize,
    /// Events at or beyond `cursor + BUCKETS`.
    far: BinaryHeap<Item<E>>,
}

impl<E: Ord + Copy> EventQueue<E> {
    /// An empty queue whose first bucket contains `start`.
    pub fn new(start: Millis) -> Self {
        Self {
            seq: 0,
            cursor: start >> BUCKET_SHIFT,
            sorted: Vec::new(),
            current: BinaryHeap::new(),
            ring: (0..BUCKETS).map(|_| Vec::new()).collect(),
            in_ring: 0,
            far: BinaryHeap::new(),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sorted.len() + self.current.len() + self.in_ring + self.far.len()
    }

    pub fn push(&mut self, t: Millis, ev: E) {
        self.seq += 1;
        let b = t >> BUCKET_SHIFT;
        if b <= self.cursor {
            self.current.push(Reverse((t, self.seq, ev)));
        } else if b < self.cursor + BUCKETS as u64 {
            self.ring[(b as usize) & (BUCKETS - 1)].push((t, self.seq, ev));
            self.in_ring += 1;
        } else {
            self.far.push(Reverse((t, self.seq, ev)));
        }
    }

    /// The event `k` places ahead in the bucket being drained, if it is there (events pushed
    /// after the bucket was opened are not looked at): for prefetching, not for ordering.
    pub fn ahead(&self, k: usize) -> Option<&E> {
        let n = self.sorted.len();
        (k < n).then(|| &self.sorted[n - 1 - k].2)
    }

    /// The earliest event (ties in push order).
    pub fn pop(&mut self) -> Option<(Millis, E)> {
        loop {
            let from_sorted = match (self.sorted.last(), self.current.peek()) {
                (Some(&(t, seq, _)), Some(Reverse((ht, hseq, _)))) => (t, seq) < (*ht, *hseq),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => false,
            };
            if from_sorted {
                if let Some((t, _, ev)) = self.sorted.pop() {
                    return Some((t, ev));
                }
            }
            if let Some(Reverse((t, _, ev))) = self.current.pop() {
                return Some((t, ev));
            }
            if self.in_ring == 0 {
                // Nothing in the ring: jump straight to the first far event's bucket.
                let Reverse((t, _, _)) = self.far.peek()?;
                self.cursor = (t >> BUCKET_SHIFT).max(self.cursor + 1);
            } else {
                self.cursor += 1;
            }
            self.pull_far();
            let slot = (self.cursor as usize) & (BUCKETS - 1);
            let mut bucket = std::mem::take(&mut self.ring[slot]);
            self.in_ring -= bucket.len();
            bucket.sort_unstable_by_key(|&(t, seq, _)| Reverse((t, seq)));
            // The previous bucket's allocation is freed here: keeping every bucket's largest
            // size would hold the sum of their peaks (gigabytes at a million vehicles).
            self.sorted = bucket;
        }
    }

    /// Move far events that now fall inside the ring (or into the current bucket).
    fn pull_far(&mut self) {
        let horizon = self.cursor + BUCKETS as u64;
        while let Some(Reverse((t, _, _))) = self.far.peek() {
            let b = t >> BUCKET_SHIFT;
            if b >= horizon {
                break;
            }
            let Some(Reverse(x)) = self.far.pop() else {
                break;
            };
            if b <= self.cursor {
                self.current.push(Reverse(x));
            } else {
                self.ring[(b as usize) & (BUCKETS - 1)].push(x);
                self.in_ring += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The calendar queue pops exactly what a binary heap of `(time, seq)` pops, including pushes
    /// made while draining and events far beyond the ring.
    #[test]
    fn pops_in_the_same_order_as_a_binary_heap() {
        let mut rng = Rng::derive(9, 9);
        let mut q = EventQueue::new(1_000);
        let mut h: BinaryHeap<Reverse<(Millis, u64, u32)>> = BinaryHeap::new();
        let mut seq = 0;
        let mut now = 1_000;
        let mut push = |q: &mut EventQueue<u32>, h: &mut BinaryHeap<_>, t: Millis, e: u32| {
            seq += 1;
            q.push(t, e);
            h.push(Reverse((t, seq, e)));
        };
        for i in 0..2_000 {
            let t = now + (rng.unit() * 5_000_000.0) as u64;
            push(&mut q, &mut h, t, i);
        }
        push(&mut q, &mut h, now + 400 * 3_600_000, 7);
        let mut n = 0u32;
        while let Some(Reverse((t, _, e))) = h.pop() {
            assert_eq!(q.pop(), Some((t, e)));
            now = t;
            n += 1;
            if n < 20_000 && rng.chance(0.6) {
                let dt = match n % 4 {
                    0 => 0,
                    1 => (rng.unit() * 2_000.0) as u64,
                    2 => (rng.unit() * 200_000_000.0) as u64,
                    _ => (rng.unit() * 60_000.0) as u64,
                };
                push(&mut q, &mut h, now + dt, n);
            }
        }
        assert_eq!(q.pop(), None);
        assert_eq!(q.len(), 0);
    }
}
