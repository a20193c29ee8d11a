//! `tokenfleet coordinator` and `tokenfleet agent`. `tokenfleet up` (a whole fleet on one
//! machine) lives in [`crate::up`] and starts its agents through [`start_agent`] here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokenfleet_agent::config::SharedAttestor;
use tokenfleet_agent::identity::IdentityDir;
use tokenfleet_agent::vehicle::{run_simulated, SimulatedVehicleConfig};
use tokenfleet_agent::{Agent, AgentConfig, VehicleStatus};
use tokenfleet_coordinator::config::{ApiKey, TlsFiles};
use tokenfleet_coordinator::CoordinatorConfig;
use tokenfleet_engine::{Engine, EngineConfig};

use crate::cli::EngineArgs;

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// TOML config (flags below override it).
    #[arg(long, env = "TOKENFLEET_CONFIG")]
    pub config: Option<PathBuf>,
    /// OpenAI-compatible API address.
    #[arg(long, env = "TOKENFLEET_HTTP")]
    pub http: Option<SocketAddr>,
    /// Agent session (gRPC) address.
    #[arg(long, env = "TOKENFLEET_GRPC")]
    pub grpc: Option<SocketAddr>,
    /// SQLite job store. For PostgreSQL set `TOKENFLEET_DATABASE_URL` (or the config's
    /// `database_url`) and the store's keys (`TOKENFLEET_STORE_KEYS` or `store_key_file`).
    #[arg(long, env = "TOKENFLEET_DB")]
    pub db: Option<PathBuf>,
    /// An API key for tenant "default" (repeatable).
    #[arg(long = "api-key", env = "TOKENFLEET_API_KEY")]
    pub api_keys: Vec<String>,
    /// The operator key (`/metrics`, `/healthz` details); overrides the config file's.
    #[arg(long, env = "TOKENFLEET_OPERATOR_KEY")]
    pub operator_key: Option<String>,
    /// Placement policy: random, first-fit, tokenfleet, oracle.
    #[arg(long, env = "TOKENFLEET_POLICY")]
    pub policy: Option<String>,
    /// With a PostgreSQL store: wait while another coordinator holds the database and take
    /// over when it stops (active-passive failover; give agents both addresses).
    #[arg(long, env = "TOKENFLEET_STANDBY")]
    pub standby: bool,
    /// With a PostgreSQL store: run as one of several active coordinators on it (`[cluster]`),
    /// under this id (unique among them, the same across restarts).
    #[arg(long, env = "TOKENFLEET_CLUSTER_ID", conflicts_with = "standby")]
    pub cluster_id: Option<String>,
    /// With --cluster-id: how long a coordinator that stops renewing keeps its jobs before
    /// the others take them, milliseconds (default 5000).
    #[arg(long, env = "TOKENFLEET_CLUSTER_LEASE_MS", requires = "cluster_id")]
    pub cluster_lease_ms: Option<u64>,
    /// Lease timeout for silent nodes, milliseconds.
    #[arg(long, env = "TOKENFLEET_LEASE_TIMEOUT_MS")]
    pub lease_timeout_ms: Option<u64>,
    /// PEM certificate and key for the agent port (TLS).
    #[arg(long, env = "TOKENFLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "TOKENFLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate and key for the client API (HTTPS).
    #[arg(long, env = "TOKENFLEET_HTTPS_CERT", requires = "https_key")]
    pub https_cert: Option<PathBuf>,
    #[arg(long, env = "TOKENFLEET_HTTPS_KEY", requires = "https_cert")]
    pub https_key: Option<PathBuf>,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// Enrollment, mutual TLS and attestation (the `[security]` config section as flags).
#[derive(Debug, Args, Default)]
pub struct SecurityArgs {
    /// Fleet CA directory (created on first start): enables enrollment and mutual TLS.
    #[arg(long, env = "TOKENFLEET_FLEET_CA_DIR")]
    pub fleet_ca_dir: Option<PathBuf>,
    /// Enrollment service address.
    #[arg(long, env = "TOKENFLEET_ENROLL_ADDR")]
    pub enroll: Option<SocketAddr>,
    /// Let nodes without a TPM join (they get no sensitive requests).
    #[arg(long, env = "TOKENFLEET_ALLOW_UNATTESTED")]
    pub allow_unattested: bool,
    /// sha256 (hex) of an agent build allowed to serve (repeatable).
    #[arg(
        long = "allow-agent-build",
        env = "TOKENFLEET_ALLOW_AGENT_BUILDS",
        value_delimiter = ','
    )]
    pub allow_agent_builds: Vec<String>,
    /// sha256 (hex) of a model file allowed to be served (repeatable).
    #[arg(
        long = "allow-model",
        env = "TOKENFLEET_ALLOW_MODELS",
        value_delimiter = ','
    )]
    pub allow_models: Vec<String>,
    /// Lifetime of node certificates, seconds.
    #[arg(long, env = "TOKENFLEET_CERT_TTL_S")]
    pub cert_ttl_s: Option<u64>,
}

