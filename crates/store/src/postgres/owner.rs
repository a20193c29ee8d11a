//! [`ClaimStore`] on PostgreSQL: the `owner`, `lease_until_ms` and `epoch` columns of `jobs`,
//! claims as conditional updates, and the fence every owned write checks. See
//! [`crate::claims`] for the contract. Uses tokio-postgres and the crate's job records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::jobs::load_many;
use super::{Conn, PostgresStore};
use crate::claims::{Claim, ClaimStore, Ownership, Renewal};
use crate::{JobRecord, StoreError};

/// The database's clock in epoch milliseconds: leases are compared on one clock, whatever the
/// coordinators' clocks say.
pub(super) const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// This store's coordinator and the epoch of each job it claimed (what its writes are fenced
/// on). Steps read and update the epochs when they run, in queue order, so a write queued
/// after a claim carries the claim's epoch.
pub(super) struct Owner {
    pub ownership: Ownership,
    epochs: Mutex<HashMap<u64, i64>>,
}

impl Owner {
    pub fn new(ownership: Ownership) -> Arc<Self> {
        Arc::new(Self {
            ownership,
            epochs: Mutex::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.ownership.coordinator
    }

    pub fn lease_ms(&self) -> i64 {
        self.ownership.lease.as_millis() as i64
    }

    fn epochs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, i64>> {
        self.epochs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The epoch this coordinator holds `job` at; [`StoreError::Fenced`] when it never
    /// claimed it or lost it.
    pub fn epoch(&self, job: u64) -> Result<i64, StoreError> {
        self.epochs()
            .get(&job)
            .copied()
            .ok_or(StoreError::Fenced { job })
    }

    /// What a new or re-opened row's `owner` and lease length are: this store's
    /// coordinator's, or (None, 0) for a store without an owner (the lease stays NULL).
    pub fn columns(owner: Option<&Owner>) -> (Option<&str>, i64) {
        owner.map_or((None, 0), |o| (Some(o.id()), o.lease_ms()))
    }

    pub fn claimed(&self, job: u64, epoch: i64) {
        self.epochs().insert(job, epoch);
    }

    pub fn forget(&self, job: u64) {
        self.epochs().remove(&job);
    }

    fn held(&self) -> (Vec<i64>, Vec<i64>) {
        self.epochs().iter().map(|(&j, &e)| (j as i64, e)).unzip()
    }
}

/// Claims `job` if the condition allows it; the new epoch, or None.
async fn claim_row(
    conn: &Conn,
    owner: &Owner,
    job: u64,
    steal: bool,
) -> Result<Option<i64>, StoreError> {
    let stmt = conn
        .prepare_cached(&format!(
            "UPDATE jobs SET owner = $2, epoch = epoch + 1, lease_until_ms = {NOW_MS} + $3
             WHERE id = $1 AND state = 'queued'
               AND ($4 OR owner IS NULL OR owner = $2 OR lease_until_ms < {NOW_MS})
             RETURNING epoch"
        ))
        .await?;
    let row = conn
        .query_opt(
            &stmt,
            &[&(job as i64), &owner.id(), &owner.lease_ms(), &steal],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Why `job` could not be claimed.
async fn not_claimed(conn: &Conn, job: u64) -> Result<Claim, StoreError> {
    let stmt = conn
        .prepare_cached(&format!(
            "SELECT state, owner, lease_until_ms - {NOW_MS} FROM jobs WHERE id = $1"
        ))
        .await?;
    let Some(row) = conn.query_opt(&stmt, &[&(job as i64)]).await? else {
        return Ok(Claim::Missing);
    };
    let state: &str = row.get(0);
    if state != "queued" {
        return Ok(Claim::Ended);
    }
    let left: Option<i64> = row.get(2);
    Ok(Claim::Held {
        owner: row.get::<_, Option<String>>(1).unwrap_or_default(),
        lease_left: Duration::from_millis(left.unwrap_or(0).max(0) as u64),
    })
}

impl PostgresStore {
    fn owner(&self) -> Result<Arc<Owner>, StoreError> {
        self.owner.clone().ok_or_else(|| StoreError::Backend {
            backend: "postgres",
            source: "claims need a store opened with an ownership (PostgresStore::connect_owned)"
                .into(),
        })
    }
}

#[async_trait]
impl ClaimStore for PostgresStore {
    fn ownership(&self) -> Option<&Ownership> {
        self.owner.as_ref().map(|o| &o.ownership)
    }

    async fn claim_job(&self, job: u64, steal: bool) -> Result<Claim, StoreError> {
        let Some(owner) = self.owner.clone() else {
            // The database's only coordinator: the job is its own if it is queued.
            return self
                .call(move |conn, sealer| {
                    Box::pin(async move {
                        Ok(Claim::of_sole(
                            super::jobs::load_one(conn, sealer, job).await?,
                        ))
                    })
                })
                .await;
        };
        self.call(move |conn, sealer| {
            Box::pin(async move {
                match claim_row(conn, &owner, job, steal).await? {
                    Some(epoch) => {
                        owner.claimed(job, epoch);
                        let mut jobs = load_many(conn, sealer, &[job]).await?;
                        Ok(jobs.pop().map_or(Claim::Missing, Claim::Claimed))
                    }
                    None => not_claimed(conn, job).await,
                }
            })
        })
        .await
    }

    async fn claim_orphans(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        let owner = self.owner()?;
        self.call(move |conn, sealer| {
            Box::pin(async move {
                let (mine, _) = owner.held();
                let stmt = conn
                    .prepare_cached(&format!(
                        "UPDATE jobs SET owner = $1, epoch = epoch + 1,
                                lease_until_ms = {NOW_MS} + $2
                         WHERE id IN (
                             SELECT id FROM jobs
                             WHERE state = 'queued'
                               AND (owner IS NULL OR lease_until_ms < {NOW_MS}
                                    OR (owner = $1 AND NOT (id = ANY($3))))
                             ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)
                         RETURNING id, epoch"
                    ))
                    .await?;
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows = conn
                    .query(&stmt, &[&owner.id(), &owner.lease_ms(), &mine, &limit])
                    .await?;
                let mut ids = Vec::with_capacity(rows.len());
                for r in rows {
                    let id = r.get::<_, i64>(0) as u64;
                    owner.claimed(id, r.get(1));
                    ids.push(id);
                }
                ids.sort_unstable();
                load_many(conn, sealer, &ids).await
            })
        })
        .await
    }

    async fn renew_leases(&self) -> Result<Renewal, StoreError> {
        let owner = self.owner()?;
        self.call(move |conn, _| {
            Box::pin(async move {
                let (jobs, epochs) = owner.held();
                let stmt = conn
                    .prepare_cached(&format!(
                        "UPDATE jobs SET lease_until_ms = {NOW_MS} + $2
                         FROM unnest($3::bigint[], $4::bigint[]) AS held (id, epoch)
                         WHERE jobs.id = held.id AND jobs.epoch = held.epoch
                           AND jobs.owner = $1 AND jobs.state = 'queued'
                         RETURNING jobs.id"
                    ))
                    .await?;
                let renewed: std::collections::HashSet<i64> = conn
                    .query(&stmt, &[&owner.id(), &owner.lease_ms(), &jobs, &epochs])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let lost: Vec<u64> = jobs
                    .iter()
                    .filter(|j| !renewed.contains(j))
                    .map(|&j| j as u64)
                    .collect();
                for &j in &lost {
                    owner.forget(j);
                }
                Ok(Renewal {
                    lost,
                    renewed: renewed.len(),
                })
            })
        })
        .await
    }
}
