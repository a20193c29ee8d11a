//! `tokenfleet bench e2e`: the whole path (OpenAI API → coordinator → gRPC → agent → engine)
//! against llama-server serving the same model directly, in one run, with one and eight
//! concurrent streaming clients. The same client code drives both (only the OpenAI streaming
//! format), so the difference is what tokenfleet adds: validation, the job store, dispatch, the
//! agent session and token relaying.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tokenfleet_agent::{Agent, AgentConfig, VehicleStatus};
use tokenfleet_coordinator::config::ApiKey;
use tokenfleet_coordinator::CoordinatorConfig;
use tokenfleet_engine::{Engine, EngineConfig};

use super::median;
use super::reference::{self, StreamStats};
use crate::cli::{default_cache_dir, EngineArgs};
use crate::serve::model_name_of;

#[derive(Debug, Args)]
pub struct E2eArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Sequential requests of the single client (TTFT sample size).
    #[arg(long, default_value_t = 10)]
    pub requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    pub n_gen: u32,
    #[arg(long, env = "TOKENFLEET_CACHE", default_value_os_t = default_cache_dir())]
    pub cache_dir: PathBuf,
    /// Instead of the llama-server comparison: interactive TTFT alone and while a batch
    /// (`--batch-requests` requests of `--n-gen` tokens) fills the vehicle.
    #[arg(long)]
    pub with_batch: bool,
    #[arg(long, default_value_t = 400)]
    pub batch_requests: usize,
}

#[derive(Debug, Serialize)]
pub struct E2eReport {
    pub model: String,
    pub threads: u32,
    pub ttft_p50_ms: f64,
    pub ref_ttft_p50_ms: f64,
    pub ttft_ratio: f64,
    pub tps_1: f64,
    pub ref_tps_1: f64,
    pub tps_8: f64,
    pub ref_tps_8: f64,
    pub tps_ratio_8: f64,
    pub ttft_p50_ms_8: f64,
    pub ref_ttft_p50_ms_8: f64,
}

pub(super) const PROMPT: &str =
    "Write a short story about an electric car that earns money while parked.";
const KEY: &str = "bench-e2e-key-0123456789";
/// Reads the coordinator's `/metrics`.
pub const OPERATOR_KEY: &str = "bench-e2e-operator-0123456789";

struct Measured {
    one: StreamStats,
    eight: StreamStats,
}

async fn measure(
    base: &str,
    key: Option<&str>,
    model: &str,
    args: &E2eArgs,
) -> anyhow::Result<Measured> {
    // Warm-up (page cache, first allocations), not measured.
    reference::drive_openai_streams(base, key, model, PROMPT, 1, 1, 8).await?;
    let one =
        reference::drive_openai_streams(base, key, model, PROMPT, 1, args.requests, args.n_gen)
            .await?;
    let eight = reference::drive_openai_streams(base, key, model, PROMPT, 8, 2, args.n_gen).await?;
    Ok(Measured { one, eight })
}

/// Our side of the comparison: a coordinator and one agent with 8 slots, in this process.
pub(super) struct OursFleet {
    pub base: String,
    pub key: &'static str,
    agent: Agent,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tokenfleet_coordinator::CoordinatorError>>,
    _dir: tempfile::TempDir,
}

impl OursFleet {
    pub async fn start(
        model_path: &std::path::Path,
        model: &str,
        threads: u32,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = CoordinatorConfig {
            http_addr: "127.0.0.1:0".parse()?,
            grpc_addr: "127.0.0.1:0".parse()?,
            db_path: dir.path().join("bench.db"),
            api_keys: vec![ApiKey {
                key: KEY.into(),
                tenant: "bench".into(),
            }],
            operator_key: Some(OPERATOR_KEY.into()),
            ..Default::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokenfleet_coordinator::start(config, async move {
            let _ = stopped.await;
        })
        .await?;
        let mut ec = EngineConfig::new(model_path);
        ec.slots = 8;
        ec.ctx_per_slot = 512;
        ec.threads = threads;
        let engine = Engine::load_async(ec).await?;
        let agent = Agent::start(
            AgentConfig::new(
                format!("http://{}", running.bound.grpc),
                "bench-vehicle",
                model,
            ),
            engine,
            super::model_sha256(model_path).await?,
            VehicleStatus::parked(),
        );
        let base = format!("http://{}", running.bound.http);
        wait_for_model(&base, model).await?;
        Ok(Self {
            base,
            key: KEY,
            agent,
            stop,
            task: running.task,
            _dir: dir,
        })
    }

    pub async fn stop(self) {
        self.agent.stop().await;
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

pub async fn run(args: E2eArgs) -> anyhow::Result<()> {
    let threads = args.engine.threads.unwrap_or(2);
    let model_path = args.engine.model.clone();
    let model = model_name_of(&model_path);
    if args.with_batch {
        return super::e2e_batch::run(&args, &model_path, &model, threads).await;
    }
    let tools = {
        let cache = args.cache_dir.clone();
        tokio::task::spawn_blocking(move || reference::ensure_reference_tools(&cache)).await??
    };

    let fleet = OursFleet::start(&model_path, &model, threads).await?;
    let ours = measure(&fleet.base, Some(KEY), &model, &args)
        .await
        .context("measuring tokenfleet")?;
    fleet.stop().await;

    // Reference: llama-server, same model, threads and slots.
    let server = reference::start_llama_server(&tools, &model_path, threads, 8, 512).await?;
    let theirs = measure(&server.base_url, None, "model", &args)
        .await
        .context("measuring llama-server")?;
    drop(server);

    let report = E2eReport {
        model: model_path.display().to_string(),
        threads,
        ttft_p50_ms: median(&ours.one.ttft_ms),
        ref_ttft_p50_ms: median(&theirs.one.ttft_ms),
        ttft_ratio: median(&ours.one.ttft_ms) / median(&theirs.one.ttft_ms),
        tps_1: ours.one.tokens_per_s(),
        ref_tps_1: theirs.one.tokens_per_s(),
        tps_8: ours.eight.tokens_per_s(),
        ref_tps_8: theirs.eight.tokens_per_s(),
        tps_ratio_8: ours.eight.tokens_per_s() / theirs.eight.tokens_per_s(),
        ttft_p50_ms_8: median(&ours.eight.ttft_ms),
        ref_ttft_p50_ms_8: median(&theirs.eight.ttft_ms),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model {}  threads {}  (llama-server: --parallel 8, prompt cache off)",
            report.model, threads
        );
        println!(
            "{:<36} {:>10} {:>12} {:>7}",
            "", "tokenfleet", "llama-server", "ratio"
        );
        let row = |n: &str, a: f64, b: f64| println!("{n:<36} {a:>10.1} {b:>12.1} {:>7.3}", a / b);
        row(
            "TTFT p50 ms, 1 client",
            report.ttft_p50_ms,
            report.ref_ttft_p50_ms,
        );
        row("tok/s, 1 client", report.tps_1, report.ref_tps_1);
        row(
            "TTFT p50 ms, 8 clients",
            report.ttft_p50_ms_8,
            report.ref_ttft_p50_ms_8,
        );
        row("tok/s aggregate, 8 clients", report.tps_8, report.ref_tps_8);
    }
    Ok(())
}

async fn wait_for_model(base: &str, model: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(resp) = client
            .get(format!("{base}/v1/models"))
            .bearer_auth(KEY)
            .send()
            .await
        {
            if resp.text().await.unwrap_or_default().contains(model) {
                return Ok(());
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the agent did not register within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
