//! The manager's side of result verification: offering finished jobs for spot checks,
//! applying the verifier's verdicts to node reputations, and taking a node out of the fleet
//! when its output is proven wrong - within the circuit breaker's limit.
//!
//! Evidence comes from two places: the verifier's confirmed verdicts (statistical, see
//! `verify::check`), and the manager itself when a node's output is inconsistent on its face
//! (texts that are not the detokenization of their ids, tokens past `max_tokens` or past a
//! stop string, a finish reason the tokens contradict: `forged_output`).
//!
//! Quarantine cuts the node off (a `Drain` with eviction, then its session is closed and any
//! reconnect is refused), and nothing it produced is trusted any more: every live job holding
//! its tokens starts again from scratch on other nodes (a streaming client that already saw
//! some of them gets an error instead, since streamed text cannot be taken back), and its
//! recent finished jobs that were not verified good are re-run so the store holds honest
//! outputs (idempotent retries and batch results read them from there).
//!
//! The circuit breaker: within `breaker_window_s` the verifier quarantines at most
//! `breaker_max_share` of the live fleet (at least one node). A failure beyond that is *held*:
//! the node keeps serving with every job checked, an ERROR names it, and an operator decides
//! (`tokenfleet fleet quarantine confirm|release`). A verifier that is wrong about everyone
//! (a miscalibrated threshold, a bad trusted copy) thus costs one node, not the fleet.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokenfleet_engine::TokenTable;
use tokenfleet_protocol::v1;
use tokenfleet_protocol::CoordinatorMsg;
use tokenfleet_scheduler::NodeId;
use tokio::sync::mpsc;

use super::{NodeRefusal, State};
use crate::clock::unix_ms;
use crate::config::models::Sha256Hex;
use crate::domain::error::RequestError;
use crate::domain::job::{engine_sampling, Job, JobOutcome, Placement};
use crate::domain::store::Store;
use crate::metrics::Metrics;
use crate::trust::reputation::{
    queue_discard_tokens, reopen_for_rerun, OperatorState, RatePolicy, Reputation,
    Verification as Mark,
};
use crate::trust::verify::check::Segment;
use crate::trust::verify::{self, Setup, Verdict, VerifyJob, VerifyMetrics, VerifyQueue};

/// How often the manager reads operator decisions (quarantine release / confirm) from the
/// store, as revocations are polled.
const OPERATOR_POLL: Duration = Duration::from_secs(2);

/// Verification state the manager owns.
pub(super) struct Verification {
    queue: VerifyQueue,
    pub(super) reputation: Reputation,
    rates: RatePolicy,
    rerun_window: Duration,
    metrics: Arc<VerifyMetrics>,
    store: Store,
    /// Model name -> token table of the trusted copy (the coordinator's own text release).
    pub(super) token_tables: HashMap<String, Arc<TokenTable>>,
    /// Model name -> sha256 of the trusted copy: a job of that model is judged against it,
    /// whatever hash its nodes claim (a claim cannot opt a job out of verification).
    trusted_names: HashMap<String, Sha256Hex>,
    breaker_max_share: f64,
    breaker_window: Duration,
    /// When the verifier quarantined nodes within the breaker's window (unix ms).
    recent_quarantines: VecDeque<u64>,
    last_operator_poll: Instant,
    _task: tokio::task::JoinHandle<()>,
}

impl Verification {
    pub(super) fn start(
        setup: Setup,
        store: Store,
        metrics: &Metrics,
        reports: mpsc::Sender<verify::Report>,
    ) -> Self {
        let metrics = VerifyMetrics::new(metrics);
        metrics
            .quarantined
            .set(setup.reputation.quarantined_count() as i64);
        metrics.held.set(setup.reputation.held_count() as i64);
        let token_tables = setup.models.token_tables();
        let trusted_names = token_tables
            .keys()
            .filter_map(|name| Some((name.clone(), setup.models.sha256_of(name)?.clone())))
            .collect();
        let (queue, task) = verify::spawn(
            setup.models,
            setup.config.queue_capacity,
            setup.thresholds,
            setup.config.confirm,
            reports,
            Arc::clone(&metrics),
        );
        Self {
            queue,
            reputation: setup.reputation,
            rates: setup.config.rates(),
            rerun_window: Duration::from_secs(setup.config.rerun_window_s),
            metrics,
            store,
            token_tables,
            trusted_names,
            breaker_max_share: setup.config.breaker_max_share,
            breaker_window: Duration::from_secs(setup.config.breaker_window_s),
            recent_quarantines: VecDeque::new(),
            last_operator_poll: Instant::now(),
            _task: task,
        }
    }
}

impl State {
    /// Refuses a session from a quarantined node.
    pub(super) fn refuse_quarantined(&self, node: &str) -> Result<(), NodeRefusal> {
        match &self.verify {
            Some(v) if v.reputation.is_quarantined(node) => Err(NodeRefusal::Quarantined),
            _ => Ok(()),
        }
    }

