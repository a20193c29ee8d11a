//! Job ids in blocks from the `job_ids` sequence (created by the migrations).
//!
//! The sequence's increment is the block size: each `nextval` returns the first id of a
//! block of that many ids that no other caller, in this process or another coordinator, ever
//! gets. [`JobIds`] hands them out in order and draws the next blocks when its own run out,
//! on its own connection from the pool, so handing out an id never waits behind the store's
//! queue. A sequence never goes back (not on rollback, not after a crash: it is logged ahead
//! of use), so ids are increasing within a store, never reused, and a store opened later
//! starts above every id handed out before. Uses deadpool-postgres and the crate's
//! [`StoreError`].

use std::collections::VecDeque;

use deadpool_postgres::Pool;
use tokio::sync::Mutex;

use crate::StoreError;

/// Hands out this store's job ids.
pub(super) struct JobIds {
    pool: Pool,
    /// Ids per block: the sequence's increment, read when the store opens.
    block: u64,
    /// Ids not handed out yet: the rest of the current block, then whole blocks drawn ahead.
    free: Mutex<Free>,
}

#[derive(Default)]
struct Free {
    /// The next id of the current block, and the end (exclusive) of that block.
    next: u64,
    end: u64,
    /// First ids of further blocks, in the order the sequence gave them (increasing).
    blocks: VecDeque<u64>,
}

impl JobIds {
    pub(super) async fn new(pool: Pool) -> Result<Self, StoreError> {
        let conn = pool.get().await?;
        let increment: i64 = conn
            .query_one(
                "SELECT increment_by FROM pg_sequences
                 WHERE schemaname = current_schema() AND sequencename = 'job_ids'",
                &[],
            )
            .await?
            .get(0);
        let block = u64::try_from(increment)
            .ok()
            .filter(|b| *b > 0)
            .ok_or_else(|| super::backend_error(format!("job_ids increments by {increment}")))?;
        drop(conn);
        Ok(Self {
            pool,
            block,
            free: Mutex::new(Free::default()),
        })
    }

    /// `n` fresh ids, increasing (and above every id handed out before by this store).
    pub(super) async fn take(&self, n: u64) -> Result<Vec<u64>, StoreError> {
        let mut free = self.free.lock().await;
        let available = (free.end - free.next) + free.blocks.len() as u64 * self.block;
        if available < n {
            let blocks = (n - available).div_ceil(self.block);
            let conn = self.pool.get().await?;
            let rows = conn
                .query(
                    "SELECT nextval('job_ids') FROM generate_series(1, $1::bigint)",
                    &[&(blocks as i64)],
                )
                .await?;
            let mut firsts: Vec<u64> = rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect();
            firsts.sort_unstable();
            free.blocks.extend(firsts);
        }
        let mut ids = Vec::with_capacity(n as usize);
        while (ids.len() as u64) < n {
            if free.next == free.end {
                // Enough blocks were drawn above.
                let Some(first) = free.blocks.pop_front() else {
                    break;
                };
                free.next = first;
                free.end = first + self.block;
            }
            ids.push(free.next);
            free.next += 1;
        }
        Ok(ids)
    }

    /// One fresh id.
    pub(super) async fn next(&self) -> Result<u64, StoreError> {
        self.take(1)
            .await?
            .pop()
            .ok_or_else(|| super::backend_error("job_ids gave no id".into()))
    }
}
