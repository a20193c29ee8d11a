//! Issue 4: `Draining` hands jobs back within one decode step, on the real engine.
//!
//! A real [`Governor`] is stepped on a parked, plugged-in [`VehicleState`] until it computes;
//! the agent (real core, real engine, real gRPC session) runs three jobs assigned by a
//! coordinator stub (a tonic `NodeSession` on 127.0.0.1:0 that records what the agent sends).
//! Then the gear leaves Park: the governor's decision goes through `vehicle::status_from` to
//! the agent, which must drop every job before the engine's next decode step and report each
//! with `JobEvicted` at the index after the last token it sent.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenfleet_agent::vehicle::{status_from, DEMO_POLICY};
use tokenfleet_agent::{Agent, AgentConfig};
use tokenfleet_engine::{Engine, EngineConfig};
use tokenfleet_protocol::v1::node_session_server::{NodeSession, NodeSessionServer};
use tokenfleet_protocol::v1::{self, AgentMessage, CoordinatorMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokenfleet_vehicle::{
    Departure, Governor, GovernorState, LowVoltageSystemState, Millis, Policy, Reason, Signal,
    SignalValue, StepContext, VehicleState,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// The test model (`scripts/fetch-model.sh` puts it there).
fn model_path() -> PathBuf {
    let path = tokenfleet_engine::gguf::default_model_path();
    assert!(
        path.exists(),
        "test model missing at {}: run scripts/fetch-model.sh",
        path.display()
    );
    path
}

/// A coordinator that welcomes one agent, assigns `jobs`, and records every agent message.
struct Stub {
    jobs: Mutex<Vec<v1::Assign>>,
    seen: Arc<Mutex<Vec<AgentMsg>>>,
}

#[tonic::async_trait]
impl NodeSession for Stub {
    type OpenStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn open(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::OpenStream>, Status> {
        let mut inbound = request.into_inner();
        let Some(AgentMsg::Hello(hello)) = inbound.message().await?.and_then(|m| m.msg) else {
            return Err(Status::invalid_argument("Hello first"));
        };
        let (tx, rx) = mpsc::channel(16);
        let welcome = CoordinatorMsg::Welcome(v1::Welcome {
            node_id: hello.node_id,
            heartbeat_interval_ms: 1000,
            lease_timeout_ms: 30_000,
        });
        let jobs = std::mem::take(&mut *self.jobs.lock().unwrap());
        for msg in std::iter::once(welcome).chain(jobs.into_iter().map(CoordinatorMsg::Assign)) {
            let _ = tx.send(Ok(CoordinatorMessage::new(msg))).await;
        }
        let seen = self.seen.clone();
        tokio::spawn(async move {
            let _keep_open = tx;
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(msg) = m.msg {
                    seen.lock().unwrap().push(msg);
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn assign(job_id: &str, resume: Vec<i32>) -> v1::Assign {
    v1::Assign {
        job_id: job_id.into(),
        prompt: Some(v1::assign::Prompt::Chat(v1::ChatMessages {
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: "Write a very long story about a robot who learns to paint. \
                          Describe every painting in detail."
                    .into(),
            }],
        })),
        sampling: Some(v1::Sampling {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 0,
            seed: 7,
        }),
        resume_token_ids: resume,
        max_tokens: 1500,
        ..Default::default()
    }
}

/// A parked, plugged-in, charging car with every signal fresh at `t`.
fn parked(vs: &mut VehicleState, t: Millis, gear: i64) {
    use SignalValue::*;
    let signals = [
        (Signal::SelectedGear, Int(gear)),
        (Signal::Speed, Float(0.0)),
        (Signal::IsMoving, Bool(false)),
        (
            Signal::LowVoltageSystemState,
            LowVoltage(LowVoltageSystemState::Off),
        ),
        (Signal::LowVoltageBatteryVoltage, Float(12.6)),
        (Signal::StateOfCharge, Float(80.0)),
        (Signal::BatteryTemperature, Float(25.0)),
        (Signal::ComputeTemperature, Float(40.0)),
        (Signal::ChargingCableConnected, Bool(true)),
        (Signal::IsCharging, Bool(true)),
    ];
    for (s, v) in signals {
        vs.set(s, t, v);
    }
}

/// Waits until `cond` holds on the recorded messages.
async fn wait_seen(
    seen: &Mutex<Vec<AgentMsg>>,
    what: &str,
    cond: impl Fn(&[AgentMsg]) -> bool,
) -> Vec<AgentMsg> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        {
            let s = seen.lock().unwrap();
            if cond(&s) {
                return s.clone();
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Tokens received in chunks for a job: (first start_index, count), checking contiguity.
fn received(msgs: &[AgentMsg], job: &str) -> (u32, u32) {
    let mut first = None;
    let mut next = None;
    for m in msgs {
        if let AgentMsg::Chunk(c) = m {
            if c.job_id == job {
                if let Some(n) = next {
                    assert_eq!(c.start_index, n, "chunks of {job} are contiguous");
                }
                first.get_or_insert(c.start_index);
                next = Some(c.start_index + c.token_ids.len() as u32);
            }
        }
    }
    let first = first.unwrap_or(0);
    (first, next.unwrap_or(first) - first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue4_draining_hands_jobs_back_within_one_decode_step() {
    let mut ec = EngineConfig::new(model_path());
    ec.slots = 4;
    ec.ctx_per_slot = 2048;
    // One thread: no OpenMP barrier to stall when the test shares a loaded machine.
    ec.threads = 1;
    let engine = Engine::load_async(ec).await.expect("load the test model");
    let resume = engine.tokenize(" Once upon a time, in a small workshop,", false);
    assert!(resume.len() >= 5);

    // The governor computes: parked, plugged in, start conditions held past the dwell.
    let policy = Policy::from_toml_str(DEMO_POLICY, "DRAIN-TEST").unwrap();
    let t0 = Millis::from_secs(1_748_815_200);
    let mut vs = VehicleState::new();
    let mut gov = Governor::new(policy.clone(), t0);
    let mut t = t0;
    let mut decision = None;
    for _ in 0..10 {
        parked(&mut vs, t, 126);
        let d = gov.step(&vs, t, StepContext::with_work(true));
        decision = Some(d);
        if d.state.is_computing() {
            break;
        }
        t = t + Duration::from_secs(30);
    }
    let computing = decision.unwrap();
    assert_eq!(computing.state, GovernorState::Computing, "{computing:?}");
    let initial = status_from(&computing, &vs, t);
    assert!(!initial.must_evict && initial.state.eligible);

    // A coordinator stub on 127.0.0.1:0 assigning three jobs (one resumed elsewhere).
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stub = Stub {
        jobs: Mutex::new(vec![
            assign("job-a", Vec::new()),
            assign("job-b", Vec::new()),
            assign("job-c", resume.clone()),
        ]),
        seen: seen.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeSessionServer::new(stub))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let config = AgentConfig::new(format!("http://{addr}"), "drain-test", "smollm2");
    let agent = Agent::start(config, engine.clone(), "0".repeat(64), initial);

    // All three jobs are decoding and streaming tokens.
    let jobs = ["job-a", "job-b", "job-c"];
    wait_seen(&seen, "every job streamed 8 tokens", |m| {
        jobs.iter().all(|j| received(m, j).1 >= 8)
    })
    .await;
    let before = engine.stats();
    assert_eq!(before.slots_busy, 3, "{before:?}");

    // Departure: the gear leaves Park. Governor → status → agent core.
    t = t + Duration::from_secs(5);
    parked(&mut vs, t, 127);
    let d = gov.step(&vs, t, StepContext::with_work(true));
    assert_eq!(d.state, GovernorState::Draining);
    assert!(d.must_evict);
    assert_eq!(
        d.reason,
        Reason::Departure(Departure::GearLeftPark { gear: 127 })
    );
    let status = status_from(&d, &vs, t);
    assert!(status.must_evict && !status.state.eligible && !status.state.parked);
    let steps_at_departure = engine.stats().steps;
    agent.status().send_replace(status);

    // The engine is empty after at most the decode step already under way.
    let mut stats = engine.watch_stats();
    let idle = tokio::time::timeout(
        Duration::from_secs(10),
        stats.wait_for(|s| s.slots_busy == 0),
    )
    .await
    .expect("the engine freed the evicted jobs' slots")
    .expect("engine running")
    .clone();
    assert!(
        idle.steps <= steps_at_departure + 1,
        "{} decode steps ran after the departure (at most the one under way may): {idle:?}",
        idle.steps - steps_at_departure
    );
    assert_eq!(idle.last_batch_sequences, 0, "{idle:?}");
    assert_eq!(idle.cancelled, before.cancelled + 3, "{idle:?}");

    // Every job was reported with JobEvicted at the index after its last sent token.
    let msgs = wait_seen(&seen, "three JobEvicted", |m| {
        m.iter()
            .filter(|x| matches!(x, AgentMsg::Evicted(_)))
            .count()
            == 3
    })
    .await;
    for job in jobs {
        let ev = msgs
            .iter()
            .find_map(|m| match m {
                AgentMsg::Evicted(e) if e.job_id == job => Some(e),
                _ => None,
            })
            .unwrap();
        let (first, n) = received(&msgs, job);
        let base = if job == "job-c" {
            resume.len() as u32
        } else {
            0
        };
        assert_eq!(first, base, "{job} streamed from its resume point");
        assert_eq!(ev.next_index, base + n, "{job}: {ev:?}");
        assert!(ev.reason.contains("gear 127 left Park"), "{ev:?}");
        assert!(
            !msgs
                .iter()
                .any(|m| matches!(m, AgentMsg::Done(x) if x.job_id == job)),
            "{job} was evicted, not finished"
        );
    }
    // The coordinator was told the vehicle is draining and not eligible.
    wait_seen(&seen, "a Draining State", |m| {
        m.iter().any(|x| {
            matches!(x, AgentMsg::State(s)
                if s.governor == v1::GovernorState::Draining as i32 && !s.eligible)
        })
    })
    .await;
    // Nothing runs any more.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(engine.stats().steps, idle.steps);

    agent.stop().await;
    server.abort();
}
