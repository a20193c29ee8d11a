//! The manager's side of result verification: offering finished jobs for spot checks,
//! applying the verifier's reports to node reputations, and quarantining a node that fails.
//!
//! Quarantine cuts the node off (a `Drain` with eviction, then its session is closed and any
//! reconnect is refused), and nothing it produced is trusted any more: every live job holding
//! its tokens starts again from scratch on other nodes (a streaming client that already saw
//! some of them gets an error instead, since streamed text cannot be taken back), and its
//! recent finished jobs that were not verified good are re-run so the store holds honest
//! outputs (idempotent retries and batch results read them from there).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenfleet_engine::SamplingParams;
use tokenfleet_protocol::v1;
use tokenfleet_protocol::CoordinatorMsg;
use tonic::Status;

use super::{unix_ms, Manager, State};
use crate::error::ApiError;
use crate::jobs::{Job, JobOutcome, Placement};
use crate::metrics::Metrics;
use crate::model_binding::Sha256Hex;
use crate::reputation::{
    queue_discard_tokens, reopen_for_rerun, RatePolicy, Reputation, Verification as Mark,
};
use crate::store::Store;
use crate::verify::check::{self, Finding, Segment, Thresholds};
use crate::verify::{self, SegmentResult, Setup, VerifyJob, VerifyMetrics, VerifyQueue};

/// Verification state the manager owns.
pub(super) struct Verification {
    queue: VerifyQueue,
    reputation: Reputation,
    rates: RatePolicy,
    thresholds: Thresholds,
    rerun_window: Duration,
    metrics: Arc<VerifyMetrics>,
    store: Store,
    _task: tokio::task::JoinHandle<()>,
}

impl Verification {
    pub(super) fn start(setup: Setup, store: Store, metrics: &Metrics, manager: Manager) -> Self {
        let metrics = VerifyMetrics::new(metrics);
        metrics
            .quarantined
            .set(setup.reputation.quarantined_count() as i64);
        let thresholds = setup.config.thresholds();
        let (queue, task) = verify::spawn(
            setup.models,
            setup.config.queue_capacity,
            thresholds,
            manager,
            Arc::clone(&metrics),
        );
        Self {
            queue,
            reputation: setup.reputation,
            rates: setup.config.rates(),
            thresholds,
            rerun_window: Duration::from_secs(setup.config.rerun_window_s),
            metrics,
            store,
            _task: task,
        }
    }
}

impl State {
    /// Refuses a session from a quarantined node.
    pub(super) fn refuse_quarantined(&self, node: &str) -> Result<(), Status> {
        match &self.verify {
            Some(v) if v.reputation.is_quarantined(node) => Err(Status::permission_denied(
                "this node is quarantined: its outputs failed result verification",
            )),
            _ => Ok(()),
        }
    }

    /// Records who produced a finished job and, when the spot-check draw says so, queues it
    /// for the verifier.
    pub(super) async fn offer_verification(&mut self, job: &Job, finish_reason: &str) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let tokens: Vec<i32> = job.view.borrow().tokens.iter().map(|t| t.id).collect();
        if tokens.is_empty() || job.producers.is_empty() {
            return;
        }
        let mut segments = Vec::with_capacity(job.producers.len());
        for (i, &(node, start)) in job.producers.iter().enumerate() {
            let end = job.producers.get(i + 1).map_or(tokens.len(), |p| p.1);
            let Some(n) = self.nodes.get(&node) else {
                continue;
            };
            segments.push(Segment {
                node: n.name.clone(),
                start,
                end,
            });
        }
        let names: Vec<String> = segments
            .iter()
            .map(|s| s.node.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        v.reputation
            .record_producers(job.id, names.clone(), unix_ms())
            .await;
        let rate = names
            .iter()
            .map(|n| v.rates.rate(v.reputation.get(n)))
            .fold(0.0, f64::max);
        if rand::random::<f64>() >= rate {
            v.metrics.skipped.with_label_values(&["not_sampled"]).inc();
            return;
        }
        // Every producer must claim the same model file; its sha256 picks the trusted engine.
        let shas: HashSet<Option<Sha256Hex>> = job
            .producers
            .iter()
            .map(|(node, _)| {
                self.nodes.get(node).and_then(|n| {
                    n.hello
                        .models
                        .iter()
                        .find(|m| m.name == job.request.model)
                        .and_then(|m| Sha256Hex::parse(&m.sha256).ok())
                })
            })
            .collect();
        let sha = match shas.into_iter().collect::<Vec<_>>().as_slice() {
            [Some(sha)] => sha.clone(),
            _ => {
                v.metrics
                    .skipped
                    .with_label_values(&["unknown_model"])
                    .inc();
                return;
            }
        };
        let r = &job.request;
        v.queue.offer(VerifyJob {
            job: job.id,
            model_sha256: sha,
            prompt: r.prompt.clone(),
            sampling: SamplingParams {
                temperature: r.sampling.temperature,
                top_p: r.sampling.top_p,
                top_k: 0,
                seed: r.sampling.seed,
            },
            ended_on_eog: finish_reason == "stop"
                && r.stop.is_empty()
                && (tokens.len() as u32) < r.max_tokens,
            tokens,
            segments,
        });
    }

