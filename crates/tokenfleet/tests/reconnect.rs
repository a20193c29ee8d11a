//! An agent that loses its connection and is back within the lease (a vehicle moving from
//! cellular to Wi-Fi) through the chaos bench's fault proxy: nothing the coordinator put on the
//! old connection may be stranded.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{greedy_chat, metric, start_agent, Fleet};
use tokenfleet::bench::chaos::proxy::{FaultCounters, FaultProfile, FaultProxy};

/// Issue 13 (found by `tokenfleet bench chaos`): a job whose `Assign` was in flight when the
/// connection was reset never reaches the agent, so the agent's Hello on the new connection
/// does not list it; the coordinator still counts it as running there and, the node being
/// alive again (heartbeats refresh its lease), never takes it back: the request hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_13_a_job_whose_assign_died_with_the_old_connection_is_answered_after_the_reconnect()
{
    // The production lease (5 s): the agent is back well within it.
    let mut fleet = Fleet::start_with(0, 2, |c, _| {
        c.heartbeat_interval = Duration::from_millis(1000);
        c.lease_timeout = Duration::from_secs(5);
    })
    .await;
    let grpc: SocketAddr = fleet.grpc.parse().unwrap();
    let counters = Arc::new(FaultCounters::default());
    let mut proxy = FaultProxy::start(grpc, Arc::clone(&counters), 1)
        .await
        .unwrap();
    fleet
        .agents
        .push(start_agent(&proxy.addr.to_string(), "vehicle-1", 2).await);
    fleet.wait_for_nodes(1).await;

    // A slow link: what the coordinator sends spends 3 s in flight.
    proxy.set_faults(Some(FaultProfile {
        delay_mean: Duration::from_secs(3),
        delay_jitter: Duration::ZERO,
        loss: 0.0,
        rto_min: Duration::ZERO,
        rto_max: Duration::ZERO,
    }));
    let request = tokio::spawn(
        fleet
            .post("/v1/chat/completions", greedy_chat("Say hello.", 8, false))
            .send(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while metric(
        &fleet.metrics().await,
        "tokenfleet_dispatch_latency_seconds_count",
    ) < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job was not dispatched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The Assign is in flight: the vehicle changes networks and comes straight back on a
    // clean link.
    proxy.set_faults(None);
    proxy
        .change_address(Duration::from_millis(200))
        .await
        .unwrap();

    let resp = tokio::time::timeout(Duration::from_secs(60), request)
        .await
        .expect("the request is answered after the reconnect (it hangs for good otherwise)")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["usage"]["completion_tokens"].as_u64() > Some(0),
        "{body}"
    );
    assert_eq!(counters.snapshot().address_changes, 1);
}