impl SecurityArgs {
    /// Applies the flags over the config file's `[security]` (creating it with --fleet-ca-dir).
    fn apply(self, c: &mut CoordinatorConfig) {
        if let Some(dir) = self.fleet_ca_dir {
            c.security.get_or_insert_with(Default::default).ca_dir = dir;
        }
        let Some(sec) = c.security.as_mut() else {
            return;
        };
        if let Some(a) = self.enroll {
            sec.enroll_addr = a;
        }
        sec.allow_unattested |= self.allow_unattested;
        sec.allowed_agent_builds.extend(self.allow_agent_builds);
        sec.allowed_models.extend(self.allow_models);
        if let Some(ttl) = self.cert_ttl_s {
            sec.cert_ttl = Duration::from_secs(ttl);
        }
    }
}

impl CoordinatorArgs {
    fn into_config(self) -> anyhow::Result<CoordinatorConfig> {
        let mut c = match &self.config {
            Some(path) => CoordinatorConfig::from_file(path)?,
            None => CoordinatorConfig::default(),
        };
        if let Some(a) = self.http {
            c.http_addr = a;
        }
        if let Some(a) = self.grpc {
            c.grpc_addr = a;
        }
        if let Some(d) = self.db {
            c.db_path = d;
        }
        for key in self.api_keys {
            c.api_keys.push(ApiKey {
                key,
                tenant: "default".into(),
            });
        }
        if let Some(k) = self.operator_key {
            c.operator_key = Some(k);
        }
        if let Some(p) = self.policy {
            c.policy = p;
        }
        c.standby |= self.standby;
        if let Some(id) = self.cluster_id {
            let cluster = c.cluster.get_or_insert_with(Default::default);
            cluster.id = Some(id);
            if let Some(ms) = self.cluster_lease_ms {
                cluster.lease = Duration::from_millis(ms);
                cluster.sweep_interval = cluster.sweep_interval.min(cluster.lease);
            }
        }
        if let Some(ms) = self.lease_timeout_ms {
            c.lease_timeout = Duration::from_millis(ms);
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            c.grpc_tls = Some(TlsFiles { cert, key });
        }
        if let (Some(cert), Some(key)) = (self.https_cert, self.https_key) {
            c.http_tls = Some(TlsFiles { cert, key });
        }
        self.security.apply(&mut c);
        Ok(c)
    }
}

