//! Ordered, backpressured writes to the job store: token batches and outcomes of one job land
//! in the order the manager issued them, off the manager's task.

use tokio::sync::mpsc;

use crate::store::{Outcome, Store, StoredToken};

pub enum WriteOp {
    Tokens(u64, u32, Vec<StoredToken>),
    Finish(u64, Outcome),
}

pub struct StoreWriter {
    tx: mpsc::Sender<WriteOp>,
}

impl StoreWriter {
    pub fn spawn(store: Store) -> Self {
        let (tx, mut rx) = mpsc::channel::<WriteOp>(4096);
        tokio::spawn(async move {
            while let Some(op) = rx.recv().await {
                let result = match op {
                    WriteOp::Tokens(job, start, tokens) => {
                        store.append_tokens(job, start, tokens).await
                    }
                    WriteOp::Finish(job, outcome) => store.finish_job(job, outcome).await,
                };
                if let Err(e) = result {
                    // The job stays recoverable: unpersisted tokens are regenerated after a
                    // restart, an unpersisted outcome means the job is re-run from its tokens.
                    tracing::error!(cause = %e, "job store write failed");
                }
            }
        });
        Self { tx }
    }

    /// Queues a write; waits when the store is behind (backpressure on the manager).
    pub async fn send(&self, op: WriteOp) {
        if self.tx.send(op).await.is_err() {
            tracing::error!("job store writer stopped");
        }
    }
}
