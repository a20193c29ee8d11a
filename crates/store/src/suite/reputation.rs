//! The reputation store's tests: node records and operators' decisions, producers of jobs and
//! their verification.

use super::{new_job, Harness};
use crate::{Decision, NodeReputation, OperatorState, Sealer, Verification};

fn record(passed: u64) -> NodeReputation {
    NodeReputation {
        passed,
        inconclusive: 1,
        sampled_tokens: 10 * passed,
        sampled_excess: 0.5,
        sampled_variance: 0.25,
        quarantined: None,
        held: None,
    }
}

/// A node's counts are written on every record; its quarantine and hold only with
/// `with_status`, so a pass counted later never undoes a quarantine.
pub(crate) async fn reputation_counts_never_overwrite_an_operators_decision(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let reputation = &store.reputation;
    assert!(reputation.load_reputations().await.unwrap().is_empty());
    let quarantined = NodeReputation {
        quarantined: Some((5, "wrong output".into())),
        ..record(3)
    };
    reputation
        .queue_reputation("vehicle-1", quarantined.clone(), true, 5)
        .await;
    reputation
        .queue_reputation("vehicle-2", record(1), false, 5)
        .await;
    let mut loaded = reputation.load_reputations().await.unwrap();
    loaded.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        loaded,
        vec![
            ("vehicle-1".to_string(), quarantined.clone()),
            ("vehicle-2".to_string(), record(1)),
        ]
    );
    // Counts only: the quarantine stays.
    reputation
        .queue_reputation("vehicle-1", record(4), false, 6)
        .await;
    let loaded = reputation.load_reputations().await.unwrap();
    let (_, one) = loaded.iter().find(|(n, _)| n == "vehicle-1").unwrap();
    assert_eq!(one.passed, 4);
    assert_eq!(one.sampled_tokens, 40);
    assert_eq!(one.quarantined, Some((5, "wrong output".into())));
    // With its status the record replaces it.
    let held = NodeReputation {
        held: Some((7, "mismatch".into())),
        ..record(4)
    };
    reputation
        .queue_reputation("vehicle-1", held.clone(), true, 7)
        .await;
    let loaded = reputation.load_reputations().await.unwrap();
    let (_, one) = loaded.iter().find(|(n, _)| n == "vehicle-1").unwrap();
    assert_eq!(one, &held);
}

pub(crate) async fn operators_release_and_confirm(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let reputation = &store.reputation;
    let quarantined = NodeReputation {
        quarantined: Some((5, "wrong output".into())),
        ..record(3)
    };
    let held = NodeReputation {
        held: Some((6, "mismatch".into())),
        ..record(2)
    };
    reputation
        .queue_reputation("vehicle-1", quarantined, true, 5)
        .await;
    reputation
        .queue_reputation("vehicle-2", held, true, 6)
        .await;
    reputation
        .queue_reputation("vehicle-3", record(1), true, 6)
        .await;
    assert_eq!(
        reputation.operator_states().await.unwrap(),
        vec![
            OperatorState {
                node: "vehicle-1".into(),
                quarantined: Some((5, "wrong output".into())),
                held: None,
            },
            OperatorState {
                node: "vehicle-2".into(),
                quarantined: None,
                held: Some((6, "mismatch".into())),
            },
            OperatorState {
                node: "vehicle-3".into(),
                quarantined: None,
                held: None,
            },
        ]
    );
    assert!(reputation
        .decide("vehicle-1", Decision::Release, 9)
        .await
        .unwrap());
    assert!(reputation
        .decide("vehicle-2", Decision::Confirm, 10)
        .await
        .unwrap());
    assert!(reputation
        .decide("vehicle-3", Decision::Confirm, 11)
        .await
        .unwrap());
    assert!(!reputation
        .decide("nobody", Decision::Release, 9)
        .await
        .unwrap());
    let loaded = reputation.load_reputations().await.unwrap();
    let get = |node: &str| loaded.iter().find(|(n, _)| n == node).unwrap().1.clone();
    // Released: judged afresh, its passes start over.
    let released = get("vehicle-1");
    assert_eq!((released.quarantined, released.held), (None, None));
    assert_eq!(released.passed, 0);
    // Confirmed: quarantined with the held reason, or the operator's.
    let confirmed = get("vehicle-2");
    assert_eq!(confirmed.quarantined, Some((10, "mismatch".into())));
    assert_eq!(confirmed.held, None);
    assert_eq!(confirmed.passed, 2);
    assert_eq!(
        get("vehicle-3").quarantined,
        Some((11, "quarantined by an operator".into()))
    );
}

pub(crate) async fn suspect_jobs_are_those_not_verified_good(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let reputation = &store.reputation;
    let (j1, j2, j3) = (
        new_job(&store).await,
        new_job(&store).await,
        new_job(&store).await,
    );
    reputation
        .queue_producers(j1, vec!["vehicle-1".into(), "vehicle-2".into()], 100)
        .await;
    reputation
        .queue_producers(j2, vec!["vehicle-1".into()], 200)
        .await;
    reputation
        .queue_producers(j3, vec!["vehicle-1".into()], 50)
        .await;
    // Recorded twice: kept once, still unverified.
    reputation
        .queue_producers(j3, vec!["vehicle-1".into()], 50)
        .await;
    reputation
        .queue_verification(j2, "vehicle-1", Verification::Passed)
        .await;
    reputation
        .queue_verification(j1, "vehicle-2", Verification::Inconclusive)
        .await;
    assert_eq!(
        reputation.suspect_jobs("vehicle-1", 0).await.unwrap(),
        vec![j3, j1],
        "oldest first"
    );
    assert_eq!(
        reputation.suspect_jobs("vehicle-1", 60).await.unwrap(),
        vec![j1]
    );
    assert_eq!(
        reputation.suspect_jobs("vehicle-2", 0).await.unwrap(),
        vec![j1]
    );
    reputation
        .queue_verification(j1, "vehicle-1", Verification::Failed)
        .await;
    reputation
        .queue_verification(j3, "vehicle-1", Verification::Passed)
        .await;
    assert_eq!(
        reputation.suspect_jobs("vehicle-1", 0).await.unwrap(),
        vec![j1]
    );
    assert!(reputation
        .suspect_jobs("vehicle-9", 0)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(h.rows("job_producers").await, 4);
}
