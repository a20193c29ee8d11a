//! Command-line interface. Every flag has a long name and an environment variable.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tokenfleet",
    version,
    about = "LLM inference on fleets of parked EVs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole demo fleet on this machine: a coordinator and N agents on simulated vehicles.
    Up(crate::serve::UpArgs),
    /// Run the coordinator (OpenAI-compatible API, agent sessions, job store, dispatch).
    Coordinator(crate::serve::CoordinatorArgs),
    /// Run a vehicle agent.
    Agent(crate::serve::AgentArgs),
    /// Enroll this vehicle: trade a one-time token for a node certificate (key made here).
    Enroll(crate::fleet_cmd::EnrollArgs),
    /// Operator commands on the fleet registry: enrollment tokens, revocation.
    #[command(subcommand)]
    Fleet(crate::fleet_cmd::FleetCommand),
    /// Simulate a fleet with the real scheduler: tokens, energy, battery wear and cost.
    Sim(crate::sim_cmd::SimArgs),
    /// Answer one chat prompt with the local engine, streaming tokens to stdout.
    Chat(ChatArgs),
    /// Result verification: calibrate the verifier's thresholds on honest work.
    #[command(subcommand)]
    Verify(crate::verify_cmd::VerifyCommand),
    /// Benchmarks that print our figures next to a reference measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// Where models and built reference tools are cached.
pub fn default_cache_dir() -> PathBuf {
    tokenfleet_engine::gguf::default_cache_dir()
}

/// The demo model as `scripts/fetch-model.sh` installs it.
pub fn default_model_path() -> PathBuf {
    tokenfleet_engine::gguf::default_model_path()
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// GGUF model file.
    #[arg(long, env = "TOKENFLEET_MODEL", default_value_os_t = default_model_path())]
    pub model: PathBuf,
    /// CPU threads for llama.cpp (default: all cores).
    #[arg(long, env = "TOKENFLEET_THREADS")]
    pub threads: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Maximum new tokens.
    #[arg(long, env = "TOKENFLEET_MAX_TOKENS", default_value_t = 256)]
    pub max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The user's message.
    pub prompt: String,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Our engine against llama.cpp's llama-bench and llama-server on the same model/threads.
    Engine(crate::bench::engine::EngineBenchArgs),
    /// Coordinator + agent against llama-server directly: TTFT and 8-client throughput.
    E2e(crate::bench::e2e::E2eArgs),
    /// Coordinator dispatch at fleet scale: N simulated agents (null engine) over gRPC/TLS.
    Dispatch(crate::bench::dispatch::DispatchArgs),
    /// Result verification: false quarantines of an honest fleet, and how long liars last.
    Trust(crate::bench::trust::TrustArgs),
    /// A fleet of 3 agents behind fault proxies (latency, loss, partitions, address changes):
    /// lost, duplicated or changed answers against fault-free ones.
    Chaos(crate::bench::chaos::ChaosArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,tokenfleet=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => crate::serve::up(args).await,
            Command::Coordinator(args) => crate::serve::coordinator(args).await,
            Command::Agent(args) => crate::serve::agent(args).await,
            Command::Enroll(args) => crate::fleet_cmd::enroll_cmd(args).await,
            Command::Fleet(cmd) => crate::fleet_cmd::run(cmd).await,
            Command::Sim(args) => {
                tokio::task::spawn_blocking(move || crate::sim_cmd::run(args)).await?
            }
            Command::Chat(args) => crate::chat::run(args).await,
            Command::Verify(cmd) => crate::verify_cmd::run(cmd).await,
            Command::Bench(BenchCommand::Engine(args)) => crate::bench::engine::run(args).await,
            Command::Bench(BenchCommand::E2e(args)) => crate::bench::e2e::run(args).await,
            Command::Bench(BenchCommand::Dispatch(args)) => crate::bench::dispatch::run(args).await,
            Command::Bench(BenchCommand::Trust(args)) => crate::bench::trust::run(args).await,
            Command::Bench(BenchCommand::Chaos(args)) => crate::bench::chaos::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
