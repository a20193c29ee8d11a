//! Result verification: a trusted engine on the coordinator re-scores a fraction of finished
//! jobs, off the request path, and judges whether each node's tokens came from the model it
//! claims to serve.
//!
//! The manager offers a finished job ([`VerifyJob`]) when the spot-check draw for its nodes
//! says so (see [`crate::trust::reputation`] for the adaptive rate). The offer goes into a bounded
//! queue (a full queue drops the check and counts it; clients are never delayed). One task
//! takes jobs from the queue, renders and tokenizes the prompt exactly as an agent does,
//! teacher-forces the claimed tokens through the trusted engine of the model the nodes
//! claimed (keyed by the GGUF's sha256), and sends the manager a [`Report`] per job: a
//! finding per node segment ([`check`]). The manager applies it to the node's reputation and
//! quarantines a node that fails (`manager::verdicts`).
//!
//! A failed check is confirmed before it counts: the trusted engine re-scores the job token by
//! token (the path a generating node takes) and the failure stands only if it holds on both
//! paths; otherwise it is a false alarm, counted and logged, and the node keeps its standing.
//! The verifier task also keeps each node's sliding window of evidence ([`check::NodeWindow`]).
//!
//! Layout: this file (config, trusted models, the verifier task, metrics); [`check`] (the
//! statistical rules, pure); [`calibrate`] (thresholds from honest measurements, pure).

pub mod calibrate;
pub mod check;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use tokenfleet_engine::{
    ChatMessage, Engine, EngineConfig, PromptInput, SamplingParams, ScoreMode, ScoreRequest,
    ScoreResult, TokenTable,
};
use tokio::sync::mpsc;

use crate::config::models::Sha256Hex;
use crate::config::verification::{Thresholds, VerificationConfig};
use crate::domain::request::Prompt;
use crate::metrics::Metrics;
use crate::trust::reputation::{RatePolicy, Reputation};
use check::{Claims, Evidence, Finding, NodeWindow, Segment};

impl VerificationConfig {
    pub fn rates(&self) -> RatePolicy {
        RatePolicy {
            min_rate: self.min_rate(),
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
    /// Model name (the file stem, as agents announce their models) -> sha256.
    names: HashMap<String, Sha256Hex>,
}

impl TrustedModels {
    /// Hashes and loads every configured model (blocking: call from `spawn_blocking`).
    pub fn load(config: &VerificationConfig) -> Result<Self, VerifyError> {
        let mut engines = HashMap::new();
        let mut names = HashMap::new();
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
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            names.insert(name, sha.clone());
            engines.insert(sha, engine);
        }
        Ok(Self { engines, names })
    }

    pub fn sha256s(&self) -> Vec<String> {
        self.engines.keys().map(Sha256Hex::to_string).collect()
    }

    /// Model name (as agents announce it) -> the trusted copy's token table, from which the
    /// coordinator releases the text clients see instead of trusting a node's.
    pub fn token_tables(&self) -> HashMap<String, Arc<TokenTable>> {
        self.names
            .iter()
            .filter_map(|(name, sha)| Some((name.clone(), self.engines.get(sha)?.token_table())))
            .collect()
    }

    /// The sha256 of the trusted copy of the model agents announce as `name`.
    pub fn sha256_of(&self, name: &str) -> Option<&Sha256Hex> {
        self.names.get(name)
    }

    /// The trusted copies' tokenizers by model name, for counting prompt tokens at the edge.
    pub fn prompt_counter(&self) -> PromptCounter {
        PromptCounter {
            engines: self
                .names
                .iter()
                .filter_map(|(name, sha)| Some((name.clone(), self.engines.get(sha)?.clone())))
                .collect(),
        }
    }
}

/// Counts a request's prompt tokens with the coordinator's trusted copy of its model, so that
/// a request no connected vehicle has the context for is refused with a 400 before it is
/// queued. (A vehicle's own refusal is a claim the client never reads; see `node_events`.)
/// Cheap to clone; empty when verification is off, and then nothing is counted.
#[derive(Clone, Default)]
pub struct PromptCounter {
    engines: HashMap<String, Engine>,
}

impl PromptCounter {
    /// The prompt's token count as an agent would tokenize it, on a blocking thread; None when
    /// the coordinator holds no trusted copy of `model`.
    pub async fn count(&self, model: &str, prompt: &Prompt) -> Option<Result<usize, String>> {
        let engine = self.engines.get(model)?;
        Some(prompt_tokens(engine, prompt).await.map(|t| t.len()))
    }
}

/// Everything the manager needs to run verification, prepared by `start`.
pub struct Setup {
    pub config: VerificationConfig,
    pub thresholds: Thresholds,
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
    /// The log-probability reported for each token (what the client was shown).
    pub logprobs: Vec<f32>,
    pub segments: Vec<Segment>,
    /// The job ended on an end-of-generation token (not a stop string or its length).
    pub ended_on_eog: bool,
}

/// The verifier's verdict on one node's segment.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    /// Too little evidence on its own (a short sampled job); it counts in the node's window.
    Inconclusive(String),
    /// Failed, and the failure held on the independent path too.
    Fail(String),
    /// Failed the fast check but not the independent one: the verifier was wrong, not the
    /// node (counted and logged with the statistics, so thresholds can be recalibrated).
    FalseAlarm(String),
}

