//! `tokenfleet verify calibrate`: measures how far honest work lands from the verifier's
//! re-score, across the engine configurations a fleet runs, and derives the verifier's
//! thresholds for a stated false-positive rate per job.
//!
//! Honest jobs (greedy and sampled, short and long prompts, 8 to 64 new tokens, some resumed
//! after a hand-off from another configuration) run on engines of 1, 4 and 8 slots, 1 and 2
//! threads, three context sizes and 1 to 8 concurrent sequences; then the verifier's own
//! configuration (one slot, `--verifier-threads`, `--verifier-ctx`) re-scores every job as it
//! would in production. The measured distributions go to
//! `tokenfleet_coordinator::trust::verify::calibrate::derive`; the derived thresholds are then
//! applied to the same honest jobs, as the verifier would (per job, in each configuration's
//! window, failures confirmed token by token), and `honest_failures` counts what still fails.
//!
//! An operator recalibrates for another model or backend by running this on the vehicles'
//! hardware class and the coordinator's verifier, then pointing `[verification] calibration`
//! at the JSON it prints.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde::Serialize;
use tokenfleet_coordinator::config::verification::Thresholds;
use tokenfleet_coordinator::trust::verify::calibrate::{derive, Derivation, HonestSample};
use tokenfleet_coordinator::trust::verify::check::{self, Claims, Finding, NodeWindow, Segment};
use tokenfleet_engine::{
    ChatMessage, Engine, EngineConfig, GenerationRequest, PromptInput, SamplingParams, ScoreMode,
    ScoreRequest, ScoreResult,
};