    /// Applies the verifier's report to each node's reputation.
    pub(super) async fn on_verified(&mut self, report: verify::Report) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let results = match report.results {
            Ok(results) => results,
            Err((label, detail)) => {
                tracing::warn!(job = report.job, reason = label, %detail, "job could not be verified");
                v.metrics.skipped.with_label_values(&[label]).inc();
                return;
            }
        };
        let now = unix_ms();
        let mut failed = Vec::new();
        for (segment, result) in results {
            let node = segment.node.as_str();
            let finding = match result {
                SegmentResult::Greedy(f) => f,
                SegmentResult::Sampled(Err(why)) => Finding::Fail(why),
                SegmentResult::Sampled(Ok(delta)) => {
                    let th = v.thresholds;
                    let mut finding = Finding::Pass;
                    v.reputation
                        .update(node, now, |r| {
                            r.sampled.add(&delta);
                            finding = check::test_sampled(&mut r.sampled, &th);
                        })
                        .await;
                    finding
                }
            };
            let (label, mark) = match &finding {
                Finding::Pass => ("pass", Mark::Passed),
                Finding::Inconclusive(_) => ("inconclusive", Mark::Inconclusive),
                Finding::Fail(_) => ("fail", Mark::Failed),
            };
            v.metrics.checks.with_label_values(&[label]).inc();
            v.reputation.mark(report.job, node, mark).await;
            match finding {
                Finding::Pass => {
                    v.reputation.update(node, now, |r| r.passed += 1).await;
                    tracing::debug!(node, job = report.job, "spot check passed");
                }
                Finding::Inconclusive(why) => {
                    v.reputation
                        .update(node, now, |r| r.inconclusive += 1)
                        .await;
                    tracing::debug!(node, job = report.job, %why, "spot check inconclusive");
                }
                Finding::Fail(why) => failed.push((segment.node, why)),
            }
        }
        for (node, why) in failed {
            self.quarantine(&node, why, report.job).await;
        }
    }

    /// Takes a node out of the fleet for good and re-runs what it produced.
    async fn quarantine(&mut self, name: &str, reason: String, failed_job: u64) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        if v.reputation.is_quarantined(name) {
            return;
        }
        let now = unix_ms();
        tracing::error!(node = name, job = failed_job, %reason, "node failed result verification; quarantined");
        let why = reason.clone();
        v.reputation
            .update(name, now, |r| r.quarantined = Some((now, why)))
            .await;
        v.metrics
            .quarantined
            .set(v.reputation.quarantined_count() as i64);
        let since = now.saturating_sub(v.rerun_window.as_millis() as u64);
        let suspect = v.reputation.suspect_jobs(name, since).await;
        let store = v.store.clone();
        let reruns = v.metrics.reruns.clone();

        // 1. Cut it off: evict its work, close its session (reconnects are refused).
        let node_id = self.node_names.get(name).copied();
        if let Some(id) = node_id {
            if let Some(node) = self.nodes.get_mut(&id) {
                node.send(CoordinatorMsg::Drain(v1::Drain {
                    reason: format!("quarantined: {reason}"),
                    evict: true,
                }));
                self.close_session(id);
                self.scheduler.remove_node(id);
                self.dirty_nodes.remove(&id);
                self.node_gauges_dirty = true;
            }
            // 2. Every live job holding its tokens starts again from scratch elsewhere.
            let live: Vec<u64> = self
                .jobs
                .values()
                .filter(|j| {
                    j.placement == (Placement::Running { node: id })
                        || j.producers.iter().any(|p| p.0 == id)
                })
                .map(|j| j.id)
                .collect();
            for job in live {
                self.restart_from_scratch(job, &store, &reruns).await;
            }
        }

        // 3. Its recent finished work that was not verified good runs again.
        let mut finished = match suspect {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(node = name, cause = %e, "cannot list a quarantined node's recent jobs");
                Vec::new()
            }
        };
        finished.push(failed_job);
        finished.sort_unstable();
        finished.dedup();
        for job in finished {
            if self.jobs.contains_key(&job) {
                continue;
            }
            match reopen_for_rerun(&store, job).await {
                Ok(Some(stored)) => {
                    tracing::info!(
                        node = name,
                        job,
                        "re-running a finished job of a quarantined node"
                    );
                    reruns.with_label_values(&["finished"]).inc();
                    self.recover(stored);
                    self.wants_dispatch = true;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(node = name, job, cause = %e, "cannot re-open a job for re-run")
                }
            }
        }
    }

    /// Discards a live job's tokens and queues it again from its prompt. A streaming client
    /// that already received tokens gets an error (a retry runs the request afresh).
    async fn restart_from_scratch(
        &mut self,
        id: u64,
        store: &Store,
        reruns: &prometheus::IntCounterVec,
    ) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if let Placement::Running { node } = job.placement {
            if let Some(n) = self.nodes.get(&node) {
                n.send(CoordinatorMsg::Cancel(v1::Cancel {
                    job_id: id.to_string(),
                    reason: "restarting: a node that produced it failed verification".into(),
                    // Nothing of a liar's is kept: the job restarts from scratch.
                    hand_back: false,
                }));
            }
            self.detach(id, node);
        }
        let job = self.jobs.get_mut(&id).expect("checked above");
        if job.request.stream && job.generated() > 0 {
            reruns.with_label_values(&["failed_stream"]).inc();
            let err = ApiError::unavailable(
                "a vehicle that produced part of this streamed answer failed result \
                 verification; retry the request",
            );
            self.end(id, JobOutcome::Failed(err)).await;
            return;
        }
        job.view.send_modify(|v| {
            v.tokens.clear();
            v.restarts += 1;
        });
        job.persisted = 0;
        job.producers.clear();
        job.first_token_seen = false;
        job.placement = Placement::Queued {
            since: Instant::now(),
        };
        queue_discard_tokens(store, id).await;
        reruns.with_label_values(&["pending"]).inc();
        tracing::info!(
            job = id,
            "job restarted from scratch after its node was quarantined"
        );
        self.queue.insert(id, ());
        self.wants_dispatch = true;
    }
}
