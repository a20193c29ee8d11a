//! The store thread's group commit: operations queued by [`super::SqliteStore`] handles,
//! applied in queue order; consecutive writes share one transaction (each in its own
//! savepoint), committed once, then answered. A connection call splits the group so that it
//! runs in its place. Uses the job SQL of [`super::jobs`] and the crate's records.

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::jobs::{append, finish, insert, NewRow};
use crate::jobs::answer;
use crate::sealing::Sealer;
use crate::{Outcome, StoreError, StoredToken};

/// Operations applied in one transaction, at most.
pub const MAX_BATCH: usize = 1024;
/// Operations waiting for the store thread beyond which callers wait (backpressure).
pub(super) const QUEUE: usize = 8192;

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum Op {
    Insert {
        id: u64,
        public_id: String,
        tenant: String,
        idempotency_key: Option<String>,
        request: Vec<u8>,
        created_ms: u64,
        reply: Reply<Result<u64, u64>>,
    },
    Tokens {
        job: u64,
        start: u32,
        tokens: Vec<StoredToken>,
        reply: Option<Reply<()>>,
    },
    Finish {
        job: u64,
        outcome: Outcome,
        reply: Option<Reply<()>>,
    },
    /// Runs on the store thread outside any transaction, after the writes queued before it
    /// are committed and before those queued after it (reads, and rare writes that commit on
    /// their own).
    WithConn(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// A write applied inside the open transaction, waiting for the commit to answer.
pub(super) enum Applied {
    Insert(
        Reply<Result<u64, u64>>,
        Result<Result<u64, u64>, StoreError>,
    ),
    Unit(Option<Reply<()>>, Result<(), StoreError>),
}

/// The store thread: group commits until every [`super::SqliteStore`] handle is gone.
pub(super) fn serve(mut conn: Connection, mut rx: mpsc::Receiver<Op>, sealer: &Sealer) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(op) = rx.blocking_recv() {
        batch.push(op);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        run_batch(&mut conn, &mut batch, sealer);
    }
}

/// Applies a batch in queue order: consecutive writes share one transaction (one sync); a
/// [`Op::WithConn`] first commits the writes queued before it, then runs alone, and the writes
/// queued after it open the next transaction. So every operation sees exactly the operations
/// queued before it, which is the ordering [`super::SqliteStore::queue_exec`] promises (a discard of
/// a job's tokens cannot overtake the re-run's tokens queued after it).
fn run_batch(conn: &mut Connection, batch: &mut Vec<Op>, sealer: &Sealer) {
    let mut writes = Vec::with_capacity(batch.len());
    for op in batch.drain(..) {
        match op {
            Op::WithConn(f) => {
                commit_writes(conn, &mut writes, sealer);
                f(conn);
            }
            write => writes.push(write),
        }
    }
    commit_writes(conn, &mut writes, sealer);
}

/// Applies `writes` in one transaction (each in its own savepoint), commits, then answers.
fn commit_writes(conn: &mut Connection, writes: &mut Vec<Op>, sealer: &Sealer) {
    if writes.is_empty() {
        return;
    }
    let mut applied = Vec::with_capacity(writes.len());
    let committed = match conn.transaction() {
        Ok(mut tx) => {
            for write in writes.drain(..) {
                applied.push(apply_in_savepoint(&mut tx, write, sealer));
            }
            tx.commit().map_err(|e| e.to_string())
        }
        Err(e) => {
            applied.extend(writes.drain(..).map(not_applied));
            Err(e.to_string())
        }
    };
    for a in applied {
        match a {
            Applied::Insert(reply, result) => {
                let _ = reply.send(match &committed {
                    Ok(()) => result,
                    Err(e) => Err(StoreError::Commit(e.clone())),
                });
            }
            Applied::Unit(reply, result) => {
                let result = match &committed {
                    Ok(()) => result,
                    Err(e) => Err(StoreError::Commit(e.clone())),
                };
                answer(reply, result);
            }
        }
    }
}

fn not_applied(op: Op) -> Applied {
    let err = || StoreError::Commit("the operation could not be applied".into());
    match op {
        Op::Insert { reply, .. } => Applied::Insert(reply, Err(err())),
        Op::Tokens { reply, .. } | Op::Finish { reply, .. } => Applied::Unit(reply, Err(err())),
        Op::WithConn(_) => unreachable!("connection calls run between commits, not in one"),
    }
}

fn apply_in_savepoint(tx: &mut rusqlite::Transaction<'_>, op: Op, sealer: &Sealer) -> Applied {
    let sp = match tx.savepoint() {
        Ok(sp) => sp,
        Err(e) => {
            let applied = not_applied(op);
            tracing::error!(cause = %e, "job store savepoint failed");
            return applied;
        }
    };
    let applied = match op {
        Op::Insert {
            id,
            public_id,
            tenant,
            idempotency_key,
            request,
            created_ms,
            reply,
        } => Applied::Insert(
            reply,
            insert(
                &sp,
                sealer,
                NewRow {
                    id,
                    public_id: &public_id,
                    tenant: &tenant,
                    idempotency_key: idempotency_key.as_deref(),
                    request: &request,
                    created_ms,
                },
            ),
        ),
        Op::Tokens {
            job,
            start,
            tokens,
            reply,
        } => Applied::Unit(reply, append(&sp, sealer, job, start, &tokens)),
        Op::Finish {
            job,
            outcome,
            reply,
        } => Applied::Unit(reply, finish(&sp, sealer, job, &outcome)),
        Op::WithConn(_) => unreachable!("connection calls run between commits, not in one"),
    };
    let ok = match &applied {
        Applied::Insert(_, r) => r.is_ok(),
        Applied::Unit(_, r) => r.is_ok(),
    };
    let end = if ok {
        sp.commit()
    } else {
        // Undo this operation only; the rest of the group commits.
        sp.finish()
    };
    match (end, applied) {
        (Ok(()), applied) => applied,
        (Err(e), Applied::Insert(reply, _)) => Applied::Insert(reply, Err(e.into())),
        (Err(e), Applied::Unit(reply, _)) => Applied::Unit(reply, Err(e.into())),
    }
}
