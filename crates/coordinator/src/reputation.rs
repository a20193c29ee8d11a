//! Node reputation for result verification: what the fleet has verified of each vehicle's
//! work, which vehicles are quarantined, and how often each one's work is spot-checked.
//!
//! The spot-check rate adapts like BOINC's adaptive replication: a node with no verified work
//! has every job checked (`new_node_rate`); each job verified good lowers its rate,
//! `rate = max(min_rate, new_node_rate · d / (d + good))` with `d = decay_jobs`, so a node that
//! has earned trust costs little verification while a newcomer, or a liar trying its luck
//! early, meets the verifier at once. A failed check quarantines the node for good (an
//! operator clears it by deleting its row). Records live in the job store
//! ([`MIGRATION`]), keyed by the node's name (its enrolled identity), so a quarantine
//! survives coordinator restarts and reconnects. `job_producers` remembers which nodes
//! produced each finished job and whether that work was verified, so a quarantined node's
//! recent unverified jobs can be found and re-run.

use std::collections::HashMap;

use rusqlite::params;

use crate::store::{Store, StoreError, StoredJob};
use crate::verify::check::SampledSums;

/// Schema for reputation (appended to the store's migrations).
pub const MIGRATION: &str = "CREATE TABLE node_reputation (
        node TEXT PRIMARY KEY,
        passed INTEGER NOT NULL,
        inconclusive INTEGER NOT NULL,
        sampled_tokens INTEGER NOT NULL,
        sampled_excess REAL NOT NULL,
        sampled_variance REAL NOT NULL,
        sampled_looks INTEGER NOT NULL,
        quarantined_ms INTEGER,
        quarantine_reason TEXT,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE job_producers (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        node TEXT NOT NULL,
        finished_ms INTEGER NOT NULL,
        verification TEXT NOT NULL,
        PRIMARY KEY (job_id, node)
    ) WITHOUT ROWID;
    CREATE INDEX job_producers_node ON job_producers(node, verification, finished_ms);";

/// Schema change: a node whose failure the circuit breaker held for an operator.
pub const MIGRATION_HELD: &str = "ALTER TABLE node_reputation ADD COLUMN held_ms INTEGER;
    ALTER TABLE node_reputation ADD COLUMN held_reason TEXT;";

/// A node's quarantine state as the store has it (an operator may have changed it).
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorState {
    pub node: String,
    pub quarantined: Option<(u64, String)>,
    pub held: Option<(u64, String)>,
}

/// What the fleet knows of one node's honesty.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeRecord {
    /// Spot checks passed.
    pub passed: u64,
    /// Spot checks that could not decide (short sampled jobs, unknown model).
    pub inconclusive: u64,
    /// Lifetime sums of the sampled-output test (a statistic for operators; the verdicts use
    /// a sliding window, see `verify::check`).
    pub sampled: SampledSums,
    /// (unix ms, reason) once quarantined.
    pub quarantined: Option<(u64, String)>,
    /// (unix ms, reason) when a failure was held by the circuit breaker for an operator.
    pub held: Option<(u64, String)>,
}

/// Where a producer's work stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    Unverified,
    Passed,
    Failed,
    Inconclusive,
}

impl Verification {
    fn as_str(self) -> &'static str {
        match self {
            Verification::Unverified => "unverified",
            Verification::Passed => "passed",
            Verification::Failed => "failed",
            Verification::Inconclusive => "inconclusive",
        }
    }
}

/// Spot-check rate parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePolicy {
    pub min_rate: f64,
    pub new_node_rate: f64,
    pub decay_jobs: u32,
}

impl RatePolicy {
    /// The probability that a finished job of a node with this record is re-scored.
    pub fn rate(&self, record: Option<&NodeRecord>) -> f64 {
        if record.is_some_and(|r| r.held.is_some()) {
            return 1.0; // failed once; until an operator decides, every job is checked
        }
        let good = record.map_or(0, |r| r.passed) as f64;
        let d = self.decay_jobs.max(1) as f64;
        (self.new_node_rate * d / (d + good)).clamp(self.min_rate, 1.0)
    }
}

/// Every node's record, loaded at start and written through on change.
pub struct Reputation {
    records: HashMap<String, NodeRecord>,
    store: Store,
}

