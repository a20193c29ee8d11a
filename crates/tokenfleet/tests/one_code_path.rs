//! "One code path": a live coordinator (real agents, real model) records every scheduler round
//! in its decision log; the simulator's driver replays the log and must reach the same
//! decisions, so what the simulator runs is what the fleet runs.

mod common;

use std::time::Duration;

use common::{greedy_chat, Fleet};
use tokenfleet_agent::VehicleStatus;
use tokenfleet_scheduler::NodeChange;
use tokenfleet_sim::driver::Driver;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_coordinator_run_replays_through_the_simulator_driver() {
    let mut log = None;
    let mut fleet = Fleet::start_with(2, 4, |config, dir| {
        let path = dir.join("decisions.jsonl");
        config.decision_log = Some(path.clone());
        log = Some(path);
    })
    .await;
    let log = log.expect("configured");

    // More requests than the two agents have slots (4 each), so some wait for a later round.
    let requests: Vec<_> = (0..12)
        .map(|i| {
            let body = greedy_chat(&format!("Count to {}.", i + 3), 24, false);
            tokio::spawn(fleet.post("/v1/chat/completions", body).send())
        })
        .collect();
    // A driver returns while the first wave runs: its jobs are requeued and continued on the
    // other vehicle, and the node leaves the scheduler's view (a removal in the log).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let busy = loop {
        if let Some(i) = fleet
            .agents
            .iter()
            .position(|a| a.engine.stats().slots_busy > 0)
        {
            break i;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agent started work"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    fleet.agents[busy]
        .agent
        .as_ref()
        .unwrap()
        .status()
        .send_replace(VehicleStatus::departing("departure: driver returned"));
    for r in requests {
        let resp = tokio::time::timeout(Duration::from_secs(180), r)
            .await
            .expect("request finished in time")
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    fleet.agents[busy].agent.take();

    let trace = tokenfleet_coordinator::fleet::decision_log::read(&log).expect("decision log");
    assert_eq!(trace.policy.to_string(), "tokenfleet");
    assert!(trace.steps.len() >= 2, "{} rounds", trace.steps.len());
    let assigned: usize = trace
        .steps
        .iter()
        .map(|s| s.decisions.assignments.len())
        .sum();
    assert!(assigned >= 12, "{assigned} assignments for 12 requests");
    assert!(
        trace
            .steps
            .iter()
            .any(|s| s.queue.len() > s.decisions.assignments.len()),
        "no round left a job waiting: the log does not exercise queueing"
    );
    assert!(trace
        .steps
        .iter()
        .flat_map(|s| &s.nodes)
        .any(|c| matches!(c, NodeChange::Upsert(_))));
    // The departed vehicle re-appears as ineligible or is removed; either way the replay must
    // see the same changes in the same order.
    Driver::replay(&trace).expect("the simulator's driver decides exactly as the live run");
}