#[derive(Debug, Subcommand)]
pub enum VerifyCommand {
    /// Derive the verifier's thresholds from honest jobs (prints a report; `--json` for the
    /// file `[verification] calibration` reads).
    Calibrate(CalibrateArgs),
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The GGUF model to calibrate for.
    #[arg(long, env = "TOKENFLEET_MODEL", default_value_os_t = crate::cli::default_model_path())]
    pub model: PathBuf,
    /// Honest jobs to run (spread over the configurations).
    #[arg(long, default_value_t = 2000)]
    pub jobs: usize,
    /// Target probability that an honest job fails verification.
    #[arg(long, default_value_t = 1e-6)]
    pub false_positive_rate: f64,
    /// Longest job (positions) the limits must hold for.
    #[arg(long, default_value_t = 2048)]
    pub max_job_tokens: usize,
    /// The verifier's engine, as the coordinator runs it.
    #[arg(long, default_value_t = 1)]
    pub verifier_threads: u32,
    #[arg(long, default_value_t = 4096)]
    pub verifier_ctx: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

/// One engine configuration honest vehicles run.
#[derive(Debug, Clone, Copy, Serialize)]
struct Config {
    slots: u32,
    threads: u32,
    ctx_per_slot: u32,
    concurrency: usize,
}

const CONFIGS: [Config; 6] = [
    Config {
        slots: 1,
        threads: 1,
        ctx_per_slot: 2048,
        concurrency: 1,
    },
    Config {
        slots: 1,
        threads: 2,
        ctx_per_slot: 4096,
        concurrency: 1,
    },
    Config {
        slots: 4,
        threads: 2,
        ctx_per_slot: 2048,
        concurrency: 4,
    },
    Config {
        slots: 4,
        threads: 1,
        ctx_per_slot: 1024,
        concurrency: 2,
    },
    Config {
        slots: 8,
        threads: 2,
        ctx_per_slot: 2048,
        concurrency: 8,
    },
    Config {
        slots: 8,
        threads: 1,
        ctx_per_slot: 1024,
        concurrency: 5,
    },
];

/// An honest job as the verifier sees it.
#[derive(Debug, Clone)]
struct HonestJob {
    config: usize,
    prompt: Vec<i32>,
    tokens: Vec<i32>,
    logprobs: Vec<f32>,
    sampling: SamplingParams,
    ended_on_eog: bool,
    resumed: bool,
}

#[derive(Debug, Serialize)]
struct ConfigReport {
    #[serde(flatten)]
    config: Config,
    jobs: usize,
    tokens: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    honest_jobs: usize,
    greedy_jobs: usize,
    sampled_jobs: usize,
    resumed_jobs: usize,
    tokens: usize,
    configs: usize,
    engine_configs: Vec<ConfigReport>,
    verifier: Config,
    false_positive_rate_target: f64,
    max_job_tokens: usize,
    thresholds: Thresholds,
    derivation: Derivation,
    /// Honest jobs failing the derived thresholds on the fast path (before confirmation).
    fast_path_failures: usize,
    /// Honest jobs still failing after the token-by-token confirmation (must be 0).
    honest_failures: usize,
    seconds: f64,
}

pub async fn run(cmd: VerifyCommand) -> anyhow::Result<()> {
    match cmd {
        VerifyCommand::Calibrate(args) => calibrate(args).await,
    }
}

async fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.jobs >= CONFIGS.len(),
        "--jobs must be at least {}",
        CONFIGS.len()
    );
    let started = Instant::now();
    let mut jobs: Vec<HonestJob> = Vec::with_capacity(args.jobs);
    let per_config = args.jobs.div_ceil(CONFIGS.len());
    for (ci, config) in CONFIGS.iter().enumerate() {
        let engine = load(
            &args.model,
            config.slots,
            config.ctx_per_slot,
            config.threads,
        )
        .await?;
        let previous: Vec<HonestJob> = jobs
            .iter()
            .filter(|j| j.config + 1 == ci)
            .cloned()
            .collect();
        let first = ci * per_config;
        let count = per_config.min(args.jobs - first.min(args.jobs));
        let specs: Vec<usize> = (first..first + count).collect();
        let done: Vec<anyhow::Result<HonestJob>> = futures::stream::iter(specs)
            .map(|k| {
                let engine = engine.clone();
                // Every 8th job continues one of the previous configuration's jobs (a hand-off).
                let handoff = (k % 8 == 7)
                    .then(|| previous.get(k % previous.len().max(1)).cloned())
                    .flatten();
                async move { honest_job(&engine, ci, k, args.seed, handoff).await }
            })
            .buffer_unordered(config.concurrency)
            .collect()
            .await;
        for job in done {
            jobs.push(job?);
        }
        eprintln!(
            "config {ci} ({config:?}): {count} jobs, {:.0} s so far",
            started.elapsed().as_secs_f64()
        );
    }

    let verifier = Config {
        slots: 1,
        threads: args.verifier_threads,
        ctx_per_slot: args.verifier_ctx,
        concurrency: 1,
    };
    let trusted = load(&args.model, 1, args.verifier_ctx, args.verifier_threads).await?;
    let mut scores = Vec::with_capacity(jobs.len());
    for job in &jobs {
        scores.push(score(&trusted, job, ScoreMode::Prefill).await?);
    }
    eprintln!(
        "re-scored {} jobs, {:.0} s so far",
        jobs.len(),
        started.elapsed().as_secs_f64()
    );

    let probe = Thresholds::default();
    let mut sample = HonestSample::default();
    for (job, s) in jobs.iter().zip(&scores) {
        for (i, t) in s.tokens.iter().enumerate() {
            sample
                .logprob_errors
                .push((job.logprobs[i] - t.logprob).abs());
        }
        if job.sampling.is_greedy() {
            let mut gaps: Vec<f32> = s.tokens.iter().map(|t| t.gap()).collect();
            if job.ended_on_eog {
                gaps.push((s.next.argmax_logprob - s.next.best_eog_logprob).max(0.0));
            }
            sample.greedy_job_lengths.push(gaps.len());
            sample.greedy_gaps.extend(gaps);
        } else {
            let e = check::evidence(s, &whole(job), &claims(job), &probe);
            if e.sampled.tokens >= probe.min_sampled_tokens {
                sample.sampled_z.push(e.sampled.z());
            }
        }
    }
    let (thresholds, derivation) = derive(&sample, args.false_positive_rate, args.max_job_tokens);

    // The derived thresholds on the same honest work, as the verifier applies them: per job,
    // in each configuration's window (a vehicle), failures confirmed token by token.
    let mut windows: Vec<NodeWindow> = vec![NodeWindow::default(); CONFIGS.len()];
    let (mut fast_failures, mut honest_failures) = (0, 0);
    for (job, s) in jobs.iter().zip(&scores) {
        let window = &mut windows[job.config];
        let e = check::evidence(s, &whole(job), &claims(job), &thresholds);
        let kept = match failure(&e, window, &thresholds) {
            None => e,
            Some(why) => {
                fast_failures += 1;
                let slow = score(&trusted, job, ScoreMode::Stepwise).await?;
                let merged = tokenfleet_coordinator::trust::verify::merge_scores(s, &slow);
                let confirmed = check::evidence(&merged, &whole(job), &claims(job), &thresholds);
                if let Some(again) = failure(&confirmed, window, &thresholds) {
                    honest_failures += 1;
                    eprintln!("honest job failed: {why}; confirmed: {again}");
                }
                confirmed
            }
        };
        window.push(&kept, &thresholds);
    }

    let report = Report {
        model: args.model.display().to_string(),
        honest_jobs: jobs.len(),
        greedy_jobs: jobs.iter().filter(|j| j.sampling.is_greedy()).count(),
        sampled_jobs: jobs.iter().filter(|j| !j.sampling.is_greedy()).count(),
        resumed_jobs: jobs.iter().filter(|j| j.resumed).count(),
        tokens: jobs.iter().map(|j| j.tokens.len()).sum(),
        configs: CONFIGS.len(),
        engine_configs: CONFIGS
            .iter()
            .enumerate()
            .map(|(ci, c)| ConfigReport {
                config: *c,
                jobs: jobs.iter().filter(|j| j.config == ci).count(),
                tokens: jobs
                    .iter()
                    .filter(|j| j.config == ci)
                    .map(|j| j.tokens.len())
                    .sum(),
            })
            .collect(),
        verifier,
        false_positive_rate_target: args.false_positive_rate,
        max_job_tokens: args.max_job_tokens,
        thresholds,
        derivation,
        fast_path_failures: fast_failures,
        honest_failures,
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let d = &report.derivation;
        println!(
            "honest jobs {} ({} greedy, {} sampled, {} resumed) on {} configurations, {} tokens",
            report.honest_jobs,
            report.greedy_jobs,
            report.sampled_jobs,
            report.resumed_jobs,
            report.configs,
            report.tokens
        );
        println!("greedy gap (nats): p50 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}, {:.1} % not the re-scored argmax",
            d.greedy_gap.p50, d.greedy_gap.p99, d.greedy_gap.p999, d.greedy_gap.max, 100.0 * d.greedy_gap.nonzero_frac);
        println!("logprob error (nats): p99 {:.3} max {:.3}; sampled |z|: p99 {:.2} max {:.2} (std {:.2})",
            d.logprob_error.p99, d.logprob_error.max, d.sampled_z.p99, d.sampled_z.max, d.sampled_z_std);
        println!(
            "thresholds at {:e} per job: {:?}",
            report.false_positive_rate_target, report.thresholds
        );
        println!(
            "honest jobs failing: {} on the fast path, {} after confirmation",
            report.fast_path_failures, report.honest_failures
        );
    }
    Ok(())
}

