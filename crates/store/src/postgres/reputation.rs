//! [`ReputationStore`] on PostgreSQL: the `node_reputation` and `job_producers` tables.
//! Record, producer and verification writes are queued steps (not awaited, applied in order
//! with everything else); reads and operators' decisions are steps answered after their
//! group's commit. Uses the crate's records and tokio-postgres.

use async_trait::async_trait;
use tokio_postgres::Row;

use super::PostgresStore;
use crate::{Decision, NodeReputation, OperatorState, ReputationStore, StoreError, Verification};

/// A nullable (ms, reason) column pair.
fn since_and_reason(r: &Row, at: usize) -> Option<(u64, String)> {
    r.get::<_, Option<i64>>(at).map(|ms| {
        (
            ms as u64,
            r.get::<_, Option<String>>(at + 1).unwrap_or_default(),
        )
    })
}

#[async_trait]
impl ReputationStore for PostgresStore {
    async fn load_reputations(&self) -> Result<Vec<(String, NodeReputation)>, StoreError> {
        self.call(|conn, _| {
            Box::pin(async move {
                let rows = conn
                    .query(
                        "SELECT node, passed, inconclusive, sampled_tokens, sampled_excess,
                                sampled_variance, quarantined_ms, quarantine_reason, held_ms,
                                held_reason
                         FROM node_reputation ORDER BY node",
                        &[],
                    )
                    .await?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        (
                            r.get(0),
                            NodeReputation {
                                passed: r.get::<_, i64>(1) as u64,
                                inconclusive: r.get::<_, i64>(2) as u64,
                                sampled_tokens: r.get::<_, i64>(3) as u64,
                                sampled_excess: r.get(4),
                                sampled_variance: r.get(5),
                                quarantined: since_and_reason(r, 6),
                                held: since_and_reason(r, 8),
                            },
                        )
                    })
                    .collect())
            })
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
        self.queue("reputation", move |conn, _| {
            Box::pin(async move {
                let stmt = conn
                    .prepare_cached(
                        "INSERT INTO node_reputation (node, passed, inconclusive, sampled_tokens,
                            sampled_excess, sampled_variance, sampled_looks, updated_ms)
                         VALUES ($1, $2, $3, $4, $5, $6, 0, $7)
                         ON CONFLICT (node) DO UPDATE SET passed = $2, inconclusive = $3,
                            sampled_tokens = $4, sampled_excess = $5, sampled_variance = $6,
                            updated_ms = $7",
                    )
                    .await?;
                conn.execute(
                    &stmt,
                    &[
                        &node,
                        &(r.passed as i64),
                        &(r.inconclusive as i64),
                        &(r.sampled_tokens as i64),
                        &r.sampled_excess,
                        &r.sampled_variance,
                        &(now_ms as i64),
                    ],
                )
                .await?;
                if with_status {
                    let stmt = conn
                        .prepare_cached(
                            "UPDATE node_reputation SET quarantined_ms = $2,
                                quarantine_reason = $3, held_ms = $4, held_reason = $5
                             WHERE node = $1",
                        )
                        .await?;
                    let ms = |s: &Option<(u64, String)>| s.as_ref().map(|s| s.0 as i64);
                    let why = |s: &Option<(u64, String)>| s.as_ref().map(|s| s.1.clone());
                    conn.execute(
                        &stmt,
                        &[
                            &node,
                            &ms(&r.quarantined),
                            &why(&r.quarantined),
                            &ms(&r.held),
                            &why(&r.held),
                        ],
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .await;
    }

    async fn queue_producers(&self, job: u64, nodes: Vec<String>, finished_ms: u64) {
        self.queue("producers", move |conn, _| {
            Box::pin(async move {
                let stmt = conn
                    .prepare_cached(
                        "INSERT INTO job_producers (job_id, node, finished_ms, verification)
                         SELECT $1, t.node, $2, 'unverified' FROM unnest($3::text[]) AS t (node)
                         ON CONFLICT (job_id, node) DO NOTHING",
                    )
                    .await?;
                conn.execute(&stmt, &[&(job as i64), &(finished_ms as i64), &nodes])
                    .await?;
                Ok(())
            })
        })
        .await;
    }

    async fn queue_verification(&self, job: u64, node: &str, verification: Verification) {
        let node = node.to_string();
        self.queue("verification", move |conn, _| {
            Box::pin(async move {
                let stmt = conn
                    .prepare_cached(
                        "UPDATE job_producers SET verification = $3
                         WHERE job_id = $1 AND node = $2",
                    )
                    .await?;
                conn.execute(&stmt, &[&(job as i64), &node, &verification.as_str()])
                    .await?;
                Ok(())
            })
        })
        .await;
    }

    async fn suspect_jobs(&self, node: &str, since_ms: u64) -> Result<Vec<u64>, StoreError> {
        let node = node.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                Ok(conn
                    .query(
                        "SELECT job_id FROM job_producers WHERE node = $1 AND finished_ms >= $2
                         AND verification != 'passed' ORDER BY finished_ms, job_id",
                        &[&node, &(since_ms as i64)],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get::<_, i64>(0) as u64)
                    .collect())
            })
        })
        .await
    }

    async fn operator_states(&self) -> Result<Vec<OperatorState>, StoreError> {
        self.call(|conn, _| {
            Box::pin(async move {
                Ok(conn
                    .query(
                        "SELECT node, quarantined_ms, quarantine_reason, held_ms, held_reason
                         FROM node_reputation ORDER BY node",
                        &[],
                    )
                    .await?
                    .iter()
                    .map(|r| OperatorState {
                        node: r.get(0),
                        quarantined: since_and_reason(r, 1),
                        held: since_and_reason(r, 3),
                    })
                    .collect())
            })
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
        self.call(move |conn, _| {
            Box::pin(async move {
                let sql = match decision {
                    // Released: judged afresh (its window and record of passes start over).
                    Decision::Release => {
                        "UPDATE node_reputation SET quarantined_ms = NULL,
                            quarantine_reason = NULL, held_ms = NULL, held_reason = NULL,
                            passed = 0, updated_ms = $2
                         WHERE node = $1"
                    }
                    Decision::Confirm => {
                        "UPDATE node_reputation SET quarantined_ms = $2,
                            quarantine_reason = COALESCE(held_reason, 'quarantined by an operator'),
                            held_ms = NULL, held_reason = NULL, updated_ms = $2
                         WHERE node = $1"
                    }
                };
                Ok(conn.execute(sql, &[&node, &(now_ms as i64)]).await? > 0)
            })
        })
        .await
    }
}