    /// Records who produced a finished job and, when the spot-check draw says so (always for
    /// a job that ended without a token: cheap to check, and the cheapest lie), queues it for
    /// the verifier.
    pub(super) async fn offer_verification(&mut self, job: &Job, finish_reason: &str) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let (tokens, logprobs): (Vec<i32>, Vec<f32>) = job
            .view
            .borrow()
            .tokens
            .iter()
            .map(|t| (t.id, t.logprob))
            .unzip();
        if job.producers.is_empty() {
            return; // recovered after a restart with no new producer: nobody to judge
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
        let rate = if tokens.is_empty() {
            1.0
        } else {
            names
                .iter()
                .map(|n| v.rates.rate(v.reputation.get(n)))
                .fold(0.0, f64::max)
        };
        if rand::random::<f64>() >= rate {
            v.metrics.skipped.with_label_values(&["not_sampled"]).inc();
            return;
        }
        // The trusted copy of the job's model, when the coordinator has one by that name;
        // otherwise every producer must claim the same model file, and its sha256 picks it.
        let trusted = v.trusted_names.get(&job.request.model).cloned();
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
        let sha = match (trusted, shas.into_iter().collect::<Vec<_>>().as_slice()) {
            (Some(sha), _) => sha,
            (None, [Some(sha)]) => sha.clone(),
            _ => {
                v.metrics
                    .skipped
                    .with_label_values(&["unknown_model"])
                    .inc();
                return;
            }
        };
        let r = &job.request;
        // Ended on an end-of-generation token: a `stop` that no stop string explains.
        let stopped_by_string = match &job.text {
            Some(text) => text.stopped(),
            // Without the coordinator's own release it cannot tell; a stop string may have
            // ended it, so the end is not judged.
            None => !r.stop.is_empty(),
        };
        v.queue.offer(VerifyJob {
            job: job.id,
            model_sha256: sha,
            prompt: r.prompt.clone(),
            sampling: engine_sampling(r),
            ended_on_eog: finish_reason == "stop" && !stopped_by_string,
            tokens,
            logprobs,
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
        for (segment, verdict) in results {
            let node = segment.node.as_str();
            let (label, mark) = match &verdict {
                Verdict::Pass | Verdict::FalseAlarm(_) => ("pass", Mark::Passed),
                Verdict::Inconclusive(_) => ("inconclusive", Mark::Inconclusive),
                Verdict::Fail(_) => ("fail", Mark::Failed),
            };
            v.metrics.checks.with_label_values(&[label]).inc();
            v.reputation.mark(report.job, node, mark).await;
            // Its reputation changes below: the scheduler sees it at the next dispatch.
            if let Some(&id) = self.node_names.get(node) {
                self.dirty_nodes.insert(id);
            }
            match verdict {
                Verdict::Pass => {
                    v.reputation.update(node, now, |r| r.passed += 1).await;
                    tracing::debug!(node, job = report.job, "spot check passed");
                }
                Verdict::FalseAlarm(why) => {
                    v.metrics.false_alarms.with_label_values(&["cleared"]).inc();
                    v.reputation.update(node, now, |r| r.passed += 1).await;
                    tracing::warn!(node, job = report.job, %why,
                        "a spot check failed on the fast re-score but the token-by-token re-score cleared it: \
                         the verifier was wrong, not the node (node kept; if this repeats, recalibrate with \
                         `tokenfleet verify calibrate`)");
                }
                Verdict::Inconclusive(why) => {
                    v.reputation
                        .update(node, now, |r| r.inconclusive += 1)
                        .await;
                    tracing::debug!(node, job = report.job, %why, "spot check inconclusive");
                }
                Verdict::Fail(why) => failed.push((segment.node, why)),
            }
        }
        for (node, why) in failed {
            self.quarantine_or_hold(&node, why, report.job).await;
        }
    }

    /// A node's output is inconsistent on its face (see the module doc): no statistics
    /// needed, but it goes through the same circuit breaker as a failed spot check.
    pub(super) async fn forged_output(&mut self, node: NodeId, job: u64, why: String) {
        self.metrics.forged_outputs.inc();
        let Some(name) = self.nodes.get(&node).map(|n| n.name.clone()) else {
            return;
        };
        tracing::error!(node = %name, job, %why, "node sent output inconsistent with its own tokens");
        if self.verify.is_some() {
            self.quarantine_or_hold(&name, format!("forged output: {why}"), job)
                .await;
        }
    }

    /// Requeues a job a node was detached from, unless quarantining that node already moved
    /// or ended it.
    pub(super) async fn requeue_if_live(&mut self, id: u64, from: NodeId) {
        if self
            .jobs
            .get(&id)
            .is_some_and(|j| !matches!(j.placement, Placement::Queued { .. } | Placement::Ended))
        {
            self.requeue(id, from).await;
        }
    }

    /// Quarantines a node proven wrong, unless the circuit breaker says the verifier has
    /// already taken out as many nodes as it may without an operator.
    async fn quarantine_or_hold(&mut self, name: &str, reason: String, failed_job: u64) {
        let live = self.nodes.values().filter(|n| n.sender.is_some()).count();
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        if v.reputation.is_quarantined(name) || v.reputation.is_held(name) {
            return;
        }
        let now = unix_ms();
        let window_ms = v.breaker_window.as_millis() as u64;
        while v
            .recent_quarantines
            .front()
            .is_some_and(|&t| t + window_ms < now)
        {
            v.recent_quarantines.pop_front();
        }
        let allowed = ((v.breaker_max_share * live as f64).floor() as usize).max(1);
        if v.recent_quarantines.len() >= allowed {
            let why = reason.clone();
            v.reputation
                .update(name, now, |r| r.held = Some((now, why)))
                .await;
            v.metrics.held.set(v.reputation.held_count() as i64);
            tracing::error!(
                node = name,
                job = failed_job,
                %reason,
                quarantined_recently = v.recent_quarantines.len(),
                live,
                "node failed result verification, but the circuit breaker holds it for an operator \
                 (the verifier already quarantined its share of the live fleet in this window); it keeps \
                 serving with every job checked: `tokenfleet fleet quarantine confirm --node-id {name}` \
                 or `release`"
            );
            return;
        }
        v.recent_quarantines.push_back(now);
        self.quarantine(name, reason, Some(failed_job)).await;
    }

    /// Reads operator decisions from the store (at most every [`OPERATOR_POLL`]): a held node
    /// confirmed is quarantined; a released node may reconnect and is judged afresh.
    pub(super) async fn poll_operator(&mut self) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        if v.last_operator_poll.elapsed() < OPERATOR_POLL {
            return;
        }
        v.last_operator_poll = Instant::now();
        let states = match v.reputation.operator_states().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(cause = %e, "cannot read quarantine decisions from the store");
                return;
            }
        };
        let mut confirmed = Vec::new();
        for OperatorState {
            node,
            quarantined,
            held,
        } in states
        {
            let was_quarantined = v.reputation.is_quarantined(&node);
            if was_quarantined && quarantined.is_none() {
                tracing::info!(node = %node, "released from quarantine by an operator");
            }
            if quarantined.is_some() && !was_quarantined {
                confirmed.push((node.clone(), quarantined.clone()));
            }
            v.reputation.set_operator_state(&node, quarantined, held);
        }
        v.metrics
            .quarantined
            .set(v.reputation.quarantined_count() as i64);
        v.metrics.held.set(v.reputation.held_count() as i64);
        for (node, q) in confirmed {
            let reason = q.map(|q| q.1).unwrap_or_default();
            tracing::error!(node = %node, %reason, "quarantined by an operator");
            self.cut_off(&node, &reason).await;
        }
    }

    /// Takes a node out of the fleet for good and re-runs what it produced.
    async fn quarantine(&mut self, name: &str, reason: String, failed_job: Option<u64>) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let now = unix_ms();
        tracing::error!(node = name, job = ?failed_job, %reason, "node failed result verification; quarantined");
        let why = reason.clone();
        v.reputation
            .update(name, now, |r| {
                r.quarantined = Some((now, why));
                r.held = None;
            })
            .await;
        v.metrics
            .quarantined
            .set(v.reputation.quarantined_count() as i64);
        v.metrics.held.set(v.reputation.held_count() as i64);
        self.cut_off(name, &reason).await;
        if let Some(job) = failed_job {
            self.rerun_finished(name, &[job]).await;
        }
    }

    /// Evicts a quarantined node's work, closes its session and re-runs what it produced.
    async fn cut_off(&mut self, name: &str, reason: &str) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let since = unix_ms().saturating_sub(v.rerun_window.as_millis() as u64);
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
                        || j.is_handing_back_from(id)
                        || j.producers.iter().any(|p| p.0 == id)
                })
                .map(|j| j.id)
                .collect();
            for job in live {
                self.restart_from_scratch(job, &store, &reruns).await;
            }
        }

        // 3. Its recent finished work that was not verified good runs again.
        let finished = match suspect {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(node = name, cause = %e, "cannot list a quarantined node's recent jobs");
                Vec::new()
            }
        };
        self.rerun_finished(name, &finished).await;
    }

    async fn rerun_finished(&mut self, name: &str, jobs: &[u64]) {
        let Some(v) = self.verify.as_ref() else {
            return;
        };
        let store = v.store.clone();
        let reruns = v.metrics.reruns.clone();
        let mut jobs = jobs.to_vec();
        jobs.sort_unstable();
        jobs.dedup();
        for job in jobs {
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
        // Nothing of a liar's is kept: the job restarts from scratch.
        self.drop_from_node(
            id,
            job.placement,
            "restarting: a node that produced it failed verification",
        );
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.request.stream && job.generated() > 0 {
            reruns.with_label_values(&["failed_stream"]).inc();
            let err = RequestError::unavailable(
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
        if let Some(text) = job.text.as_mut() {
            text.reset();
        }
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
        self.enqueue(id);
        self.wants_dispatch = true;
    }
}