fn whole(job: &HonestJob) -> Segment {
    Segment {
        node: String::new(),
        start: 0,
        end: job.tokens.len(),
    }
}

fn claims(job: &HonestJob) -> Claims<'_> {
    Claims {
        tokens: &job.tokens,
        logprobs: &job.logprobs,
        ended_on_eog: job.ended_on_eog,
        sampling: &job.sampling,
    }
}

fn failure(e: &check::Evidence, window: &NodeWindow, th: &Thresholds) -> Option<String> {
    match check::judge(e, th) {
        Finding::Fail(why) => Some(why),
        _ => match window.judge_with(e, th) {
            Finding::Fail(why) => Some(why),
            _ => None,
        },
    }
}

async fn load(
    model: &std::path::Path,
    slots: u32,
    ctx: u32,
    threads: u32,
) -> anyhow::Result<Engine> {
    let mut ec = EngineConfig::new(model);
    ec.slots = slots;
    ec.ctx_per_slot = ctx;
    ec.threads = threads;
    ec.max_waiting = 64;
    Engine::load_async(ec)
        .await
        .with_context(|| format!("loading {}", model.display()))
}

async fn score(engine: &Engine, job: &HonestJob, mode: ScoreMode) -> anyhow::Result<ScoreResult> {
    Ok(engine
        .score(ScoreRequest {
            prompt: job.prompt.clone(),
            claimed: job.tokens.clone(),
            sampling: job.sampling.clone(),
            mode,
        })
        .await?)
}

