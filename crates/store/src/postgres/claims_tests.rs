//! Several coordinators on one database ([`crate::claims`]): who may claim a job, what an
//! owner that lost its job can still write (nothing), orphans swept without two coordinators
//! taking the same job, a restarted coordinator taking its own jobs back.

use std::collections::HashSet;
use std::time::Duration;

use super::tests::{with_database, PgHarness};
use crate::suite::{done_at, new_job, token};
use crate::{Claim, StoreError, Stores};

/// Long enough never to run out during a test.
const LONG: Duration = Duration::from_secs(600);

fn claimed(claim: Claim) -> crate::JobRecord {
    match claim {
        Claim::Claimed(job) => job,
        other => panic!("expected a claim, got {other:?}"),
    }
}

fn is_fenced(result: Result<(), StoreError>, job: u64) -> bool {
    matches!(result, Err(StoreError::Fenced { job: j }) if j == job)
}

/// A job another coordinator holds is not claimed unless stolen (a vehicle running it came
/// over); after the steal the old owner can write neither tokens nor an outcome, learns it at
/// its next renewal, and the new owner continues from the stored tokens.
#[tokio::test]
async fn a_stolen_job_fences_its_old_owner() {
    with_database(|h: PgHarness| async move {
        let a = h.owned("coord-a", LONG).await;
        let b = h.owned("coord-b", LONG).await;
        let job = new_job(&a).await;
        a.jobs
            .append_tokens(job, 0, vec![token(1), token(2)])
            .await
            .unwrap();

        match b.claims.claim_job(job, false).await.unwrap() {
            Claim::Held { owner, lease_left } => {
                assert_eq!(owner, "coord-a");
                assert!(lease_left > Duration::from_secs(500), "{lease_left:?}");
            }
            other => panic!("a held job was {other:?}"),
        }
        let taken = claimed(b.claims.claim_job(job, true).await.unwrap());
        assert_eq!(taken.tokens, vec![token(1), token(2)]);

        // The old owner's writes are refused, and change nothing.
        assert!(is_fenced(
            a.jobs.append_tokens(job, 2, vec![token(9)]).await,
            job
        ));
        assert!(is_fenced(a.jobs.finish_job(job, done_at(5)).await, job));
        let renewal = a.claims.renew_leases().await.unwrap();
        assert!(renewal.lost.is_empty(), "forgotten at the fenced finish");
        b.jobs.append_tokens(job, 2, vec![token(3)]).await.unwrap();
        let stored = b.jobs.load_job(job).await.unwrap().unwrap();
        assert_eq!(stored.tokens, vec![token(1), token(2), token(3)]);
        assert_eq!(stored.state, crate::JobState::Queued);
        b.jobs.finish_job(job, done_at(7)).await.unwrap();
        assert_eq!(
            a.claims.claim_job(job, true).await.unwrap(),
            Claim::Ended,
            "an ended job is nobody's"
        );
    })
    .await;
}

/// An owner that is still running learns at its next renewal which of its jobs were taken,
/// and keeps the rest.
#[tokio::test]
async fn renewal_reports_the_jobs_taken_and_keeps_the_rest() {
    with_database(|h: PgHarness| async move {
        let a = h.owned("coord-a", LONG).await;
        let b = h.owned("coord-b", LONG).await;
        let kept = new_job(&a).await;
        let taken = new_job(&a).await;
        claimed(b.claims.claim_job(taken, true).await.unwrap());
        let renewal = a.claims.renew_leases().await.unwrap();
        assert_eq!(renewal.lost, vec![taken]);
        assert_eq!(renewal.renewed, 1);
        a.jobs.append_tokens(kept, 0, vec![token(1)]).await.unwrap();
        assert!(is_fenced(
            a.jobs.append_tokens(taken, 0, vec![token(1)]).await,
            taken
        ));
        // Queued writes fail alone: the job stays as its new owner left it.
        a.jobs.queue_tokens(taken, 0, vec![token(8)]).await;
        a.jobs.flush().await.unwrap();
        assert!(b
            .jobs
            .load_job(taken)
            .await
            .unwrap()
            .unwrap()
            .tokens
            .is_empty());
    })
    .await;
}

