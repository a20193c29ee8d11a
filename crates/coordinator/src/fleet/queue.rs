//! The manager's queue of jobs waiting for a vehicle, kept in the scheduler's terms.
//!
//! Each waiting job's [`QueuedJob`] is built once, when it is queued (nothing the scheduler
//! reads changes while a job waits: its tokens change only while it runs), and the slice the
//! scheduler takes is rebuilt only after the queue changed. Before, every dispatch (at least
//! one per 100 ms tick) cloned the whole queue with its strings. Depths per class are counted
//! as jobs come and go, for the gauges.
//!
//! Imports nothing from the crate; owned by `fleet::manager`.

use std::collections::BTreeMap;

use tokenfleet_scheduler::{JobClass, QueuedJob};

/// Jobs waiting for a vehicle, oldest (lowest id) first.
#[derive(Debug, Default)]
pub struct JobQueue {
    waiting: BTreeMap<u64, QueuedJob>,
    /// `waiting`'s values in order, when nothing changed since they were collected.
    snapshot: Option<Vec<QueuedJob>>,
    interactive: usize,
    batch: usize,
}

impl JobQueue {
    /// Queues a job (replacing its entry if it was queued already).
    pub fn insert(&mut self, job: QueuedJob) {
        let class = job.class;
        if let Some(old) = self.waiting.insert(job.id.0, job) {
            self.count(old.class, -1);
        }
        self.count(class, 1);
        self.snapshot = None;
    }

    /// Takes a job out of the queue; whether it was queued.
    pub fn remove(&mut self, id: u64) -> bool {
        match self.waiting.remove(&id) {
            Some(old) => {
                self.count(old.class, -1);
                self.snapshot = None;
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Waiting job ids, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.waiting.keys().copied()
    }

    /// Jobs waiting of one class.
    pub fn depth(&self, class: JobClass) -> usize {
        match class {
            JobClass::Interactive => self.interactive,
            JobClass::Batch => self.batch,
        }
    }

    /// The queue as the scheduler takes it, oldest first; collected again only after a change.
    pub fn as_scheduled(&mut self) -> &[QueuedJob] {
        self.snapshot
            .get_or_insert_with(|| self.waiting.values().cloned().collect())
    }

    fn count(&mut self, class: JobClass, delta: isize) {
        let n = match class {
            JobClass::Interactive => &mut self.interactive,
            JobClass::Batch => &mut self.batch,
        };
        *n = n.saturating_add_signed(delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenfleet_scheduler::JobId;

    fn job(id: u64, class: JobClass) -> QueuedJob {
        QueuedJob {
            id: JobId(id),
            class,
            model: "m".into(),
            prompt_tokens: 1,
            max_tokens: 8,
            generated_tokens: 0,
            deadline: None,
            residency: None,
            tenant: String::new(),
            sensitive: false,
            enqueued_at: 0,
            running_on: None,
        }
    }

    #[test]
    fn snapshot_follows_inserts_and_removals_in_id_order() {
        let mut q = JobQueue::default();
        q.insert(job(3, JobClass::Batch));
        q.insert(job(1, JobClass::Interactive));
        let ids: Vec<u64> = q.as_scheduled().iter().map(|j| j.id.0).collect();
        assert_eq!(ids, [1, 3]);
        q.insert(job(2, JobClass::Interactive));
        assert!(q.remove(3));
        assert!(!q.remove(3), "a job is removed once");
        let ids: Vec<u64> = q.as_scheduled().iter().map(|j| j.id.0).collect();
        assert_eq!(ids, [1, 2]);
        assert_eq!(q.depth(JobClass::Interactive), 2);
        assert_eq!(q.depth(JobClass::Batch), 0);
    }

    #[test]
    fn requeueing_a_queued_job_replaces_it_and_keeps_the_counts() {
        let mut q = JobQueue::default();
        q.insert(job(1, JobClass::Batch));
        q.insert(job(1, JobClass::Batch));
        assert_eq!(q.len(), 1);
        assert_eq!(q.depth(JobClass::Batch), 1);
        assert!(q.remove(1));
        assert!(q.is_empty());
        assert_eq!(q.depth(JobClass::Batch), 0);
    }
}
