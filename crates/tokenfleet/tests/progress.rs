//! Issue 13, hole 6: a node that heartbeats but never emits a token (a black hole) held its
//! jobs until the clients gave up, since any message refreshed the lease. With the progress
//! deadline the job moves to another node from its last token, the black hole is told to stop
//! it, loses standing (a stall is counted) and, past `stalls_to_cooldown`, gets no new work.
//!
//! Also here: hand-offs are not failures. A job evicted by departing vehicles and then refused
//! by one that was leaving as its Assign arrived still completes (the first `bench trust` run
//! lost 10 of 1,000 requests that way: every placement counted against the failure limit).

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{metric, start_agent, Fleet, MODEL};
use tokenfleet_protocol::v1::node_session_client::NodeSessionClient;
use tokenfleet_protocol::v1::{self, AgentMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// What the black hole saw.
#[derive(Default)]
struct Seen {
    assigned: AtomicU32,
    cancelled: AtomicU32,
}

/// What a scripted node does with its `n`th Assign (from 0): the messages it answers with,
/// and whether it then ends its session.
type Script = fn(u32, &v1::Assign) -> (Vec<AgentMsg>, bool);

/// Speaks the real protocol, heartbeats every 200 ms, accepts every Assign and never answers.
fn black_hole(_: u32, _: &v1::Assign) -> (Vec<AgentMsg>, bool) {
    (Vec::new(), false)
}

/// A node that claims to be far faster than any honest one (so the scheduler prefers it),
/// heartbeats every 200 ms and answers each Assign as `script` says.
async fn scripted_node(grpc: &str, seen: Arc<Seen>, script: Script) -> tokio::task::JoinHandle<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = NodeSessionClient::new(channel);
    let (tx, rx) = mpsc::channel(64);
    let hello = v1::Hello {
        node_id: "black-hole".into(),
        software_version: "test".into(),
        protocol_version: tokenfleet_protocol::PROTOCOL_VERSION,
        hardware: Some(v1::HardwareProfile {
            compute_class: "cpu".into(),
            cpu_threads: 2,
            memory_bytes: 0,
            // Claims to be far faster than the honest agent, so the scheduler prefers it.
            decode_tps_single: 10_000.0,
            decode_tps_batched: 20_000.0,
        }),
        engine_slots: 8,
        models: vec![v1::ModelInfo {
            name: MODEL.into(),
            sha256: common::secure::UNMEASURED_SHA.into(),
            ctx_per_slot: 2048,
            size_bytes: 0,
        }],
        held_jobs: Vec::new(),
    };
    tx.send(AgentMessage::new(AgentMsg::Hello(hello)))
        .await
        .unwrap();
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    tx.send(AgentMessage::new(AgentMsg::State(
        tokenfleet_agent::VehicleStatus::parked().state,
    )))
    .await
    .unwrap();
    tokio::spawn(async move {
        let mut heartbeat = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(v1::CoordinatorMessage { msg: Some(CoordinatorMsg::Assign(a)) })) => {
                        let n = seen.assigned.fetch_add(1, Ordering::SeqCst);
                        let (answers, leave) = script(n, &a);
                        for answer in answers {
                            if tx.send(AgentMessage::new(answer)).await.is_err() {
                                return;
                            }
                        }
                        if leave {
                            return;
                        }
                    }
                    Ok(Some(v1::CoordinatorMessage { msg: Some(CoordinatorMsg::Cancel(_)) })) => {
                        seen.cancelled.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Some(_)) => {}
                    _ => return,
                },
                _ = heartbeat.tick() => {
                    let hb = AgentMsg::Heartbeat(v1::Heartbeat { sent_unix_ms: 0 });
                    if tx.send(AgentMessage::new(hb)).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

async fn chat(client: reqwest::Client, http: String, prompt: String) -> (u16, serde_json::Value) {
    let resp = client
        .post(format!("{http}/v1/chat/completions"))
        .bearer_auth(common::KEY)
        .json(&serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8,
            "temperature": 0.0,
        }))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_a_node_that_never_emits_a_token_moves_and_the_node_cools_down() {
    let fleet = Fleet::start_with(0, 4, |c, _| {
        // Heartbeats keep the black hole's lease alive (1.5 s lease, a beat every 200 ms):
        // only the progress deadline can take its job.
        c.progress.stall_timeout = Duration::from_secs(1);
        c.progress.prefill_floor_tps = 1e9;
        c.progress.stalls_to_cooldown = 1;
        c.progress.cooldown = Duration::from_secs(3600);
        c.queue_timeout = Duration::from_secs(60);
    })
    .await;
    let seen = Arc::new(Seen::default());
    let _hole = scripted_node(&fleet.grpc, Arc::clone(&seen), black_hole).await;
    fleet.wait_for_nodes(1).await;
    let first = tokio::spawn(chat(
        fleet.client.clone(),
        fleet.http.clone(),
        "Say hi.".into(),
    ));
    // Bounded: the job reaches the black hole first (it is the only node).
    for _ in 0..300 {
        if seen.assigned.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.assigned.load(Ordering::SeqCst), 1);
    let honest = start_agent(&fleet.grpc, "honest", 2).await;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(120), first)
            .await
            .expect("the client got an answer")
            .unwrap()
            .0,
        200,
        "the job moved to the honest node"
    );
    let m = fleet.metrics().await;
    assert_eq!(metric(&m, "tokenfleet_node_stalls_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "tokenfleet_node_cooldowns_total"), 1.0, "{m}");
    assert_eq!(seen.cancelled.load(Ordering::SeqCst), 1, "told to stop it");
    // Cooling down, the black hole gets no new work although it claims to be much faster.
    for i in 0..3 {
        let (status, body) = chat(
            fleet.client.clone(),
            fleet.http.clone(),
            format!("Count to {i}."),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(seen.assigned.load(Ordering::SeqCst), 1);
    drop(honest);
}

/// Evicts its first three jobs as a departing vehicle does (from where they were: nothing
/// generated), refuses the fourth as "vehicle is leaving" (what agents sent when an Assign
/// crossed their departure), and drives off (ends its session) at the fifth.
fn departing_vehicle(n: u32, a: &v1::Assign) -> (Vec<AgentMsg>, bool) {
    match n {
        0..=2 => {
            let evicted = AgentMsg::Evicted(v1::JobEvicted {
                job_id: a.job_id.clone(),
                reason: "departure: driver returned".into(),
                next_index: a.resume_token_ids.len() as u32,
            });
            (vec![evicted], false)
        }
        3 => {
            let refused = AgentMsg::Failed(v1::JobFailed {
                job_id: a.job_id.clone(),
                message: "vehicle is leaving".into(),
                retryable: true,
            });
            (vec![refused], false)
        }
        _ => (Vec::new(), true),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_offs_do_not_count_as_failures_of_a_job() {
    let fleet = Fleet::start_with(0, 4, |c, _| {
        c.queue_timeout = Duration::from_secs(60);
    })
    .await;
    let seen = Arc::new(Seen::default());
    let departing = scripted_node(&fleet.grpc, Arc::clone(&seen), departing_vehicle).await;
    fleet.wait_for_nodes(1).await;
    let client = tokio::spawn(chat(
        fleet.client.clone(),
        fleet.http.clone(),
        "Say hi.".into(),
    ));
    // Bounded: the only node gets the job five times (three evictions, one refusal, and the
    // Assign it drives off with); before the fix the refusal failed the job at the fourth.
    tokio::time::timeout(Duration::from_secs(60), departing)
        .await
        .expect("the job came back to the departing vehicle after its refusal")
        .unwrap();
    assert_eq!(seen.assigned.load(Ordering::SeqCst), 5);
    let honest = start_agent(&fleet.grpc, "honest", 2).await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(120), client)
        .await
        .expect("the client got an answer")
        .unwrap();
    assert_eq!(
        status, 200,
        "one refusal after three hand-offs is not three failures: {body}"
    );
    let m = fleet.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokenfleet_node_job_failures_total{claim=\"retryable\"}"
        ),
        1.0,
        "{m}"
    );
    drop(honest);
}