impl Reputation {
    pub async fn load(store: Store) -> Result<Self, StoreError> {
        let records = store
            .with_conn(|conn, _| {
                let mut stmt = conn.prepare(
                    "SELECT node, passed, inconclusive, sampled_tokens, sampled_excess,
                            sampled_variance, quarantined_ms, quarantine_reason, held_ms,
                            held_reason
                     FROM node_reputation",
                )?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            NodeRecord {
                                passed: r.get(1)?,
                                inconclusive: r.get(2)?,
                                sampled: SampledSums {
                                    tokens: r.get(3)?,
                                    excess: r.get(4)?,
                                    variance: r.get(5)?,
                                },
                                quarantined: since_and_reason(r, 6)?,
                                held: since_and_reason(r, 8)?,
                            },
                        ))
                    })?
                    .collect::<Result<HashMap<_, _>, _>>()?;
                Ok(rows)
            })
            .await?;
        Ok(Self { records, store })
    }

    pub fn get(&self, node: &str) -> Option<&NodeRecord> {
        self.records.get(node)
    }

    pub fn is_quarantined(&self, node: &str) -> bool {
        self.records
            .get(node)
            .is_some_and(|r| r.quarantined.is_some())
    }

    pub fn is_held(&self, node: &str) -> bool {
        self.records.get(node).is_some_and(|r| r.held.is_some())
    }

    pub fn held_count(&self) -> usize {
        self.records.values().filter(|r| r.held.is_some()).count()
    }

    /// Every node's quarantine and hold as the store has them now.
    pub async fn operator_states(&self) -> Result<Vec<OperatorState>, StoreError> {
        operator_states(&self.store).await
    }

    /// Takes an operator's decision into the in-memory record (already in the store).
    pub fn set_operator_state(
        &mut self,
        node: &str,
        quarantined: Option<(u64, String)>,
        held: Option<(u64, String)>,
    ) {
        let record = self.records.entry(node.to_string()).or_default();
        record.quarantined = quarantined;
        record.held = held;
    }

    pub fn quarantined_count(&self) -> usize {
        self.records
            .values()
            .filter(|r| r.quarantined.is_some())
            .count()
    }

    /// Changes a node's record and writes it through (queued behind earlier store writes).
    /// Quarantine and hold columns are written only when the change sets them, so a pass
    /// counted here never overwrites an operator's decision made in the store meanwhile.
    pub async fn update(&mut self, node: &str, now_ms: u64, change: impl FnOnce(&mut NodeRecord)) {
        let record = self.records.entry(node.to_string()).or_default();
        let status_before = (record.quarantined.clone(), record.held.clone());
        change(record);
        let status_changed = status_before != (record.quarantined.clone(), record.held.clone());
        let (node, r) = (node.to_string(), record.clone());
        self.store
            .queue_exec(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO node_reputation (node, passed, inconclusive, sampled_tokens,
                        sampled_excess, sampled_variance, sampled_looks, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7)
                     ON CONFLICT (node) DO UPDATE SET passed = ?2, inconclusive = ?3,
                        sampled_tokens = ?4, sampled_excess = ?5, sampled_variance = ?6,
                        updated_ms = ?7",
                )?
                .execute(params![
                    node,
                    r.passed,
                    r.inconclusive,
                    r.sampled.tokens,
                    r.sampled.excess,
                    r.sampled.variance,
                    now_ms,
                ])?;
                if status_changed {
                    conn.prepare_cached(
                        "UPDATE node_reputation SET quarantined_ms = ?2, quarantine_reason = ?3,
                            held_ms = ?4, held_reason = ?5 WHERE node = ?1",
                    )?
                    .execute(params![
                        node,
                        r.quarantined.as_ref().map(|q| q.0),
                        r.quarantined.as_ref().map(|q| q.1.clone()),
                        r.held.as_ref().map(|q| q.0),
                        r.held.as_ref().map(|q| q.1.clone()),
                    ])?;
                }
                Ok(())
            })
            .await;
    }

    /// Records that `nodes` produced finished job `job` (unverified until a check says so).
    pub async fn record_producers(&self, job: u64, nodes: Vec<String>, finished_ms: u64) {
        self.store
            .queue_exec(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "INSERT OR IGNORE INTO job_producers (job_id, node, finished_ms, verification)
                     VALUES (?1, ?2, ?3, 'unverified')",
                )?;
                for node in nodes {
                    stmt.execute(params![job as i64, node, finished_ms as i64])?;
                }
                Ok(())
            })
            .await;
    }

    pub async fn mark(&self, job: u64, node: &str, verification: Verification) {
        let node = node.to_string();
        self.store
            .queue_exec(move |conn| {
                conn.prepare_cached(
                    "UPDATE job_producers SET verification = ?3 WHERE job_id = ?1 AND node = ?2",
                )?
                .execute(params![job as i64, node, verification.as_str()])?;
                Ok(())
            })
            .await;
    }

    /// Jobs `node` helped produce that finished at or after `since_ms` and were not verified
    /// good (unverified, inconclusive or failed), newest last.
    pub async fn suspect_jobs(&self, node: &str, since_ms: u64) -> Result<Vec<u64>, StoreError> {
        let node = node.to_string();
        self.store
            .with_conn(move |conn, _| {
                let ids = conn
                    .prepare(
                        "SELECT job_id FROM job_producers WHERE node = ?1 AND finished_ms >= ?2
                         AND verification != 'passed' ORDER BY finished_ms",
                    )?
                    .query_map(params![node, since_ms as i64], |r| r.get::<_, u64>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ids)
            })
            .await
    }
}

