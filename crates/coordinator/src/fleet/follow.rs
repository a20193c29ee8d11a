//! Following a job that another coordinator of the cluster runs, for a client connected here:
//! what the job's owner stores (tokens, then the outcome) is published into the job's view, as
//! if the job ran here, so the HTTP layer streams it the same way. The job comes here when it
//! can: as soon as its owner's lease runs out (the owner died) the follower claims it and the
//! manager resumes it from its stored tokens; when the manager has it again (a sweep, a
//! vehicle that came over) the follower forwards the manager's view instead.
//!
//! The store is polled ([`FOLLOW_POLL`]): the relay costs one claim attempt and one read per
//! followed job per poll. Only retried requests (a client whose coordinator died, or whose
//! job was taken over) are followed, so this is rare; a push relay between coordinators would
//! cut the poll's latency, not change what the client gets.
//!
//! Uses the manager's handle and the domain's store and job types.

use std::time::Duration;

use tokio::sync::watch;

use crate::domain::error::RequestError;
use crate::domain::job::{JobHandle, JobOutcome, JobView};
use crate::domain::store::{ClaimedJob, JobState, Store, StoredJob};
use crate::fleet::manager::Manager;

/// How often a followed job is read. A client following a job elsewhere sees its tokens at
/// most this late; 100 ms is below the ~250 ms p50 a streamed token takes on the demo fleet
/// (FIELD-NOTES), and 20 reads/s per followed job are nothing to the database.
pub const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// A handle on `job` (stored, not run here) whose view follows the job wherever it runs.
pub fn follow(store: Store, manager: Manager, job: &StoredJob) -> JobHandle {
    let (tx, rx) = watch::channel(JobView {
        tokens: job.tokens.clone(),
        prompt_tokens: job.prompt_tokens,
        outcome: None,
        restarts: 0,
    });
    tokio::spawn(run(store, manager, job.id, tx));
    JobHandle {
        id: job.id,
        public_id: job.public_id.clone(),
        created_s: job.created_ms / 1000,
        request: job.request.clone(),
        view: rx,
    }
}

/// Keeps publishing `job` into `view` (whose readers are already attached) until it ends or
/// nobody reads it any more.
pub fn spawn_follower(store: Store, manager: Manager, job: u64, view: watch::Sender<JobView>) {
    tokio::spawn(run(store, manager, job, view));
}

async fn run(store: Store, manager: Manager, job: u64, view: watch::Sender<JobView>) {
    let mut poll = tokio::time::interval(FOLLOW_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
        if view.is_closed() {
            return; // nobody reads it any more
        }
        if let Some(handle) = manager.attach(job).await {
            return forward(handle, view).await;
        }
        let claimed = match store.claim_job(job, false).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(job, cause = %e, "following a job on another coordinator: the store failed; retrying");
                continue;
            }
        };
        match claimed {
            ClaimedJob::Claimed(stored) => {
                tracing::info!(
                    job,
                    "the job's coordinator stopped renewing it; resuming it here"
                );
                match manager.resume(*stored).await {
                    Some(handle) => return forward(handle, view).await,
                    None => return, // shutting down
                }
            }
            ClaimedJob::Held { .. } => {
                if let Ok(Some(stored)) = store.load_job(job).await {
                    publish(&view, &stored, None);
                }
            }
            ClaimedJob::Ended => {
                match store.load_job(job).await {
                    Ok(Some(stored)) => {
                        let outcome = outcome_of(&stored);
                        publish(&view, &stored, Some(outcome));
                    }
                    _ => continue,
                }
                return;
            }
            ClaimedJob::Missing => {
                view.send_modify(|v| {
                    v.outcome = Some(JobOutcome::Failed(RequestError::internal(
                        "the job vanished from the store",
                    )))
                });
                return;
            }
        }
    }
}

/// Publishes the stored tokens (and the outcome, at the end). Tokens are only ever appended
/// to a view; a stored job with fewer tokens than the view was re-run from scratch, so its
/// readers start over.
fn publish(view: &watch::Sender<JobView>, stored: &StoredJob, outcome: Option<JobOutcome>) {
    view.send_if_modified(|v| {
        let mut changed = false;
        if stored.tokens.len() < v.tokens.len() {
            v.restarts += 1;
            v.tokens.clear();
            changed = true;
        }
        if stored.tokens.len() > v.tokens.len() {
            v.tokens.extend_from_slice(&stored.tokens[v.tokens.len()..]);
            changed = true;
        }
        if stored.prompt_tokens != 0 && v.prompt_tokens != stored.prompt_tokens {
            v.prompt_tokens = stored.prompt_tokens;
            changed = true;
        }
        if let Some(o) = outcome {
            v.outcome = Some(o);
            changed = true;
        }
        changed
    });
}

/// A stored job's end as the view carries it.
fn outcome_of(stored: &StoredJob) -> JobOutcome {
    match stored.state {
        JobState::Done => JobOutcome::Done {
            finish_reason: stored
                .finish_reason
                .clone()
                .unwrap_or_else(|| "stop".into()),
            text_tail: stored.text_tail.clone(),
            prompt_tokens: stored.prompt_tokens,
        },
        JobState::Cancelled => JobOutcome::Cancelled,
        JobState::Failed | JobState::Queued => JobOutcome::Failed(RequestError::unavailable(
            stored
                .error
                .clone()
                .unwrap_or_else(|| "the job failed on another coordinator".into()),
        )),
    }
}

/// Mirrors the manager's view of the job into `view` until the job ends.
async fn forward(mut from: JobHandle, view: watch::Sender<JobView>) {
    loop {
        let current = from.view.borrow_and_update().clone();
        let ended = current.outcome.is_some();
        view.send_replace(current);
        if ended || view.is_closed() {
            return;
        }
        if from.view.changed().await.is_err() {
            return;
        }
    }
}
