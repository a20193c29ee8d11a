//! Node reputation for result verification: what the fleet has verified of each vehicle's
//! work, which vehicles are quarantined, and how often each one's work is spot-checked.
//!
//! The spot-check rate adapts like BOINC's adaptive replication: a node with no verified work
//! has every job checked (`new_node_rate`); each job verified good lowers its rate,
//! `rate = max(min_rate, new_node_rate · d / (d + good))` with `d = decay_jobs`, so a node that
//! has earned trust costs little verification while a newcomer, or a liar trying its luck
//! early, meets the verifier at once. A failed check quarantines the node for good (an
//! operator releases it with `tokenfleet fleet quarantine release`). Records live in the
//! reputation store ([`tokenfleet_store::ReputationStore`]), keyed by the node's name (its
//! enrolled identity), so a quarantine survives coordinator restarts and reconnects. The store
//! remembers which nodes produced each finished job and whether that work was verified, so a
//! quarantined node's recent unverified jobs can be found and re-run.
//!
//! Uses the store crate, [`crate::domain::store`] and [`crate::trust::verify::check`]; the policy is here,
//! the storage there.

use std::collections::HashMap;

use tokenfleet_store::NodeReputation;

pub use tokenfleet_store::{Decision, OperatorState, Verification};

use crate::domain::store::{parse_job, Store, StoreError, StoredJob};
use crate::trust::verify::check::SampledSums;

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

impl From<NodeReputation> for NodeRecord {
    fn from(r: NodeReputation) -> Self {
        NodeRecord {
            passed: r.passed,
            inconclusive: r.inconclusive,
            sampled: SampledSums {
                tokens: r.sampled_tokens,
                excess: r.sampled_excess,
                variance: r.sampled_variance,
            },
            quarantined: r.quarantined,
            held: r.held,
        }
    }
}

impl From<NodeRecord> for NodeReputation {
    fn from(r: NodeRecord) -> Self {
        NodeReputation {
            passed: r.passed,
            inconclusive: r.inconclusive,
            sampled_tokens: r.sampled.tokens,
            sampled_excess: r.sampled.excess,
            sampled_variance: r.sampled.variance,
            quarantined: r.quarantined,
            held: r.held,
        }
    }
}

impl NodeRecord {
    /// The node's standing for the scheduler's reputation term, in [0, 1]: 0 when
    /// quarantined, 0.1 while a failure waits for an operator, otherwise rising with spot
    /// checks passed from 0.5 (no verified work) towards 1 (half way at
    /// [`REPUTATION_HALF_JOBS`] passes). So among otherwise equal vehicles, work goes to
    /// those whose outputs were verified, and a suspect one gets work only when others cannot
    /// take it.
    pub fn score(&self) -> f32 {
        if self.quarantined.is_some() {
            return 0.0;
        }
        if self.held.is_some() {
            return 0.1;
        }
        let passed = self.passed as f32;
        0.5 + 0.5 * passed / (passed + REPUTATION_HALF_JOBS)
    }
}

/// Spot checks passed at which a node's score is half way from 0.5 to 1. Ten is the
/// default `decay_jobs` (the spot-check rate halves over the same record).
pub const REPUTATION_HALF_JOBS: f32 = 10.0;

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
        let records = store.reputation().load_reputations().await?;
        let records = records
            .into_iter()
            .map(|(node, r)| (node, NodeRecord::from(r)))
            .collect();
        Ok(Self { records, store })
    }

    /// The scheduler's reputation of a node ([`NodeRecord::score`]; 0.5 with no record).
    pub fn score(&self, node: &str) -> f32 {
        self.records.get(node).map_or(0.5, NodeRecord::score)
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
    /// Quarantine and hold are written only when the change sets them, so a pass counted
    /// here never overwrites an operator's decision made in the store meanwhile.
    pub async fn update(&mut self, node: &str, now_ms: u64, change: impl FnOnce(&mut NodeRecord)) {
        let record = self.records.entry(node.to_string()).or_default();
        let status_before = (record.quarantined.clone(), record.held.clone());
        change(record);
        let status_changed = status_before != (record.quarantined.clone(), record.held.clone());
        let record = NodeReputation::from(record.clone());
        self.store
            .reputation()
            .queue_reputation(node, record, status_changed, now_ms)
            .await;
    }

    /// Records that `nodes` produced finished job `job` (unverified until a check says so).
    pub async fn record_producers(&self, job: u64, nodes: Vec<String>, finished_ms: u64) {
        self.store
            .reputation()
            .queue_producers(job, nodes, finished_ms)
            .await;
    }

    pub async fn mark(&self, job: u64, node: &str, verification: Verification) {
        self.store
            .reputation()
            .queue_verification(job, node, verification)
            .await;
    }

    /// Jobs `node` helped produce that finished at or after `since_ms` and were not verified
    /// good (unverified, inconclusive or failed), newest last.
    pub async fn suspect_jobs(&self, node: &str, since_ms: u64) -> Result<Vec<u64>, StoreError> {
        self.store.reputation().suspect_jobs(node, since_ms).await
    }
}

/// Every node that is quarantined or held, as the store has it.
pub async fn operator_states(store: &Store) -> Result<Vec<OperatorState>, StoreError> {
    store.reputation().operator_states().await
}

/// An operator's decision on a node, written to the store (the running coordinator reads it
/// within a few seconds). Returns false when the node has no record.
pub async fn decide(store: &Store, node: &str, decision: Decision) -> Result<bool, StoreError> {
    let now = crate::clock::unix_ms();
    store.reputation().decide(node, decision, now).await
}

/// Discards a job's stored tokens so it runs again from scratch. Queued behind earlier writes
/// (so tokens the manager queued before are deleted too) and before later ones (the re-run's
/// tokens land on a clean slate).
pub async fn queue_discard_tokens(store: &Store, job: u64) {
    store.jobs().queue_discard_tokens(job).await;
}

/// Re-opens a finished job for a re-run from scratch and returns it (None if it is not a
/// finished `done` job). Durable on return.
pub async fn reopen_for_rerun(store: &Store, job: u64) -> Result<Option<StoredJob>, StoreError> {
    store
        .jobs()
        .reopen_for_rerun(job)
        .await?
        .map(parse_job)
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheduler_score_rises_with_passed_checks_and_falls_on_suspicion() {
        let fresh = NodeRecord::default();
        assert_eq!(fresh.score(), 0.5);
        let proven = NodeRecord {
            passed: 10,
            ..NodeRecord::default()
        };
        assert!(
            (proven.score() - 0.75).abs() < 1e-6,
            "half way at 10 passes"
        );
        let veteran = NodeRecord {
            passed: 10_000,
            ..NodeRecord::default()
        };
        assert!(veteran.score() > proven.score() && veteran.score() <= 1.0);
        let held = NodeRecord {
            passed: 10_000,
            held: Some((1, "greedy gap".into())),
            ..NodeRecord::default()
        };
        assert!(held.score() < fresh.score());
        let quarantined = NodeRecord {
            quarantined: Some((1, "greedy gap".into())),
            ..veteran.clone()
        };
        assert_eq!(quarantined.score(), 0.0);
    }

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
                    tokenfleet_store::Sealer::from_spec(
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
                tokenfleet_store::Sealer::from_spec(
                    "t:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
                )
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