/// A nullable (ms, reason) column pair.
fn since_and_reason(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<(u64, String)>> {
    Ok(match r.get::<_, Option<u64>>(at)? {
        Some(ms) => Some((ms, r.get::<_, Option<String>>(at + 1)?.unwrap_or_default())),
        None => None,
    })
}

/// Every node that is quarantined or held, as the store has it.
pub async fn operator_states(store: &Store) -> Result<Vec<OperatorState>, StoreError> {
    store
        .with_conn(|conn, _| {
            let rows = conn
                .prepare(
                    "SELECT node, quarantined_ms, quarantine_reason, held_ms, held_reason
                     FROM node_reputation ORDER BY node",
                )?
                .query_map([], |r| {
                    Ok(OperatorState {
                        node: r.get(0)?,
                        quarantined: since_and_reason(r, 1)?,
                        held: since_and_reason(r, 3)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
}

/// An operator's decision on a node, written to the store (the running coordinator reads it
/// within a few seconds). Returns false when the node has no record.
pub async fn decide(store: &Store, node: &str, decision: Decision) -> Result<bool, StoreError> {
    let node = node.to_string();
    store
        .with_conn(move |conn, _| {
            let now = crate::manager::unix_ms() as i64;
            let changed = match decision {
                // Released: judged afresh (its window and record of passes start over).
                Decision::Release => conn.execute(
                    "UPDATE node_reputation SET quarantined_ms = NULL, quarantine_reason = NULL,
                        held_ms = NULL, held_reason = NULL, passed = 0, updated_ms = ?2
                     WHERE node = ?1",
                    params![node, now],
                )?,
                Decision::Confirm => conn.execute(
                    "UPDATE node_reputation SET quarantined_ms = ?2,
                        quarantine_reason = COALESCE(held_reason, 'quarantined by an operator'),
                        held_ms = NULL, held_reason = NULL, updated_ms = ?2
                     WHERE node = ?1",
                    params![node, now],
                )?,
            };
            Ok(changed > 0)
        })
        .await
}

/// What an operator decides about a quarantined or held node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Release,
    Confirm,
}

/// Discards a job's stored tokens and outcome so it runs again from scratch: deletes its
/// token rows and, for a finished job, puts it back in the `queued` state. Queued behind
/// earlier writes (so tokens the manager queued before are deleted too) and before later
/// ones (the re-run's tokens land on a clean slate).
pub async fn queue_discard_tokens(store: &Store, job: u64) {
    store
        .queue_exec(move |conn| {
            conn.prepare_cached("DELETE FROM job_outputs WHERE job_id = ?1")?
                .execute(params![job as i64])?;
            Ok(())
        })
        .await;
}

/// Re-opens a finished job for a re-run from scratch and returns it (None if it is not a
/// finished `done` job). Durable on return.
pub async fn reopen_for_rerun(store: &Store, job: u64) -> Result<Option<StoredJob>, StoreError> {
    store
        .with_conn(move |conn, sealer| {
            let tx = conn.transaction()?;
            let changed = tx.execute(
                "UPDATE jobs SET state = 'queued', finished_ms = NULL, finish_reason = NULL,
                 text_tail = NULL, error = NULL WHERE id = ?1 AND state = 'done'",
                params![job as i64],
            )?;
            if changed == 0 {
                return Ok(None);
            }
            tx.execute(
                "DELETE FROM job_outputs WHERE job_id = ?1",
                params![job as i64],
            )?;
            tx.commit()?;
            crate::store::load_one(conn, sealer, job)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RatePolicy {
        RatePolicy {
            min_rate: 0.05,
            new_node_rate: 1.0,
            decay_jobs: 10,
        }
    }

    #[test]
    fn the_spot_check_rate_falls_with_verified_work_down_to_the_floor() {
        let p = policy();
        let with = |passed| NodeRecord {
            passed,
            ..Default::default()
        };
        assert_eq!(p.rate(None), 1.0);
        assert_eq!(p.rate(Some(&with(0))), 1.0);
        assert!((p.rate(Some(&with(10))) - 0.5).abs() < 1e-12);
        assert!(p.rate(Some(&with(30))) < p.rate(Some(&with(10))));
        assert_eq!(p.rate(Some(&with(1_000_000))), 0.05);
    }

    #[tokio::test]
    async fn records_and_quarantines_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        {
            let mut rep = Reputation::load(
                Store::open(
                    &path,
                    crate::sealing::Sealer::from_spec(
                        "t:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
                    )
                    .unwrap(),
                )
                .unwrap(),
            )
            .await
            .unwrap();
            rep.update("good", 1, |r| r.passed += 3).await;
            rep.update("bad", 2, |r| r.quarantined = Some((2, "lied".into())))
                .await;
            rep.store.flush().await.unwrap();
        }
        let rep = Reputation::load(
            Store::open(
                &path,
                crate::sealing::Sealer::from_spec("t:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
                    .unwrap(),
            )
            .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(rep.get("good").unwrap().passed, 3);
        assert!(!rep.is_quarantined("good"));
        assert!(rep.is_quarantined("bad"));
        assert_eq!(rep.quarantined_count(), 1);
    }
}
