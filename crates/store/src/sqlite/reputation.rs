//! [`ReputationStore`] on SQLite: the `node_reputation` and `job_producers` tables. Record,
//! producer and verification writes are queued behind earlier writes (`queue_exec`); reads and
//! operators' decisions run in their place in the queue. Uses the crate's records and rusqlite.

use async_trait::async_trait;
use rusqlite::params;

use super::SqliteStore;
use crate::{Decision, NodeReputation, OperatorState, ReputationStore, StoreError, Verification};

/// A nullable (ms, reason) column pair.
fn since_and_reason(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<(u64, String)>> {
    Ok(match r.get::<_, Option<u64>>(at)? {
        Some(ms) => Some((ms, r.get::<_, Option<String>>(at + 1)?.unwrap_or_default())),
        None => None,
    })
}

#[async_trait]
impl ReputationStore for SqliteStore {
    async fn load_reputations(&self) -> Result<Vec<(String, NodeReputation)>, StoreError> {
        self.with_conn(|conn, _| {
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
                        NodeReputation {
                            passed: r.get(1)?,
                            inconclusive: r.get(2)?,
                            sampled_tokens: r.get(3)?,
                            sampled_excess: r.get(4)?,
                            sampled_variance: r.get(5)?,
                            quarantined: since_and_reason(r, 6)?,
                            held: since_and_reason(r, 8)?,
                        },
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn queue_reputation(
        &self,
        node: &str,
        record: NodeReputation,
        with_status: bool,
        now_ms: u64,
    ) {
        let (node, r) = (node.to_string(), record);
        self.queue_exec(move |conn| {
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
                r.sampled_tokens,
                r.sampled_excess,
                r.sampled_variance,
                now_ms,
            ])?;
            if with_status {
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

    async fn queue_producers(&self, job: u64, nodes: Vec<String>, finished_ms: u64) {
        self.queue_exec(move |conn| {
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

    async fn queue_verification(&self, job: u64, node: &str, verification: Verification) {
        let node = node.to_string();
        self.queue_exec(move |conn| {
            conn.prepare_cached(
                "UPDATE job_producers SET verification = ?3 WHERE job_id = ?1 AND node = ?2",
            )?
            .execute(params![job as i64, node, verification.as_str()])?;
            Ok(())
        })
        .await;
    }

    async fn suspect_jobs(&self, node: &str, since_ms: u64) -> Result<Vec<u64>, StoreError> {
        let node = node.to_string();
        self.with_conn(move |conn, _| {
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

    async fn operator_states(&self) -> Result<Vec<OperatorState>, StoreError> {
        self.with_conn(|conn, _| {
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

    async fn decide(
        &self,
        node: &str,
        decision: Decision,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let node = node.to_string();
        self.with_conn(move |conn, _| {
            let now = now_ms as i64;
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
}