/// Resolves on Ctrl-C or SIGTERM (so that a supervisor's stop also shuts down gracefully:
/// agents stop and software TPMs are ended).
pub(crate) async fn ctrl_c() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    // A standby waits inside `start` for the database: Ctrl-C must stop it there too.
    let running = tokio::select! {
        running = tokenfleet_coordinator::start(config, ctrl_c()) => running?,
        () = ctrl_c() => return Ok(()),
    };
    // Machine-readable for scripts and tests that start us on port 0.
    match running.bound.enroll {
        Some(e) => println!(
            "http={} grpc={} enroll={e}",
            running.bound.http, running.bound.grpc
        ),
        None => println!("http={} grpc={}", running.bound.http, running.bound.grpc),
    }
    running.task.await??;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VehicleMode {
    /// Always parked and plugged in (a stationary node).
    Parked,
    /// A simulated commuter car on an accelerated clock, with the real governor.
    Simulated,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Coordinator agent endpoint (http:// on loopback, https:// with --ca-cert otherwise);
    /// several, comma-separated, are tried in turn (an active coordinator and its standby).
    #[arg(
        long,
        env = "TOKENFLEET_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// CA certificate (PEM) of the coordinator's TLS certificate.
    #[arg(long, env = "TOKENFLEET_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// This vehicle's id (with --identity-dir, the enrolled id is used).
    #[arg(long, env = "TOKENFLEET_NODE_ID", required_unless_present_any = ["replay", "identity_dir"])]
    pub node_id: Option<String>,
    /// The enrolled identity (`tokenfleet enroll`): connect with mutual TLS.
    #[arg(long, env = "TOKENFLEET_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    /// The vehicle's TPM (TCTI): the agent measures itself and its model into it and answers
    /// the coordinator's attestation challenges.
    #[arg(long, env = "TOKENFLEET_TPM")]
    pub tpm: Option<String>,
    /// The resettable PCR to measure into (16 or 23).
    #[arg(long, env = "TOKENFLEET_PCR", default_value_t = 23)]
    pub pcr: u32,
    /// Name clients use for the model (default: the GGUF file stem).
    #[arg(long, env = "TOKENFLEET_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Concurrent sequences.
    #[arg(long, env = "TOKENFLEET_SLOTS", default_value_t = 4)]
    pub slots: u32,
    /// Context tokens per sequence.
    #[arg(long, env = "TOKENFLEET_CTX", default_value_t = 2048)]
    pub ctx: u32,
    #[arg(long, value_enum, env = "TOKENFLEET_VEHICLE", default_value = "parked")]
    pub vehicle: VehicleMode,
    /// Virtual seconds per real second for the simulated vehicle.
    #[arg(long, env = "TOKENFLEET_SPEEDUP", default_value_t = 120.0)]
    pub speedup: f64,
    /// Hour of the virtual day the simulated vehicle starts at.
    #[arg(long, default_value_t = 20.0)]
    pub start_hour: f64,
    /// `--replay FILE --report`: a recorded day through the governor, offline.
    #[command(flatten)]
    pub replay: crate::replay_cmd::ReplayFlags,
}

pub fn model_name_of(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// The decode speed a vehicle claims in its Hello (one stream, every slot at once): measured
/// on its own engine at start, not a constant. The scheduler plans with it, and the
/// coordinator warns about a vehicle that decodes far below its claim: the former fixed
/// 150 tok/s was 4-25x what the demo's agents decode on a shared 2-core machine (6-35 tok/s
/// measured by the coordinator under load).
async fn measured_decode_speed(engine: &Engine, node: &str) -> anyhow::Result<(f32, f32)> {
    let single = crate::bench::engine::measure_decode_1(engine, 32, 1).await?;
    let slots = engine.info().slots as usize;
    let prompt = engine.tokenize("Once upon a time", true);
    let batched = crate::bench::engine::measure_streams(engine, &prompt, slots, 16).await?;
    tracing::info!(
        node,
        single_tps = single,
        all_slots_tps = batched,
        slots,
        "decode speed measured"
    );
    Ok((single as f32, batched.max(single) as f32))
}

/// Loads the engine and starts an agent with the chosen vehicle.
pub async fn start_agent(a: &AgentArgs, threads: u32) -> anyhow::Result<Agent> {
    let mut ec = EngineConfig::new(&a.engine.model);
    ec.slots = a.slots;
    ec.ctx_per_slot = a.ctx;
    ec.threads = a.engine.threads.unwrap_or(threads);
    let engine = Engine::load_async(ec)
        .await
        .with_context(|| format!("loading {}", a.engine.model.display()))?;
    let path = a.engine.model.clone();
    let sha =
        tokio::task::spawn_blocking(move || tokenfleet_engine::gguf::sha256_file(&path)).await??;
    let identity = a.identity_dir.as_ref().map(IdentityDir::new);
    let node_id = match &identity {
        Some(id) => id.node_id()?,
        None => a.node_id.clone().unwrap_or_else(|| "vehicle".into()),
    };
    let model_name = a
        .model_name
        .clone()
        .unwrap_or_else(|| model_name_of(&a.engine.model));
    let mut config = AgentConfig::new(&a.coordinator, &node_id, &model_name);
    (config.decode_tps_single, config.decode_tps_batched) =
        measured_decode_speed(&engine, &node_id).await?;
    config.ca_cert = a.ca_cert.clone();
    config.identity = identity;
    if let Some(tcti) = &a.tpm {
        let (tcti, pcr, models) = (tcti.clone(), a.pcr, vec![(model_name, sha.clone())]);
        let tpm = tokio::task::spawn_blocking(move || {
            crate::fleet_cmd::measured_tpm(&tcti, pcr, &models)
        })
        .await??;
        tracing::info!(node = %node_id, pcr = a.pcr, "agent and model measured into the TPM");
        config.attestor = Some(SharedAttestor(Arc::new(tpm)));
    }
    let simulated = if a.vehicle == VehicleMode::Simulated {
        let seed = node_id
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let sim = SimulatedVehicleConfig::commuter(a.speedup, a.start_hour, seed)
            .map_err(anyhow::Error::msg)?;
        // Per-job energy and wear use the simulated vehicle's own hardware and pack.
        config.power_model = sim.policy.compute.hardware;
        config.wear_model = tokenfleet_vehicle::WearModel::new(
            sim.policy.pack_capacity_kwh,
            sim.policy.budgets.replacement_usd_per_kwh,
        );
        Some(sim)
    } else {
        None
    };
    let agent = Agent::start(config, engine.clone(), sha, VehicleStatus::parked());
    if let Some(sim) = simulated {
        tokio::spawn(run_simulated(sim, engine, agent.status().clone()));
    }
    Ok(agent)
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    if args.replay.replay.is_some() {
        let replay = crate::replay_cmd::ReplayArgs {
            engine: args.engine,
            replay: args.replay,
        };
        return crate::replay_cmd::run(replay).await;
    }
    let agent = start_agent(&args, 2).await?;
    ctrl_c().await;
    agent.stop().await;
    Ok(())
}

pub use crate::up::{up, UpArgs};
