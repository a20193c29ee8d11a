//! Dispatch: the scheduler over the fleet view and the queue, then `Assign`s (and hand-back
//! preemptions) sent over node sessions; queue and node gauges.

use std::collections::HashMap;

use tokenfleet_protocol::v1::{self, CoordinatorMessage};
use tokenfleet_protocol::CoordinatorMsg;
use tokenfleet_scheduler::{JobClass, JobId, NodeId, QueuedJob};

use super::State;
use crate::clock::unix_ms;
use crate::domain::job::Placement;

impl State {
    /// Puts a job in the queue in the scheduler's terms (what the scheduler reads does not
    /// change while it waits). Called once the job is in `jobs` and its tokens are final.
    pub(super) fn enqueue(&mut self, id: u64) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let now_ms = unix_ms();
        let enqueued_at = match job.placement {
            Placement::Queued { since } => {
                now_ms.saturating_sub(since.elapsed().as_millis() as u64)
            }
            _ => now_ms,
        };
        self.queue.insert(QueuedJob {
            id: JobId(job.id),
            class: job.request.class,
            model: job.request.model.clone(),
            prompt_tokens: job.view.borrow().prompt_tokens.max(1),
            max_tokens: job.request.max_tokens,
            generated_tokens: job.generated() as u32,
            deadline: job.request.deadline_ms,
            residency: job.request.residency.clone(),
            tenant: job.tenant.clone(),
            sensitive: job.request.sensitive,
            enqueued_at,
            running_on: None,
        });
    }

    pub(super) fn update_gauges(&mut self) {
        self.metrics
            .queue_depth
            .with_label_values(&["interactive"])
            .set(self.queue.depth(JobClass::Interactive) as i64);
        self.metrics
            .queue_depth
            .with_label_values(&["batch"])
            .set(self.queue.depth(JobClass::Batch) as i64);
        if !std::mem::take(&mut self.node_gauges_dirty) {
            return;
        }
        let mut by_state: HashMap<&'static str, i64> = HashMap::new();
        for n in self.nodes.values().filter(|n| n.connected()) {
            *by_state.entry(n.governor_label()).or_default() += 1;
        }
        for state in crate::fleet::nodes::GOVERNOR_LABELS {
            self.metrics
                .nodes
                .with_label_values(&[state])
                .set(by_state.get(state).copied().unwrap_or(0));
        }
    }

    pub(super) async fn dispatch(&mut self) {
        self.wants_dispatch = false;
        if self.queue.is_empty() {
            return;
        }
        let now_ms = unix_ms();
        let dirty: Vec<NodeId> = self.dirty_nodes.drain().collect();
        for id in dirty {
            if let Some(n) = self.nodes.get(&id) {
                if n.connected() {
                    let mut view = n.view(now_ms);
                    view.running_batch = self.running_batch(n);
                    // Without verification every vehicle stands equal (1.0).
                    view.reputation = self
                        .verify
                        .as_ref()
                        .map_or(1.0, |v| v.reputation.score(&n.name));
                    self.scheduler.upsert_node(view);
                }
            }
        }
        let decisions = self.scheduler.decide(now_ms, self.queue.as_scheduled());
        for p in decisions.preemptions {
            self.preempt(p.job.0, p.node);
        }
        for a in decisions.assignments {
            self.assign(a.job.0, a.node);
        }
        // A request no node could ever serve (e.g. no vehicle in its residency region)
        // waits for the queue timeout rather than failing at once: vehicles come and go.
        for r in decisions.rejections {
            tracing::debug!(job = r.job.0, reason = %r.reason, "scheduler could not place job yet");
        }
    }

    pub(super) fn assign(&mut self, id: u64, node_id: NodeId) {
        let Some(node) = self.nodes.get_mut(&node_id) else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let Placement::Queued { since } = job.placement else {
            return;
        };
        let resume: Vec<i32> = job.view.borrow().tokens.iter().map(|t| t.id).collect();
        let r = &job.request;
        let prompt = match &r.prompt {
            crate::domain::request::Prompt::Chat(msgs) => {
                v1::assign::Prompt::Chat(v1::ChatMessages {
                    messages: msgs
                        .iter()
                        .map(|m| v1::ChatMessage {
                            role: m.role.clone(),
                            content: m.content.clone(),
                        })
                        .collect(),
                })
            }
            crate::domain::request::Prompt::Text(t) => v1::assign::Prompt::Text(t.clone()),
        };
        let msg = CoordinatorMessage::new(CoordinatorMsg::Assign(v1::Assign {
            job_id: id.to_string(),
            lease_deadline_unix_ms: unix_ms() + self.config.lease_timeout.as_millis() as u64,
            model: r.model.clone(),
            prompt: Some(prompt),
            sampling: Some({
                let s = crate::domain::job::engine_sampling(r);
                v1::Sampling {
                    temperature: s.temperature,
                    top_p: s.top_p,
                    top_k: s.top_k,
                    seed: s.seed,
                }
            }),
            // The manager never keeps more than max_tokens (node_events caps chunks), but a
            // stored job is not to be trusted blindly either.
            max_tokens: r.max_tokens.saturating_sub(resume.len() as u32),
            resume_token_ids: resume,
            stop: r.stop.clone(),
            logprobs: r.logprobs,
            top_logprobs: r.top_logprobs as u32,
            ignore_eos: r.ignore_eos,
            interactive: r.class == JobClass::Interactive,
        }));
        if !node.try_send(msg) {
            tracing::warn!(node = %node.name, job = id, "node session is full or closed; job stays queued");
            self.dirty_nodes.insert(node_id);
            return;
        }
        self.metrics
            .dispatch_latency
            .observe(since.elapsed().as_secs_f64());
        job.placement = Placement::Running { node: node_id };
        node.jobs.insert(id);
        self.queue.remove(id);
        self.dirty_nodes.insert(node_id);
    }
}
