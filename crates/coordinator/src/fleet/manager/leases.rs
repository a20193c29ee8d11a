//! The periodic tick: persisting acknowledged tokens, taking jobs back from nodes whose lease
//! ran out or that made no progress before a job's deadline (the node loses standing), and
//! failing interactive jobs that waited in the queue past their deadline.
//!
//! A lease only proves that a node talks; the progress deadline proves that it works. Both are
//! judged here from what the coordinator saw (tokens arriving), never from what the node says
//! about itself (slots, speeds, state).

use std::time::Duration;

use tokio::time::Instant;

use tokenfleet_protocol::v1;
use tokenfleet_protocol::CoordinatorMsg;
use tokenfleet_scheduler::{JobClass, NodeId};

use super::State;
use crate::clock::unix_ms;
use crate::domain::error::RequestError;
use crate::domain::job::{Job, JobOutcome, Placement};
use crate::domain::request::Prompt;
use crate::fleet::nodes::JobProgress;

/// Tokens a node must prefill before it owes `job`'s next token: the prompt (its token count
/// once a node reported it, else one token per two characters, an over-estimate for text in
/// any script the test model's BPE splits) and the tokens it resumes from.
fn owed_prefill(job: &Job, at_assign: usize) -> u64 {
    let reported = job.view.borrow().prompt_tokens as u64;
    let prompt = if reported > 0 {
        reported
    } else {
        let chars = match &job.request.prompt {
            Prompt::Chat(msgs) => msgs.iter().map(|m| m.content.chars().count()).sum(),
            Prompt::Text(t) => t.chars().count(),
        };
        (chars as u64).div_ceil(2)
    };
    prompt + at_assign as u64
}

impl State {
    pub(super) async fn on_tick(&mut self) {
        self.flush_tokens().await;
        self.expire_leases().await;
        self.check_progress().await;
        self.expire_hand_backs().await;
        self.fail_stale_queue().await;
        self.update_gauges();
        if !self.queue.is_empty() {
            self.wants_dispatch = true;
        }
    }

