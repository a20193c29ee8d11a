//! `tokenfleet bench trust`: trust measured like performance. Two figures decide whether
//! result verification can be deployed: how often it takes an honest vehicle out (it must
//! not), and how long a liar lasts.
//!
//! 1. **Honest fleet**: a coordinator with the verifier (every job checked, so that each one is
//!    a trial) and three real agents with different slot and thread counts, under concurrent
//!    OpenAI requests (greedy and sampled, streamed and not) while vehicles leave and come back
//!    (their jobs continue on another vehicle from their last token). Counts jobs, checks,
//!    false alarms the confirmation cleared, and false quarantines (must be 0).
//! 2. **Rare liars**: vehicles that run the real model and answer 1 % of their jobs with random
//!    tokens (texts made consistent), under the production spot-check rates (the floor derived
//!    from the detection goal). Each is counted until the coordinator quarantines it:
//!    `jobs_to_detect` over several liars. The circuit breaker is opened for this phase (every
//!    vehicle in it lies; the breaker would otherwise hold all but one for an operator, which
//!    is detection too, but not what is measured).
//! 3. **Other liars**, one at a time: forged text with honest ids, an upper-case model hash,
//!    another model behind the allowed hash, zero-token answers, truncated answers claiming
//!    `length`, samples for greedy requests, greedy answers for sampled ones: each detected or
//!    refused, and after how many of its jobs.

pub mod liar;
mod load;
pub mod perturb;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tokenfleet_agent::{Agent, AgentConfig, VehicleStatus};
use tokenfleet_coordinator::config::verification::VerificationConfig;
use tokenfleet_coordinator::config::ApiKey;
use tokenfleet_coordinator::CoordinatorConfig;
use tokenfleet_engine::{Engine, EngineConfig};

use crate::cli::EngineArgs;
use crate::serve::model_name_of;
use liar::{Liar, Lie};
use load::drive;

#[derive(Debug, Args)]
pub struct TrustArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Honest requests through the fleet of real agents.
    #[arg(long, default_value_t = 1000)]
    pub honest_jobs: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Rare liars to catch (each counted until quarantined).
    #[arg(long, default_value_t = 8)]
    pub liars: usize,
    /// The share of its jobs a rare liar lies on.
    #[arg(long, default_value_t = 0.01)]
    pub liar_rate: f64,
    /// Give up on the rare liars after this many of their jobs in all.
    #[arg(long, default_value_t = 12_000)]
    pub max_liar_jobs: u64,
    /// Skip phases (`honest`, `rare`, `others`), comma-separated.
    #[arg(long, default_value = "")]
    pub skip: String,
}

#[derive(Debug, Default, Serialize)]
pub struct HonestReport {
    pub honest_jobs: usize,
    pub answered: usize,
    pub failed_requests: usize,
    /// Why the failed requests failed (HTTP status and error code, or the client's error).
    pub failures: BTreeMap<String, usize>,
    pub agents: Vec<String>,
    pub handoffs: u64,
    pub checks_passed: f64,
    pub checks_inconclusive: f64,
    pub checks_failed: f64,
    pub checks_skipped: f64,
    pub false_alarms_cleared: f64,
    pub false_quarantines: f64,
    pub held_for_operator: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct RareReport {
    pub liar_rate: f64,
    pub min_rate: f64,
    pub liars: usize,
    pub detected: usize,
    pub jobs_to_detect: Vec<u64>,
    pub jobs_to_detect_p50: f64,
    pub jobs_to_detect_mean: f64,
    pub lies_told: u64,
}

#[derive(Debug, Serialize)]
pub struct LiarReport {
    pub liar: &'static str,
    pub detected: bool,
    /// "quarantined" or "refused at hello: ..."
    pub how: String,
    pub jobs_finished: u64,
    pub lies: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct TrustReport {
    pub model: String,
    #[serde(flatten)]
    pub honest: HonestReport,
    #[serde(flatten)]
    pub rare: RareReport,
    pub other_liars: Vec<LiarReport>,
    pub seconds: f64,
}

const KEY: &str = "bench-trust-key-0123456789";
const OPERATOR_KEY: &str = "bench-trust-operator-0123456789";

/// A coordinator for one phase.
struct Coordinator {
    base: String,
    grpc: String,
    client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tokenfleet_coordinator::CoordinatorError>>,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    async fn start(
        model: &std::path::Path,
        verification: VerificationConfig,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = CoordinatorConfig {
            http_addr: "127.0.0.1:0".parse()?,
            grpc_addr: "127.0.0.1:0".parse()?,
            db_path: dir.path().join("trust.db"),
            api_keys: vec![ApiKey {
                key: KEY.into(),
                tenant: "bench".into(),
            }],
            operator_key: Some(OPERATOR_KEY.into()),
            heartbeat_interval: Duration::from_millis(250),
            lease_timeout: Duration::from_millis(2000),
            verification: VerificationConfig {
                enabled: true,
                models: vec![model.to_path_buf()],
                queue_capacity: 8192,
                ..verification
            },
            ..Default::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokenfleet_coordinator::start(config, async move {
            let _ = stopped.await;
        })
        .await?;
        Ok(Self {
            base: format!("http://{}", running.bound.http),
            grpc: format!("http://{}", running.bound.grpc),
            client: reqwest::Client::new(),
            stop: Some(stop),
            task: running.task,
            _dir: dir,
        })
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .client
            .get(format!("{}/metrics", self.base))
            .bearer_auth(OPERATOR_KEY)
            .send()
            .await?
            .text()
            .await?)
    }

