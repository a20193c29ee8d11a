//! Job ownership across coordinators: the [`ClaimStore`] trait, [`Ownership`] (who this store
//! writes for) and [`Claim`] (what claiming a job found).
//!
//! Several coordinators may share one database. Each unfinished job then has an *owner* (the
//! coordinator that runs it), a *lease* (until when the owner is presumed alive; renewed while
//! it works) and an *epoch* (raised by every claim). A store opened with an [`Ownership`]
//! writes a job's tokens, outcome and discards only while it still owns the job at the epoch
//! of its own last claim, checked on the row in the same statement: a coordinator that was
//! paused, partitioned or presumed dead and comes back finds its writes refused
//! ([`crate::StoreError::Fenced`]) and can never overwrite the new owner's tokens. Jobs it
//! inserts or re-opens are its own from the start.
//!
//! Leases are measured on the database's clock, so coordinators' clocks need not agree.
//!
//! A store opened without an [`Ownership`] (the SQLite default: one coordinator per file)
//! owns every job: its claims always succeed and nothing is fenced.
//! Uses only the crate's job records and [`crate::StoreError`].

use std::time::Duration;

use async_trait::async_trait;

use crate::{JobRecord, StoreError};

/// The coordinator a store writes for, when several share its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// Unique among the coordinators of one database, and the same across a coordinator's
    /// restarts, so that a restarted coordinator takes its own jobs back at once instead of
    /// waiting out their leases.
    pub coordinator: String,
    /// How long a claim or a renewal keeps a job this coordinator's without a further renewal.
    pub lease: Duration,
}

/// What [`ClaimStore::claim_job`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The job is this coordinator's now (at a new epoch), with its stored tokens.
    Claimed(JobRecord),
    /// Another coordinator owns the job and its lease has not run out.
    Held {
        owner: String,
        /// How long the owner's lease still runs, by the database's clock.
        lease_left: Duration,
    },
    /// The job is no longer queued: done, failed or cancelled.
    Ended,
    /// No such job.
    Missing,
}

impl Claim {
    /// The claim of a database's only coordinator on a job it loaded: the job if it is
    /// queued (every job is its own).
    pub fn of_sole(job: Option<JobRecord>) -> Claim {
        match job {
            None => Claim::Missing,
            Some(j) if j.state == crate::JobState::Queued => Claim::Claimed(j),
            Some(_) => Claim::Ended,
        }
    }
}

/// Jobs this store's coordinator lost since the last renewal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Renewal {
    /// Jobs it had claimed that another coordinator claimed since (or that ended without it:
    /// a batch cancelled by a client elsewhere). Its writes for them are refused from now on;
    /// the coordinator should stop running them.
    pub lost: Vec<u64>,
    /// Jobs whose lease was renewed.
    pub renewed: usize,
}

/// Claims on jobs, for several coordinators on one database. See the module doc.
#[async_trait]
pub trait ClaimStore: Send + Sync {
    /// The coordinator this store writes for; None when it is the database's only one.
    fn ownership(&self) -> Option<&Ownership>;

    /// Claims a queued job: taken when it has no owner, when this coordinator owns it, when
    /// its owner's lease has run out, or, with `steal`, whatever its lease (a vehicle that
    /// runs the job has come to this coordinator: its old owner lost the vehicle's session).
    /// Its tokens are loaded after the claim, so none written by an earlier owner is missed.
    async fn claim_job(&self, job: u64, steal: bool) -> Result<Claim, StoreError>;

    /// Claims up to `limit` queued jobs nobody holds (no owner, or an owner whose lease ran
    /// out) and this coordinator's own jobs it does not run (left from before a restart),
    /// oldest first, with their tokens; rows another coordinator is claiming at the same
    /// moment are skipped, never waited on.
    async fn claim_orphans(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError>;

    /// Renews the lease of every job this coordinator has claimed and still owns, and says
    /// which it lost. Call it well within the lease.
    async fn renew_leases(&self) -> Result<Renewal, StoreError>;
}
