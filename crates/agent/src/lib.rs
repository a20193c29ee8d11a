//! `tokenfleet-agent`: the vehicle daemon.
//!
//! It dials out to the coordinator (vehicles sit behind carrier NAT), says who it is and what
//! it serves, runs assigned jobs on the local engine with continuous batching, streams tokens
//! back, and gives work back the moment the vehicle is needed.
//!
//! Layout:
//! - [`config`]: [`AgentConfig`], reconnect [`config::Backoff`].
//! - [`status`]: [`VehicleStatus`], what the vehicle side (governor) publishes to the core.
//! - `core`: the task owning running jobs; chunking, eviction, resend after reconnect.
//! - [`energy`]: per-job energy (grid vs battery, measured vs estimated) and battery wear,
//!   reported in `JobDone`.
//! - `session`: the gRPC session, heartbeats, reconnects.
//! - [`identity`]: enrollment, the node key and certificate on disk, renewal.
//! - [`attest`]: measurements into the TPM and quotes for the coordinator's challenges.
//! - [`vehicle`]: the governor on a simulated vehicle, publishing [`VehicleStatus`].
//! - [`replay`]: a recorded day through the governor with the engine measured at each
//!   budget, and the day's report (`tokenfleet agent --replay FILE --report`).

pub mod attest;
pub mod config;
mod core;
pub mod energy;
pub mod identity;
pub mod replay;
mod session;
pub mod status;
pub mod vehicle;

pub use config::AgentConfig;
pub use core::prompt_input;
pub use session::SessionStatus;
pub use status::{StatusSender, VehicleStatus};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokenfleet_engine::Engine;
use tokenfleet_protocol::v1;
use tokio::sync::{mpsc, watch};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot reach the coordinator: {0}")]
    Connect(String),
    #[error("the coordinator refused the session: {0}")]
    Refused(String),
    /// Refused for who this vehicle is (quarantined, revoked, unknown): retrying soon cannot
    /// help, so the agent backs off for minutes, not seconds.
    #[error("the coordinator denies this vehicle: {0}")]
    Denied(String),
    #[error("the agent is stopping")]
    Stopped,
}

/// A running agent. Dropping it stops the agent (its jobs' leases then expire on the
/// coordinator, which resumes them elsewhere).
pub struct Agent {
    shutdown: watch::Sender<bool>,
    status: StatusSender,
    session: watch::Receiver<SessionStatus>,
    assigns: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Kept to wait, on stop, until the engine has let go of every sequence.
    engine: Engine,
}

impl Agent {
    /// Starts the agent: the core task and the session loop. `model_sha256` identifies the
    /// served GGUF to the coordinator.
    pub fn start(
        config: AgentConfig,
        engine: Engine,
        model_sha256: String,
        initial: VehicleStatus,
    ) -> Agent {
        let info = engine.info().clone();
        let size_bytes = std::fs::metadata(&info.path).map(|m| m.len()).unwrap_or(0);
        let hello = v1::Hello {
            node_id: config.node_id.clone(),
            software_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: tokenfleet_protocol::PROTOCOL_VERSION,
            hardware: Some(v1::HardwareProfile {
                compute_class: config.compute_class.clone(),
                cpu_threads: std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1),
                memory_bytes: 0,
                decode_tps_single: config.decode_tps_single,
                decode_tps_batched: config.decode_tps_batched,
            }),
            engine_slots: info.slots,
            models: vec![v1::ModelInfo {
                name: config.model_name.clone(),
                sha256: model_sha256,
                ctx_per_slot: info.ctx_per_slot,
                size_bytes,
            }],
            held_jobs: Vec::new(),
        };
        let (status, status_rx) = watch::channel(initial);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (core_tx, core_rx) = mpsc::channel(4096);
        let ledger = energy::JobEnergyLedger::new(config.power_model, config.wear_model);
        let core = core::Core::new(
            engine.clone(),
            hello,
            core_rx,
            core_tx.clone(),
            status_rx,
            ledger,
        );
        let (session_tx, session) = watch::channel(SessionStatus::Connecting);
        let assigns = Arc::new(AtomicU64::new(0));
        let report = session::SessionReport {
            status: session_tx,
            assigns: Arc::clone(&assigns),
        };
        let tasks = vec![
            tokio::spawn(core.run()),
            tokio::spawn(session::run(config, core_tx, shutdown_rx, report)),
        ];
        Agent {
            shutdown,
            status,
            session,
            assigns,
            tasks,
            engine,
        }
    }

    /// Where the session to the coordinator stands (e.g. why the last attempt was refused).
    pub fn session_status(&self) -> watch::Receiver<SessionStatus> {
        self.session.clone()
    }

    /// How many jobs the coordinator has assigned to this agent.
    pub fn assignments_received(&self) -> u64 {
        self.assigns.load(Ordering::Relaxed)
    }

    /// The vehicle side's handle: publish a new [`VehicleStatus`] (e.g. the driver is back).
    pub fn status(&self) -> &StatusSender {
        &self.status
    }

    /// Stops the session and the core, waiting for both, then (at most 10 s, without blocking
    /// the executor) for the engine to drop the stopped jobs' sequences: the engine may be
    /// shared, and its own wait on drop happens only when its last handle goes.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        if !self
            .engine
            .wait_idle(std::time::Duration::from_secs(10))
            .await
        {
            tracing::warn!("the engine still had work 10 s after the agent stopped");
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}
