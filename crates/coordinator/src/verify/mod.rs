//! Result verification: a trusted engine on the coordinator re-scores a fraction of finished
//! jobs, off the request path, and judges whether each node's tokens came from the model it
//! claims to serve.
//!
//! The manager offers a finished job ([`VerifyJob`]) when the spot-check draw for its nodes
//! says so (see [`crate::reputation`] for the adaptive rate). The offer goes into a bounded
//! queue (a full queue drops the check and counts it; clients are never delayed). One task
//! takes jobs from the queue, renders and tokenizes the prompt exactly as an agent does,
//! teacher-forces the claimed tokens through the trusted engine of the model the nodes
//! claimed (keyed by the GGUF's sha256), and sends the manager a [`Report`] per job: a
//! finding per node segment ([`check`]). The manager applies it to the node's reputation and
//! quarantines a node that fails (`manager::verdicts`).
//!
//! Layout: this file (config, trusted models, the verifier task, metrics); [`check`] (the
//! statistical rules, pure).

pub mod check;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use serde::{Deserialize, Serialize};
use tokenfleet_engine::{ChatMessage, Engine, EngineConfig, SamplingParams, ScoreRequest};
use tokio::sync::mpsc;

use crate::manager::Manager;
use crate::metrics::Metrics;
use crate::model_binding::Sha256Hex;
use crate::reputation::{RatePolicy, Reputation};
use crate::validation::Prompt;
use check::{SampledEvidence, Segment, Thresholds};

/// `[verification]` in the coordinator's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerificationConfig {
    pub enabled: bool,
    /// GGUF files the verifier trusts. Each is identified by its sha256 (computed at start);
    /// a job is verified against the file whose sha256 its nodes claimed in Hello.
    pub models: Vec<PathBuf>,
    /// Spot-check rate of a node with a long good record (the steady-state fraction).
    pub min_rate: f64,
    /// Spot-check rate of a node with no verified work.
    pub new_node_rate: f64,
    /// Jobs verified good over which a node's rate falls to half of `new_node_rate`.
    pub decay_jobs: u32,
    /// Greedy jobs: how far (nats) a claimed token may be below the argmax.
    pub greedy_tolerance_nats: f32,
    /// Sampled jobs: probability that an honest node is ever failed by the likelihood test
    /// over its whole life (alpha, spent over repeated looks).
    pub sampled_false_positive_rate: f64,
    /// Sampled jobs: informative tokens a node needs before its likelihood test is judged.
    pub min_sampled_tokens: u64,
    /// Jobs waiting for the verifier beyond which spot checks are dropped (and counted).
    pub queue_capacity: usize,
    /// A quarantined node's finished jobs this recent that were not verified good are re-run.
    pub rerun_window_s: u64,
    /// Context of the trusted engine (prompt + output); longer jobs are not verified.
    pub ctx_tokens: u32,
    /// CPU threads of the trusted engine.
    pub threads: u32,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            models: Vec::new(),
            min_rate: 0.05,
            new_node_rate: 1.0,
            decay_jobs: 10,
            greedy_tolerance_nats: 0.25,
            sampled_false_positive_rate: 1e-6,
            min_sampled_tokens: 32,
            queue_capacity: 64,
            rerun_window_s: 3600,
            ctx_tokens: 4096,
            threads: 1,
        }
    }
}