/// When a coordinator stops renewing, its jobs become orphans once their lease runs out;
/// two coordinators sweeping at once never take the same job, and between them take all.
#[tokio::test]
async fn orphans_are_swept_once_when_their_lease_runs_out() {
    with_database(|h: PgHarness| async move {
        let dead = h.owned("coord-dead", Duration::from_millis(300)).await;
        let mut jobs = Vec::new();
        for _ in 0..40 {
            jobs.push(new_job(&dead).await);
        }
        dead.jobs
            .append_tokens(jobs[0], 0, vec![token(4)])
            .await
            .unwrap();
        let b = h.owned("coord-b", LONG).await;
        let c = h.owned("coord-c", LONG).await;
        assert!(
            b.claims.claim_orphans(100).await.unwrap().is_empty(),
            "leases still running"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        let sweep = |s: &Stores| {
            let s = s.clone();
            async move {
                let mut got = Vec::new();
                loop {
                    let batch = s.claims.claim_orphans(7).await.unwrap();
                    if batch.is_empty() {
                        break got;
                    }
                    got.extend(batch);
                }
            }
        };
        let (from_b, from_c) = tokio::join!(sweep(&b), sweep(&c));
        let ids_b: HashSet<u64> = from_b.iter().map(|j| j.id).collect();
        let ids_c: HashSet<u64> = from_c.iter().map(|j| j.id).collect();
        assert!(ids_b.is_disjoint(&ids_c), "a job swept twice");
        let all: HashSet<u64> = ids_b.union(&ids_c).copied().collect();
        assert_eq!(all, jobs.iter().copied().collect::<HashSet<_>>());
        let first = from_b
            .iter()
            .chain(&from_c)
            .find(|j| j.id == jobs[0])
            .unwrap();
        assert_eq!(first.tokens, vec![token(4)], "swept with its tokens");
        assert!(is_fenced(
            dead.jobs.finish_job(jobs[1], done_at(1)).await,
            jobs[1]
        ));
    })
    .await;
}

/// A coordinator restarted under the same id takes its unfinished jobs back at once, without
/// waiting out their leases; its jobs in the sweep are not re-claimed while it runs them.
#[tokio::test]
async fn a_restarted_coordinator_takes_its_own_jobs_back_at_once() {
    with_database(|h: PgHarness| async move {
        let before = h.owned("coord-a", LONG).await;
        let job = new_job(&before).await;
        drop(before);
        let after = h.owned("coord-a", LONG).await;
        let other = h.owned("coord-b", LONG).await;
        assert!(other.claims.claim_orphans(10).await.unwrap().is_empty());
        let back = after.claims.claim_orphans(10).await.unwrap();
        assert_eq!(back.iter().map(|j| j.id).collect::<Vec<_>>(), vec![job]);
        assert!(
            after.claims.claim_orphans(10).await.unwrap().is_empty(),
            "a job it runs is not an orphan"
        );
        after.jobs.finish_job(job, done_at(2)).await.unwrap();
    })
    .await;
}

/// A re-opened job is the re-opener's, whoever ran it before.
#[tokio::test]
async fn reopened_jobs_belong_to_the_coordinator_that_reopened_them() {
    with_database(|h: PgHarness| async move {
        let a = h.owned("coord-a", LONG).await;
        let b = h.owned("coord-b", LONG).await;
        let job = new_job(&a).await;
        a.jobs
            .finish_job(job, crate::suite::ended(crate::JobState::Cancelled, 3))
            .await
            .unwrap();
        let reopened = b.jobs.reopen_cancelled(job).await.unwrap().unwrap();
        assert_eq!(reopened.id, job);
        b.jobs.append_tokens(job, 0, vec![token(1)]).await.unwrap();
        assert!(is_fenced(
            a.jobs.append_tokens(job, 0, vec![token(2)]).await,
            job
        ));
        match a.claims.claim_job(job, false).await.unwrap() {
            Claim::Held { owner, .. } => assert_eq!(owner, "coord-b"),
            other => panic!("{other:?}"),
        }
    })
    .await;
}
