//! This coordinator's share of a cluster's jobs (`[cluster]`): one task that renews the lease
//! of every job it owns, hands the manager the jobs it lost (another coordinator took them:
//! it stops running them and follows them for their clients) and sweeps the database for jobs
//! nobody holds (a dead coordinator's, once their lease has run out), which the manager then
//! runs from their stored tokens.
//!
//! What must happen once (who runs a job) is decided by the store's claims, on the job's row
//! (see `tokenfleet_store::claims`); this task only keeps this coordinator's claims alive and
//! picks up what is left. Uses the manager's handle, the store and the cluster's config.

use tokio::sync::watch;

use crate::config::ClusterConfig;
use crate::domain::store::Store;
use crate::fleet::manager::Manager;

/// Jobs one sweep claims at most: a dead coordinator's backlog is shared out among the
/// survivors a slice at a time rather than all landing on whichever sweeps first.
const SWEEP_LIMIT: usize = 256;

/// Runs until `shutdown`. Renewals every fifth of the lease leave four renewals' worth of
/// slack before another coordinator may take a job.
pub async fn run(
    store: Store,
    manager: Manager,
    cluster: ClusterConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut renew = tokio::time::interval(cluster.lease / 5);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(cluster.sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = renew.tick() => renew_once(&store, &manager, &cluster, &mut failing_since).await,
            _ = sweep.tick() => sweep_once(&store, &manager).await,
            _ = shutdown.changed() => return,
        }
    }
}

async fn renew_once(
    store: &Store,
    manager: &Manager,
    cluster: &ClusterConfig,
    failing_since: &mut Option<tokio::time::Instant>,
) {
    match store.claims().renew_leases().await {
        Ok(renewal) => {
            if let Some(since) = failing_since.take() {
                tracing::info!(
                    after_s = since.elapsed().as_secs_f64(),
                    "job leases renewed again"
                );
            }
            if !renewal.lost.is_empty() {
                tracing::info!(
                    jobs = renewal.lost.len(),
                    "jobs taken over by another coordinator; following them for their clients"
                );
                manager.disown(renewal.lost).await;
            }
        }
        Err(e) => {
            let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
            // Past the lease, other coordinators may already run these jobs: every write of
            // this one is fenced from then on, so nothing is lost, but the operator must know.
            if since.elapsed() >= cluster.lease {
                tracing::error!(cause = %e, failing_s = since.elapsed().as_secs_f64(), "cannot renew job leases for longer than the lease: other coordinators may be taking this one's jobs");
            } else {
                tracing::warn!(cause = %e, "cannot renew job leases; retrying");
            }
        }
    }
}

async fn sweep_once(store: &Store, manager: &Manager) {
    match store.claim_orphans(SWEEP_LIMIT).await {
        Ok(jobs) if jobs.is_empty() => {}
        Ok(jobs) => {
            tracing::info!(
                jobs = jobs.len(),
                "took over jobs nobody held (their coordinator stopped renewing them)"
            );
            manager.adopt(jobs).await;
        }
        Err(e) => tracing::warn!(cause = %e, "sweeping for orphaned jobs failed; retrying"),
    }
}