    /// A node silent for longer than the lease loses its jobs; they continue elsewhere.
    pub(super) async fn expire_leases(&mut self) {
        let lease = self.config.lease_timeout;
        let silent: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| !n.jobs.is_empty() && n.silent_for() > lease)
            .map(|n| n.id)
            .collect();
        for id in silent {
            let Some(node) = self.nodes.get(&id) else {
                continue;
            };
            tracing::warn!(node = %node.name, jobs = node.jobs.len(), "node silent past its lease; requeueing its jobs");
            let jobs: Vec<u64> = node.jobs.iter().copied().collect();
            // A live but silent session is cut so the agent reconnects and resyncs.
            self.close_session(id);
            self.node_gauges_dirty = true;
            self.scheduler.remove_node(id);
            for job in jobs {
                self.metrics.lease_expiries.inc();
                self.requeue(job, id).await;
            }
        }
    }

    /// The progress deadline and measured throughput (see `config::ProgressConfig`): jobs
    /// with no new token before their deadline move to another node from their last token,
    /// and their node loses standing.
    pub(super) async fn check_progress(&mut self) {
        let now = Instant::now();
        let cfg = self.config.progress.clone();
        let mut stalled: Vec<(NodeId, u64, Duration)> = Vec::new();
        for (&id, node) in self.nodes.iter_mut() {
            let standing = &mut node.standing;
            let dt = standing
                .last_check
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            standing.last_check = Some(now);
            if standing.cooldown_until.is_some_and(|t| now >= t) {
                standing.cooldown_until = None;
                tracing::info!(node = %node.name, "node cool-down over; it gets new work again");
                self.dirty_nodes.insert(id);
            }
            standing.progress.retain(|job, _| node.jobs.contains(job));
            let (mut produced, mut decoding) = (0u64, false);
            for &job_id in &node.jobs {
                let Some(job) = self.jobs.get(&job_id) else {
                    continue;
                };
                let have = job.generated();
                let p = standing.progress.entry(job_id).or_insert(JobProgress {
                    at_assign: have,
                    tokens: have,
                    since: now,
                });
                if have > p.tokens {
                    produced += (have - p.tokens) as u64;
                    p.tokens = have;
                    p.since = now;
                }
                let started = p.tokens > p.at_assign;
                decoding |= started;
                let owed = if started {
                    0
                } else {
                    owed_prefill(job, p.at_assign)
                };
                let silent = now.saturating_duration_since(p.since);
                if silent > cfg.deadline(owed) {
                    stalled.push((id, job_id, silent));
                }
            }
            if decoding {
                standing.busy += dt;
                standing.tokens += produced;
            }
            if standing.busy >= cfg.measure_busy {
                let measured = (standing.tokens as f64 / standing.busy.as_secs_f64()) as f32;
                let claimed = node
                    .hello
                    .hardware
                    .as_ref()
                    .map_or(0.0, |h| h.decode_tps_single);
                let overclaims = measured < claimed * cfg.overclaim_ratio;
                if overclaims && standing.measured_tps.is_none() {
                    if standing.overclaim_warned {
                        tracing::debug!(node = %node.name, claimed_tps = claimed, measured_tps = measured, "node decodes far below its claimed speed again");
                    } else {
                        tracing::warn!(node = %node.name, claimed_tps = claimed, measured_tps = measured, "node decodes far below its claimed speed; scheduling it at the measured one while it does");
                        standing.overclaim_warned = true;
                    }
                    self.metrics.node_speed_overclaims.inc();
                }
                let next = overclaims.then_some(measured);
                if next != standing.measured_tps {
                    standing.measured_tps = next;
                    self.dirty_nodes.insert(id);
                }
                standing.busy = Duration::ZERO;
                standing.tokens = 0;
            }
        }
        for (node, job, silent) in stalled {
            self.stall(node, job, silent, now).await;
        }
    }

    /// Takes `job` from `node`, which made no progress on it in `silent`, and counts the stall.
    async fn stall(&mut self, node: NodeId, job: u64, silent: Duration, now: Instant) {
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        tracing::warn!(node = %n.name, job, silent_s = silent.as_secs_f64(), "no progress before the job's deadline; continuing it elsewhere from its last token");
        n.send(CoordinatorMsg::Cancel(v1::Cancel {
            job_id: job.to_string(),
            reason: "no progress before the deadline".into(),
            hand_back: false,
        }));
        self.metrics.node_stalls.inc();
        let cfg = &self.config.progress;
        let standing = &mut n.standing;
        standing.progress.remove(&job);
        standing.stalls.push_back(now);
        while standing
            .stalls
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > cfg.stall_window)
        {
            standing.stalls.pop_front();
        }
        if standing.stalls.len() >= cfg.stalls_to_cooldown as usize && !standing.cooling_down(now) {
            standing.cooldown_until = Some(now + cfg.cooldown);
            standing.stalls.clear();
            tracing::warn!(node = %n.name, stalls = cfg.stalls_to_cooldown, cooldown_s = cfg.cooldown.as_secs(), "node stalled repeatedly; no new work for its cool-down");
            self.metrics.node_cooldowns.inc();
            self.dirty_nodes.insert(node);
        }
        self.requeue(job, node).await;
    }

    /// Interactive jobs that no vehicle could take within the queue timeout fail with 503
    /// (batch jobs wait for their deadline instead).
    pub(super) async fn fail_stale_queue(&mut self) {
        let timeout = self.config.queue_timeout;
        let now_ms = unix_ms();
        let stale: Vec<(u64, RequestError)> = self
            .queue
            .ids()
            .filter_map(|id| {
                let job = self.jobs.get(&id)?;
                let Placement::Queued { since } = job.placement else {
                    return None;
                };
                if job.request.deadline_ms.is_some_and(|d| d < now_ms) {
                    return Some((
                        id,
                        RequestError::unavailable(
                            "the request's deadline passed before a vehicle could finish it",
                        ),
                    ));
                }
                (job.request.class == JobClass::Interactive && since.elapsed() > timeout).then(
                    || {
                        (
                            id,
                            RequestError::unavailable(format!(
                        "no eligible vehicle could take the request within {} s; retry later",
                        timeout.as_secs()
                    )),
                        )
                    },
                )
            })
            .collect();
        for (id, err) in stale {
            self.metrics
                .rejected
                .with_label_values(&["queue_timeout"])
                .inc();
            self.end(id, JobOutcome::Failed(err)).await;
        }
    }
}