/// The verifier's answer for one job.
#[derive(Debug, Clone)]
pub struct Report {
    pub job: u64,
    /// Per segment, or why the job could not be verified (reason label, detail).
    pub results: Result<Vec<(Segment, Verdict)>, (&'static str, String)>,
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
    /// Failed fast checks the independent path cleared.
    pub false_alarms: IntCounterVec,
    /// Nodes whose verification failed but the circuit breaker held for an operator.
    pub held: IntGauge,
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
            false_alarms: IntCounterVec::new(
                Opts::new(
                    "tokenfleet_verification_false_alarms_total",
                    "Failed spot checks that the independent re-score cleared, by kind",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            held: IntGauge::new(
                "tokenfleet_verification_held_nodes",
                "Nodes that failed verification and wait for an operator (circuit breaker)",
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
            Box::new(m.false_alarms.clone()),
            Box::new(m.held.clone()),
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

/// Starts the verifier task; its reports go to `reports` (the manager's side reads them). The task owns each node's window
/// of recent evidence (it sees every checked segment, in order).
pub fn spawn(
    models: TrustedModels,
    capacity: usize,
    thresholds: Thresholds,
    confirm: bool,
    reports: mpsc::Sender<Report>,
    metrics: Arc<VerifyMetrics>,
) -> (VerifyQueue, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<VerifyJob>(capacity);
    let queue = VerifyQueue {
        tx,
        metrics: Arc::clone(&metrics),
    };
    let task = tokio::spawn(async move {
        let mut verifier = Verifier {
            models,
            thresholds,
            confirm,
            windows: HashMap::new(),
        };
        while let Some(job) = rx.recv().await {
            metrics.queue_depth.dec();
            let started = Instant::now();
            let report = verifier.verify(job).await;
            metrics.seconds.observe(started.elapsed().as_secs_f64());
            if reports.send(report).await.is_err() {
                break;
            }
        }
    });
    (queue, task)
}

/// The verifier: trusted engines, thresholds and every node's window.
pub struct Verifier {
    pub models: TrustedModels,
    pub thresholds: Thresholds,
    pub confirm: bool,
    pub windows: HashMap<String, NodeWindow>,
}

impl Verifier {
    /// Re-scores one job, judges each node's segment on it and on the node's window, and
    /// confirms any failure on the stepwise path before it becomes a verdict.
    pub async fn verify(&mut self, job: VerifyJob) -> Report {
        let id = job.job;
        let fail = |label: &'static str, detail: String| Report {
            job: id,
            results: Err((label, detail)),
        };
        let Some(engine) = self.models.engines.get(&job.model_sha256).cloned() else {
            return fail(
                "unknown_model",
                format!("no trusted model with sha256 {}", job.model_sha256),
            );
        };
        let prompt = match prompt_tokens(&engine, &job.prompt).await {
            Ok(p) => p,
            Err(e) => return fail("error", e),
        };
        if prompt.len() + job.tokens.len() >= engine.info().ctx_per_slot as usize {
            return fail(
                "too_long",
                format!(
                    "{} prompt + {} output tokens exceed the verifier's context",
                    prompt.len(),
                    job.tokens.len()
                ),
            );
        }
        let score = |mode| {
            engine.score(ScoreRequest {
                prompt: prompt.clone(),
                claimed: job.tokens.clone(),
                sampling: job.sampling.clone(),
                mode,
            })
        };
        let fast = match score(ScoreMode::Prefill).await {
            Ok(s) => s,
            Err(e) => return fail("error", e.to_string()),
        };
        let th = self.thresholds;
        let claims = Claims {
            tokens: &job.tokens,
            logprobs: &job.logprobs,
            ended_on_eog: job.ended_on_eog,
            sampling: &job.sampling,
        };
        let mut stepwise = None;
        let mut results = Vec::with_capacity(job.segments.len());
        for segment in job.segments {
            let window = self.windows.entry(segment.node.clone()).or_default();
            let e = check::evidence(&fast, &segment, &claims, &th);
            let first = first_failure(&e, window, &th);
            let (verdict, kept) = match first {
                None => {
                    let v = match check::judge(&e, &th) {
                        Finding::Inconclusive(why) => Verdict::Inconclusive(why),
                        _ => Verdict::Pass,
                    };
                    (v, e)
                }
                Some(why) if !self.confirm => (Verdict::Fail(why), e),
                Some(why) => {
                    // The independent path: the same job, one token per decode call.
                    if stepwise.is_none() {
                        match score(ScoreMode::Stepwise).await {
                            Ok(s) => stepwise = Some(s),
                            Err(e) => return fail("error", e.to_string()),
                        }
                    }
                    let slow = stepwise.as_ref().expect("scored above");
                    let confirmed =
                        check::evidence(&merge_scores(&fast, slow), &segment, &claims, &th);
                    match first_failure(&confirmed, window, &th) {
                        Some(again) => (
                            Verdict::Fail(format!("{why}; confirmed token by token: {again}")),
                            confirmed,
                        ),
                        None => (Verdict::FalseAlarm(why), confirmed),
                    }
                }
            };
            window.push(&kept, &th);
            results.push((segment, verdict));
        }
        Report {
            job: id,
            results: Ok(results),
        }
    }
}

/// The first failed test of a segment: on its own, then in the node's window.
fn first_failure(e: &Evidence, window: &NodeWindow, th: &Thresholds) -> Option<String> {
    match check::judge(e, th) {
        Finding::Fail(why) => Some(why),
        _ => match window.judge_with(e, th) {
            Finding::Fail(why) => Some(why),
            _ => None,
        },
    }
}

/// Per position, the score that is kinder to the node (the smaller gap below the argmax, and
/// for sampled tokens the higher probability): a token fails the confirmed check only when
/// both paths find it wrong.
pub fn merge_scores(fast: &ScoreResult, slow: &ScoreResult) -> ScoreResult {
    let tokens = fast
        .tokens
        .iter()
        .zip(&slow.tokens)
        .map(|(a, b)| {
            let kinder = match (a.sampled, b.sampled) {
                (Some(sa), Some(sb)) => {
                    if sb.in_support && !sa.in_support {
                        b
                    } else if sa.in_support && !sb.in_support {
                        a
                    } else if (sb.logprob + sb.entropy).abs() < (sa.logprob + sa.entropy).abs() {
                        b
                    } else {
                        a
                    }
                }
                _ if b.gap() < a.gap() => b,
                _ => a,
            };
            kinder.clone()
        })
        .collect();
    let next = if slow.next.argmax_logprob - slow.next.best_eog_logprob
        < fast.next.argmax_logprob - fast.next.best_eog_logprob
    {
        slow.next
    } else {
        fast.next
    };
    ScoreResult { tokens, next }
}

/// A job's prompt tokens, through the same engine functions an agent generates from.
/// Off the async executor.
pub async fn prompt_tokens(engine: &Engine, prompt: &Prompt) -> Result<Vec<i32>, String> {
    let input = match prompt {
        Prompt::Chat(messages) => PromptInput::Chat(
            messages
                .iter()
                .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                .collect(),
        ),
        Prompt::Text(t) => PromptInput::Text(t.clone()),
    };
    engine
        .prompt_tokens_async(input)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenfleet_engine::{NextScore, TokenScore};

    fn token(gap: f32) -> TokenScore {
        TokenScore {
            token: 1,
            logprob: -1.0 - gap,
            rank: u32::from(gap > 0.0),
            argmax: if gap > 0.0 { 0 } else { 1 },
            argmax_logprob: -1.0,
            sampled: None,
        }
    }

    fn scores(gaps: &[f32]) -> ScoreResult {
        ScoreResult {
            tokens: gaps.iter().map(|&g| token(g)).collect(),
            next: NextScore {
                argmax: 0,
                argmax_logprob: 0.0,
                best_eog_logprob: 0.0,
            },
        }
    }

    /// A failure of the fast path that the token-by-token path does not share is a false
    /// alarm: the merged evidence passes. One both paths share stands.
    #[test]
    fn a_failure_stands_only_where_both_paths_find_it() {
        let th = Thresholds::default();
        let greedy = SamplingParams::default();
        let tokens = vec![1; 4];
        let logprobs = vec![-1.0f32; 4];
        let claims = Claims {
            tokens: &tokens,
            logprobs: &logprobs,
            ended_on_eog: false,
            sampling: &greedy,
        };
        let segment = Segment {
            node: "n".into(),
            start: 0,
            end: 4,
        };
        let window = NodeWindow::default();
        // Fast path: token 2 far below the argmax; stepwise: it is the argmax.
        let fast = scores(&[0.0, 0.0, 9.0, 0.0]);
        let slow = scores(&[0.0, 0.0, 0.0, 0.0]);
        let alone = check::evidence(&fast, &segment, &claims, &th);
        assert!(first_failure(&alone, &window, &th).is_some());
        let merged = check::evidence(&merge_scores(&fast, &slow), &segment, &claims, &th);
        assert_eq!(first_failure(&merged, &window, &th), None);
        // Both paths find token 2 wrong: the failure stands.
        let slow_too = scores(&[0.0, 0.0, 8.5, 0.0]);
        let merged = check::evidence(&merge_scores(&fast, &slow_too), &segment, &claims, &th);
        assert!(first_failure(&merged, &window, &th).is_some_and(|w| w.contains("token 2")));
    }
}