impl VerificationConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.models.is_empty() {
            return Err("verification.models must list at least one trusted GGUF".into());
        }
        let rate = |r: f64| (0.0..=1.0).contains(&r);
        if !rate(self.min_rate) || !rate(self.new_node_rate) || self.min_rate > self.new_node_rate {
            return Err(
                "verification rates must satisfy 0 <= min_rate <= new_node_rate <= 1".into(),
            );
        }
        if !(self.sampled_false_positive_rate > 0.0 && self.sampled_false_positive_rate < 1.0) {
            return Err("verification.sampled_false_positive_rate must be in (0, 1)".into());
        }
        if self.greedy_tolerance_nats.is_nan() || self.greedy_tolerance_nats < 0.0 {
            return Err("verification.greedy_tolerance_nats must be >= 0".into());
        }
        if self.queue_capacity == 0 || self.threads == 0 || self.ctx_tokens < 16 {
            return Err(
                "verification.queue_capacity, threads must be > 0 and ctx_tokens >= 16".into(),
            );
        }
        Ok(())
    }

    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            greedy_tolerance_nats: self.greedy_tolerance_nats,
            sampled_false_positive_rate: self.sampled_false_positive_rate,
            min_sampled_tokens: self.min_sampled_tokens,
            top_p_slack: 0.02,
        }
    }

    pub fn rates(&self) -> RatePolicy {
        RatePolicy {
            min_rate: self.min_rate,
            new_node_rate: self.new_node_rate,
            decay_jobs: self.decay_jobs,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the verifier could not start: {0}")]
    Start(String),
    #[error("trusted model {path}: {source}")]
    Model {
        path: PathBuf,
        source: tokenfleet_engine::EngineError,
    },
}

/// The trusted engines, by the sha256 of their GGUF.
pub struct TrustedModels {
    engines: HashMap<Sha256Hex, Engine>,
}

impl TrustedModels {
    /// Hashes and loads every configured model (blocking: call from `spawn_blocking`).
    pub fn load(config: &VerificationConfig) -> Result<Self, VerifyError> {
        let mut engines = HashMap::new();
        for path in &config.models {
            let err = |source| VerifyError::Model {
                path: path.clone(),
                source,
            };
            let sha = tokenfleet_engine::gguf::sha256_file(path).map_err(err)?;
            let sha = Sha256Hex::parse(&sha).map_err(|e| VerifyError::Start(e.to_string()))?;
            let mut ec = EngineConfig::new(path);
            ec.slots = 1;
            ec.ctx_per_slot = config.ctx_tokens;
            ec.threads = config.threads;
            ec.batch_tokens = 512;
            ec.max_waiting = 4;
            let engine = Engine::load(ec).map_err(err)?;
            tracing::info!(path = %path.display(), sha256 = %sha, "verifier trusts model");
            engines.insert(sha, engine);
        }
        Ok(Self { engines })
    }

    pub fn sha256s(&self) -> Vec<String> {
        self.engines.keys().map(Sha256Hex::to_string).collect()
    }
}

/// Everything the manager needs to run verification, prepared by `start`.
pub struct Setup {
    pub config: VerificationConfig,
    pub models: TrustedModels,
    pub reputation: Reputation,
}

/// A finished job to re-score.
#[derive(Debug, Clone)]
pub struct VerifyJob {
    pub job: u64,
    pub model_sha256: Sha256Hex,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub tokens: Vec<i32>,
    pub segments: Vec<Segment>,
    /// The job ended on an end-of-generation token (not a stop string or its length).
    pub ended_on_eog: bool,
}

/// What re-scoring found for one node's segment.
#[derive(Debug, Clone, PartialEq)]
pub enum SegmentResult {
    Greedy(check::Finding),
    /// The segment's sampled evidence, or why it is impossible under honest sampling.
    Sampled(Result<SampledEvidence, String>),
}

/// The verifier's answer for one job.
#[derive(Debug, Clone)]
pub struct Report {
    pub job: u64,
    /// Per segment, or why the job could not be verified (reason label, detail).
    pub results: Result<Vec<(Segment, SegmentResult)>, (&'static str, String)>,
}

/// Verification metrics (`tokenfleet_verification_*`, `tokenfleet_quarantined_nodes`).
pub struct VerifyMetrics {
    /// Segments judged, by result (pass, fail, inconclusive).
    pub checks: IntCounterVec,
    /// Finished jobs not re-scored, by reason (not_sampled, queue_full, unknown_model,
    /// too_long, error).
    pub skipped: IntCounterVec,
    pub queue_depth: IntGauge,
    pub quarantined: IntGauge,
    /// Jobs re-run because a quarantined node produced them, by kind (pending, finished,
    /// failed_stream).
    pub reruns: IntCounterVec,
    pub seconds: Histogram,
}

impl VerifyMetrics {
    pub fn new(metrics: &Metrics) -> Arc<Self> {
        let m = Self {
            checks: IntCounterVec::new(
                Opts::new(
                    "tokenfleet_verification_checks_total",
                    "Node segments of finished jobs re-scored, by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
            skipped: IntCounterVec::new(
                Opts::new(
                    "tokenfleet_verification_skipped_total",
                    "Finished jobs not re-scored, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            queue_depth: IntGauge::new(
                "tokenfleet_verification_queue_depth",
                "Jobs waiting for the verifier",
            )
            .expect("valid metric"),
            quarantined: IntGauge::new(
                "tokenfleet_quarantined_nodes",
                "Nodes quarantined for failing verification",
            )
            .expect("valid metric"),
            reruns: IntCounterVec::new(
                Opts::new(
                    "tokenfleet_verification_reruns_total",
                    "Jobs re-run from scratch because a quarantined node produced them",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tokenfleet_verification_seconds",
                    "Time to re-score one job on the trusted engine",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )
            .expect("valid metric"),
        };
        for c in [
            Box::new(m.checks.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.skipped.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.quarantined.clone()),
            Box::new(m.reruns.clone()),
            Box::new(m.seconds.clone()),
        ] {
            metrics.register(c);
        }
        Arc::new(m)
    }
}

/// The manager's side of the verifier's bounded queue.
pub struct VerifyQueue {
    tx: mpsc::Sender<VerifyJob>,
    metrics: Arc<VerifyMetrics>,
}

impl VerifyQueue {
    /// Hands a job to the verifier without waiting; a full queue drops the check.
    pub fn offer(&self, job: VerifyJob) {
        match self.tx.try_send(job) {
            Ok(()) => self.metrics.queue_depth.inc(),
            Err(mpsc::error::TrySendError::Full(j)) => {
                tracing::warn!(job = j.job, "verification queue full; spot check dropped");
                self.metrics
                    .skipped
                    .with_label_values(&["queue_full"])
                    .inc();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.skipped.with_label_values(&["error"]).inc();
            }
        }
    }
}

/// Starts the verifier task; its reports go to `manager`.
pub fn spawn(
    models: TrustedModels,
    capacity: usize,
    thresholds: Thresholds,
    manager: Manager,
    metrics: Arc<VerifyMetrics>,
) -> (VerifyQueue, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<VerifyJob>(capacity);
    let queue = VerifyQueue {
        tx,
        metrics: Arc::clone(&metrics),
    };
    let task = tokio::spawn(async move {
        while let Some(job) = rx.recv().await {
            metrics.queue_depth.dec();
            let started = Instant::now();
            let report = verify(&models, job, &thresholds).await;
            metrics.seconds.observe(started.elapsed().as_secs_f64());
            if !manager.verified(report).await {
                break;
            }
        }
    });
    (queue, task)
}

/// Re-scores one job and judges each node's segment.
pub async fn verify(models: &TrustedModels, job: VerifyJob, th: &Thresholds) -> Report {
    let id = job.job;
    let fail = |label: &'static str, detail: String| Report {
        job: id,
        results: Err((label, detail)),
    };
    let Some(engine) = models.engines.get(&job.model_sha256) else {
        return fail(
            "unknown_model",
            format!("no trusted model with sha256 {}", job.model_sha256),
        );
    };
    let prompt = match &job.prompt {
        Prompt::Chat(messages) => {
            let messages: Vec<ChatMessage> = messages
                .iter()
                .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                .collect();
            match engine.render_chat(&messages) {
                Ok(text) => engine.tokenize(&text, true),
                Err(e) => return fail("error", e.to_string()),
            }
        }
        Prompt::Text(t) => engine.tokenize(t, true),
    };
    if prompt.len() + job.tokens.len() > engine.info().ctx_per_slot as usize {
        return fail(
            "too_long",
            format!(
                "{} prompt + {} output tokens exceed the verifier's context",
                prompt.len(),
                job.tokens.len()
            ),
        );
    }
    let scores = match engine
        .score(ScoreRequest {
            prompt,
            claimed: job.tokens.clone(),
            sampling: job.sampling.clone(),
        })
        .await
    {
        Ok(s) => s,
        Err(e) => return fail("error", e.to_string()),
    };
    let greedy = job.sampling.is_greedy();
    let results = job
        .segments
        .into_iter()
        .map(|segment| {
            let result = if greedy {
                SegmentResult::Greedy(check::judge_greedy(&scores, &segment, job.ended_on_eog, th))
            } else {
                SegmentResult::Sampled(check::sampled_evidence(
                    &scores,
                    &segment,
                    &job.sampling,
                    th,
                ))
            };
            (segment, result)
        })
        .collect();
    Report {
        job: id,
        results: Ok(results),
    }
}
