//! The queue task's group commit: every call of a [`super::PostgresStore`] is a [`Step`] in
//! one bounded queue; the task takes the steps waiting together, runs them in queue order in
//! one transaction, each inside its own savepoint, commits once, and then answers them all.
//!
//! A step that fails is rolled back to its savepoint (PostgreSQL aborts the whole transaction
//! on a failed statement otherwise) and answered with its error; the others in its group
//! commit. If the connection itself fails (a savepoint cannot be taken or released, the commit
//! fails), the group's transaction is gone: every step of it that had not failed on its own is
//! answered with the commit error, and the next group takes a fresh connection from the pool.
//! Uses deadpool-postgres and the crate's [`StoreError`] and [`Sealer`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use crate::jobs::answer;
use crate::sealing::Sealer;
use crate::StoreError;

/// Steps run in one transaction, at most.
pub const MAX_BATCH: usize = 1024;
/// Steps waiting for the queue task beyond which callers wait (backpressure).
pub(super) const QUEUE: usize = 8192;

/// The connection a step runs on: a pooled tokio-postgres client with a statement cache.
pub(super) type Conn = deadpool_postgres::ClientWrapper;
pub(super) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One queued call, as the queue task sees it.
pub(super) type Step = Box<dyn Call>;

/// A call in the queue: run on the group's connection inside its savepoint (returning how to
/// answer once the commit is known), or answered with an error without running.
///
/// A step returns `Err` whenever one of its statements failed, never swallows such an error:
/// PostgreSQL then refuses everything until the savepoint is rolled back, and a `COMMIT` of
/// an aborted transaction rolls it back without an error, so a swallowed failure would have
/// the whole group answered as committed.
pub(super) trait Call: Send {
    fn run<'a>(self: Box<Self>, conn: &'a Conn, sealer: &'a Sealer) -> BoxFuture<'a, Applied>;
    fn fail(self: Box<Self>, error: &str);
}

/// Answers a step's caller once its group's commit is known: `Ok` when the group committed,
/// or the commit's error.
type Answer = Box<dyn FnOnce(Result<(), &str>) + Send>;

/// A step that ran, waiting for its group's commit.
pub(super) struct Applied {
    /// Whether the step succeeded (its savepoint is released, not rolled back).
    ok: bool,
    /// Answers the caller: with the step's result if the group committed, or the commit's
    /// error.
    answer: Answer,
}

/// `f` as a step whose result goes to `reply` (or, without one, is logged when it failed).
pub(super) fn step<T, F>(f: F, reply: Option<Reply<T>>) -> Step
where
    T: Send + 'static,
    F: for<'a> FnOnce(&'a Conn, &'a Sealer) -> BoxFuture<'a, Result<T, StoreError>>
        + Send
        + 'static,
{
    Box::new(Typed { f, reply })
}

struct Typed<T, F> {
    f: F,
    reply: Option<Reply<T>>,
}

impl<T, F> Call for Typed<T, F>
where
    T: Send + 'static,
    F: for<'a> FnOnce(&'a Conn, &'a Sealer) -> BoxFuture<'a, Result<T, StoreError>>
        + Send
        + 'static,
{
    fn run<'a>(self: Box<Self>, conn: &'a Conn, sealer: &'a Sealer) -> BoxFuture<'a, Applied> {
        let Typed { f, reply } = *self;
        Box::pin(async move {
            let result = f(conn, sealer).await;
            Applied {
                ok: result.is_ok(),
                answer: Box::new(move |committed: Result<(), &str>| {
                    let result = match committed {
                        Ok(()) => result,
                        Err(e) => Err(StoreError::Commit(e.to_string())),
                    };
                    answer(reply, result);
                }),
            }
        })
    }

    fn fail(self: Box<Self>, error: &str) {
        answer(self.reply, Err(StoreError::Commit(error.to_string())));
    }
}

/// The queue task: group commits until every [`super::PostgresStore`] handle is gone.
pub(super) async fn serve(pool: Pool, mut rx: mpsc::Receiver<Step>, sealer: Arc<Sealer>) {
    let mut group = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut group, MAX_BATCH).await > 0 {
        run_group(&pool, &mut group, &sealer).await;
    }
}

/// Runs `group` in queue order in one transaction (each step in its own savepoint), commits,
/// then answers every step.
async fn run_group(pool: &Pool, group: &mut Vec<Step>, sealer: &Sealer) {
    let conn = match pool.get().await {
        Ok(conn) => conn,
        Err(e) => {
            let e = format!("no connection to the database: {e}");
            tracing::error!(cause = %e, steps = group.len(), "job store group not run");
            for s in group.drain(..) {
                s.fail(&e);
            }
            return;
        }
    };
    let mut applied = Vec::with_capacity(group.len());
    // Durable on return whatever the server's or the role's default: a commit waits for its
    // WAL flush. The first step's savepoint opens with the transaction.
    let mut broken = conn
        .batch_execute("BEGIN; SET LOCAL synchronous_commit = on; SAVEPOINT step")
        .await
        .err()
        .map(|e| e.to_string());
    let mut steps = group.drain(..);
    // Each step runs with the savepoint `step` set: after a step that succeeded it is released
    // and set again for the next one; after one that failed it is rolled back to, which undoes
    // that step alone and leaves it set for the next. That command is sent together with the
    // next step's first statement (pipelined on the connection, which keeps their order), so
    // a step costs no round trip of its own beyond its statements. If the command fails, the
    // transaction is gone and so is what the step did: the group is answered with that error.
    // The last step's savepoint ends with the commit.
    while broken.is_none() {
        let Some(step) = steps.next() else { break };
        let mut a = match applied.last().map(|previous: &Applied| previous.ok) {
            None => step.run(&conn, sealer).await,
            Some(previous_ok) => {
                let command = if previous_ok {
                    "RELEASE SAVEPOINT step; SAVEPOINT step"
                } else {
                    "ROLLBACK TO SAVEPOINT step"
                };
                let (before, a) =
                    tokio::join!(conn.batch_execute(command), step.run(&conn, sealer));
                if let Err(e) = before {
                    broken = Some(e.to_string());
                }
                a
            }
        };
        if broken.is_some() {
            // Answered with the transaction's error, not with what its statements saw of it.
            a.ok = true;
        }
        applied.push(a);
    }
    let committed = match broken {
        None => {
            let end = if applied.last().is_some_and(|last| !last.ok) {
                "ROLLBACK TO SAVEPOINT step; COMMIT"
            } else {
                "COMMIT"
            };
            conn.batch_execute(end).await.map_err(|e| e.to_string())
        }
        Some(e) => {
            // The transaction cannot commit; end it so that the connection is clean (a closed
            // one is dropped by the pool).
            let _ = conn.batch_execute("ROLLBACK").await;
            Err(e)
        }
    };
    if let Err(e) = &committed {
        tracing::error!(cause = %e, steps = applied.len(), "job store group commit failed");
    }
    for a in applied {
        // A step that failed on its own keeps its own error.
        let outcome = match (&committed, a.ok) {
            (Err(e), true) => Err(e.as_str()),
            _ => Ok(()),
        };
        (a.answer)(outcome);
    }
    // Steps after a broken connection did not run.
    for s in steps {
        s.fail(
            committed
                .as_ref()
                .err()
                .map_or("the group's transaction failed", |e| e),
        );
    }
}