    /// Waits until the verifier has no job queued (bounded).
    async fn drain_verifier(&self) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let m = self.metrics().await?;
            if metric(&m, "tokenfleet_verification_queue_depth", "") <= 0.0
                || Instant::now() > deadline
            {
                return Ok(m);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

/// Sum of every sample of `name` whose labels contain `labels`.
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name))
        .filter(|l| matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{')))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0
}

async fn engine(model: &std::path::Path, slots: u32, threads: u32) -> anyhow::Result<Engine> {
    let mut ec = EngineConfig::new(model);
    ec.slots = slots;
    ec.ctx_per_slot = 1024;
    ec.threads = threads;
    ec.max_waiting = 64;
    Engine::load_async(ec).await.context("loading the model")
}

async fn wait_for_model(base: &str, model: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = client
            .get(format!("{base}/v1/models"))
            .bearer_auth(KEY)
            .send()
            .await
        {
            if r.text().await.unwrap_or_default().contains(model) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no vehicle announced {model} within 60 s")
}

async fn honest_phase(
    args: &TrustArgs,
    model_path: &std::path::Path,
    model: &str,
    sha: &str,
) -> anyhow::Result<HonestReport> {
    let coordinator = Coordinator::start(
        model_path,
        VerificationConfig {
            min_rate: Some(1.0),
            ..Default::default()
        },
    )
    .await?;
    let shapes = [(1u32, 1u32), (4, 1), (8, 2)];
    let mut agents = Vec::new();
    for (i, &(slots, threads)) in shapes.iter().enumerate() {
        let engine = engine(model_path, slots, threads).await?;
        agents.push(Agent::start(
            AgentConfig::new(coordinator.grpc.clone(), format!("honest-{i}"), model),
            engine,
            sha.to_string(),
            VehicleStatus::parked(),
        ));
    }
    wait_for_model(&coordinator.base, model).await?;
    // Hand-offs: every 15 s one vehicle leaves for 3 s (its jobs continue elsewhere).
    let statuses: Vec<_> = agents.iter().map(|a| a.status().clone()).collect();
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let churn = tokio::spawn(async move {
        let mut handoffs = 0u64;
        for k in 0.. {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(15)) => {}
                _ = done_rx.changed() => return handoffs,
            }
            let s = &statuses[k % statuses.len()];
            s.send_replace(VehicleStatus::departing("bench hand-off"));
            handoffs += 1;
            tokio::time::sleep(Duration::from_secs(3)).await;
            s.send_replace(VehicleStatus::parked());
        }
        handoffs
    });
    let (answered, failures) = drive(
        &coordinator.base,
        model,
        args.honest_jobs,
        args.concurrency,
        0,
        |i| [16, 32, 48, 24][i % 4],
    )
    .await;
    let _ = done_tx.send(true);
    let handoffs = churn.await.unwrap_or(0);
    let m = coordinator.drain_verifier().await?;
    let report = HonestReport {
        honest_jobs: args.honest_jobs,
        answered,
        failed_requests: args.honest_jobs - answered,
        failures,
        agents: shapes
            .iter()
            .map(|(s, t)| format!("{s} slots / {t} threads"))
            .collect(),
        handoffs,
        checks_passed: metric(
            &m,
            "tokenfleet_verification_checks_total",
            "result=\"pass\"",
        ),
        checks_inconclusive: metric(
            &m,
            "tokenfleet_verification_checks_total",
            "result=\"inconclusive\"",
        ),
        checks_failed: metric(
            &m,
            "tokenfleet_verification_checks_total",
            "result=\"fail\"",
        ),
        checks_skipped: metric(&m, "tokenfleet_verification_skipped_total", ""),
        false_alarms_cleared: metric(&m, "tokenfleet_verification_false_alarms_total", ""),
        false_quarantines: metric(&m, "tokenfleet_quarantined_nodes", ""),
        held_for_operator: metric(&m, "tokenfleet_verification_held_nodes", ""),
    };
    for a in agents {
        a.stop().await;
    }
    coordinator.stop().await;
    Ok(report)
}

async fn rare_phase(
    args: &TrustArgs,
    model_path: &std::path::Path,
    model: &str,
    sha: &str,
) -> anyhow::Result<RareReport> {
    let verification = VerificationConfig {
        breaker_max_share: 1.0,
        ..Default::default()
    };
    let min_rate = verification.min_rate();
    let coordinator = Coordinator::start(model_path, verification).await?;
    let shared = engine(model_path, 8, 2).await?;
    // Four liars at a time; each detected one is replaced by a fresh one until enough were
    // caught or the job budget is spent.
    let parallel = 4.min(args.liars.max(1));
    let mut started = 0usize;
    let mut live: Vec<Liar> = Vec::new();
    let mut report = RareReport {
        liar_rate: args.liar_rate,
        min_rate,
        liars: args.liars,
        ..Default::default()
    };
    let spawn = |n: usize| {
        Liar::start(
            coordinator.grpc.clone(),
            format!("rare-liar-{n}"),
            model.to_string(),
            sha.to_string(),
            shared.clone(),
            4,
            Lie::Rare(args.liar_rate),
            0x5EED ^ n as u64,
        )
    };
    while live.len() < parallel {
        live.push(spawn(started));
        started += 1;
    }
    wait_for_model(&coordinator.base, model).await?;
    let mut offset = 0;
    let total = |live: &[Liar], retired: u64| {
        retired
            + live
                .iter()
                .map(|l| l.stats.finished.load(Ordering::SeqCst))
                .sum::<u64>()
    };
    let mut retired_jobs = 0u64;
    while report.detected < args.liars && total(&live, retired_jobs) < args.max_liar_jobs {
        drive(
            &coordinator.base,
            model,
            64,
            args.concurrency,
            100_000 + offset,
            |_| 8,
        )
        .await;
        offset += 64;
        // Replace the detected (give the coordinator a moment to drain them first).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut keep = Vec::new();
        for l in live.drain(..) {
            if l.stats.detected.load(Ordering::SeqCst) {
                report.detected += 1;
                report
                    .jobs_to_detect
                    .push(l.stats.finished_at_detection.load(Ordering::SeqCst));
                report.lies_told += l.stats.lies.load(Ordering::SeqCst);
                retired_jobs += l.stats.finished.load(Ordering::SeqCst);
            } else {
                keep.push(l);
            }
        }
        live = keep;
        while live.len() < parallel && started < args.liars + parallel {
            live.push(spawn(started));
            started += 1;
        }
        eprintln!(
            "rare liars: {} caught, {} jobs so far",
            report.detected,
            total(&live, retired_jobs)
        );
    }
    let mut sorted = report.jobs_to_detect.clone();
    sorted.sort_unstable();
    let values: Vec<f64> = sorted.iter().map(|&v| v as f64).collect();
    report.jobs_to_detect_p50 = super::median(&values);
    report.jobs_to_detect_mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    drop(live);
    coordinator.stop().await;
    Ok(report)
}

async fn other_liars(
    model_path: &std::path::Path,
    model: &str,
    sha: &str,
) -> anyhow::Result<Vec<LiarReport>> {
    let dir = tempfile::tempdir()?;
    let perturbed = dir.path().join("perturbed.gguf");
    {
        let (src, dst) = (model_path.to_path_buf(), perturbed.clone());
        tokio::task::spawn_blocking(move || perturb::perturbed_copy(&src, &dst, 0.3, 7)).await??;
    }
    let honest_engine = engine(model_path, 4, 2).await?;
    let wrong_engine = engine(&perturbed, 4, 2).await?;
    let lies = [
        Lie::ForgedText,
        Lie::UpperCaseHash,
        Lie::WrongModel,
        Lie::ZeroTokens,
        Lie::TruncatedLength,
        Lie::WrongTemperature,
        Lie::GreedyOnSampled,
    ];
    let mut out = Vec::new();
    for (n, lie) in lies.into_iter().enumerate() {
        // A fresh coordinator each: the liar is the only vehicle, and every job it finishes
        // meets the production spot-check rates of a new vehicle.
        let coordinator = Coordinator::start(
            model_path,
            VerificationConfig {
                breaker_max_share: 1.0,
                ..Default::default()
            },
        )
        .await?;
        let engine = if lie == Lie::WrongModel {
            wrong_engine.clone()
        } else {
            honest_engine.clone()
        };
        let liar = Liar::start(
            coordinator.grpc.clone(),
            format!("liar-{}", lie.name()),
            model.to_string(),
            sha.to_string(),
            engine,
            4,
            lie,
            n as u64,
        );
        let visible = wait_for_model(&coordinator.base, model).await.is_ok();
        let mut offset = 200_000 + 1000 * n;
        let deadline = Instant::now() + Duration::from_secs(180);
        while visible
            && !liar.stats.detected.load(Ordering::SeqCst)
            && liar.stats.finished.load(Ordering::SeqCst) < 60
            && Instant::now() < deadline
        {
            drive(&coordinator.base, model, 4, 4, offset, |_| 48).await;
            offset += 4;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let refused = liar.stats.refused.load(Ordering::SeqCst);
        let detected = liar.stats.detected.load(Ordering::SeqCst);
        let refusal = liar
            .stats
            .refusal
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        out.push(LiarReport {
            liar: lie.name(),
            detected: detected || refused,
            how: if detected {
                "quarantined".into()
            } else if refused {
                format!("refused at hello: {refusal}")
            } else {
                "not detected".into()
            },
            jobs_finished: if detected {
                liar.stats.finished_at_detection.load(Ordering::SeqCst)
            } else {
                liar.stats.finished.load(Ordering::SeqCst)
            },
            lies: liar.stats.lies.load(Ordering::SeqCst),
        });
        eprintln!(
            "{}: {}",
            lie.name(),
            out.last().map(|r| r.how.as_str()).unwrap_or("")
        );
        drop(liar);
        coordinator.stop().await;
    }
    Ok(out)
}

pub async fn run(args: TrustArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let model_path: PathBuf = args.engine.model.clone();
    let model = model_name_of(&model_path);
    let sha = super::model_sha256(&model_path).await?;
    let skip: Vec<&str> = args.skip.split(',').map(str::trim).collect();
    let mut report = TrustReport {
        model: model.clone(),
        ..Default::default()
    };
    if !skip.contains(&"honest") {
        report.honest = honest_phase(&args, &model_path, &model, &sha).await?;
        eprintln!("honest phase: {:?}", report.honest);
    }
    if !skip.contains(&"rare") {
        report.rare = rare_phase(&args, &model_path, &model, &sha).await?;
        eprintln!("rare liars: {:?}", report.rare);
    }
    if !skip.contains(&"others") {
        report.other_liars = other_liars(&model_path, &model, &sha).await?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let h = &report.honest;
        println!("honest: {} jobs ({} answered, failures {:?}) on {:?}, {} hand-offs: checks pass {} / inconclusive {} / fail {}, false alarms cleared {}, false quarantines {}, held {}",
            h.honest_jobs, h.answered, h.failures, h.agents, h.handoffs, h.checks_passed, h.checks_inconclusive, h.checks_failed, h.false_alarms_cleared, h.false_quarantines, h.held_for_operator);
        let r = &report.rare;
        println!("rare liars ({} of jobs, spot-check floor {:.2}): {} of {} caught, jobs to detect p50 {} mean {:.0} ({:?})",
            r.liar_rate, r.min_rate, r.detected, r.liars, r.jobs_to_detect_p50, r.jobs_to_detect_mean, r.jobs_to_detect);
        for l in &report.other_liars {
            println!(
                "{:<34} detected {:<5} after {:>3} jobs ({} lies): {}",
                l.liar, l.detected, l.jobs_finished, l.lies, l.how
            );
        }
    }
    Ok(())
}
