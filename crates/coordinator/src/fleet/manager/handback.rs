//! Preemption with hand-back: interactive work takes a slot from a batch job without throwing
//! the batch job's work away.
//!
//! The scheduler sees each node's running batch jobs (oldest first) and, when an interactive
//! job finds no free slot, names one to preempt. The manager tells the node to hand it back
//! (`Cancel` with `hand_back`): the agent sends the tokens it has not sent yet, then
//! `JobEvicted`, and the job is queued again to resume from all its tokens. Until then the job
//! is `HandingBack`: its slot already counts as free (the interactive job takes it), its chunks
//! are still taken, and if the node never answers within the lease the job is queued again
//! with the tokens that did arrive.

use tokio::time::Instant;

use tokenfleet_protocol::v1;
use tokenfleet_protocol::CoordinatorMsg;
use tokenfleet_scheduler::{JobClass, JobId, NodeId};

use super::State;
use crate::domain::job::Placement;
use crate::fleet::nodes::Node;

/// The message that asks a node to hand `job` back.
pub(super) fn hand_back_msg(job: u64) -> CoordinatorMsg {
    CoordinatorMsg::Cancel(v1::Cancel {
        job_id: job.to_string(),
        reason: "preempted: interactive priority".into(),
        hand_back: true,
    })
}

impl State {
    /// The batch jobs running on `node`, oldest first (the scheduler preempts from the back).
    pub(super) fn running_batch(&self, node: &Node) -> Vec<JobId> {
        let mut batch: Vec<u64> = node
            .jobs
            .iter()
            .copied()
            .filter(|id| {
                self.jobs
                    .get(id)
                    .is_some_and(|j| j.request.class == JobClass::Batch)
            })
            .collect();
        batch.sort_unstable();
        batch.into_iter().map(JobId).collect()
    }

    /// Asks `node` to hand `job` back; its slot is free for the job the scheduler put there.
    pub(super) fn preempt(&mut self, job: u64, node: NodeId) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if j.placement != (Placement::Running { node }) {
            return;
        }
        j.placement = Placement::HandingBack {
            node,
            since: Instant::now(),
        };
        self.detach(job, node);
        if let Some(n) = self.nodes.get(&node) {
            tracing::debug!(node = %n.name, job, "preempting batch job for interactive work");
            n.send(hand_back_msg(job));
        }
        self.metrics
            .evictions
            .with_label_values(&["preempted"])
            .inc();
    }

    /// Jobs a node was asked to hand back but did not within the lease: queued again with the
    /// tokens that arrived (the rest is regenerated).
    pub(super) async fn expire_hand_backs(&mut self) {
        let lease = self.config.lease_timeout;
        let overdue: Vec<(u64, NodeId)> = self
            .jobs
            .values()
            .filter_map(|j| match j.placement {
                Placement::HandingBack { node, since } if since.elapsed() > lease => {
                    Some((j.id, node))
                }
                _ => None,
            })
            .collect();
        for (job, node) in overdue {
            tracing::warn!(job, node = %node, "no hand-back within the lease; requeueing from the tokens received");
            self.requeue(job, node).await;
        }
    }
}
