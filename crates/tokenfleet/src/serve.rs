//! `tokenfleet coordinator`, `tokenfleet agent` and `tokenfleet up` (a whole fleet on one
//! machine: a coordinator and N agents on simulated vehicles, with the real model).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokenfleet_agent::vehicle::{run_simulated, SimulatedVehicleConfig};
use tokenfleet_agent::{Agent, AgentConfig, VehicleStatus};
use tokenfleet_coordinator::config::{ApiKey, TlsFiles};
use tokenfleet_coordinator::CoordinatorConfig;
use tokenfleet_engine::{Engine, EngineConfig};

use crate::cli::{default_cache_dir, EngineArgs};

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
    /// SQLite job store.
    #[arg(long, env = "TOKENFLEET_DB")]
    pub db: Option<PathBuf>,
    /// An API key for tenant "default" (repeatable).
    #[arg(long = "api-key", env = "TOKENFLEET_API_KEY")]
    pub api_keys: Vec<String>,
    /// Placement policy: random, first-fit, tokenfleet, oracle.
    #[arg(long, env = "TOKENFLEET_POLICY")]
    pub policy: Option<String>,
    /// Lease timeout for silent nodes, milliseconds.
    #[arg(long, env = "TOKENFLEET_LEASE_TIMEOUT_MS")]
    pub lease_timeout_ms: Option<u64>,
    /// PEM certificate and key for the agent port (TLS).
    #[arg(long, env = "TOKENFLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "TOKENFLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
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
        if let Some(p) = self.policy {
            c.policy = p;
        }
        if let Some(ms) = self.lease_timeout_ms {
            c.lease_timeout = Duration::from_millis(ms);
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            c.grpc_tls = Some(TlsFiles { cert, key });
        }
        Ok(c)
    }
}

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

pub async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let running = tokenfleet_coordinator::start(config, ctrl_c()).await?;
    // Machine-readable for scripts and tests that start us on port 0.
    println!("http={} grpc={}", running.bound.http, running.bound.grpc);
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
    /// Coordinator agent endpoint (http:// on loopback, https:// with --ca-cert otherwise).
    #[arg(
        long,
        env = "TOKENFLEET_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// CA certificate (PEM) of the coordinator's TLS certificate.
    #[arg(long, env = "TOKENFLEET_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// This vehicle's id.
    #[arg(long, env = "TOKENFLEET_NODE_ID", required_unless_present = "replay")]
    pub node_id: Option<String>,
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

/// Loads the engine and starts an agent with the chosen vehicle.
async fn start_agent(a: &AgentArgs, threads: u32) -> anyhow::Result<Agent> {
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
    let node_id = a.node_id.clone().unwrap_or_else(|| "vehicle".into());
    let mut config = AgentConfig::new(
        &a.coordinator,
        &node_id,
        a.model_name
            .clone()
            .unwrap_or_else(|| model_name_of(&a.engine.model)),
    );
    config.ca_cert = a.ca_cert.clone();
    let agent = Agent::start(config, engine.clone(), sha, VehicleStatus::parked());
    if a.vehicle == VehicleMode::Simulated {
        let seed = node_id
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let sim = SimulatedVehicleConfig::commuter(a.speedup, a.start_hour, seed)
            .map_err(anyhow::Error::msg)?;
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

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Number of vehicles (agents) on this machine.
    #[arg(long, env = "TOKENFLEET_AGENTS", default_value_t = 3)]
    pub agents: u32,
    /// OpenAI-compatible API address.
    #[arg(long, env = "TOKENFLEET_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// API key to accept (default: a random one, printed).
    #[arg(long, env = "TOKENFLEET_API_KEY")]
    pub api_key: Option<String>,
    /// Job store (default: a fresh file under the cache dir).
    #[arg(long, env = "TOKENFLEET_DB")]
    pub db: Option<PathBuf>,
    /// Concurrent sequences per vehicle.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Keep every vehicle parked (no departures).
    #[arg(long)]
    pub always_parked: bool,
    /// Virtual seconds per real second for the simulated vehicles.
    #[arg(long, default_value_t = 120.0)]
    pub speedup: f64,
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let key = args
        .api_key
        .clone()
        .unwrap_or_else(|| format!("tf-{}", hex::encode(rand::random::<[u8; 16]>())));
    let run_dir = default_cache_dir()
        .join("up")
        .join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let db = args.db.clone().unwrap_or_else(|| run_dir.join("fleet.db"));
    // Agent sessions run over TLS, as on a real fleet.
    let tls = crate::tls::write_self_signed(&run_dir)?;
    let config = CoordinatorConfig {
        http_addr: args.http,
        grpc_addr: "127.0.0.1:0".parse()?,
        grpc_tls: Some(tls.clone()),
        db_path: db.clone(),
        api_keys: vec![ApiKey {
            key: key.clone(),
            tenant: "default".into(),
        }],
        // The demo fleet verifies its own vehicles: a trusted copy of the model on the
        // coordinator re-scores their finished jobs (every job of a new vehicle, fewer as it
        // earns trust).
        verification: tokenfleet_coordinator::verify::VerificationConfig {
            enabled: true,
            models: vec![args.engine.model.clone()],
            ..Default::default()
        },
        ..Default::default()
    };
    let running = tokenfleet_coordinator::start(config, ctrl_c()).await?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2);
    let threads = (cores / args.agents.max(1)).max(1);
    let mut agents = Vec::new();
    for i in 0..args.agents {
        let a = AgentArgs {
            engine: EngineArgs {
                model: args.engine.model.clone(),
                threads: args.engine.threads,
            },
            coordinator: format!("https://{}", running.bound.grpc),
            ca_cert: Some(tls.cert.clone()),
            node_id: Some(format!("vehicle-{}", i + 1)),
            model_name: None,
            slots: args.slots,
            ctx: 2048,
            vehicle: if args.always_parked {
                VehicleMode::Parked
            } else {
                VehicleMode::Simulated
            },
            speedup: args.speedup,
            // Spread the fleet over the day so some cars come and go while others stay.
            start_hour: 16.0 + 1.3 * i as f64,
            replay: Default::default(),
        };
        agents.push(start_agent(&a, threads).await?);
    }
    let model = model_name_of(&args.engine.model);
    println!("tokenfleet is up: {} vehicles serving {model}", args.agents);
    println!(
        "  API       http://{}/v1   (OpenAI-compatible)",
        running.bound.http
    );
    println!("  API key   {key}");
    println!("  agents    https://{} (gRPC over TLS)", running.bound.grpc);
    println!("  job store {}", db.display());
    println!("  metrics   http://{}/metrics", running.bound.http);
    println!("  verifier  re-scores finished jobs with a trusted copy of the model");
    println!();
    println!("try:");
    println!(
        "  curl -s http://{}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Explain why the sky is blue.\"}}], \"max_tokens\": 64}}'",
        running.bound.http
    );
    println!("Ctrl-C stops the fleet.");
    running.task.await??;
    for a in agents {
        a.stop().await;
    }
    Ok(())
}
