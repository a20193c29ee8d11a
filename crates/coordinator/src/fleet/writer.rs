//! Ordered, backpressured writes to the job store: token batches and outcomes of one job land
//! in the order the manager issued them, off the manager's task.
//!
//! The store applies its queue in order and commits in groups (the store crate's ordering
//! contract), so the manager only waits for room in that queue, never for a disk sync. Uses
//! [`crate::domain::store`].

use crate::domain::store::{Outcome, Store, StoredToken};

pub enum WriteOp {
    Tokens(u64, u32, Vec<StoredToken>),
    Finish(u64, Outcome),
}

pub struct StoreWriter {
    store: Store,
}

impl StoreWriter {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Queues a write; waits when the store is behind (backpressure on the manager). A write
    /// that fails is logged by the store; the job stays recoverable (unpersisted tokens are
    /// regenerated after a restart, an unpersisted outcome means the job is re-run from its
    /// tokens).
    pub async fn send(&self, op: WriteOp) {
        match op {
            WriteOp::Tokens(job, start, tokens) => {
                self.store.jobs().queue_tokens(job, start, tokens).await
            }
            WriteOp::Finish(job, outcome) => self.store.jobs().queue_finish(job, outcome).await,
        }
    }
}