/// Job `k` of the calibration: its prompt, decoding mode and length follow from `k`.
async fn honest_job(
    engine: &Engine,
    config: usize,
    k: usize,
    seed: u64,
    handoff: Option<HonestJob>,
) -> anyhow::Result<HonestJob> {
    let (prompt, sampling, resume, resume_logprobs, max_tokens) = match handoff {
        // Continue another configuration's job from half its tokens, same seed (a vehicle
        // taking over from one that left).
        Some(prev) if prev.tokens.len() >= 2 => {
            let half = prev.tokens.len() / 2;
            let max = (prev.tokens.len() - half) as u32 + 16;
            (
                prev.prompt,
                prev.sampling,
                prev.tokens[..half].to_vec(),
                prev.logprobs[..half].to_vec(),
                max,
            )
        }
        _ => {
            let prompt = engine.prompt_tokens(&PromptInput::Chat(vec![ChatMessage::new(
                "user",
                prompt_text(k),
            )]))?;
            let sampling = if k % 2 == 0 {
                SamplingParams::default()
            } else {
                SamplingParams {
                    temperature: [0.6, 0.8, 1.0, 1.2][(k / 2) % 4],
                    top_p: [1.0, 0.95, 0.9][k % 3],
                    top_k: 0,
                    seed: seed ^ k as u64,
                }
            };
            let max = [8, 16, 32, 64][(k / 2) % 4];
            (prompt, sampling, Vec::new(), Vec::new(), max)
        }
    };
    let resumed = !resume.is_empty();
    let completion = engine
        .generate(GenerationRequest {
            prompt: prompt.clone(),
            resume: resume.clone(),
            max_tokens,
            sampling: sampling.clone(),
            stop: Vec::new(),
            logprobs: true,
            top_logprobs: 0,
            ignore_eos: false,
            interactive: false,
        })?
        .collect()
        .await?;
    let ended_on_eog = completion
        .finished
        .as_ref()
        .is_some_and(|f| f.reason == tokenfleet_engine::FinishReason::Stop);
    let mut tokens = resume;
    tokens.extend(&completion.tokens);
    let mut logprobs = resume_logprobs;
    logprobs.extend(&completion.logprobs);
    Ok(HonestJob {
        config,
        prompt,
        tokens,
        logprobs,
        sampling,
        ended_on_eog,
        resumed,
    })
}

/// Varied prompts: questions, instructions, and passages to summarize (150-400 tokens).
fn prompt_text(k: usize) -> String {
    const TOPICS: [&str; 24] = [
        "photosynthesis",
        "the French revolution",
        "electric cars",
        "black holes",
        "tea",
        "the immune system",
        "volcanoes",
        "prime numbers",
        "jazz",
        "the Roman empire",
        "batteries",
        "bees",
        "the internet",
        "glaciers",
        "chess",
        "vaccines",
        "rainbows",
        "the printing press",
        "octopuses",
        "solar panels",
        "bread",
        "earthquakes",
        "Mars",
        "parking lots",
    ];
    const FORMS: [&str; 8] = [
        "Explain {} to a ten-year-old.",
        "Write a short poem about {}.",
        "List three surprising facts about {}.",
        "What are the pros and cons of {}?",
        "Write a haiku about {}.",
        "Describe the history of {} in two sentences.",
        "Give me a quiz question about {} and its answer.",
        "Why does {} matter today?",
    ];
    let topic = TOPICS[k % TOPICS.len()];
    if k % 10 == 9 {
        // A long passage: sentences about several topics, then an instruction.
        let n = 4 + k % 8;
        let mut text = String::new();
        for i in 0..n {
            let t = TOPICS[(k + 7 * i) % TOPICS.len()];
            text.push_str(&format!(
                "Paragraph {i}: people have studied {t} for a long time, and much of what we know about {t} came from careful observation, patient experiments and arguments between experts. "
            ));
        }
        text.push_str("Summarize the text above in one sentence.");
        text
    } else {
        FORMS[(k / TOPICS.len()) % FORMS.len()].replace("{}", topic)
    }
}
